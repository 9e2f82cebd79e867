"""`GradientDiagnosticsCallback`: log gradient-direction variance and friends every N optimizer steps;
`SharpnessCallback`: the Hessian trace and top eigenvalue of the training loss, every N optimizer steps."""

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
    call the functions of `hf_regtools.diagnostics` on your own gradients. Buffers (BatchNorm running statistics) are
    restored after the probe passes.

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
        self.probes = probe_batches(train_dataloader, args.per_device_train_batch_size, self.n_batches, self.seed)
        self.initial = _flat_parameters(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self.latest = self.measure(model)

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """Compute the metrics now (RNG states and the model's mode are restored afterwards)."""
        device = next(model.parameters()).device
        rng, was_training = rng_state(), model.training
        buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]  # BatchNorm statistics of the passes
        try:
            model.train()
            gradients = torch.stack([flat_gradient(model, _loss(model, batch, device)) for batch in self.probes])
            model.eval()
            full = torch.stack([flat_gradient(model, _loss(model, batch, device)) for batch in self.probes]).mean(0)
        finally:
            model.train(was_training)
            set_rng_state(rng)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        metrics = {"gdv": gradient_direction_variance(gradients), "gde": gradient_direction_error(gradients, full),
                   "grad_norm": float(gradients.norm(dim=1).mean()),
                   "dist_from_init": float((_flat_parameters(model) - self.initial).norm())}
        return {PREFIX + name: value for name, value in metrics.items()}

    def metrics(self) -> dict[str, float]:
        return dict(self.latest)

    def state(self) -> dict:
        return {"args": {"every_n_steps": self.every_n_steps, "n_batches": self.n_batches, "seed": self.seed},
                "attributes": {}}


def probe_batches(train_dataloader, batch_size: int, n_batches: int, seed: int) -> list[dict]:
    """`n_batches` collated batches of the training set, drawn by a seeded permutation (the training iterator and the
    global RNG are not touched)."""
    dataset, collate = train_dataloader.dataset, train_dataloader.collate_fn
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return [collate([dataset[i] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(n_batches)]


def _loss(model, batch, device):
    outputs = model(**{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()})
    return outputs["loss"] if isinstance(outputs, dict) else outputs.loss


def _flat_parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters() if p.requires_grad])


class SharpnessCallback(TechniqueMetricsCallback, ExportableState):
    """Measure the sharpness of the training loss during training: the Hessian trace (Hutchinson) and the top Hessian
    eigenvalue (power iteration), with Hessian-vector products from `torch.func` (`hf_regtools.diagnostics.sharpness`).

    A fixed probe set of `n_batches` training batches is drawn once (seeded, as `GradientDiagnosticsCallback` draws
    its own). Every `every_n_steps` optimizer steps, the model's own loss on them is probed without dropout, with
    BatchNorm on batch statistics and its running statistics untouched, every RNG restored and `.grad` untouched, so
    training is bit-identical with and without the callback. Logged as `hf_regtools/diagnostics/hessian_trace` and
    `hf_regtools/diagnostics/hessian_top_eigenvalue`; `plot_diagnostics(..., keys=SHARPNESS_KEYS)` draws them. Each
    measurement costs `n_batches * (n_probes + power_iterations)` Hessian-vector products at most. Under DDP every
    process measures the same probe set on the same weights, so the values agree without a reduction.

    In a custom loop: `hessian_trace(model, None, batches)` and `hessian_top_eigenvalue(model, None, batches)`.

    Args:
        every_n_steps (`int`, *optional*, defaults to 100): measurement interval, in optimizer steps.
        n_batches (`int`, *optional*, defaults to 1): probe batches (the loss is their mean).
        n_probes (`int`, *optional*, defaults to 16): Hutchinson probe vectors.
        power_iterations (`int`, *optional*, defaults to 20): the most power iterations (0: no eigenvalue).
        tol (`float`, *optional*, defaults to 1e-3): relative change of the eigenvalue estimate that stops early.
        seed (`int`, *optional*, defaults to 0): seed of the probe set and of the probe vectors.
        method (`str`, *optional*, defaults to `"reverse"`): `"reverse"` (vjp of grad) or `"forward"` (jvp of grad).
        batch_norm (`str`, *optional*, defaults to `"batch"`): BatchNorm statistics, `"batch"` or `"running"`.
    """

    def __init__(self, *, every_n_steps: int = 100, n_batches: int = 1, n_probes: int = 16, power_iterations: int = 20,
                 tol: float = 1e-3, seed: int = 0, method: str = "reverse", batch_norm: str = "batch"):
        from .sharpness import BATCH_NORM_MODES, METHODS

        if every_n_steps < 1 or n_batches < 1 or n_probes < 1 or power_iterations < 0:
            raise ValueError("every_n_steps, n_batches and n_probes must be >= 1 and power_iterations >= 0")
        if method not in METHODS or batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"method must be one of {METHODS} and batch_norm one of {BATCH_NORM_MODES}")
        self.every_n_steps, self.n_batches, self.n_probes = every_n_steps, n_batches, n_probes
        self.power_iterations, self.tol, self.seed, self.method, self.batch_norm = (power_iterations, tol, seed,
                                                                                     method, batch_norm)
        self.probes: list[dict] = []
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.probes = probe_batches(train_dataloader, args.per_device_train_batch_size, self.n_batches, self.seed)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self.latest = self.measure(model)

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """Compute the metrics now, on the probe set."""
        from .sharpness import hessian_top_eigenvalue, hessian_trace

        options = {"seed": self.seed, "method": self.method, "batch_norm": self.batch_norm}
        metrics = {"hessian_trace": hessian_trace(model, None, self.probes, self.n_probes, **options)}
        if self.power_iterations:
            metrics["hessian_top_eigenvalue"] = hessian_top_eigenvalue(model, None, self.probes,
                                                                       self.power_iterations, tol=self.tol, **options)
        return {PREFIX + name: value for name, value in metrics.items()}

    def metrics(self) -> dict[str, float]:
        return dict(self.latest)

    def state(self) -> dict:
        return {"args": {"every_n_steps": self.every_n_steps, "n_batches": self.n_batches, "n_probes": self.n_probes,
                         "power_iterations": self.power_iterations, "tol": self.tol, "seed": self.seed,
                         "method": self.method, "batch_norm": self.batch_norm},
                "attributes": {}}
