"""Where dropout and stochastic depth live in each supported family, as settable rate sites.

A `RateSite` is one float that a forward pass reads at call time: `nn.Dropout.p`, a float attention-dropout
attribute (transformers ViT and Swin `attention_dropout`), or `DropPath.drop_prob`. Sites are found once and then
updated cheaply, so schedules never walk the module tree at every step.

Every function takes the model as the Trainer holds it: the supported model is found inside wrappers
(`find_supported_model`), and sites and slots are named with the outer model's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from . import UnsupportedModelError, find_supported_model, library_adapter

DROP_PATH_SLOT = re.compile(r"(^|\.)drop_path\d*$")


@dataclass(frozen=True)
class RateSite:
    """One dropout-like rate: `module.attribute`, named `name` in the model."""

    name: str
    module: Any
    attribute: str

    def get(self) -> float:
        return getattr(self.module, self.attribute)

    def set(self, rate: float) -> None:
        attributes = vars(self.module)
        if self.attribute in attributes:  # a plain float: skip nn.Module.__setattr__'s parameter/buffer checks
            attributes[self.attribute] = rate
        else:
            setattr(self.module, self.attribute, rate)


def dropout_sites(model: torch.nn.Module, *, include_head: bool = False) -> list[RateSite]:
    """Every dropout rate of `model`: `nn.Dropout` modules and float attention-dropout attributes.

    The classifier head's dropout is left out unless `include_head` (the official ViT has none).
    """
    found = find_supported_model(model)
    family = found.family
    sites = []
    for name, module in found.module.named_modules():
        if isinstance(module, torch.nn.Dropout):
            if include_head or family.head_dropout is None or not re.search(family.head_dropout, name):
                sites.append(RateSite(found.qualified(name), module, "p"))
        for attribute in family.attention_dropout:
            if isinstance(getattr(module, attribute, None), float):
                sites.append(RateSite(f"{found.qualified(name)}.{attribute}", module, attribute))
    return sites


def drop_path_slots(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """`(name, module)` of every stochastic-depth slot, in depth order: `DropPath` modules and `Identity` placeholders.

    Names are the outer model's (`timm_model.blocks.1.drop_path1` in a `TimmWrapperForImageClassification`).
    """
    found = find_supported_model(model)
    return [(found.qualified(name), module) for name, module in found.module.named_modules()
            if DROP_PATH_SLOT.search(name) and (hasattr(module, "drop_prob") or isinstance(module, torch.nn.Identity))]


def drop_path_blocks(model: torch.nn.Module) -> list[list[RateSite]]:
    """Drop-path sites grouped by residual block, in depth order (ConvNeXt: one global order across stages).

    The first block's rate is 0 under the linear depth rule, so libraries build it as `Identity` even with a non-zero
    drop path rate; it stays in the list with no site.

    Raises:
        `UnsupportedModelError`: a slot of a later block is still an `Identity` placeholder (see `install_drop_path`).
    """
    blocks: dict[str, list[RateSite]] = {}
    placeholders = []
    for name, module in drop_path_slots(model):
        sites = blocks.setdefault(name.rpartition(".")[0], [])
        if hasattr(module, "drop_prob"):
            sites.append(RateSite(name, module, "drop_prob"))
        elif len(blocks) > 1:
            placeholders.append(name)
    if placeholders:
        raise UnsupportedModelError(
            f"{len(placeholders)} stochastic-depth slots are Identity placeholders (the model was built with drop "
            f"path rate 0), e.g. {placeholders[:3]}: setting a rate on them would do nothing. Call "
            "install_drop_path(model) first, or build the model with a non-zero drop path rate."
        )
    return list(blocks.values())


def install_drop_path(model: torch.nn.Module) -> list[str]:
    """Replace `Identity` drop-path placeholders by the family's `DropPath` (rate 0); returns the replaced names.

    Surgery keeps every parameter (placeholders have none). Do it before the optimizer and DDP exist: before
    `Trainer(...)` or in `on_init_end`. The names are the outer model's, for `surgery.replace_modules(model, ...)`.
    """
    from ..surgery import replace_modules

    found = find_supported_model(model)
    make = library_adapter(found.library).drop_path_class(found.family)
    placeholders = [name for name, module in drop_path_slots(model) if isinstance(module, torch.nn.Identity)]
    replace_modules(model, {name: make(0.0) for name in placeholders})
    return placeholders
