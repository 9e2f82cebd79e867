"""timm adapter: configs, student construction and export for timm ViT/DeiT and ConvNeXt (v1, v2); drop path for
these and Swin."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf
from timm.models import PretrainedCfg
from timm.models._hub import load_model_config_from_path

from . import ModelFamily, StudentShape, UnsupportedModelError, convnext_dims, stage_dims, vit_dims


@dataclass
class TimmModelConfig:
    """What timm needs to rebuild a model: the registered architecture, its keyword arguments and `pretrained_cfg`.

    Attributes:
        architecture (`str`): a registered timm model name (`timm.list_models()`).
        model_args (`dict`): keyword arguments over the architecture's defaults.
        num_classes (`int`, *optional*): the classifier's classes.
        pretrained_cfg (`dict`): `pretrained_cfg` fields laid over the architecture's default one when the model is
            built (preprocessing, license, labels); weight-source fields (`url`, `hf_hub_id`, `file`, ...) are ignored.
    """

    architecture: str
    model_args: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    def create(self, **overrides: Any) -> torch.nn.Module:
        classes = {} if self.num_classes is None else {"num_classes": self.num_classes}
        kwargs = {**self.model_args, **classes, **overrides}
        overlay = {key: value for key, value in self.pretrained_cfg.items()
                   if key in _CFG_FIELDS and (key not in _SOURCE_FIELDS or value is None)}
        return timm.create_model(self.architecture, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)


_CFG_FIELDS = {f.name for f in fields(PretrainedCfg)}
_SOURCE_FIELDS = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture"}  # clear only
# pretrained_cfg fields that describe the pretrained weights rather than the architecture: a weight-selected student
# inherits none of them from its builder architecture's default cfg.
_WEIGHT_FIELDS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "tag", "license", "description",
                  "origin_url", "paper_name", "paper_ids", "notes", "label_names", "label_descriptions", "label_offset")
# pretrained_cfg fields that say how to prepare the inputs (timm.data.resolve_data_config reads them).
DATA_FIELDS = ("input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation", "crop_pct",
               "test_crop_pct", "crop_mode", "mean", "std")
# Size words of timm's model names (`vit_small_patch16_224`, `convnext_femto`), used to find a registered
# architecture of the student's shape.
_SIZES = ("zepto", "atto", "femto", "pico", "nano", "tiny", "small", "medium", "base", "large", "xlarge", "xxlarge",
          "huge", "giant", "gigantic")


def is_timm_config(config: dict) -> bool:
    return "architecture" in config and "model_type" not in config


def load_config(folder: str | Path) -> TimmModelConfig:
    """Read a timm `config.json` (as written by `save_for_hf` / found in `timm/...` Hub repos)."""
    pretrained_cfg, architecture, model_args = load_model_config_from_path(folder)
    return TimmModelConfig(architecture, dict(model_args), pretrained_cfg.get("num_classes"), dict(pretrained_cfg))


def config_of(model: torch.nn.Module) -> TimmModelConfig:
    """The config `timm.create_model` recorded on `model` (architecture, arguments, pretrained_cfg)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if not pretrained_cfg or not timm.is_model(pretrained_cfg.get("architecture")):
        raise UnsupportedModelError(
            f"this timm {type(model).__name__} was built from its class, not by timm.create_model, so it has no "
            "architecture name to rebuild or save it under; build it with timm.create_model(name, **kwargs), or "
            "initialize it in place with select_weights(teacher, student)")
    return TimmModelConfig(pretrained_cfg["architecture"], dict(getattr(model, "_model_args", {})), model.num_classes,
                           dict(pretrained_cfg))


def model_name(config: TimmModelConfig) -> str:
    """How error messages name the model: its architecture, e.g. `resnet18`."""
    return config.architecture


def create(config: TimmModelConfig) -> torch.nn.Module:
    """Build a randomly initialized model from `config`."""
    return config.create()


def _skeleton(config: TimmModelConfig, **overrides: Any) -> torch.nn.Module:
    with torch.device("meta"):
        return config.create(**overrides)


