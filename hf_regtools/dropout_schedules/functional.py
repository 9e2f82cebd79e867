"""Setting dropout and stochastic-depth rates on a model (the functional core of early/late dropout)."""

from __future__ import annotations

import torch

from ..adapters import UnsupportedModelError, detect_family
from ..adapters.sites import drop_path_blocks, dropout_sites, install_drop_path

TARGETS = ("dropout", "drop_path")


def block_rates(rate: float, num_blocks: int) -> list[float]:
    """The linear depth rule: block `i` of `L` gets `linspace(0, rate, L)[i]` (block 0 always 0)."""
    return torch.linspace(0, rate, num_blocks).tolist()


class DropRateController:
    """Set the dropout (or drop-path) rate of every site of a model, cheaply and repeatedly.

    Sites are discovered once (`nn.Dropout.p`, float attention dropout, `DropPath.drop_prob` per block); `set(r)`
    then writes only floats, and nothing when `r` did not change.

    Args:
        model (`nn.Module`): a timm or transformers ViT/DeiT/ConvNeXt/Swin.
        target (`str`, *optional*, defaults to `"dropout"`): `"dropout"` or `"drop_path"` (stochastic depth, with the
            linear depth rule `linspace(0, r, L)` over all blocks).
        include_head (`bool`, *optional*, defaults to `False`): also schedule the classifier-head dropout.
        on_identity (`str`, *optional*, defaults to `"install"`): stochastic-depth slots built as `Identity` (rate 0
            at construction) are replaced by the family's `DropPath` (`"install"`), or raise (`"error"`).

    Example (a custom loop):

    ```python
    from hf_regtools.dropout_schedules import DropRateController
    from hf_regtools.schedules import drop_schedule
    from hf_regtools.testing.tiny_models import timm_vit

    model = timm_vit(depth=2)
    rates = DropRateController(model, target="dropout")
    for step in range(3):
        rates.set(drop_schedule(step, p=0.1, cutoff_step=2, mode="early", schedule="linear"))
    assert rates.rate == 0.0
    ```
    """

    def __init__(self, model: torch.nn.Module, *, target: str = "dropout", include_head: bool = False,
                 on_identity: str = "install"):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
        if on_identity not in ("install", "error"):
            raise ValueError(f"on_identity must be 'install' or 'error', got {on_identity!r}")
        self.target, self.rate = target, None
        family = detect_family(model, technique="dropout_schedules")
        if target == "dropout":
            self.sites = [[site] for site in dropout_sites(model, include_head=include_head)]
        else:
            if on_identity == "install":
                install_drop_path(model)
            self.sites = drop_path_blocks(model)
        if not self.sites:
            raise UnsupportedModelError(
                f"{family.label} has no {'dropout' if target == 'dropout' else 'stochastic-depth'} site to schedule"
                + ("; transformers ViT has no stochastic depth, use target='dropout'" if target == "drop_path" else "")
            )

    def set(self, rate: float) -> None:
        """Give every site the rate `rate` (drop path: block `i` gets `linspace(0, rate, L)[i]`)."""
        if rate == self.rate:
            return
        per_block = block_rates(rate, len(self.sites)) if self.target == "drop_path" else [rate] * len(self.sites)
        for block, block_rate in zip(self.sites, per_block):
            for site in block:
                site.set(block_rate)
        self.rate = rate


def apply_drop_rate(model: torch.nn.Module, rate: float, *, target: str = "dropout", include_head: bool = False,
                    on_identity: str = "install") -> DropRateController:
    """Set `rate` on every dropout (or drop-path) site of `model` once; returns the controller for later updates."""
    controller = DropRateController(model, target=target, include_head=include_head, on_identity=on_identity)
    controller.set(rate)
    return controller
