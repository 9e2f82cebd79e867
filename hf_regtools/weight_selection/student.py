"""From a teacher reference to an initialized student, saved with a model card and optionally pushed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import hub
from .._io import atomic_directory
from ..adapters import (PRESETS, ModelFamily, StudentShape, UnsupportedModelError, detect_family,
                        find_supported_model, library_adapter, library_of, preset_shape)
from ..checkpoint import CheckpointReader
from .config import WeightSelectionConfig
from .functional import SelectionReport, select_weights


@dataclass
class SelectedStudent:
    """The result of `initialize_student`.

    Attributes:
        model (`nn.Module`): the initialized student (timm or transformers).
        report (`SelectionReport`): what was selected and skipped.
        library (`str`): `"timm"` or `"transformers"`.
        teacher (`str`): the teacher's Hub id (or local folder / class name).
        teacher_revision (`str`, *optional*): the teacher's commit sha when pulled from the Hub.
        config (`WeightSelectionConfig`): the selection settings.
        student_source (`str`): how the student was specified (preset, config reference, overrides).
    """

    model: torch.nn.Module
    report: SelectionReport
    library: str
    teacher: str
    teacher_revision: str | None
    config: WeightSelectionConfig
    student_source: str
    teacher_on_hub: bool = False

    def save(self, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write weights, config and model card to `output_dir` atomically; see `save_student`."""
        return save_student(self, output_dir, overwrite=overwrite)


def initialize_student(
    teacher: str | os.PathLike | torch.nn.Module,
    student: str | os.PathLike | torch.nn.Module | StudentShape | None = None,
    *,
    revision: str | None = None,
    hidden_size: int | tuple[int, ...] | None = None,
    depth: int | tuple[int, ...] | None = None,
    num_heads: int | None = None,
    mlp_dim: int | None = None,
    num_labels: int | None = None,
    config: WeightSelectionConfig | None = None,
    **selection_kwargs: Any,
) -> SelectedStudent:
    """Build a student and initialize it by weight selection from `teacher`.

    The teacher is read tensor by tensor from its safetensors files when given as a reference, so a teacher
    larger than memory works and peak memory stays near the student's size plus one teacher tensor.

    Args:
        teacher (`str`, `os.PathLike` or `nn.Module`): Hub id (`org/name`, `org/name@rev`), timm `hf-hub:` id or
            pretrained tag, local folder, or a loaded model.
        student (*optional*): a preset (`"vit-tiny"`, `"convnext-femto"`, ... see `PRESETS`), a Hub id or local
            folder holding the student's `config.json`, a built model, or a `StudentShape`. Defaults to the
            teacher's architecture with the overrides below.
        revision (`str`, *optional*): teacher revision on the Hub.
        hidden_size, depth, num_heads, mlp_dim (*optional*): overrides of the teacher's (or preset's) architecture;
            see `StudentShape`.
        num_labels (`int`, *optional*): the student's number of classes (defaults to the teacher's).
        config (`WeightSelectionConfig`, *optional*): selection settings; or pass them as keyword arguments
            (`mode=`, `qkv_mode=`, `skip=`, `keep_classifier=`, `reshape_1x1=`, `seed=`).

    Example:

    ```python
    from hf_regtools.weight_selection import initialize_student

    result = initialize_student("google/vit-base-patch16-224-in21k", "vit-tiny", num_labels=100)
    result.save("vit-tiny-ws")
    ```
    """
    if config is not None and selection_kwargs:
        raise ValueError("pass selection settings either as config= or as keyword arguments, not both")
    config = config or WeightSelectionConfig(**selection_kwargs)
    overrides = StudentShape(hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim)

    if isinstance(teacher, torch.nn.Module):
        teacher = find_supported_model(teacher, role="teacher", technique="weight_selection").module
        teacher_weights, library = teacher, library_of(teacher)
        teacher_name, teacher_revision, on_hub = _module_name(teacher), None, False
        teacher_config = _config_of_module(teacher, library)
    else:
        resolved = hub.resolve_model(teacher, revision=revision)
        library, teacher_name, teacher_revision = resolved.library, resolved.hub_reference, resolved.revision
        on_hub = resolved.repo_id is not None
        teacher_weights = CheckpointReader(resolved.folder)
        teacher_config = library_adapter(library).load_config(resolved.folder)
    family = detect_family(teacher_weights, role="teacher", technique="weight_selection")

    model, source = _build_student(student, overrides, num_labels, family, library, teacher_config)
    report = select_weights(teacher_weights, model, **config.to_dict())
    return SelectedStudent(model=model, report=report, library=library, teacher=teacher_name,
                           teacher_revision=teacher_revision, config=config, student_source=source,
                           teacher_on_hub=on_hub)


