"""From a teacher reference to an initialized student, saved with a model card and optionally pushed."""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import hub
from .._io import atomic_directory
from ..adapters import (PRESETS, ModelFamily, StudentShape, UnsupportedModelError, check_preset, detect_family,
                        find_supported_model, library_adapter, library_of, preset_shape)
from ..remote import open_teacher_weights
from .axes import WeightSelectionError
from .config import CALIBRATION_FIELDS, WeightSelectionConfig
from .functional import SelectionReport, select_weights
from .importance import ImportanceScores, importance_scores


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
        teacher_on_hub (`bool`): whether `teacher` is a Hub repo id (then the card's `base_model`).
        preprocessing (`dict[str, str]`): for each kind of preprocessing (image processor, timm data config), what
            the student got from the teacher, or why not.
        preprocessing_files (`tuple[Path, ...]`): the teacher's preprocessing files that `save` copies.
        license (`dict[str, str]`): the teacher's license (`license`, and `license_name` / `license_link` for
            "other"), empty when the teacher declares none.
        license_source (`str`, *optional*): where the license was read.
        calibration (`str`, *optional*): the calibration data of importance selection, described.
        scores (`ImportanceScores`, *optional*): what importance selection measured on the teacher.
        weights_source (`str`): how the teacher's weights were read: `"remote"` (only the needed byte ranges, from
            the Hub), `"download"` (the weight files were downloaded: the repo has no safetensors weights),
            `"cache"` (the local Hugging Face cache), `"local"` (a local folder) or `"module"` (a loaded model).
        bytes_read (`int`): bytes of teacher weights transferred from the Hub (the ranges read, or the downloaded
            files); 0 when read from local files.
        teacher_size (`int`, *optional*): total size of the teacher's weight files, in bytes.
        weights_note (`str`, *optional*): why the weights were downloaded instead of read by ranges.
    """

    model: torch.nn.Module
    report: SelectionReport
    library: str
    teacher: str
    teacher_revision: str | None
    config: WeightSelectionConfig
    student_source: str
    teacher_on_hub: bool = False
    preprocessing: dict[str, str] = field(default_factory=dict)
    preprocessing_files: tuple[Path, ...] = ()
    license: dict[str, str] = field(default_factory=dict)
    license_source: str | None = None
    calibration: str | None = None
    scores: ImportanceScores | None = None

    weights_source: str = "module"
    bytes_read: int = 0
    teacher_size: int | None = None
    weights_note: str | None = None

    @property
    def read_remotely(self) -> bool:
        """Whether the teacher's weights were read from the Hub by byte ranges, without downloading its files."""
        return self.weights_source == "remote"

    @property
    def weights_summary(self) -> str:
        """One sentence on how the teacher's weights were read, e.g. for the model card and the CLI."""
        if self.weights_source == "module":
            return "taken from the given teacher model"
        if self.weights_source in ("local", "cache"):
            where = "a local folder" if self.weights_source == "local" else "the local Hugging Face cache"
            return f"read from {where} ({_bytes(self.teacher_size)} of weight files)"
        if self.weights_source == "download":
            return f"downloaded ({_bytes(self.bytes_read)}): {self.weights_note}"
        share = f", {self.bytes_read / self.teacher_size:.0%}" if self.teacher_size else ""
        return (f"read from the Hub by byte ranges: {_bytes(self.bytes_read)} of {_bytes(self.teacher_size)} of "
                f"weight files{share}, without downloading them")

    def save(self, output_dir: str | os.PathLike, *, overwrite: bool = False, repo_id: str | None = None) -> Path:
        """Write weights, config, preprocessing and model card to `output_dir` atomically; see `save_student`."""
        return save_student(self, output_dir, overwrite=overwrite, repo_id=repo_id)


