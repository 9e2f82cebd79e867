"""Weight selection (Xu et al., ICLR 2024): initialize a small model with a subset of a larger one's weights.

Three steps, as in the paper and `OscarXZQ/weight-selection`:

1. *layer selection*: student key `blocks.i` (or `stages.s.blocks.j`) reads the teacher tensor of block `i`, so the
   first N blocks (per stage) of the teacher are used; last-N, evenly spaced and explicit lists are options;
2. *component mapping*: same key name, same role;
3. *element selection*: along every axis the student keeps `d` of the teacher's `D` entries. The family names every
   axis (`ModelFamily.axes`) and one index set is drawn per name, so every tensor sharing a dimension keeps the same
   channels (consistency). With the uniform rule this is the official code's one set per `(D, d)`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from ..adapters import ModelFamily, UnsupportedModelError, detect_family, find_supported_model
from .axes import (IndexPlan, WeightSelectionError, consecutive_indices, random_indices, top_indices,  # noqa: F401
                   uniform_indices)
from .config import QKV_MODES, SKIP_RULES
from .layers import LayerChoice, block_depths, flat_block_depths, flat_teacher_keys, layer_map, teacher_key

if TYPE_CHECKING:
    from .importance import ImportanceScores

SelectionMode = Literal["uniform", "consecutive", "random", "importance"]
QKVMode = Literal["per_chunk", "fused"]
SkipRule = Literal["classifier", "official"] | Callable[[str], bool]


def select_tensor(
    tensor: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    *,
    plan: IndexPlan | None = None,
    qkv_chunks: int = 1,
    fixed_axes: tuple[int, ...] = (),
    axes: tuple[str | None, ...] | None = None,
    name: str = "tensor",
) -> torch.Tensor:
    """Select a sub-tensor of `shape` from `tensor`, axis by axis.

    Args:
        tensor (`torch.Tensor`): the teacher tensor.
        shape (`tuple[int, ...]`): the student shape; same number of axes, none longer than the teacher's.
        plan (`IndexPlan`, *optional*): index sets to use; a fresh uniform plan by default.
        qkv_chunks (`int`, *optional*, defaults to 1): with 3, axis 0 holds q, k and v stacked and each chunk is
            selected on its own (`qkv_mode="per_chunk"`).
        fixed_axes (`tuple[int, ...]`, *optional*): axes that must have the same length in both (kernel sizes,
            positional-embedding tokens).
        axes (`tuple`, *optional*): the name of every axis (`ModelFamily.axes`): `None` for an axis that must have the
            same length in both, `""` for an unnamed one (one index set per `(D, d)`), else the axis's factor names
            (`"hidden"`, `"3*hidden"`); replaces `qkv_chunks` and `fixed_axes`.
        name (`str`, *optional*): the tensor's key, used in error messages.
    """
    plan = plan or IndexPlan()
    shape = tuple(shape)
    if axes is not None:
        if len(axes) != len(shape):
            raise WeightSelectionError(f"{name!r}: {len(axes)} axis names for {len(shape)} axes")
        fixed_axes, qkv_chunks = tuple(axis for axis, names in enumerate(axes) if names is None), 1
    if tensor.ndim != len(shape):
        raise WeightSelectionError(f"{name!r}: teacher has {tensor.ndim} axes {tuple(tensor.shape)}, student {len(shape)} {shape}")
    for axis, (teacher_dim, student_dim) in enumerate(zip(tensor.shape, shape)):
        if student_dim > teacher_dim:
            raise WeightSelectionError(
                f"{name!r}: the student is larger than the teacher on axis {axis} ({student_dim} > {teacher_dim}; "
                f"student {shape}, teacher {tuple(tensor.shape)}). Weight selection needs a student no wider and no "
                "deeper than its teacher: reduce the student's hidden size, MLP width or heads."
            )
        if axis in fixed_axes and student_dim != teacher_dim:
            raise WeightSelectionError(
                f"{name!r}: axis {axis} must be equal in teacher and student (teacher {tuple(tensor.shape)}, "
                f"student {shape}): build the student with the teacher's patch size, kernel size and image size."
            )
    for axis, (teacher_dim, student_dim) in enumerate(zip(tensor.shape, shape)):
        if teacher_dim == student_dim:
            continue
        if axes is not None and axes[axis]:
            index = plan.axis(axes[axis], teacher_dim, student_dim, key=name)
        elif axis == 0 and qkv_chunks > 1:
            if teacher_dim % qkv_chunks or student_dim % qkv_chunks:
                raise WeightSelectionError(f"{name!r}: axis 0 ({teacher_dim} -> {student_dim}) is not {qkv_chunks} equal chunks")
            chunk = plan(teacher_dim // qkv_chunks, student_dim // qkv_chunks)
            index = torch.cat([chunk + i * (teacher_dim // qkv_chunks) for i in range(qkv_chunks)])
        else:
            index = plan(teacher_dim, student_dim)
        tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


@dataclass
class SelectionReport:
    """What `select_weights` did.

    Attributes:
        family (`str`): e.g. `"timm vit"`.
        loaded (`list[str]`): student keys initialized from the teacher.
        skipped (`dict[str, str]`): student keys left at their initialization, with the reason.
        teacher_unused (`list[str]`): teacher keys never read (deeper blocks, heads, pooler ...).
        index_sets (`dict`): the index set of each axis factor name (`"hidden"`, `"mlp3"`, `"c1"`), and of each
            `(D, d)` for axes no rule of the family names.
        settings (`dict`): the selection settings, as recorded in model cards.
        layer_map (`dict[str, list[int]]`): for each stage (`""` without stages), the teacher block each student
            block reads.
        axes (`dict[str, tuple]`): the axis names of each selected student key (see `ModelFamily.axes`).
        sources (`dict[str, str]`): the teacher key each selected student key was read from.
    """

    family: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    teacher_unused: list[str] = field(default_factory=list)
    index_sets: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    layer_map: dict[str, list[int]] = field(default_factory=dict)
    axes: dict[str, tuple] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"weight selection ({self.family}): {len(self.loaded)} tensors selected, {len(self.skipped)} kept "
                f"their initialization ({', '.join(sorted(self.skipped)) or 'none'})")


def select_weights(
    teacher: torch.nn.Module | Mapping[str, torch.Tensor],
    student: torch.nn.Module | MutableMapping[str, torch.Tensor],
    *,
    mode: SelectionMode = "uniform",
    qkv_mode: QKVMode = "per_chunk",
    skip: SkipRule = "classifier",
    keep_classifier: bool = False,
    reshape_1x1: bool = False,
    seed: int = 0,
    layers: LayerChoice = "first",
    scores: Mapping[str, torch.Tensor] | ImportanceScores | None = None,
    teacher_config=None,
    student_config=None,
    progress: bool | None = None,
) -> SelectionReport:
    """Initialize `student` in place with weights selected from `teacher`.

    Teacher and student must be of the same library and family (timm or transformers ViT/DeiT, ConvNeXt v1/v2,
    ResNets; timm VGG; transformers Llama-layout decoders, BERT and RoBERTa; not Swin, see the method card), the
    student no wider and no deeper than the teacher. The teacher may be a module, a state dict, or a
    `CheckpointReader` that reads one tensor at a time from the teacher's files. A module may wrap the model
    (`TimmWrapperForImageClassification`, DDP, `torch.compile`, a user module holding it): the supported model inside
    is used (`hf_regtools.adapters.find_supported_model`).

    Args:
        teacher (`nn.Module` or `Mapping[str, Tensor]`): the pretrained teacher.
        student (`nn.Module` or `MutableMapping[str, Tensor]`): the student, updated in place (a module keeps its
            `Parameter` objects; a state dict gets new tensors).
        mode (`str`, *optional*, defaults to `"uniform"`): element selection, `"uniform"`, `"consecutive"`,
            `"random"` (random with consistency: one random index set per axis name) or `"importance"` (the entries
            of highest `scores`).
        qkv_mode (`str`, *optional*, defaults to `"per_chunk"`): fused qkv tensors (timm ViT) are selected per q/k/v
            chunk; `"fused"` reproduces the official code, which selects the stacked tensor as a whole.
        skip (`str` or `Callable[[str], bool]`, *optional*, defaults to `"classifier"`): keys that keep the student's
            initialization. `"classifier"`: the family's classification head(s) only. `"official"`: every key
            containing `"head"`, as the official code (this also skips timm ConvNeXt's final norm `head.norm`).
            A callable receives the student key.
        keep_classifier (`bool`, *optional*, defaults to `False`): also select the classifier; requires the same
            number of classes in teacher and student.
        reshape_1x1 (`bool`, *optional*, defaults to `False`): allow a Linear `[o, i]` weight to initialize a 1x1
            convolution `[o, i, 1, 1]` and back (timm ConvNeXt `conv_mlp`).
        seed (`int`, *optional*, defaults to 0): seed of `mode="random"`.
        layers (`str` or `list`, *optional*, defaults to `"first"`): which teacher blocks the student's blocks read:
            `"first"` (the paper's first-N), `"last"`, `"even"` (evenly spaced), `"importance"` (the blocks of
            highest Block Influence in `scores`, ShortGPT), or the teacher block indices (one list per stage for
            staged families); see `layers.layer_map`.
        scores (`ImportanceScores` or `Mapping[str, Tensor]`, *optional*): what `importance_scores` measured on the
            teacher, or the importance of every teacher entry by axis factor name, for `mode="importance"` and
            `layers="importance"`.
        teacher_config, student_config (*optional*): the models' configs, needed for families whose axes have
            factors a shape cannot give (heads and head dimension of language models) when teacher or student is a
            state dict; taken from modules by default.
        progress (`bool`, *optional*): show a progress bar over the tensors on stderr. By default it shows when stderr
            is a terminal, unless progress bars are disabled (`HF_HUB_DISABLE_PROGRESS_BARS=1`,
            `huggingface_hub.utils.disable_progress_bars()`).

    Returns:
        `SelectionReport`: what was loaded and skipped, and the index sets used.

    Example:

    ```python
    import timm
    from hf_regtools.weight_selection import select_weights

    teacher = timm.create_model("vit_small_patch16_224", pretrained=False)
    student = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    report = select_weights(teacher, student)
    ```
    """
    if qkv_mode not in QKV_MODES:
        raise WeightSelectionError(f"unknown qkv_mode {qkv_mode!r}; choose one of {QKV_MODES}")
    if not callable(skip) and skip not in SKIP_RULES:
        raise WeightSelectionError(f"unknown skip rule {skip!r}; choose one of {SKIP_RULES} or pass a callable")
    if isinstance(student, torch.nn.Module):
        student = find_supported_model(student, role="student", technique="weight_selection").module
    if isinstance(teacher, torch.nn.Module):
        teacher = find_supported_model(teacher, role="teacher", technique="weight_selection").module
    student_tensors = student.state_dict(keep_vars=True) if isinstance(student, torch.nn.Module) else student
    teacher_tensors = _teacher_tensors(teacher, student)
    family = _matching_family(teacher_tensors, student_tensors)
    skipped = _skipped_keys(family, student_tensors, skip, keep_classifier)

    selected_keys = [key for key in student_tensors if key not in skipped]
    aliases = _shared_axes(family, teacher_tensors, student_tensors)
    if family.flat_blocks is not None:
        teacher_blocks, student_blocks = family.flat_blocks(teacher_tensors), family.flat_blocks(student_tensors)
        teacher_depths, student_depths = flat_block_depths(teacher_blocks), flat_block_depths(student_blocks)
        if len(teacher_depths) != len(student_depths):
            raise WeightSelectionError(
                f"the teacher ({family.label}) has {len(teacher_depths)} stages, the student {len(student_depths)}: "
                "build the student with the teacher's number of stages (fewer blocks per stage are fine)")
    else:
        teacher_depths = block_depths(family.layers, teacher_tensors)
        student_depths = block_depths(family.layers, student_tensors)
    axis_scores, layer_choice = _split_scores(scores, mode, layers, student_depths)
    mapping = (layer_map(layer_choice, teacher_depths, student_depths, keep_first=family.keep_first_block)
               if family.layers or family.flat_blocks else {})
    if family.flat_blocks is not None:
        sources = flat_teacher_keys(selected_keys, student_blocks, teacher_blocks, mapping)
    else:
        sources = {key: _source_key(family, key, mapping, teacher_tensors) for key in selected_keys}
    missing = [key for key, source in sources.items() if source not in teacher_tensors]
    if missing:
        raise WeightSelectionError(
            f"{len(missing)} student tensors have no teacher counterpart: {_preview(missing)}. The student must be "
            "of the teacher's family and no deeper than the teacher (per stage for ConvNeXt)."
        )
    if keep_classifier:
        _check_label_space(family, teacher_tensors, student_tensors)

    plan = IndexPlan(mode, seed=seed, scores=axis_scores, paired=family.paired_factors,
                     teacher_sizes=_factor_sizes(family, teacher_config, teacher),
                     student_sizes=_factor_sizes(family, student_config, student))
    stages = [int(stage) for stage in teacher_depths if stage.isdigit()]
    last_stage = max(stages) if stages else None
    report = SelectionReport(family=family.label, skipped=skipped, index_sets=plan.sets, layer_map=mapping,
                             sources=sources,
                             settings=dict(mode=mode, qkv_mode=qkv_mode, seed=seed, keep_classifier=keep_classifier,
                                           reshape_1x1=reshape_1x1, layers=layers,
                                           skip=skip if isinstance(skip, str) else getattr(skip, "__name__", "custom")))
    if hasattr(teacher_tensors, "plan_reads"):
        teacher_tensors.plan_reads(list(dict.fromkeys(sources.values())))
    for key in _progress(selected_keys, progress):
        target, source_key = student_tensors[key], sources[key]
        with _borrowed(teacher_tensors, source_key) as teacher_tensor:
            source = _match_ndim(teacher_tensor, tuple(target.shape), key, reshape_1x1)
            axes = family.axis_names(source_key, source.ndim, last_stage=last_stage, aliases=aliases)
            if axes is not None and qkv_mode == "fused" and family.is_fused_qkv(source_key):
                axes = ("", *axes[1:])
            chunks = 3 if qkv_mode == "per_chunk" and family.is_fused_qkv(source_key) else 1
            selected = select_tensor(source, target.shape, plan=plan, qkv_chunks=chunks, name=key, axes=axes,
                                     fixed_axes=family.fixed_axes(source_key, source.ndim))
            if isinstance(student, torch.nn.Module):
                with torch.no_grad():
                    target.copy_(selected)
            else:
                student[key] = selected.to(dtype=target.dtype, device=target.device, copy=True)
            del teacher_tensor, source, selected  # keep at most one teacher tensor alive
        report.loaded.append(key)
        report.axes[key] = axes
    read = set(sources.values())
    report.teacher_unused = [key for key in teacher_tensors if key not in read]
    return report


def _split_scores(scores, mode: str, layers: LayerChoice, student_depths: dict[str, int]):
    """The axis scores `mode` uses (none unless `"importance"`) and the layer choice, `"importance"` resolved to the
    most influential teacher blocks."""
    from .importance import ImportanceScores

    is_measured = isinstance(scores, ImportanceScores)
    axis_scores = (scores.axes if is_measured else scores) if mode == "importance" else None
    if not (isinstance(layers, str) and layers == "importance"):
        return axis_scores, layers
    if not is_measured or not scores.block_influence:
        raise WeightSelectionError('layers="importance" needs the block influence of the teacher\'s blocks: pass '
                                   "scores=importance_scores(teacher, calibration_data)")
    return axis_scores, scores.layers(student_depths)


def _source_key(family: ModelFamily, key: str, mapping: dict[str, list[int]], teacher_tensors) -> str:
    """The teacher key student `key` reads: its block mapped by layer selection, or the tensor it is tied to."""
    source = teacher_key(family.layers, key, mapping)
    if source not in teacher_tensors:
        for pattern, tied_to in family.tied:
            if re.search(pattern, key) and tied_to in teacher_tensors:
                return tied_to
    return source


def _shared_axes(family: ModelFamily, teacher_tensors, student_tensors) -> dict[str, str]:
    """The teacher's axis aliases (`ModelFamily.shared_axes`); raises when the student's differ."""
    teacher, student = family.axis_aliases(teacher_tensors), family.axis_aliases(student_tensors)
    if teacher != student:
        differ = sorted(name for name in {*teacher, *student} if teacher.get(name) != student.get(name))
        described = lambda aliases, name: (f"{name} is {aliases[name]} (identity residual, no projection)"  # noqa: E731
                                           if name in aliases else f"{name} has its own channels (a projection)")
        raise WeightSelectionError(
            f"teacher and student differ in their residual connections: in the teacher "
            f"{', '.join(described(teacher, name) for name in differ)}; in the student "
            f"{', '.join(described(student, name) for name in differ)}. Build the student with a projection "
            "shortcut exactly where the teacher has one (a ResNet: a stem as wide as the first stage in both, or "
            "different in both)")
    return teacher


def _factor_sizes(family: ModelFamily, config, model) -> dict[str, int]:
    if family.factor_sizes is None:
        return {}
    if config is None and isinstance(model, torch.nn.Module):
        config = getattr(model, "config", None)
    return family.factor_sizes(config) if config is not None else {}


def show_progress(progress: bool | None) -> bool:
    """Whether to show a progress bar: `progress` when given, else whether stderr is a terminal and progress bars are
    enabled (`HF_HUB_DISABLE_PROGRESS_BARS`, `huggingface_hub.utils.disable_progress_bars()`)."""
    if progress is None:
        from huggingface_hub.utils import are_progress_bars_disabled

        return sys.stderr.isatty() and not are_progress_bars_disabled()
    return progress


def _progress(keys: list[str], progress: bool | None):
    """`keys`, with a tqdm bar on stderr when `show_progress(progress)`."""
    if not show_progress(progress):
        return keys
    from tqdm import tqdm

    return tqdm(keys, desc="weight selection", unit="tensor", file=sys.stderr, dynamic_ncols=True)


def _teacher_tensors(teacher, student) -> Mapping[str, torch.Tensor]:
    if isinstance(teacher, torch.nn.Module):
        return teacher.state_dict()
    if not isinstance(teacher, Mapping):
        raise WeightSelectionError(f"teacher must be an nn.Module or a state dict, got {type(teacher).__name__}")
    if _is_transformers_model(student):
        from .._compat import transformers_checkpoint_key_map
        from ..checkpoint import CheckpointReader

        key_map = transformers_checkpoint_key_map(student, teacher.keys())
        if any(new != old for new, old in key_map.items()):
            if isinstance(teacher, CheckpointReader):
                return teacher.with_key_map(key_map)
            renamed = set(key_map.values())
            aligned = {key: value for key, value in teacher.items() if key not in renamed}
            aligned.update({new: teacher[old] for new, old in key_map.items()})
            return aligned
    return teacher


@contextmanager
def _borrowed(tensors: Mapping[str, torch.Tensor], key: str):
    """A zero-copy view when the mapping lends one (`CheckpointReader.borrowed`), else `tensors[key]`."""
    if hasattr(tensors, "borrowed"):
        with tensors.borrowed(key) as tensor:
            yield tensor
    else:
        yield tensors[key]


def _is_transformers_model(model) -> bool:
    return isinstance(model, torch.nn.Module) and type(model).__module__.startswith("transformers.")


def _matching_family(teacher_tensors, student_tensors) -> ModelFamily:
    student_family = detect_family(student_tensors, role="student", technique="weight_selection")
    try:
        teacher_family = detect_family(teacher_tensors, role="teacher", technique="weight_selection")
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{error} The student is {student_family.label}.") from None
    if teacher_family.library != student_family.library:
        raise UnsupportedModelError(
            f"the teacher is a {teacher_family.library} model but the student a {student_family.library} model: "
            f"build both with the same library (key names differ between timm and transformers)"
        )
    if teacher_family.layout != student_family.layout:
        raise UnsupportedModelError(
            f"teacher ({teacher_family.label}) and student ({student_family.label}) are of different families; "
            "weight selection needs the same architecture family"
        )
    return student_family


def _skipped_keys(family: ModelFamily, student_tensors, skip, keep_classifier: bool) -> dict[str, str]:
    skipped = {}
    for key in student_tensors:
        if callable(skip) and skip(key):
            skipped[key] = "skip callable"
        elif skip == "official" and "head" in key:
            skipped[key] = 'official rule: key contains "head"'
        elif family.is_classifier(key) and not keep_classifier:
            skipped[key] = "classifier (re-initialized)"
    return skipped


def _check_label_space(family: ModelFamily, teacher_tensors, student_tensors) -> None:
    for key in student_tensors:
        names = family.axis_names(key, 1)
        if family.is_classifier(key) and key.endswith("bias") and (names is None or names[0] is None):
            classes = (teacher_tensors[key].shape[0], student_tensors[key].shape[0])
            if classes[0] != classes[1]:
                raise WeightSelectionError(
                    f"keep_classifier=True but the label spaces differ: teacher {key!r} has {classes[0]} classes, "
                    f"the student {classes[1]}. Build the student with {classes[0]} classes or re-initialize the head."
                )


def _match_ndim(tensor: torch.Tensor, shape: tuple[int, ...], key: str, reshape_1x1: bool) -> torch.Tensor:
    if tensor.ndim == len(shape):
        return tensor
    linear_to_conv = tensor.ndim == 2 and len(shape) == 4 and shape[2:] == (1, 1)
    conv_to_linear = tensor.ndim == 4 and len(shape) == 2 and tuple(tensor.shape[2:]) == (1, 1)
    if not (linear_to_conv or conv_to_linear):
        raise WeightSelectionError(f"{key!r}: teacher shape {tuple(tensor.shape)} and student shape {shape} have "
                                   "different numbers of axes")
    if not reshape_1x1:
        raise WeightSelectionError(
            f"{key!r}: the teacher stores a {'Linear' if linear_to_conv else '1x1 conv'} weight {tuple(tensor.shape)}, "
            f"the student a {'1x1 conv' if linear_to_conv else 'Linear'} weight {shape} (timm ConvNeXt `conv_mlp`). "
            "Build the student with the teacher's conv_mlp setting, or pass reshape_1x1=True."
        )
    return tensor[:, :, None, None] if linear_to_conv else tensor.flatten(1)


def _preview(keys: list[str], limit: int = 8) -> str:
    blocks = sorted({m.group(0) for k in keys if (m := re.search(r"(blocks|layers|layer|stages)\.\d+(\.(blocks|layers)\.\d+)?", k))})
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return shown + (f" (blocks: {', '.join(blocks[:limit])})" if blocks else "")