def _vit_shape(skeleton: torch.nn.Module, args: dict[str, Any], shape: StudentShape
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    block = skeleton.blocks[0]
    width, heads, mlp = vit_dims(shape, teacher_width=skeleton.embed_dim, teacher_heads=block.attn.num_heads,
                                 teacher_mlp=block.mlp.fc1.out_features)
    args.update(embed_dim=width, num_heads=heads, mlp_ratio=mlp / width,
                depth=shape.depth if shape.depth is not None else len(skeleton.blocks))
    if not isinstance(args["depth"], int):
        raise ValueError(f"depth for a ViT must be one integer, got {args['depth']!r}")
    return ("embed_dim", "num_heads", "mlp_ratio"), ("depth",)


def _convnext_shape(skeleton: torch.nn.Module, args: dict[str, Any], shape: StudentShape
                    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    widths = tuple(stage.blocks[0].conv_dw.out_channels for stage in skeleton.stages)
    depths = tuple(len(stage.blocks) for stage in skeleton.stages)
    args["dims"], args["depths"] = convnext_dims(shape, teacher_widths=widths, teacher_depths=depths)
    return ("dims",), ("depths",)


def _resnet_shape(skeleton: torch.nn.Module, args: dict[str, Any], shape: StudentShape
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A ResNet's `channels` (stage widths over the block expansion), `layers` and, for a deep stem, `stem_width`.

    timm's plain 7x7 stem is always 64 wide; a deep stem (`stem_type="deep"`, `"deep_tiered"`) is `2 * stem_width`
    wide, kept as wide as the first stage when the teacher's are equal (no downsampling shortcut), else scaled with it.
    """
    stages = [module for name, module in skeleton.named_children() if name.startswith("layer")]
    expansion = type(stages[0][0]).expansion
    widths, depths = stage_dims(shape, teacher_widths=tuple(_block_width(stage) for stage in stages),
                                teacher_depths=tuple(len(stage) for stage in stages), model="ResNet", check_sizes=True)
    if any(width % expansion for width in widths):
        raise ValueError(f"the stage widths {widths} of a bottleneck ResNet must be multiples of its expansion, "
                         f"{expansion} (timm's `channels` are the widths over {expansion})")
    args["channels"], args["layers"] = tuple(width // expansion for width in widths), depths
    teacher_stem, teacher_first = skeleton.bn1.num_features, _block_width(stages[0])
    projects = stages[0][0].downsample is not None
    if not isinstance(skeleton.conv1, torch.nn.Sequential):
        if (widths[0] != 64) != projects:
            raise ValueError(
                f"timm ResNet's 7x7 stem is always 64 channels wide; the teacher's first stage ({teacher_first} "
                f"channels) {'has' if projects else 'has no'} downsampling shortcut, so the student's "
                f"{'cannot be 64 channels wide' if projects else 'must keep 64 channels'} (hidden_size {widths})")
        return ("channels",), ("layers",)
    stem_width = (widths[0] if not projects else max(1, round(teacher_stem * widths[0] / teacher_first))) // 2
    if skeleton.conv1[0].out_channels != skeleton.conv1[3].out_channels and stem_width < 4:
        raise ValueError(f"a tiered deep stem needs stem_width >= 4 (its first convolution is 3 * (stem_width // 4) "
                         f"wide), but a first stage of {widths[0]} channels gives {stem_width}; choose a wider first "
                         "stage")
    if not projects and widths[0] % 2 or projects and 2 * stem_width == widths[0]:
        raise ValueError(f"cannot give the deep stem of this ResNet student a width for a first stage of "
                         f"{widths[0]} channels: the teacher's stem ({teacher_stem}) and first stage "
                         f"({teacher_first}) are {'different' if projects else 'equal'}, and so must the student's "
                         f"be{' (an even width)' if not projects else ''}; choose another first-stage width")
    args["stem_width"] = stem_width
    return ("channels", "stem_width"), ("layers",)


def _block_width(stage: torch.nn.Module) -> int:
    block = stage[-1]
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


# Family name -> how a student's shape overrides the teacher's `model_args` (in place), given the teacher's skeleton;
# returns the `model_args` keys that set widths and those that set depths.
SHAPE_RULES: dict[str, Callable[[torch.nn.Module, dict[str, Any], StudentShape],
                                tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "vit": _vit_shape, "deit": _vit_shape, "convnext": _convnext_shape, "convnextv2": _convnext_shape,
    "resnet": _resnet_shape,
}


def student_config(teacher: TimmModelConfig, shape: StudentShape, family: ModelFamily,
                   num_classes: int | None = None) -> TimmModelConfig:
    """The student's config: the teacher's with the student's architecture overrides applied.

    The architecture is the registered timm model of the student's shape when there is one (a ViT-S teacher and the
    `vit-tiny` preset give `vit_tiny_patch16_224`), with `model_args` for what still differs; else the teacher's
    architecture with the student's shape in `model_args`. `pretrained_cfg` keeps the source's input preprocessing
    and drops what describes the source's weights (tag, Hub id, license, labels of another label space).
    """
    if family.name not in SHAPE_RULES and not shape.is_empty():
        raise UnsupportedModelError(f"cannot build a timm {family.name} student from a shape; pass the student's "
                                    "config (a folder or Hub id) instead")
    args = dict(teacher.model_args)
    width_keys, depth_keys = SHAPE_RULES[family.name](_skeleton(teacher), args, shape) if (
        family.name in SHAPE_RULES) else ((), ())
    classes = num_classes if num_classes is not None else teacher.num_classes
    pretrained_cfg = {key: value for key, value in teacher.pretrained_cfg.items() if key in DATA_FIELDS}
    if classes == teacher.num_classes:
        pretrained_cfg.update({key: teacher.pretrained_cfg[key] for key in ("label_names", "label_descriptions",
                                                                            "label_offset")
                               if teacher.pretrained_cfg.get(key) is not None})
    pretrained_cfg = {**dict.fromkeys(_WEIGHT_FIELDS), **pretrained_cfg, "custom_load": False, "num_classes": classes}
    student = TimmModelConfig(teacher.architecture, args, classes, pretrained_cfg)
    return _registered(student, width_keys, depth_keys, family) if family.name in SHAPE_RULES else student


def _registered(config: TimmModelConfig, width_keys: tuple[str, ...], depth_keys: tuple[str, ...],
                family: ModelFamily) -> TimmModelConfig:
    """`config` under the registered architecture that builds the same model with the fewest `model_args`."""
    skeleton = _skeleton(config)
    target = _fingerprint(skeleton)
    width = target[0]
    tokens = config.architecture.split("_")
    candidates = [config.architecture] + [
        name for i, token in enumerate(tokens) if token in _SIZES for size in _SIZES
        if size != token and timm.is_model(name := "_".join([*tokens[:i], size, *tokens[i + 1:]]))]
    extras = [{}]
    if family.layout == "hierarchical":  # timm's smallest ConvNeXts default to conv_mlp=True, the others to False
        extras.append({"conv_mlp": bool(getattr(skeleton.stages[0].blocks[0], "use_conv_mlp", False))})
    best = None
    for name in candidates:
        if _default_width(name, family.layout) != width:
            continue
        for dropped in (width_keys + depth_keys, width_keys):
            for extra in extras:
                args = {k: v for k, v in config.model_args.items() if k not in dropped} | extra
                if best is not None and len(args) >= len(best.model_args):
                    continue
                candidate = TimmModelConfig(name, args, config.num_classes, config.pretrained_cfg)
                if _fingerprint(_skeleton(candidate)) == target:
                    best = candidate
    return best or config


@functools.lru_cache(maxsize=None)
def _default_width(name: str, layout: str):
    """The embedding width (ViT) or stage widths (ConvNeXt) of a registered architecture's defaults."""
    shallow = {"depth": 1} if layout == "isotropic" else {"depths": (1, 1, 1, 1)}
    try:
        with torch.device("meta"):
            return _fingerprint(timm.create_model(name, pretrained=False, **shallow))[0]
    except Exception:  # an architecture that cannot be built so (other stage count, ...) is no candidate
        return None


def _fingerprint(model: torch.nn.Module) -> tuple:
    """What makes two timm models the same: widths, tensor names and shapes, module types and their settings."""
    if hasattr(model, "stages"):
        width = tuple(stage.blocks[0].conv_dw.out_channels for stage in model.stages if hasattr(stage, "blocks"))
    else:
        width = getattr(model, "embed_dim", None)
    shapes = tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())
    settings = tuple((name, type(module).__name__, tuple(sorted(
        (key, value) for key, value in vars(module).items()
        if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str, tuple)))))
        for name, module in model.named_modules())
    return width, shapes, settings


