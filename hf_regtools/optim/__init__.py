"""Optimizers and optimizer helpers: Automatic Gradient Descent (`AGD`, `agd_init_`, see `README.md` here) and the
weight-decay grouping of the papers' recipes, for the Trainer and for custom loops.

The official code of *Dropout Reduces Underfitting* (`facebookresearch/dropout`) and *A Coefficient Makes SVRG
Effective* (`davidyyd/alpha-SVRG`), like the ConvNeXt codebase they build on, groups parameters in
`optim_factory.py::get_parameter_groups` with `skip_list = model.no_weight_decay()`: every 1-D parameter, every bias
and every name in the skip list get no weight decay. The Trainer's default (`Trainer.get_decay_parameter_names`)
only exempts biases and LayerNorm weights, so it decays timm's `cls_token` / `pos_embed`, ConvNeXt layer scale (timm
`gamma`, transformers `layer_scale_parameter`) and BatchNorm weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import re
from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    import torch

    from .agd import AGD, agd_init_
    from .agd_callback import AGDMetricsCallback

_LAZY = {"AGD": ".agd", "agd_init_": ".agd", "AGDMetricsCallback": ".agd_callback"}

__all__ = ["AGD", "AGDMetricsCallback", "PaperWeightDecayMixin", "agd_init_", "decay_parameter_names",
           "no_weight_decay_names", "param_groups_weight_decay"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameters kept out of weight decay by name (beyond the 1-D rule), with `model`'s names.

    These are what timm's `no_weight_decay()` lists (`cls_token`, `pos_embed`, `dist_token`, Swin's relative position
    bias tables) and, for transformers models, the same tensors under their names (`embeddings.cls_token`,
    `embeddings.position_embeddings`, `embeddings.distillation_token`, ...; `ModelFamily.no_weight_decay`). The model
    is found inside wrappers (`hf_regtools.adapters.find_supported_model`); a model of another family contributes its
    `no_weight_decay()`, if it has one.
    """
    from ..adapters import UnsupportedModelError, find_supported_model

    try:
        found = find_supported_model(model)
    except UnsupportedModelError:
        found = None
    if found is not None:
        owner, prefix, patterns = found.module, found.prefix, found.family.no_weight_decay
    else:
        owner, prefix, patterns = _shallowest_with_no_weight_decay(model), "", ()
        if owner is not None:
            prefix = next(name for name, module in model.named_modules() if module is owner)
    qualify = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    names = set()
    if owner is not None and callable(getattr(owner, "no_weight_decay", None)):
        names |= {qualify(name) for name in owner.no_weight_decay()}
    if found is not None:
        names |= {qualify(name) for name, _ in found.module.named_parameters()
                  if any(re.search(pattern, name) for pattern in patterns)}
    return names


def _shallowest_with_no_weight_decay(model: torch.nn.Module) -> torch.nn.Module | None:
    modules = sorted(model.named_modules(), key=lambda item: item[0].count(".") + bool(item[0]))
    return next((module for _, module in modules if callable(getattr(module, "no_weight_decay", None))), None)


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float, *,
                              exempt: Iterable[torch.nn.Parameter] = ()) -> list[dict]:
    """Optimizer parameter groups as in the papers' code: no weight decay for 1-D parameters, biases and
    `no_weight_decay_names(model)`; `weight_decay` for the rest. Frozen parameters are left out. Parameters in
    `exempt` (those a technique regularizes in place of weight decay: weight rescaling, WEISSI) join the group without
    decay.

    Built on `timm.optim.param_groups_weight_decay`, which also exempts 0-D parameters (the official `len(shape) == 1`
    decays them; no supported family has one). With the Trainer, use `PaperWeightDecayMixin`, or pass the groups
    through `optimizer_cls_and_kwargs` (the Trainer takes `"params"` from the keyword arguments, in place of its own
    groups; `weight_decay` then comes from the groups, not from `TrainingArguments`):

    ```py
    trainer = Trainer(model, args, train_dataset=train, optimizer_cls_and_kwargs=(
        torch.optim.AdamW, {"params": param_groups_weight_decay(model, 0.05), "lr": 4e-3}))
    ```

    In a custom loop: `torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=4e-3)`.

    Example:

    ```python
    from hf_regtools.optim import param_groups_weight_decay
    from hf_regtools.testing.tiny_models import timm_vit

    no_decay, decay = param_groups_weight_decay(timm_vit(depth=1), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ```
    """
    from timm.optim import param_groups_weight_decay as timm_param_groups_weight_decay

    groups = timm_param_groups_weight_decay(model, weight_decay=weight_decay,
                                            no_weight_decay_list=sorted(no_weight_decay_names(model)))
    exempt_ids = {id(parameter) for parameter in exempt}
    if not exempt_ids:
        return groups
    no_decay = next((group for group in groups if group["weight_decay"] == 0.0), None)
    if no_decay is None:
        no_decay = {"params": [], "weight_decay": 0.0}
        groups.insert(0, no_decay)
    for group in groups:
        if group is not no_decay:
            no_decay["params"] += [p for p in group["params"] if id(p) in exempt_ids]
            group["params"] = [p for p in group["params"] if id(p) not in exempt_ids]
    return [group for group in groups if group["params"] or group is no_decay]


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that `param_groups_weight_decay` decays (what `Trainer.get_decay_parameter_names`
    returns under `PaperWeightDecayMixin`)."""
    decayed = {id(p) for group in param_groups_weight_decay(model, 1.0) if group["weight_decay"] for p in group["params"]}
    return [name for name, parameter in model.named_parameters() if id(parameter) in decayed]


class PaperWeightDecayMixin:
    """Trainer mixin: weight decay grouped as in the papers' code (see `param_groups_weight_decay`).

    It overrides only the public `Trainer.get_decay_parameter_names`, which `Trainer.create_optimizer` uses to build
    its decay / no-decay groups, so any `optim` and `weight_decay` of `TrainingArguments` keep working. Combine it with
    the other hf_regtools mixins, first:

    ```py
    class MyTrainer(PaperWeightDecayMixin, RegtoolsTrainerMixin, Trainer):
        pass
    ```
    """

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)
