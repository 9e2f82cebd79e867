"""transformers adapter: configs, student construction and export for ViT/DeiT, ConvNeXt (v1, v2), Llama-layout
decoders and BERT-style encoders; drop path for ConvNeXt and Swin."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig

from . import ModelFamily, StudentShape, UnsupportedModelError, convnext_dims, stage_dims, vit_dims

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


def _resnet_shape(config: PretrainedConfig, shape: StudentShape) -> None:
    """A ResNet's `hidden_sizes`, `depths` and `embedding_size` (the stem's width): as wide as the first stage when
    the teacher's are equal (no downsampling shortcut), else scaled with it."""
    widths, depths = stage_dims(shape, teacher_widths=tuple(config.hidden_sizes), teacher_depths=tuple(config.depths),
                                model="ResNet", check_sizes=True)
    if config.layer_type == "bottleneck" and min(widths) < 4:
        raise ValueError(f"the stage widths {widths} of a bottleneck ResNet must be at least 4 (a bottleneck reduces "
                         "its width by 4)")
    stem, first = config.embedding_size, config.hidden_sizes[0]
    projects = stem != first or config.downsample_in_first_stage
    student_stem = widths[0] if stem == first else max(1, round(stem * widths[0] / first))
    if projects and not config.downsample_in_first_stage and student_stem == widths[0]:
        raise ValueError(f"the teacher's stem ({stem} channels) and first stage ({first}) differ, so the student's "
                         f"must too, but scaling the stem with a first stage of {widths[0]} channels makes them equal; "
                         "choose another first-stage width")
    config.hidden_sizes, config.depths, config.embedding_size = list(widths), list(depths), student_stem


def _decoder_width_depth(config: PretrainedConfig, shape: StudentShape) -> tuple[int, int]:
    """The student decoder's width and depth: the shape's, else the teacher's; single integers."""
    width = shape.hidden_size if shape.hidden_size is not None else config.hidden_size
    depth = shape.depth if shape.depth is not None else config.num_hidden_layers
    if not isinstance(width, int) or not isinstance(depth, int):
        raise ValueError(f"hidden_size and depth of a decoder are single integers, got {width!r} and {depth!r}")
    return width, depth


def _larger_than_teacher(*sizes: tuple[str, int, int]) -> list[str]:
    """A problem for every `(what, student size, teacher size)` where the student's is larger."""
    return [f"{what} {value} is larger than the teacher's {limit}" for what, value, limit in sizes if value > limit]


def _llama_shape(config: PretrainedConfig, shape: StudentShape) -> None:
    from .families.llama import attention_sizes

    teacher = attention_sizes(config)
    width, depth = _decoder_width_depth(config, shape)
    head_dim = shape.head_dim or teacher["head_dim"]
    heads = shape.num_heads
    if heads is None:
        if width % head_dim:
            raise ValueError(f"hidden_size {width} is not a multiple of the head dimension {head_dim}; pass the number "
                             "of heads (--num-heads, or num_heads=) or another head dimension (--head-dim)")
        heads = width // head_dim
    kv_heads = shape.num_key_value_heads
    if kv_heads is None:
        if heads % teacher["group"]:
            raise ValueError(f"{heads} query heads do not make whole groups of the teacher's {teacher['group']} query "
                             "heads per key/value head; pass --num-key-value-heads (num_key_value_heads=)")
        kv_heads = heads // teacher["group"]
    mlp = shape.mlp_dim if shape.mlp_dim is not None else config.intermediate_size * width // config.hidden_size
    problems = _larger_than_teacher(
        ("hidden size", width, config.hidden_size), ("depth", depth, config.num_hidden_layers),
        ("MLP width", mlp, config.intermediate_size), ("number of query heads", heads, config.num_attention_heads))
    if kv_heads > teacher["kv_heads"]:
        problems.append(f"{kv_heads} key/value heads, more than the teacher's {teacher['kv_heads']}")
    if heads % kv_heads:
        problems.append(f"{heads} query heads do not divide into {kv_heads} key/value heads")
    elif heads // kv_heads > teacher["group"]:
        problems.append(f"{heads // kv_heads} query heads per key/value head, more than the teacher's "
                        f"{teacher['group']} (selection keeps each query head in its teacher group)")
    if head_dim > teacher["head_dim"] or head_dim % 2:
        problems.append(f"head dimension {head_dim}: it must be even and at most the teacher's {teacher['head_dim']}")
    rotary_fraction = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if head_dim != teacher["head_dim"] and rotary_fraction != 1.0:
        problems.append(f"head dimension {head_dim} instead of {teacher['head_dim']} with partial rotary embeddings "
                        f"(partial_rotary_factor={rotary_fraction}); keep the teacher's head dimension")
    if problems:
        raise ValueError("cannot build this decoder student: " + "; ".join(problems))
    config.hidden_size, config.num_hidden_layers, config.intermediate_size = width, depth, mlp
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, kv_heads, head_dim
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:depth]


