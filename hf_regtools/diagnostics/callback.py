"""`GradientDiagnosticsCallback`: log gradient-direction variance and friends every N optimizer steps."""

from __future__ import annotations

import torch
from transformers.trainer_callback import ExportableState

from .._trainer_utils import rng_state, set_rng_state
from ..trainer import TechniqueMetricsCallback
from .functional import flat_gradient, gradient_direction_error, gradient_direction_variance

PREFIX = "hf_regtools/diagnostics/"


class GradientDiagnosticsCallback(TechniqueMetricsCallback, ExportableState):
    """Measure the directional variance of mini-batch gradients during training (Liu et al., ICML 2023, §3).

    A fixed probe set of `n_batches` training batches is drawn once (seeded, without consuming the training
    iterator). Every `every_n_steps` optimizer steps it computes, with `torch.autograd.grad` (never touching
    `.grad`) and with every RNG saved and restored (training is unchanged):

    - `gdv`: gradient direction variance of the probe gradients (train mode, so dropout is active);
    - `gde`: their direction error against the gradient over all probe batches in eval mode (no dropout);
    - `grad_norm`: the mean norm of the probe gradients; `dist_from_init`: the distance of the parameters from
      their values when training began.

    Logged as `hf_regtools/diagnostics/<name>` (through `RegtoolsTrainerMixin` to every reporter). In a custom loop,
    call the functions of `hf_regtools.diagnostics` on your own gradients.

    Args:
        every_n_steps (`int`, *optional*, defaults to 100): measurement interval, in optimizer steps.
        n_batches (`int`, *optional*, defaults to 8): probe batches.
        seed (`int`, *optional*, defaults to 0): seed of the probe set.
    """

    def __init__(self, *, every_n_steps: int = 100, n_batches: int = 8, seed: int = 0):
        if every_n_steps < 1 or n_batches < 2:
            raise ValueError("every_n_steps must be >= 1 and n_batches >= 2 (a variance needs two gradients)")
        self.every_n_steps, self.n_batches, self.seed = every_n_steps, n_batches, seed
        self.probes: list[dict] = []
        self.initial: torch.Tensor | None = None
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        dataset, collate = train_dataloader.dataset, train_dataloader.collate_fn
        batch_size = args.per_device_train_batch_size
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.probes = [collate([dataset[i] for i in order[k * batch_size:(k + 1) * batch_size]])
                       for k in range(self.n_batches)]
        self.initial = _flat_parameters(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self.latest = self.measure(model)

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """Compute the metrics now (RNG states and the model's mode are restored afterwards)."""
        device = next(model.parameters()).device
        rng, was_training = rng_state(), model.training
        try:
            model.train()
            gradients = torch.stack([flat_gradient(model, _loss(model, batch, device)) for batch in self.probes])
            model.eval()
            full = torch.stack([flat_gradient(model, _loss(model, batch, device)) for batch in self.probes]).mean(0)
        finally:
            model.train(was_training)
            set_rng_state(rng)
        metrics = {"gdv": gradient_direction_variance(gradients), "gde": gradient_direction_error(gradients, full),
                   "grad_norm": float(gradients.norm(dim=1).mean()),
                   "dist_from_init": float((_flat_parameters(model) - self.initial).norm())}
        return {PREFIX + name: value for name, value in metrics.items()}

    def metrics(self) -> dict[str, float]:
        return dict(self.latest)

    def state(self) -> dict:
        return {"args": {"every_n_steps": self.every_n_steps, "n_batches": self.n_batches, "seed": self.seed},
                "attributes": {}}


def _loss(model, batch, device):
    outputs = model(**{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()})
    return outputs["loss"] if isinstance(outputs, dict) else outputs.loss


def _flat_parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters() if p.requires_grad])