def initialize_student(
    teacher: str | os.PathLike | torch.nn.Module,
    student: str | os.PathLike | torch.nn.Module | StudentShape | None = None,
    *,
    revision: str | None = None,
    hidden_size: int | tuple[int, ...] | None = None,
    depth: int | tuple[int, ...] | None = None,
    num_heads: int | None = None,
    mlp_dim: int | None = None,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    num_labels: int | None = None,
    config: WeightSelectionConfig | None = None,
    calibration_data=None,
    progress: bool | None = None,
    **selection_kwargs: Any,
) -> SelectedStudent:
    """Build a student and initialize it by weight selection from `teacher`.

    The student is checked and built from the configs before any teacher weight is fetched or read. The teacher is
    then read tensor by tensor from its safetensors files when given as a reference, so a teacher larger than memory
    works and peak memory stays near the student's size plus one teacher tensor. A teacher on the Hub with
    safetensors weights is not downloaded: only the byte ranges of the tensors the student maps to are read
    (`hf_regtools.remote.RemoteCheckpointReader`); one with only PyTorch weights is downloaded, with a warning. The
    local folder, cache and `HF_HUB_OFFLINE=1` paths read local files. The student takes the teacher's
    preprocessing (image processor, timm data config) when it keeps the inputs it depends on (image size, patch
    size, channels), and the teacher's license.

    Importance selection (`mode="importance"`, `layers="importance"`) runs the teacher on calibration data
    (`importance_scores`), so the whole teacher is loaded in memory (on CPU, in its checkpoint's dtype) for it.

    Args:
        teacher (`str`, `os.PathLike` or `nn.Module`): Hub id (`org/name`, `org/name@rev`), timm `hf-hub:` id or
            pretrained tag, local folder, or a loaded model.
        student (*optional*): a preset (`"vit-tiny"`, `"convnext-femto"`, ... see `PRESETS`), a Hub id or local
            folder holding the student's `config.json`, a built model, or a `StudentShape`. Defaults to the
            teacher's architecture with the overrides below.
        revision (`str`, *optional*): teacher revision on the Hub.
        hidden_size, depth, num_heads, mlp_dim, num_key_value_heads, head_dim (*optional*): overrides of the
            teacher's (or preset's) architecture; see `StudentShape`. A ViT keeps the head dimension and MLP ratio of
            the preset (else of the teacher) unless `num_heads` / `mlp_dim` are given; a decoder keeps the teacher's
            head dimension and query heads per key/value head unless `head_dim` / `num_key_value_heads` are given.
        num_labels (`int`, *optional*): the student's number of classes (defaults to the teacher's).
        config (`WeightSelectionConfig`, *optional*): selection settings; or pass them as keyword arguments
            (`mode=`, `qkv_mode=`, `skip=`, `keep_classifier=`, `reshape_1x1=`, `seed=`, `layers=`,
            `calibration_split=`, `calibration_samples=`, `calibration_batch_size=`).
        calibration_data (*optional*): for importance selection, the calibration data as a `datasets.Dataset` (or
            an iterable of batches) whose columns are the teacher's inputs (`pixel_values`; `input_ids` and
            `attention_mask`); a folder saved with `save_to_disk` or a Hub dataset id may be given here or as the
            config's `calibration_data`.
        progress (`bool`, *optional*): show progress bars over the tensors (see `select_weights`) and, for a teacher
            read from the Hub, over the bytes to read (see `RemoteCheckpointReader`).

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
    overrides = StudentShape(hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                             num_key_value_heads=num_key_value_heads, head_dim=head_dim)
    student = _resolve_student(student)

    resolved = None
    if isinstance(teacher, torch.nn.Module):
        teacher = find_supported_model(teacher, role="teacher", technique="weight_selection").module
        library = library_of(teacher)
        teacher_name, teacher_revision, on_hub = _module_name(teacher), None, False
        teacher_config = _config_of_module(teacher, library)
        family = detect_family(teacher, role="teacher", technique="weight_selection",
                               name=_model_label(library, teacher_config))
    else:
        resolved = hub.resolve_model(teacher, revision=revision, weights=False)
        library, teacher_name, teacher_revision = resolved.library, resolved.hub_reference, resolved.revision
        on_hub = resolved.repo_id is not None
        teacher_config = library_adapter(library).load_config(resolved.folder)
        family = _family_of_config(teacher_config, library, role="teacher")

    teacher_folder = resolved.folder if resolved is not None else None
    teacher_license, license_source = _teacher_license(teacher_folder, teacher_config, library)
    model, source, preprocessing, files = _build_student(
        student, overrides, num_labels, family, library, teacher_config, teacher_folder,
        metadata=dict(license=teacher_license.get("license"),
                      description=f"Initialized by weight selection (hf_regtools) from {teacher_name}"))

    if not isinstance(calibration_data, (str, os.PathLike)):
        data, calibration = calibration_data, _described(calibration_data)
    else:
        data, calibration = None, None
        config = replace(config, calibration_data=str(calibration_data))
    scores, weights = None, None
    if config.uses_calibration:
        if data is None:
            data, calibration = _load_calibration_data(config)
        teacher_weights = teacher if resolved is None else hub.load_model(hub.fetch_weights(resolved).folder,
                                                                          library=library)
        scores = importance_scores(teacher_weights, data, batch_size=config.calibration_batch_size,
                                   num_samples=config.calibration_samples)
        calibration = f"{calibration}, {scores.samples} examples"
    else:
        if data is not None or config.calibration_data is not None:
            raise WeightSelectionError(
                f"calibration data was given, but mode is {config.mode!r} and layers {config.layers!r}: pass "
                'mode="importance" (--selection importance) and/or layers="importance", or drop the calibration data')
        weights = None if resolved is None else open_teacher_weights(resolved, progress=progress)
        teacher_weights = teacher if weights is None else weights.tensors
    try:
        report = select_weights(teacher_weights, model, progress=progress, scores=scores,
                                teacher_config=teacher_config, **config.selection_kwargs())
    finally:
        if weights is not None:
            weights.tensors.close()
    read = {} if weights is None else dict(weights_source=weights.source, bytes_read=weights.bytes_read,
                                           teacher_size=weights.size, weights_note=weights.note)
    return SelectedStudent(model=model, report=report, library=library, teacher=teacher_name,
                           teacher_revision=teacher_revision, config=config, student_source=source,
                           teacher_on_hub=on_hub, preprocessing=preprocessing, preprocessing_files=files,
                           license=teacher_license, license_source=license_source, calibration=calibration,
                           scores=scores, **read)


def _load_calibration_data(config: WeightSelectionConfig):
    """The calibration data the config names, and its description; raises when there is none."""
    if config.calibration_data is None:
        raise WeightSelectionError(
            f"mode={config.mode!r} and layers={config.layers!r} measure importance on calibration data, but none was "
            "given: pass calibration_data= (a datasets.Dataset, a save_to_disk folder or a Hub dataset id; "
            "--calibration-data on the command line) whose columns are the teacher's inputs; the whole teacher is then "
            "loaded in memory for its forward passes")
    from .._data import load_split

    return load_split(config.calibration_data, split=config.calibration_split, option="--calibration-data",
                      split_option="--calibration-split", error_class=WeightSelectionError)


def _described(data) -> str | None:
    if data is None:
        return None
    rows = f", {len(data)} rows" if hasattr(data, "__len__") else ""
    return f"a {type(data).__name__} given in Python{rows}"


def _resolve_student(student):
    """The student reference, checked before the teacher is touched: a preset name, or the student's resolved config."""
    if student is None or isinstance(student, (torch.nn.Module, StudentShape)):
        return student
    if isinstance(student, str) and (student in PRESETS or _is_bare_name(student)):
        check_preset(student)
        return student
    try:
        return hub.resolve_model(student, weights=False)
    except hub.HubError as error:
        raise hub.HubError(f"the student {str(student)!r}: {error}") from error