def _module_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return name or getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or type(model).__name__


def _config_of_module(model: torch.nn.Module, library: str):
    return library_adapter("timm").config_of(model) if library == "timm" else model.config


def _build_student(student, overrides: StudentShape, num_labels, family: ModelFamily, library: str, teacher_config
                   ) -> tuple[torch.nn.Module, str]:
    if isinstance(student, torch.nn.Module):
        if not overrides.is_empty() or num_labels is not None:
            raise ValueError("architecture overrides and num_labels apply when the student is built here, not to a "
                             "given student model")
        return find_supported_model(student, role="student", technique="weight_selection").module, \
            type(student).__name__
    adapter = library_adapter(library)
    shape, source, base_config = overrides, "teacher config with overrides", teacher_config
    if isinstance(student, StudentShape):
        shape = student.merged(overrides)
    elif isinstance(student, str) and (student in PRESETS or _is_bare_name(student, library)):
        shape, source = preset_shape(student, family).merged(overrides), f"preset {student}"
    elif student is not None:
        resolved = hub.resolve_model(student, weights=False)
        if resolved.library != library:
            raise UnsupportedModelError(f"the student config {str(student)!r} is a {resolved.library} model but the "
                                        f"teacher a {library} model; use the same library for both")
        base_config, source = adapter.load_config(resolved.folder), f"config {resolved.hub_reference}"
        with torch.device("meta"):
            _check_same_family(adapter.create(base_config), family)
    elif overrides.is_empty():
        raise ValueError(f"no student given: pass a preset ({sorted(PRESETS)}), a student config, or architecture "
                         "overrides (hidden_size, depth, num_heads, mlp_dim)")
    model = adapter.create(adapter.student_config(base_config, shape, family, num_labels))
    _check_same_family(model, family)
    return model, source


def _is_bare_name(reference: str, library: str) -> bool:
    """Neither a folder, nor a Hub id, nor a timm pretrained tag: can only have been meant as a preset."""
    if "/" in reference or Path(reference).exists():
        return False
    return library != "timm" or library_adapter("timm").hub_id_of(reference) is None


def _check_same_family(student: torch.nn.Module, family: ModelFamily) -> None:
    student_family = detect_family(student, role="student", technique="weight_selection")
    if student_family.layout != family.layout:
        raise UnsupportedModelError(f"the student is {student_family.label} but the teacher {family.label}; "
                                    "teacher and student must be of the same family")


def save_student(result: SelectedStudent, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save the student (safetensors + config) and its model card to `output_dir`.

    The folder is written to a temporary sibling and moved into place when complete, so a failure never leaves a
    half-written output. Loadable with `from_pretrained` (transformers) or `timm.create_model("hf-hub:...")` /
    `"local-dir:..."` (timm).
    """
    output_dir = Path(output_dir)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        library_adapter(result.library).save(result.model, staging)
        model_card(result).save(staging / "README.md")
    return output_dir


def model_card(result: SelectedStudent):
    """The student's `ModelCard`: `base_model`, library, tags and the selection settings."""
    from .._registry import get_technique

    info = get_technique("weight_selection")
    card_data = dict(library_name=result.library, tags=["weight-selection", "image-classification"],
                     pipeline_tag="image-classification")
    if result.teacher_on_hub:
        card_data["base_model"] = result.teacher
    parameters = sum(p.numel() for p in result.model.parameters())
    return hub.build_model_card(
        "weight_selection", card_data=card_data, teacher=result.teacher, teacher_revision=result.teacher_revision,
        library=result.library, family=result.report.family, student_source=result.student_source,
        architecture=_architecture_summary(result), parameters=f"{parameters / 1e6:.2f}M",
        settings=result.config.to_dict(), loaded=len(result.report.loaded), skipped=result.report.skipped,
        paper=info.paper, arxiv=info.arxiv, code_repo=info.code_repo,
    )


def _architecture_summary(result: SelectedStudent) -> str:
    model = result.model
    if result.library == "timm":
        cfg = library_adapter("timm").config_of(model)
        return f"{cfg.architecture} ({', '.join(f'{k}={v}' for k, v in cfg.model_args.items())})"
    config = model.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_sizes", "depths")
    return f"{type(model).__name__} ({', '.join(f'{k}={getattr(config, k)}' for k in keys if hasattr(config, k))})"


__all__ = ["SelectedStudent", "initialize_student", "model_card", "save_student"]
