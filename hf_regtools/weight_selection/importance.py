"""Importance of the teacher's channels, neurons, heads and blocks, measured on calibration data.

Beyond the paper (which selects uniformly): the entries of every named axis factor are scored by the mean absolute
activation they carry, as weight subcloning (Samragh et al. 2023, arXiv:2312.09299) and Minitron (Muralidharan et al.
2024, arXiv:2407.14679) do, and every block by its Block Influence, one minus the mean cosine similarity between its
input and output hidden states (ShortGPT, Men et al. 2024, arXiv:2403.03853).

Generic over families: a forward hook on every Linear, Conv2d and transformers `Conv1D` whose weight the family's
axis rules (`ModelFamily.axes`) name adds the mean absolute value of each input feature to the factor(s) of the
weight's input axis, and a hook on every block that the family's `layers` regex locates measures its influence.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from ..adapters import ModelFamily, find_supported_model
from .axes import WeightSelectionError, factor_lengths, top_indices
from .config import DEFAULT_CALIBRATION_SAMPLES
from .layers import block_depths

IMAGE_INPUT = "pixel_values"
NOT_INPUTS = ("labels", "label")


@dataclass
class ImportanceScores:
    """What `importance_scores` measured on a teacher.

    Attributes:
        axes (`dict[str, Tensor]`): the importance of every teacher entry of each axis factor (`"hidden"`, `"mlp3"`,
            `"c1"`, `"heads"`), for `select_weights(mode="importance", scores=...)`.
        block_influence (`dict[str, Tensor]`): for each stage (`""` without stages), the Block Influence of every
            teacher block (ShortGPT): 1 minus the mean cosine similarity of its input and output hidden states.
        samples (`int`): the number of calibration examples seen.
    """

    axes: dict[str, torch.Tensor] = field(default_factory=dict)
    block_influence: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0

    def layers(self, depth: int | Sequence[int] | Mapping[str, int]) -> list[int] | list[list[int]]:
        """The teacher blocks a student of `depth` blocks (per stage) keeps: the most influential ones, in order.

        Args:
            depth (`int`, `Sequence[int]` or `Mapping[str, int]`): the student's blocks, one count per stage for a
                family with stages (or `block_depths` of the student).

        Returns:
            a list of teacher block indices (one list per stage for a family with stages), for `layers=`.
        """
        stages = list(self.block_influence)
        if not stages:
            raise WeightSelectionError("no block influence was measured: the teacher's family locates no blocks")
        if isinstance(depth, Mapping):
            if set(depth) != set(stages):
                raise WeightSelectionError(f"the student has stages {list(depth)}, the teacher {stages}")
            depths = [depth[stage] for stage in stages]
        else:
            depths = [depth] if isinstance(depth, int) else list(depth)
        if len(depths) != len(stages):
            raise WeightSelectionError(f"the teacher has {len(stages)} stages of blocks; give one depth per stage, got "
                                       f"{depths}")
        for stage, count in zip(stages, depths):
            if not 0 < count <= len(self.block_influence[stage]):
                where = f" in stage {stage}" if stage else ""
                raise WeightSelectionError(f"cannot keep {count} of the teacher's {len(self.block_influence[stage])} "
                                           f"blocks{where}")
        chosen = [top_indices(self.block_influence[stage], count).tolist() for stage, count in zip(stages, depths)]
        return chosen if stages != [""] else chosen[0]


def importance_scores(
    teacher: torch.nn.Module,
    calibration_data,
    *,
    batch_size: int = 8,
    num_samples: int | None = DEFAULT_CALIBRATION_SAMPLES,
    device: str | torch.device | None = None,
    block_influence: bool = True,
) -> ImportanceScores:
    """Score the teacher's axis entries and blocks on calibration data.

    The score of an axis factor is the sum, over every Linear / Conv2d / `Conv1D` layer whose weight's input axis
    carries it, of the mean absolute value of each input feature (over examples, tokens and spatial positions; padded
    tokens are left out when the batch has an `attention_mask`). An input axis that is a product of factors
    (`"heads*head_dim"`) is reshaped to its factors and each factor's score sums over the others. So `"hidden"` sums
    the normalized residual-stream inputs of every layer (one ordering for the residual stream, as Minitron's
    embedding-channel importance and weight subcloning), `"mlp{layer}"` scores the MLP neurons by their activation
    (the input of `fc2` / `down_proj`), heads by the attention output (the input of the output projection). The
    teacher is run in eval mode under `torch.no_grad()` and left as it was (mode, weights, device).

    Args:
        teacher (`nn.Module`): the whole teacher, loaded (timm or transformers, possibly wrapped).
        calibration_data: a `datasets.Dataset` whose columns are model inputs (`pixel_values` for image models;
            `input_ids`, and `attention_mask` where there is padding, for text models), or an iterable of batches
            (dicts of such tensors, e.g. a `DataLoader`).
        batch_size (`int`, *optional*, defaults to 8): examples per forward pass (for a `Dataset`).
        num_samples (`int`, *optional*, defaults to 256): examples to use at most; `None` for all.
        device (*optional*): where to run the forward passes; the teacher is moved there and back. Defaults to the
            teacher's device.
        block_influence (`bool`, *optional*, defaults to `True`): also measure every block's Block Influence.

    Raises:
        `WeightSelectionError`: calibration data that does not fit the teacher's inputs (the message names the
            columns expected), or no data.

    Example:

    ```python
    import datasets, timm, torch
    from hf_regtools.weight_selection import importance_scores, select_weights

    teacher = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=32)
    student = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32)
    data = datasets.Dataset.from_dict({"pixel_values": torch.randn(8, 3, 32, 32).numpy()})
    scores = importance_scores(teacher, data)
    select_weights(teacher, student, mode="importance", scores=scores)
    ```
    """
    if batch_size < 1 or (num_samples is not None and num_samples < 1):
        raise WeightSelectionError(f"batch_size ({batch_size}) and num_samples ({num_samples}) must be positive")
    supported = find_supported_model(teacher, role="teacher", technique="weight_selection")
    model, family = supported.module, supported.family
    inputs = _InputSpec.of(model, family.library)
    parameter = next(model.parameters(), None)
    original_device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else original_device
    dtype = parameter.dtype if parameter is not None else torch.float32
    modes = {module: module.training for module in model.modules()}
    recorder = _Recorder(model, family, with_blocks=block_influence)
    try:
        model.to(device).eval()
        with torch.no_grad(), recorder:
            for batch in _batches(calibration_data, inputs, batch_size, num_samples):
                batch = {name: _to(value, device, dtype) for name, value in batch.items()}
                recorder.mask = batch.get("attention_mask")
                inputs.call(model, batch)
                recorder.samples += len(batch[inputs.main])
    finally:
        model.to(original_device)
        for module, training in modes.items():
            module.training = training
    if recorder.samples == 0:
        raise WeightSelectionError("the calibration data is empty; give at least one example")
    return recorder.scores()


@dataclass
class _InputSpec:
    """The inputs a teacher's forward takes: the main one (`pixel_values`, `input_ids`) and optional ones."""

    main: str
    optional: tuple[str, ...]
    positional: bool

    @classmethod
    def of(cls, model: torch.nn.Module, library: str) -> _InputSpec:
        if library == "timm":
            return cls(IMAGE_INPUT, (), positional=True)
        parameters = inspect.signature(model.forward).parameters
        main = getattr(model, "main_input_name", None) or next(iter(parameters))
        named = [name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return cls(main, tuple(name for name in named if name != main and name not in NOT_INPUTS), positional=False)

    def describe(self) -> str:
        extra = f" (and optionally {', '.join(f'`{name}`' for name in self.optional)})" if self.optional else ""
        return f"`{self.main}`{extra}"

    def pick(self, columns: Iterable[str], where: str) -> list[str]:
        columns = list(columns)
        if self.main not in columns:
            raise WeightSelectionError(
                f"{where} has columns {columns}, but the teacher takes {self.describe()}: give calibration data with a "
                f"`{self.main}` column (preprocessed as for the teacher: tokenized text, or images turned into "
                "normalized tensors by the teacher's image processor)")
        return [self.main, *(name for name in self.optional if name in columns)]

    def call(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        if self.positional:
            return model(batch[self.main])
        return model(**batch)


def _batches(data, inputs: _InputSpec, batch_size: int, num_samples: int | None):
    """Batches of the teacher's input columns: slices of a `datasets.Dataset`, or the batches of an iterable."""
    if hasattr(data, "column_names") and hasattr(data, "select"):
        columns = inputs.pick(data.column_names, "the calibration dataset")
        data = data.select_columns(columns).with_format("torch")
        total = len(data) if num_samples is None else min(len(data), num_samples)
        for start in range(0, total, batch_size):
            yield data[start:min(start + batch_size, total)]
        return
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise WeightSelectionError(f"calibration data must be a `datasets.Dataset` or an iterable of batches (dicts "
                                   f"of tensors), got {type(data).__name__}")
    seen = 0
    for batch in data:
        if not isinstance(batch, Mapping):
            raise WeightSelectionError(f"calibration batches must be dicts of tensors with {inputs.describe()}, got "
                                       f"{type(batch).__name__}")
        batch = {name: batch[name] for name in inputs.pick(batch, "a calibration batch")}
        if num_samples is not None:
            if seen >= num_samples:
                return
            batch = {name: value[:num_samples - seen] for name, value in batch.items()}
        seen += len(batch[inputs.main])
        yield batch


def _to(value, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    value = torch.as_tensor(value)
    return value.to(device=device, dtype=dtype if value.is_floating_point() else None)


def _input_axis(module: torch.nn.Module) -> int | None:
    """The weight axis of a layer's input features: 1 for Linear and (ungrouped) Conv2d, 0 for `Conv1D`."""
    if isinstance(module, torch.nn.Linear):
        return 1
    if isinstance(module, torch.nn.Conv2d):
        return 1 if module.groups == 1 else None
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers."):
        return 0
    return None


class _Recorder:
    """Forward hooks that accumulate input magnitudes per named input axis, and the blocks' input/output cosines."""

    def __init__(self, model: torch.nn.Module, family: ModelFamily, *, with_blocks: bool):
        self.model, self.family, self.with_blocks = model, family, with_blocks
        self.mask: torch.Tensor | None = None
        self.samples = 0
        self.sums: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}  # module -> (axis spec, |x| sums, count)
        self.cosines: dict[tuple[str, int], list[torch.Tensor]] = {}  # (stage, block) -> [cosine sum, count]
        keys = list(model.state_dict())
        stages = [int(stage) for stage in block_depths(family.layers, keys) if stage.isdigit()]
        self.last_stage = max(stages) if stages else None
        self.aliases = family.axis_aliases(keys)
        self.factor_sizes = _teacher_factor_sizes(family, model)
        self._stack = ExitStack()

    def __enter__(self):
        for name, module in self.model.named_modules():
            axis = _input_axis(module)
            weight = getattr(module, "weight", None)
            if axis is not None and isinstance(weight, torch.Tensor):
                names = self.family.axis_names(f"{name}.weight", weight.ndim, last_stage=self.last_stage,
                                               aliases=self.aliases)
                if names and names[axis]:
                    self._hook(module, self._layer_hook(name, names[axis], weight.shape[axis]))
            if self.with_blocks and (block := _block_of(self.family.layers, name)) is not None:
                self._hook(module, self._block_hook(block), with_kwargs=True)
        return self

    def __exit__(self, *exc_info):
        self._stack.close()

    def _hook(self, module: torch.nn.Module, hook, *, with_kwargs: bool = False) -> None:
        self._stack.callback(module.register_forward_hook(hook, with_kwargs=with_kwargs).remove)

    def _layer_hook(self, name: str, spec: str, length: int):
        def hook(module, args, output):
            features = args[0].detach()
            is_map = isinstance(module, torch.nn.Conv2d)
            magnitude = (features.movedim(1, -1) if is_map else features).abs().double()
            if magnitude.shape[-1] != length:
                raise WeightSelectionError(f"{name!r} received {magnitude.shape[-1]} input features, its weight has "
                                           f"{length}")
            weights = self._token_weights(magnitude.shape[:-1], magnitude.device, masked=not is_map)
            total = (magnitude * weights[..., None]).reshape(-1, length).sum(0)
            count = weights.sum()
            if name in self.sums:
                _, previous, previous_count = self.sums[name]
                total, count = previous + total, previous_count + count
            self.sums[name] = (spec, total, count)

        return hook

    def _token_weights(self, leading: torch.Size, device: torch.device, *, masked: bool) -> torch.Tensor:
        """1 for every position; 0 for padded tokens when the batch's attention mask is `(batch, tokens)` of a token
        sequence."""
        if masked and self.mask is not None and len(leading) >= 2 and tuple(self.mask.shape) == tuple(leading[:2]):
            weights = self.mask.to(device=device, dtype=torch.float64)
            return weights.reshape(*weights.shape, *([1] * (len(leading) - 2))).expand(leading)
        return torch.ones(leading, dtype=torch.float64, device=device)

    def _block_hook(self, block: tuple[str, int]):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            after = _first_tensor(output)
            if not isinstance(before, torch.Tensor) or after is None or before.shape != after.shape:
                return
            is_map = before.ndim == 4
            cosine = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=1 if is_map else -1)
            weights = self._token_weights(cosine.shape, cosine.device, masked=not is_map)
            sums = self.cosines.setdefault(block, [torch.zeros((), dtype=torch.float64), torch.zeros(())])
            sums[0] = sums[0] + (cosine * weights).sum().cpu()
            sums[1] = sums[1] + weights.sum().cpu()

        return hook

    def scores(self) -> ImportanceScores:
        axes: dict[str, torch.Tensor] = {}
        for module_name, (spec, total, count) in self.sums.items():
            mean = (total / count).cpu()
            factors = spec.split("*")
            lengths = factor_lengths(factors, len(mean), self.factor_sizes, "teacher", spec, f"{module_name}.weight")
            grid = mean.reshape(lengths)
            for position, factor in enumerate(factors):
                if factor.isdigit():
                    continue
                others = tuple(i for i in range(len(factors)) if i != position)
                score = grid.sum(others) if others else grid
                axes[factor] = axes[factor] + score if factor in axes else score
        influence: dict[str, torch.Tensor] = {}
        for stage in dict.fromkeys(stage for stage, _ in sorted(self.cosines, key=_block_order)):
            blocks = sorted(index for s, index in self.cosines if s == stage)
            influence[stage] = torch.stack([1 - self.cosines[stage, i][0] / self.cosines[stage, i][1]
                                            for i in range(max(blocks) + 1)]).float()
        return ImportanceScores(axes={name: score.float() for name, score in axes.items()},
                                block_influence=influence, samples=self.samples)


def _block_order(block: tuple[str, int]) -> tuple[int, int]:
    stage, index = block
    return (int(stage) if stage.isdigit() else -1, index)


def _block_of(pattern: str | None, module_name: str) -> tuple[str, int] | None:
    """`(stage, index)` when `module_name` is a block the family's `layers` regex locates (the match ends there)."""
    if pattern is None or not module_name:
        return None
    match = re.search(pattern, module_name + ".")
    if match is None or match.end() != len(module_name) + 1:
        return None
    return match.groupdict().get("stage") or "", int(match["layer"])


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return next((value for value in values if isinstance(value, torch.Tensor)), None)


def _teacher_factor_sizes(family: ModelFamily, model: torch.nn.Module) -> dict[str, int]:
    config = getattr(model, "config", None)
    return family.factor_sizes(config) if family.factor_sizes is not None and config is not None else {}


__all__ = ["ImportanceScores", "importance_scores"]