def _family_of_config(config, library: str, *, role: str) -> ModelFamily:
    """The family of the model `config` describes, from a skeleton on the meta device (no weights)."""
    name = _model_label(library, config)
    try:
        with torch.device("meta"):
            skeleton = library_adapter(library).create(config)
    except (ValueError, KeyError, TypeError, RuntimeError):  # e.g. no image-classification class for this model type
        skeleton = ()
    return detect_family(skeleton, role=role, technique="weight_selection", name=name)


def _model_label(library: str, config) -> str:
    """`"timm resnet18"`, `"transformers bert"`: how messages name a model."""
    return f"{library} {library_adapter(library).model_name(config)}"


def _teacher_license(folder: Path | None, teacher_config, library: str) -> tuple[dict[str, str], str | None]:
    """The teacher's license from its model card's metadata (else a timm config's `pretrained_cfg`), and where."""
    readme = folder / "README.md" if folder is not None else None
    if readme is not None and readme.is_file():
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(readme).data.to_dict()
        except (ValueError, OSError):
            data = {}
        found = {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}
        if found.get("license"):
            return found, "the teacher's model card"
    if library == "timm" and teacher_config.pretrained_cfg.get("license"):
        return {"license": teacher_config.pretrained_cfg["license"]}, "the teacher's timm config (`pretrained_cfg`)"
    return {}, None


def _module_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return name or getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or type(model).__name__


def _config_of_module(model: torch.nn.Module, library: str):
    """The model's config; a transformers config without `architectures` gets the model's class, so the student is
    built with it."""
    if library == "timm":
        return library_adapter("timm").config_of(model)
    import transformers

    config = model.config
    if not config.architectures and hasattr(transformers, type(model).__name__):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
    return config


