"""Sharpness of the training loss: Hessian-vector products (`torch.func`), the Hessian trace (Hutchinson) and the top
Hessian eigenvalue (power iteration).

The loss is `loss_fn(model, batch)` (default: the model's own loss, `model(**batch)["loss"]`), averaged over `batches`;
its Hessian is taken with respect to the trainable parameters. While measuring, the model runs without dropout-like
randomness (`eval()`), BatchNorm layers use the batch's statistics (the training loss) without updating their running
statistics (`batch_norm="batch"`) or their running statistics (`"running"`), and every RNG is restored afterwards, so
measuring changes neither the model, nor its modes and buffers, nor `.grad`, nor the random streams of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._trainer_utils import rng_state, set_rng_state

METHODS = ("forward", "reverse")
BATCH_NORM_MODES = ("batch", "running")


def model_loss(model: torch.nn.Module, batch: Mapping) -> torch.Tensor:
    """The model's own loss on `batch` (moved to the model's device): `model(**batch)["loss"]` (or `.loss`)."""
    device = next(model.parameters()).device
    outputs = model(**{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()})
    return outputs["loss"] if isinstance(outputs, dict) else outputs.loss


class _Loss(torch.nn.Module):
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


@contextmanager
def probe_mode(model: torch.nn.Module, batch_norm: str = "batch"):
    """Within the block: `model.eval()`, BatchNorm in batch-statistics mode without running-statistics updates
    (`batch_norm="batch"`), scaled dot-product attention on its math backend (the fused kernels have no second
    derivatives), every RNG saved; all restored on exit."""
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm={batch_norm!r}; allowed: {BATCH_NORM_MODES}")
    stack = ExitStack()
    modes = [(module, module.training) for module in model.modules()]
    norms = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    tracked = [module.track_running_stats for module in norms]
    rng = rng_state()
    model.eval()
    try:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if batch_norm == "batch":
            for module in norms:
                module.track_running_stats = False
                module.train()
        yield
    finally:
        for module, flag in zip(norms, tracked):
            module.track_running_stats = flag
        for module, training in modes:
            module.training = training
        set_rng_state(rng)
        stack.close()


class HessianOperator:
    """The Hessian of `mean_b loss_fn(model, b)` over `batches` w.r.t. the trainable parameters, as `H @ v`.

    Vectors are dicts `{parameter name: tensor}` (as `parameters()` gives). `method="reverse"` (default) computes a
    product as `torch.func.vjp` of `torch.func.grad` (double backward: the widest operator support, and the faster one
    in most CPU runs of `benchmarks/label_noise.py`), `"forward"` as `torch.func.jvp` of it (forward-over-reverse). `calls`
    counts the Hessian-vector products, one per batch and vector. Use it inside `probe_mode(model)`.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable | None, batches, *, method: str = "reverse"):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; allowed: {METHODS}")
        self.batches = [batches] if isinstance(batches, Mapping) else list(batches)
        if not self.batches:
            raise ValueError("HessianOperator needs at least one batch")
        self.method = method
        self.module = _Loss(model, loss_fn or model_loss)
        self.params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.calls = 0

    def _gradient(self, batch):
        def loss(params):
            return torch.func.functional_call(self.module, {f"model.{k}": v for k, v in params.items()}, (batch,),
                                              strict=False, tie_weights=True)

        return torch.func.grad(loss)

    def __matmul__(self, vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        total = None
        for batch in self.batches:
            gradient = self._gradient(batch)
            if self.method == "forward":
                product = torch.func.jvp(gradient, (self.params,), (vector,))[1]
            else:
                product = torch.func.vjp(gradient, self.params)[1](vector)[0]
            self.calls += 1
            product = {k: v.detach() for k, v in product.items()}
            total = product if total is None else {k: total[k] + product[k] for k in total}
        return {k: v / len(self.batches) for k, v in total.items()}

    def random_vector(self, generator: torch.Generator, kind: str = "rademacher") -> dict[str, torch.Tensor]:
        vector = {}
        for name, p in self.params.items():
            if kind == "rademacher":
                draw = torch.randint(0, 2, p.shape, generator=generator).mul_(2).sub_(1)
            else:
                draw = torch.randn(p.shape, generator=generator)
            vector[name] = draw.to(device=p.device, dtype=p.dtype)
        return vector


def _dot(a: dict, b: dict) -> torch.Tensor:
    return sum((a[k].double() * b[k].double()).sum() for k in a)


def hessian_trace(model: torch.nn.Module, loss_fn: Callable | None, batches: Mapping | Iterable[Mapping],
                  n_probes: int = 16, *, seed: int = 0, method: str = "reverse", batch_norm: str = "batch") -> float:
    """Hutchinson's estimate `mean_i v_i^T H v_i` (Rademacher `v_i`) of the trace of the training loss's Hessian.

    Args:
        model (`torch.nn.Module`): the model (its trainable parameters are the Hessian's variables).
        loss_fn (`Callable` or `None`): `loss_fn(model, batch) -> scalar`; `None`: the model's own loss.
        batches (`dict` or iterable of `dict`): the batch(es); the loss is their mean.
        n_probes (`int`, *optional*, defaults to 16): probe vectors (`n_probes * len(batches)` Hessian-vector products;
            the estimate's variance is `2 (||H||_F^2 - sum_i H_ii^2) / n_probes`).
        seed (`int`, *optional*): seed of the probes (their own generator; the global RNG is not used).
        method (`str`, *optional*, defaults to `"reverse"`): `"reverse"` (vjp of grad) or `"forward"` (jvp of grad).
        batch_norm (`str`, *optional*, defaults to `"batch"`): BatchNorm statistics, `"batch"` or `"running"`.
    """
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    with probe_mode(model, batch_norm):
        operator = HessianOperator(model, loss_fn, batches, method=method)
        generator = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(n_probes):
            vector = operator.random_vector(generator)
            total += float(_dot(vector, operator @ vector))
    return total / n_probes


def hessian_top_eigenvalue(model: torch.nn.Module, loss_fn: Callable | None, batches: Mapping | Iterable[Mapping],
                           iterations: int = 20, *, tol: float = 1e-3, seed: int = 0, method: str = "reverse",
                           batch_norm: str = "batch") -> float:
    """The Hessian's eigenvalue of largest magnitude (signed), by power iteration from a seeded Gaussian vector.

    Stops after `iterations` Hessian-vector products per batch, or earlier when the Rayleigh quotient changes by less
    than `tol` relative to its value. Arguments as `hessian_trace`.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    with probe_mode(model, batch_norm):
        operator = HessianOperator(model, loss_fn, batches, method=method)
        vector = operator.random_vector(torch.Generator().manual_seed(seed), kind="gaussian")
        eigenvalue = None
        for _ in range(iterations):
            norm = _dot(vector, vector).sqrt()
            vector = {k: v / norm.to(v.dtype) for k, v in vector.items()}
            product = operator @ vector
            estimate = float(_dot(vector, product))
            converged = eigenvalue is not None and abs(estimate - eigenvalue) <= tol * abs(estimate)
            eigenvalue, vector = estimate, product
            if converged or float(_dot(product, product)) == 0:
                break
    return eigenvalue
