"""timm adapter: configs, student construction and export for timm ViT/DeiT and ConvNeXt (v1, v2); drop path for
these and Swin."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf
from timm.models._hub import load_model_config_from_path

from . import ModelFamily, StudentShape, convnext_dims, vit_dims


@dataclass
class TimmModelConfig:
    """What timm needs to rebuild a model: the registered architecture and its keyword arguments."""

    architecture: str
    model_args: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None

    def create(self, **overrides: Any) -> torch.nn.Module:
        classes = {} if self.num_classes is None else {"num_classes": self.num_classes}
        kwargs = {**self.model_args, **classes, **overrides}
        return timm.create_model(self.architecture, pretrained=False, **kwargs)


def is_timm_config(config: dict) -> bool:
    return "architecture" in config and "model_type" not in config


def load_config(folder: str | Path) -> TimmModelConfig:
    """Read a timm `config.json` (as written by `save_for_hf` / found in `timm/...` Hub repos)."""
    pretrained_cfg, architecture, model_args = load_model_config_from_path(folder)
    return TimmModelConfig(architecture, dict(model_args), pretrained_cfg.get("num_classes"))


def config_of(model: torch.nn.Module) -> TimmModelConfig:
    architecture = model.pretrained_cfg.get("architecture") or type(model).__name__
    return TimmModelConfig(architecture, dict(getattr(model, "_model_args", {})), model.num_classes)


def create(config: TimmModelConfig) -> torch.nn.Module:
    """Build a randomly initialized model from `config`."""
    return config.create()


def _skeleton(config: TimmModelConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return config.create()


def student_config(teacher: TimmModelConfig, shape: StudentShape, family: ModelFamily,
                   num_classes: int | None = None) -> TimmModelConfig:
    """The teacher's config with the student's architecture overrides applied."""
    skeleton = _skeleton(teacher)
    args = dict(teacher.model_args)
    if family.layout == "isotropic":
        block = skeleton.blocks[0]
        width, heads, mlp = vit_dims(shape, teacher_width=skeleton.embed_dim, teacher_heads=block.attn.num_heads,
                                     teacher_mlp=block.mlp.fc1.out_features)
        args.update(embed_dim=width, num_heads=heads, mlp_ratio=mlp / width,
                    depth=shape.depth if shape.depth is not None else len(skeleton.blocks))
        if not isinstance(args["depth"], int):
            raise ValueError(f"depth for a ViT must be one integer, got {args['depth']!r}")
    else:
        widths = tuple(stage.blocks[0].conv_dw.out_channels for stage in skeleton.stages)
        depths = tuple(len(stage.blocks) for stage in skeleton.stages)
        args["dims"], args["depths"] = convnext_dims(shape, teacher_widths=widths, teacher_depths=depths)
    return TimmModelConfig(teacher.architecture, args, num_classes if num_classes is not None else teacher.num_classes)


def save(model: torch.nn.Module, folder: str | Path) -> None:
    """Write `model.safetensors` and a timm `config.json` that `timm.create_model("hf-hub:...")` rebuilds."""
    save_for_hf(model, str(folder), safe_serialization=True)
    config = json.loads((Path(folder) / "config.json").read_text())
    if "model_args" not in config:
        raise RuntimeError("timm did not record the model arguments; cannot export a rebuildable config")


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