def input_spec(config: TimmModelConfig) -> dict[str, Any]:
    """What the model's input preprocessing depends on: image channels, image size and patch (stem kernel) size."""
    model = _skeleton(config)
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    first_conv = first_conv if isinstance(first_conv, torch.nn.Conv2d) else first_conv.proj
    image_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return {"channels": first_conv.in_channels, "image size": image_size, "patch size": first_conv.kernel_size}


def inherit_preprocessing(student: TimmModelConfig, teacher: TimmModelConfig) -> TimmModelConfig:
    """`student` with the teacher's data config (`pretrained_cfg` input size, interpolation, crop, mean, std)."""
    data = {key: teacher.pretrained_cfg.get(key) for key in DATA_FIELDS}
    return replace(student, pretrained_cfg={**student.pretrained_cfg, **data})


def with_metadata(config: TimmModelConfig, **metadata: Any) -> TimmModelConfig:
    """`config` with `pretrained_cfg` metadata set (`license`, `description`)."""
    return replace(config, pretrained_cfg={**config.pretrained_cfg, **metadata})


def save(model: torch.nn.Module, folder: str | Path) -> None:
    """Write `model.safetensors` and a timm `config.json` that `timm.create_model("hf-hub:...")` rebuilds."""
    save_for_hf(model, str(folder), safe_serialization=True)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    if "model_args" not in config:
        raise RuntimeError("timm did not record the model arguments; cannot export a rebuildable config")
    # The classes are recorded as the config's `num_classes`, which timm and transformers' TimmWrapper both read;
    # a second copy in `model_args` makes TimmWrapper pass `num_classes` twice.
    if config["model_args"].pop("num_classes", None) is not None:
        config_file.write_text(json.dumps(config, indent=4, sort_keys=False))


def hub_id_of(name: str) -> str | None:
    """The Hub repo of a timm pretrained tag such as `vit_small_patch16_224.augreg_in21k`, if it has one."""
    if not timm.is_model(name.split(".")[0]):
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def drop_path_class(family):
    """The stochastic-depth module timm builds for this family."""
    from timm.layers import DropPath

    return DropPath
