"""Weight selection (Xu et al., ICLR 2024): initialize a small model with a subset of a larger one's weights.

Three steps, as in the paper and `OscarXZQ/weight-selection`:

1. *layer selection*: student key `blocks.i` (or `stages.s.blocks.j`) reads the teacher tensor with the same key,
   so the first N blocks (per stage) of the teacher are used;
2. *component mapping*: same key name, same role;
3. *element selection*: along every axis the student keeps `d` of the teacher's `D` entries. The index set
   depends only on `(D, d)`, so every tensor sharing a hidden dimension keeps the same channels (consistency).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..adapters import ModelFamily, UnsupportedModelError, detect_family, find_supported_model
from .config import QKV_MODES, SELECTION_MODES, SKIP_RULES

SelectionMode = Literal["uniform", "consecutive", "random"]
QKVMode = Literal["per_chunk", "fused"]
SkipRule = Literal["classifier", "official"] | Callable[[str], bool]


class WeightSelectionError(ValueError):
    """A teacher/student pair or an argument that weight selection cannot work with."""


def uniform_indices(teacher_dim: int, student_dim: int) -> torch.Tensor:
    """Uniformly spaced indices: `[0, r, 2r, ...]` for an integer ratio `r = D/d`, else `round(linspace(0, D-1, d))`.

    This is the official rule after `OscarXZQ/weight-selection` PR #8 (round half to even, float32 linspace).

    Example:

    ```python
    uniform_indices(10, 4).tolist()  # [0, 3, 6, 9]
    ```
    """
    _check_dims(teacher_dim, student_dim)
    if teacher_dim % student_dim == 0:
        return torch.arange(0, teacher_dim, teacher_dim // student_dim)
    return torch.round(torch.linspace(0, teacher_dim - 1, student_dim)).long()


def consecutive_indices(teacher_dim: int, student_dim: int) -> torch.Tensor:
    """The first `d` indices (the paper's "consecutive" ablation)."""
    _check_dims(teacher_dim, student_dim)
    return torch.arange(student_dim)


def random_indices(teacher_dim: int, student_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`d` distinct indices drawn at random, sorted (the paper's "random with consistency" ablation when reused)."""
    _check_dims(teacher_dim, student_dim)
    return torch.randperm(teacher_dim, generator=generator)[:student_dim].sort().values


def _check_dims(teacher_dim: int, student_dim: int) -> None:
    if not 0 < student_dim <= teacher_dim:
        raise WeightSelectionError(f"cannot select {student_dim} of {teacher_dim} entries")


class IndexPlan:
    """Index sets by `(D, d)`, drawn once and reused for every tensor so that selection stays consistent.

    Args:
        mode (`str`, *optional*, defaults to `"uniform"`): one of `"uniform"`, `"consecutive"`, `"random"`.
        seed (`int`, *optional*, defaults to 0): seed of the `"random"` mode (torch RNG).
    """

    def __init__(self, mode: SelectionMode = "uniform", *, seed: int = 0):
        if mode not in SELECTION_MODES:
            raise WeightSelectionError(f"unknown selection mode {mode!r}; choose one of {SELECTION_MODES}")
        self.mode = mode
        self.generator = torch.Generator().manual_seed(seed)
        self.sets: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, teacher_dim: int, student_dim: int) -> torch.Tensor:
        key = (teacher_dim, student_dim)
        if key not in self.sets:
            if self.mode == "uniform":
                self.sets[key] = uniform_indices(*key)
            elif self.mode == "consecutive":
                self.sets[key] = consecutive_indices(*key)
            else:
                self.sets[key] = random_indices(*key, generator=self.generator)
        return self.sets[key]


def select_tensor(
    tensor: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    *,
    plan: IndexPlan | None = None,
    qkv_chunks: int = 1,
    fixed_axes: tuple[int, ...] = (),
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
        name (`str`, *optional*): the tensor's key, used in error messages.
    """
    plan = plan or IndexPlan()
    shape = tuple(shape)
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
        if axis == 0 and qkv_chunks > 1:
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
        index_sets (`dict[tuple[int, int], torch.Tensor]`): the index set used for each `(D, d)`.
        settings (`dict`): the selection settings, as recorded in model cards.
    """

    family: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    teacher_unused: list[str] = field(default_factory=list)
    index_sets: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

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
    progress: bool | None = None,
) -> SelectionReport:
    """Initialize `student` in place with weights selected from `teacher`.

    Teacher and student must be of the same library and family (timm or transformers ViT/DeiT, ConvNeXt v1/v2; not
    Swin, see the method card), the student no wider and no deeper than the teacher. The teacher may be a module, a
    state dict, or a `CheckpointReader` that reads one tensor at a time from the teacher's files. A module may wrap
    the model (`TimmWrapperForImageClassification`, DDP, `torch.compile`, a user module holding it): the supported
    model inside is used (`hf_regtools.adapters.find_supported_model`).

    Args:
        teacher (`nn.Module` or `Mapping[str, Tensor]`): the pretrained teacher.
        student (`nn.Module` or `MutableMapping[str, Tensor]`): the student, updated in place (a module keeps its
            `Parameter` objects; a state dict gets new tensors).
        mode (`str`, *optional*, defaults to `"uniform"`): element selection, `"uniform"`, `"consecutive"` or
            `"random"` (random with consistency: one random index set per `(D, d)`).
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
    plan = IndexPlan(mode, seed=seed)
    if isinstance(student, torch.nn.Module):
        student = find_supported_model(student, role="student", technique="weight_selection").module
    if isinstance(teacher, torch.nn.Module):
        teacher = find_supported_model(teacher, role="teacher", technique="weight_selection").module
    student_tensors = student.state_dict(keep_vars=True) if isinstance(student, torch.nn.Module) else student
    teacher_tensors = _teacher_tensors(teacher, student)
    family = _matching_family(teacher_tensors, student_tensors)
    skipped = _skipped_keys(family, student_tensors, skip, keep_classifier)

    missing = [key for key in student_tensors if key not in skipped and key not in teacher_tensors]
    if missing:
        raise WeightSelectionError(
            f"{len(missing)} student tensors have no teacher counterpart: {_preview(missing)}. The student must be "
            "of the teacher's family and no deeper than the teacher (per stage for ConvNeXt)."
        )
    if keep_classifier:
        _check_label_space(family, teacher_tensors, student_tensors)

    report = SelectionReport(family=family.label, skipped=skipped, index_sets=plan.sets,
                             settings=dict(mode=mode, qkv_mode=qkv_mode, seed=seed, keep_classifier=keep_classifier,
                                           reshape_1x1=reshape_1x1,
                                           skip=skip if isinstance(skip, str) else getattr(skip, "__name__", "custom")))
    selected_keys = [key for key in student_tensors if key not in skipped]
    for key in _progress(selected_keys, progress):
        target = student_tensors[key]
        chunks = 3 if qkv_mode == "per_chunk" and family.is_fused_qkv(key) else 1
        with _borrowed(teacher_tensors, key) as teacher_tensor:
            source = _match_ndim(teacher_tensor, tuple(target.shape), key, reshape_1x1)
            selected = select_tensor(source, target.shape, plan=plan, qkv_chunks=chunks, name=key,
                                     fixed_axes=family.fixed_axes(key, source.ndim))
            if isinstance(student, torch.nn.Module):
                with torch.no_grad():
                    target.copy_(selected)
            else:
                student[key] = selected.to(dtype=target.dtype, device=target.device, copy=True)
            del teacher_tensor, source, selected  # keep at most one teacher tensor alive
        report.loaded.append(key)
    report.teacher_unused = [key for key in teacher_tensors if key not in student_tensors]
    return report


def _progress(keys: list[str], progress: bool | None):
    """`keys`, with a tqdm bar on stderr when asked, or by default when stderr is a terminal and bars are enabled."""
    if progress is None:
        from huggingface_hub.utils import are_progress_bars_disabled

        progress = sys.stderr.isatty() and not are_progress_bars_disabled()
    if not progress:
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
        if family.is_classifier(key) and key.endswith("bias"):
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