def _build_student(student, overrides: StudentShape, num_labels, family: ModelFamily, library: str, teacher_config,
                   teacher_folder: Path | None, *, metadata: dict[str, Any]
                   ) -> tuple[torch.nn.Module, str, dict[str, str], tuple[Path, ...]]:
    adapter = library_adapter(library)
    if isinstance(student, torch.nn.Module):
        if not overrides.is_empty() or num_labels is not None:
            raise ValueError("architecture overrides and num_labels apply when the student is built here, not to a "
                             "given student model")
        student = find_supported_model(student, role="student", technique="weight_selection").module
        notes, files, _ = _preprocessing(adapter, teacher_config, _config_of_module(student, library), teacher_folder)
        if library == "timm":
            notes["timm data config"] = "kept as the given student model has it (`pretrained_cfg`)"
        return student, type(student).__name__, notes, files
    shape, source, base_config = overrides, "teacher config with overrides", teacher_config
    if isinstance(student, StudentShape):
        shape = student.merged(overrides)
    elif isinstance(student, str):
        shape, source = preset_shape(student, family).merged(overrides), f"preset {student}"
    elif student is not None:
        if student.library != library:
            raise UnsupportedModelError(f"the student config {student.reference!r} is a {student.library} model but "
                                        f"the teacher a {library} model; use the same library for both")
        base_config, source = adapter.load_config(student.folder), f"config {student.hub_reference}"
        _check_same_family(_family_of_config(base_config, library, role="student"), family)
    elif overrides.is_empty():
        raise ValueError(f"no student given: pass a preset ({sorted(PRESETS)}), a student config, or architecture "
                         "overrides (hidden_size, depth, num_heads, mlp_dim)")
    student_config = adapter.student_config(base_config, shape, family, num_labels)
    notes, files, inputs_kept = _preprocessing(adapter, teacher_config, student_config, teacher_folder)
    if inputs_kept:
        student_config = adapter.inherit_preprocessing(student_config, teacher_config)
    model = adapter.create(adapter.with_metadata(student_config, **metadata))
    _check_same_family(detect_family(model, role="student", technique="weight_selection",
                                     name=_model_label(library, student_config)), family)
    return model, source, notes, files


def _preprocessing(adapter, teacher_config, student_config, teacher_folder: Path | None
                   ) -> tuple[dict[str, str], tuple[Path, ...], bool]:
    """What preprocessing the student takes from the teacher (notes by kind, files to copy), and whether the student
    keeps the inputs the teacher's preprocessing depends on (image size, patch size, channels)."""
    teacher_inputs, student_inputs = adapter.input_spec(teacher_config), adapter.input_spec(student_config)
    changed = "; ".join(f"its {key} is {student_inputs.get(key)}, the teacher's {value}"
                        for key, value in teacher_inputs.items() if student_inputs.get(key) != value)
    notes, files = {}, []
    is_timm = adapter.__name__.endswith(".timm")
    for kind, names in hub.PREPROCESSING_FILES.items():
        present = [teacher_folder / name for name in names if teacher_folder and (teacher_folder / name).is_file()]
        if not present:
            applies = kind == ("image processor" if teacher_inputs else "tokenizer")  # text models: no image inputs
            if not is_timm and applies:  # timm keeps its preprocessing in config.json
                notes[kind] = ("none: the teacher was given as a loaded model" if teacher_folder is None else
                               "none: the teacher has no " + ", ".join(f"`{name}`" for name in names))
            continue
        listed = ", ".join(f"`{path.name}`" for path in present)
        if changed:
            notes[kind] = f"not copied ({listed}): the student does not keep the teacher's inputs ({changed})"
        else:
            notes[kind] = f"copied from the teacher ({listed})"
            files += present
    if is_timm:
        notes["timm data config"] = (
            f"not taken from the teacher: the student does not keep the teacher's inputs ({changed}); `pretrained_cfg` "
            "has timm's defaults for its architecture" if changed else
            "taken from the teacher (`pretrained_cfg`: input size, interpolation, crop, mean, std)")
    return notes, tuple(files), not changed


def _is_bare_name(reference: str) -> bool:
    """Neither a folder, nor a Hub id, nor a timm pretrained tag: can only have been meant as a preset."""
    if "/" in reference or Path(reference).expanduser().exists():
        return False
    return library_adapter("timm").hub_id_of(reference) is None


def _check_same_family(student_family: ModelFamily, family: ModelFamily) -> None:
    if student_family.layout != family.layout:
        raise UnsupportedModelError(f"the student is {student_family.label} but the teacher {family.label}; "
                                    "teacher and student must be of the same family")