def _encoder_shape(config: PretrainedConfig, shape: StudentShape) -> None:
    """BERT-style encoders: ViT's rule for width, heads and MLP width (whole heads of the teacher's head dimension by
    default), every length checked against the teacher's before any weight is read."""
    from .families.bert import attention_sizes

    width, heads, mlp = vit_dims(shape, teacher_width=config.hidden_size, teacher_heads=config.num_attention_heads,
                                 teacher_mlp=config.intermediate_size)
    depth = shape.depth if shape.depth is not None else config.num_hidden_layers
    if not isinstance(depth, int):
        raise ValueError(f"depth of a BERT-style encoder is one integer, got {depth!r}")
    problems = _larger_than_teacher(
        ("hidden size", width, config.hidden_size), ("depth", depth, config.num_hidden_layers),
        ("MLP width", mlp, config.intermediate_size), ("number of heads", heads, config.num_attention_heads))
    teacher_head_dim = attention_sizes(config)["head_dim"]
    if width // heads > teacher_head_dim:
        problems.append(f"head dimension {width // heads} (hidden size {width} / {heads} heads) is larger than the "
                        f"teacher's {teacher_head_dim}; pass more heads (--num-heads)")
    if problems:
        raise ValueError(f"cannot build this {config.model_type} student: " + "; ".join(problems))
    config.hidden_size, config.num_attention_heads, config.intermediate_size = width, heads, mlp
    config.num_hidden_layers = depth


def _gpt2_shape(config: PretrainedConfig, shape: StudentShape) -> None:
    from .families.gpt2 import attention_sizes

    teacher = attention_sizes(config)
    _, depth = _decoder_width_depth(config, shape)
    teacher_mlp = config.n_inner or 4 * config.n_embd
    width, heads, mlp = vit_dims(shape, teacher_width=config.n_embd, teacher_heads=config.n_head,
                                 teacher_mlp=teacher_mlp)
    problems = _larger_than_teacher(
        ("hidden size", width, config.n_embd), ("depth", depth, config.n_layer), ("MLP width", mlp, teacher_mlp),
        ("number of heads", heads, config.n_head), ("head dimension", width // heads, teacher["head_dim"]))
    if shape.num_heads is not None and shape.head_dim is not None and shape.num_heads * shape.head_dim != width:
        problems.append(f"{shape.num_heads} heads of {shape.head_dim} do not make the hidden size {width} (GPT-2's "
                        "head dimension is hidden_size / num_heads); pass one of num_heads and head_dim")
    if problems:
        raise ValueError("cannot build this GPT-2 student: " + "; ".join(problems))
    config.n_embd, config.n_layer, config.n_head, config.n_inner = width, depth, heads, mlp


# Family name -> how a student's shape overrides a copy of the teacher's config (in place).
SHAPE_RULES: dict[str, Callable[[PretrainedConfig, StudentShape], None]] = {
    "vit": _vit_shape, "deit": _vit_shape, "convnext": _convnext_shape, "convnextv2": _convnext_shape,
    "llama": _llama_shape, "gpt2": _gpt2_shape, "bert": _encoder_shape, "roberta": _encoder_shape,
    "resnet": _resnet_shape,
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
    architecture = (config.architectures or [""])[0]
    if num_labels is not None and is_text_encoder(config) and not architecture.endswith("ForSequenceClassification"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        config.architectures = [MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[config.model_type]]
    return config


def is_text_encoder(config: PretrainedConfig) -> bool:
    """Whether `config` is of a text encoder with a sequence-classification model: a model type with a masked-LM
    head (BERT, RoBERTa, ...), which a student built with `num_labels` or without `architectures` turns into."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    return (config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)


def create(config: PretrainedConfig, *, classification: bool | None = None) -> torch.nn.Module:
    """Build a randomly initialized model of `config`'s architecture (an image classifier if asked; a text classifier
    for a text encoder's config without `architectures`, a causal language model for a decoder's), in the dtype its
    checkpoint is stored in (`stored_dtype`), so a bf16 teacher gives a bf16 student without an fp32 copy."""
    architecture = (config.architectures or [None])[0]
    is_classifier = architecture is not None and architecture.endswith(IMAGE_CLASSIFICATION_SUFFIXES)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    is_language_model = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if classification is None:
        classification = is_classifier or architecture is None and not is_language_model
    with _default_dtype(stored_dtype(config)):
        if classification and not is_classifier:
            return AutoModelForImageClassification.from_config(config)
        if architecture is None and is_text_encoder(config):
            return transformers.AutoModelForSequenceClassification.from_config(config)
        if architecture is None:
            auto_class = transformers.AutoModelForCausalLM if is_language_model else transformers.AutoModel
            return auto_class.from_config(config)
        model_class = getattr(transformers, architecture, None)
        if model_class is None:
            raise ValueError(f"transformers {transformers.__version__} has no model class {architecture!r}")
        return model_class(config)


def stored_dtype(config: PretrainedConfig) -> torch.dtype:
    """The floating dtype the config's checkpoint is stored in (`dtype`, which configs also set from the older
    `torch_dtype`); float32 when it says none."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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
