"""`NestedDropoutTrainerMixin`: adds the KL term of Bayesian nested networks to the Trainer's loss."""

from __future__ import annotations

import math

import torch

from ..trainer import LossTermTrainerMixin
from .layers import mean_keep_probability, nested_kl, nested_layers, variational_layers

KL_METRIC = "hf_regtools/nested_dropout/kl"
KEEP_METRIC = "hf_regtools/nested_dropout/mean_keep_prob"


def _check_kl_weight(kl_weight) -> float:
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not math.isfinite(kl_weight) \
            or kl_weight < 0:
        raise ValueError(f"kl_weight must be a finite number >= 0 (the paper's recipe uses 1e-5), got {kl_weight!r}")
    return float(kl_weight)


class NestedDropoutTrainerMixin(LossTermTrainerMixin):
    """Trains a model converted by `convert_to_nested`: the training loss becomes `loss + kl_weight * nested_kl(model)`,
    the KL counted once per optimizer step under gradient accumulation and computed in fp32 outside autocast.

    ```py
    from transformers import Trainer

    class NestedTrainer(NestedDropoutTrainerMixin, Trainer):
        pass

    model = convert_to_nested(model, prior_pi=0.95)
    trainer = NestedTrainer(model=model, args=args, train_dataset=train_dataset, kl_weight=1e-5)
    ```

    Logs `hf_regtools/nested_dropout/kl` (the unweighted KL) and `hf_regtools/nested_dropout/mean_keep_prob` (mean over
    the nested layers of the expected fraction of channels kept). In a custom loop, add
    `kl_weight * nested_kl(model)` to each optimizer step's loss once (divide it by the accumulation steps when each
    micro-batch loss is).

    Args:
        kl_weight (`float`, *optional*, defaults to 1e-5): weight of the KL (fixed, as the official recipe; not 1/N).

    Raises:
        `ValueError`: `kl_weight` is negative, or the model has no `NestedConv2d` / `LinearVDO` layer.
    """

    def __init__(self, *args, kl_weight: float = 1e-5, **kwargs):
        self.kl_weight = _check_kl_weight(kl_weight)
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and not variational_layers(model):
            raise ValueError(f"{type(model).__name__} has no NestedConv2d or LinearVDO layer: call "
                             "convert_to_nested(model) before building the Trainer")
        super().__init__(*args, **kwargs)

    def loss_term(self, model) -> tuple[torch.Tensor, dict]:
        kl = nested_kl(model)
        metrics = {KL_METRIC: kl.detach()}
        if nested_layers(model):
            metrics[KEEP_METRIC] = mean_keep_probability(model).detach()
        return self.kl_weight * kl, metrics

    def technique_metrics(self) -> dict[str, float]:
        # the metrics stay tensors until they are logged: no device sync per micro-batch
        return {name: float(value) if isinstance(value, torch.Tensor) else value
                for name, value in super().technique_metrics().items()}

    def technique_use(self):
        from ..hub import TechniqueUse

        settings = {"kl_weight": self.kl_weight}
        layers = [layer for _, layer in nested_layers(self.accelerator.unwrap_model(self.model))]
        settings["nested_layers"] = len(layers)
        for option in ("num_div", "freeze", "prior_pi", "tau", "sampler_logits"):
            values = {getattr(layer, option) for layer in layers}
            if len(values) == 1:
                settings[option] = values.pop()
        return TechniqueUse("nested_dropout", settings)