def save_student(result: SelectedStudent, output_dir: str | os.PathLike, *, overwrite: bool = False,
                 repo_id: str | None = None) -> Path:
    """Save the student (safetensors + config), the teacher's preprocessing files and the model card to `output_dir`.

    The folder is written to a temporary sibling and moved into place when complete, so a failure never leaves a
    half-written output. Loadable with `from_pretrained` (transformers; `AutoImageProcessor` too when the teacher's
    image processor was copied) or `timm.create_model("hf-hub:...")` / `"local-dir:..."` (timm).

    Args:
        result (`SelectedStudent`): what `initialize_student` returned.
        output_dir (`str` or `os.PathLike`): the folder to write.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty folder.
        repo_id (`str`, *optional*): the Hub repo the folder will be pushed to; the card's usage section names it.
    """
    output_dir = Path(output_dir)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        library_adapter(result.library).save(result.model, staging)
        for path in result.preprocessing_files:
            shutil.copyfile(path, staging / path.name)
        model_card(result, repo_id=repo_id).save(staging / "README.md")
    return output_dir


def model_card(result: SelectedStudent, *, repo_id: str | None = None):
    """The student's `ModelCard`: `base_model`, license, library, tags, the selection settings and the preprocessing.

    Args:
        result (`SelectedStudent`): what `initialize_student` returned.
        repo_id (`str`, *optional*): the student's Hub repo, used in the usage section (else a placeholder).
    """
    from .._registry import get_technique

    info = get_technique("weight_selection")
    task = _task(result.model)
    card_data = dict(library_name=result.library, tags=["weight-selection", task], pipeline_tag=task,
                     **result.license)
    if result.teacher_on_hub:
        card_data["base_model"] = result.teacher
        card_data["base_model_relation"] = "finetune"
    parameters = sum(p.numel() for p in result.model.parameters())
    return hub.build_model_card(
        "weight_selection", card_data=card_data, teacher=result.teacher, teacher_revision=result.teacher_revision,
        library=result.library, family=result.report.family, student_source=result.student_source,
        architecture=_architecture_summary(result), parameters=f"{parameters / 1e6:.2f}M",
        settings=_card_settings(result), loaded=len(result.report.loaded), skipped=result.report.skipped,
        paper=info.paper, arxiv=info.arxiv, code_repo=info.code_repo, repo_id=repo_id,
        teacher_on_hub=result.teacher_on_hub,
        preprocessing=result.preprocessing, license=result.license.get("license"),
        license_source=result.license_source,
        image_processor=any(path.name == "preprocessor_config.json" for path in result.preprocessing_files),
        tokenizer=any(name in hub.PREPROCESSING_FILES["tokenizer"] for name in
                      (path.name for path in result.preprocessing_files)),
        task=task, layers=result.report.layer_map, teacher_weights=result.weights_summary,
    )


def _task(model: torch.nn.Module) -> str:
    """The Hub pipeline tag of the student: text generation, text classification, fill-mask or image
    classification."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "text-generation"
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    if name.endswith(("ForMaskedLM", "ForPreTraining")):
        return "fill-mask"
    return "image-classification"


def _card_settings(result: SelectedStudent) -> dict:
    """The selection settings; the calibration data's only when selection used it, described."""
    settings = result.config.to_dict()
    for name in CALIBRATION_FIELDS:
        settings.pop(name)
    if result.config.uses_calibration:
        settings["calibration_data"] = result.calibration
        settings["calibration_batch_size"] = result.config.calibration_batch_size
    return settings


def _bytes(count: int | None) -> str:
    """`"12,345,678 bytes (11.8 MiB)"`."""
    return "an unknown size" if count is None else f"{count:,} bytes ({count / 2**20:.1f} MiB)"


def _architecture_summary(result: SelectedStudent) -> str:
    model = result.model
    if result.library == "timm":
        cfg = library_adapter("timm").config_of(model)
        summary = f"`{cfg.architecture}` ({', '.join(f'{k}={v}' for k, v in cfg.model_args.items()) or 'its defaults'})"
        if {"embed_dim", "dims"} & cfg.model_args.keys():
            summary += ": no registered timm architecture has this shape, so it is built from this one"
        return summary
    config = model.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "n_inner", "hidden_sizes", "depths")
    return f"{type(model).__name__} ({', '.join(f'{k}={getattr(config, k)}' for k in keys if hasattr(config, k))})"


__all__ = ["SelectedStudent", "initialize_student", "model_card", "save_student"]
