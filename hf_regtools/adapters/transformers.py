"""transformers adapter: configs, student construction and export for ViT/DeiT and ConvNeXt (v1, v2); drop path
for ConvNeXt and Swin."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig

from . import ModelFamily, StudentShape, UnsupportedModelError, convnext_dims, vit_dims

IMAGE_CLASSIFICATION_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher")


def load_config(folder: str | Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(folder))


def model_name(config: PretrainedConfig) -> str:
    """How error messages name the model: its `model_type`, e.g. `bert`."""
    return config.model_type


INPUT_FIELDS = {"image_size": "image size", "patch_size": "patch size", "num_channels": "channels"}


def input_spec(config: PretrainedConfig) -> dict:
    """What the model's preprocessing (image processor) depends on: the config's image size, patch size, channels."""
    return {label: getattr(config, name) for name, label in INPUT_FIELDS.items() if hasattr(config, name)}


def inherit_preprocessing(student: PretrainedConfig, teacher: PretrainedConfig) -> PretrainedConfig:
    """The student's config: transformers keeps preprocessing in files (`preprocessor_config.json`), not here."""
    return student


def with_metadata(config: PretrainedConfig, **metadata) -> PretrainedConfig:
    """The config: a transformers config has no field for a license or description (the model card holds them)."""
    return config


def _vit_shape(config: PretrainedConfig, shape: StudentShape) -> None:
    width, heads, mlp = vit_dims(shape, teacher_width=config.hidden_size, teacher_heads=config.num_attention_heads,
                                 teacher_mlp=config.intermediate_size)
    depth = shape.depth if shape.depth is not None else config.num_hidden_layers
    if not isinstance(depth, int):
        raise ValueError(f"depth for a ViT must be one integer, got {depth!r}")
    config.hidden_size, config.num_attention_heads, config.intermediate_size = width, heads, mlp
    config.num_hidden_layers = depth


def _convnext_shape(config: PretrainedConfig, shape: StudentShape) -> None:
    widths, depths = convnext_dims(shape, teacher_widths=tuple(config.hidden_sizes), teacher_depths=tuple(config.depths))
    config.hidden_sizes, config.depths = list(widths), list(depths)


# Family name -> how a student's shape overrides a copy of the teacher's config (in place).
SHAPE_RULES: dict[str, Callable[[PretrainedConfig, StudentShape], None]] = {
    "vit": _vit_shape, "deit": _vit_shape, "convnext": _convnext_shape, "convnextv2": _convnext_shape,
}


def student_config(teacher: PretrainedConfig, shape: StudentShape, family: ModelFamily,
                   num_labels: int | None = None) -> PretrainedConfig:
    """A copy of the teacher's config with the student's architecture overrides applied (`SHAPE_RULES`)."""
    if family.name not in SHAPE_RULES:
        raise UnsupportedModelError(f"cannot build a transformers {family.name} student from a shape; pass the "
                                    "student's config (a folder or Hub id) instead")
    config = copy.deepcopy(teacher)
    SHAPE_RULES[family.name](config, shape)
    if num_labels is not None and num_labels != config.num_labels:
        config.num_labels = num_labels
        config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    return config


def create(config: PretrainedConfig, *, classification: bool | None = None) -> torch.nn.Module:
    """Build a randomly initialized model of `config`'s architecture (an image classifier if asked)."""
    architecture = (config.architectures or [None])[0]
    is_classifier = architecture is not None and architecture.endswith(IMAGE_CLASSIFICATION_SUFFIXES)
    if classification is None:
        classification = is_classifier or architecture is None
    if classification and not is_classifier:
        return AutoModelForImageClassification.from_config(config)
    if architecture is None:
        return transformers.AutoModel.from_config(config)
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise ValueError(f"transformers {transformers.__version__} has no model class {architecture!r}")
    return model_class(config)


def save(model: torch.nn.Module, folder: str | Path) -> None:
    """Write `config.json` and `model.safetensors` loadable by `from_pretrained`."""
    model.save_pretrained(str(folder))


def drop_path_class(family):
    """The stochastic-depth module transformers builds for this family."""
    from importlib import import_module

    classes = {"convnext": ("convnext", "ConvNextDropPath"), "convnextv2": ("convnextv2", "ConvNextV2DropPath"),
               "swin": ("swin", "SwinDropPath")}
    if family.name not in classes:
        raise UnsupportedModelError(f"transformers {family.name} has no stochastic depth")
    module, name = classes[family.name]
    return getattr(import_module(f"transformers.models.{module}.modeling_{module}"), name)
