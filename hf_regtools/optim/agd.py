"""Automatic Gradient Descent (Bernstein et al., 2023, arXiv:2304.05187): `AGD` and its initialization `agd_init_`.

For every weight `W_k` of shape `(d_k, d_{k-1}, *kernel)` (a matrix, or a convolution kernel whose every kernel
position is a `d_k x d_{k-1}` slice), with `L` the number of weight tensors and
`s_k = sqrt(d_k / d_{k-1}) / sqrt(prod(kernel))`:

```
init:  every slice of W_k ~ uniform semi-orthogonal, times s_k
step:  G = (1/L) sum_k s_k sum_slices ||grad W_k||_F
       eta = log((1 + sqrt(1 + 4 G)) / 2)
       W_k <- W_k - gain * lr * (eta / L) * s_k * grad W_k / ||grad W_k||_F      (norm per slice)
```

as the official `agd.py` of `jxbz/agd` computes it. See the method card, `hf_regtools/optim/README.md`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch

__all__ = ["AGD", "agd_init_"]

_UNSUPPORTED_FIX = (
    "AGD has no update rule for biases or normalization weights (the official code refuses them too): build the model "
    "without them (`nn.Linear(..., bias=False)`, `nn.Conv2d(..., bias=False)`, `nn.LayerNorm(..., "
    "elementwise_affine=False)`, `nn.BatchNorm2d(..., affine=False)`), freeze them (`p.requires_grad_(False)`: the "
    "Trainer hands the optimizer trainable parameters only), or leave them out of AGD's parameters and give them to "
    "another optimizer."
)


def _singular_value_scale(shape: torch.Size) -> float:
    """`s_k = sqrt(d_k / d_{k-1}) / sqrt(kh * kw * ...)`: the target singular value of every slice of a weight."""
    return math.sqrt(shape[0] / shape[1]) / math.sqrt(math.prod(shape[2:]))


def _named_tensors(params) -> list[list[tuple[str, torch.Tensor]]]:
    """Parameters as named groups: a module's trainable parameters by name, or tensors / param groups by position
    (by the groups' `param_names` where torch put them)."""
    if isinstance(params, torch.nn.Module):
        return [[(name, p) for name, p in params.named_parameters() if p.requires_grad]]
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of param groups (dicts), or a module; got a tensor")
    params = list(params)
    if params and isinstance(params[0], tuple):
        return [[(name, p) for name, p in params]]
    if params and isinstance(params[0], dict):
        groups = []
        for index, group in enumerate(params):
            tensors = _tensor_list(group["params"])
            names = group.get("param_names") or [f"param_groups[{index}]['params'][{j}]" for j in range(len(tensors))]
            groups.append(list(zip(names, tensors)))
        return groups
    return [[(f"params[{j}]", p) for j, p in enumerate(params)]]


def _tensor_list(tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _check_matrices(named: Iterable[tuple[str, torch.Tensor]], caller: str) -> None:
    named = list(named)
    sharded = [name for name, p in named if type(p).__name__ == "DTensor"]
    if sharded:
        raise ValueError(f"{caller} needs whole weights to take their norms; {', '.join(sharded)} are sharded DTensors "
                         f"(FSDP2 / tensor parallelism), which are not supported: train with DDP or one process.")
    unsupported = [f"{name} (shape {tuple(p.shape)})" for name, p in named if p.dim() < 2]
    if unsupported:
        raise ValueError(f"{caller} handles weights of 2 or more dimensions only (matrices, convolution kernels); "
                         f"got {len(unsupported)} with fewer: {', '.join(unsupported)}. {_UNSUPPORTED_FIX}")


@torch.no_grad()
def agd_init_(model_or_params):
    """Initialize weights in place as AGD prescribes: uniform semi-orthogonal, scaled to singular values `s_k`.

    Each 2-D weight `(d_k, d_{k-1})`, and each `d_k x d_{k-1}` slice of a convolution kernel (one per kernel
    position), is drawn with `torch.nn.init.orthogonal_` (Haar-uniform over semi-orthogonal matrices, from torch's
    global RNG) and multiplied by `s_k = sqrt(d_k / d_{k-1}) / sqrt(prod(kernel))`, so `W^T W = s_k^2 I` for tall and
    square slices and `W W^T = s_k^2 I` for wide ones. Tensors are drawn in parameter order and kernel positions in
    row-major order, as the official `AGD.init_weights` does: under the same seed both give the same weights. The
    `Parameter` objects are kept.

    Args:
        model_or_params (`torch.nn.Module`, iterable of tensors or of param groups): what to initialize; a module's
            trainable parameters (frozen ones are left as they are).

    Returns:
        `model_or_params`, initialized.

    Raises:
        `ValueError`: before changing anything, if a tensor has fewer than 2 dimensions (names them).

    Example:

    ```python
    import torch
    from hf_regtools.optim import agd_init_

    torch.manual_seed(0)
    layer = agd_init_(torch.nn.Linear(4, 8, bias=False))   # tall: W^T W = (8 / 4) I
    assert torch.allclose(layer.weight.T @ layer.weight, 2.0 * torch.eye(4), atol=1e-5)
    ```
    """
    if isinstance(model_or_params, torch.nn.Module):
        named = _named_tensors(model_or_params)[0]
    else:
        model_or_params = list(model_or_params)
        named = [item for group in _named_tensors(model_or_params) for item in group]
    _check_matrices(named, "agd_init_")
    for _, weight in named:
        for position in itertools.product(*(range(size) for size in weight.shape[2:])):
            torch.nn.init.orthogonal_(weight[(slice(None), slice(None), *position)])
        weight.mul_(_singular_value_scale(weight.shape))
    return model_or_params


class AGD(torch.optim.Optimizer):
    """Automatic Gradient Descent: a learning-rate-free optimizer for weight matrices (and convolution kernels).

    Every step rescales each weight's gradient to the norm `gain * lr * (eta / L) * s_k` (per kernel slice for
    convolutions), where `eta = log((1 + sqrt(1 + 4 G)) / 2)` is set from the gradient summary
    `G = (1/L) sum_k s_k ||grad W_k||_F` of the whole network, `L` is the number of parameter tensors in the
    optimizer and `s_k = sqrt(d_k / d_{k-1}) / sqrt(kh * kw)`. Weights whose gradient is zero (`nan_to_num` of the
    official code) or `None` do not move; they count in `L`. Pair it with `agd_init_` (the paper's
    initialization), which is separate so that resuming or fine-tuning keeps the weights.

    `lr` multiplies `gain` in each param group, so LR schedulers (the Trainer's, `torch.optim.lr_scheduler`) scale
    the automatic step: the default `lr=1.0` with a constant schedule is the paper's step. There is no state
    besides the param groups; `eta` and `gradient_summary` hold the last step's `eta` and `G` (0-dim tensors, on
    the first parameter's device, `None` before the first step).

    With the Trainer: `Trainer(..., optimizer_cls_and_kwargs=(AGD, {}))` and
    `TrainingArguments(lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)` for the paper's
    algorithm (the Trainer's default linear decay scales the step down to 0, and its clipping changes `G`);
    `AGDMetricsCallback` logs `eta`. In a custom loop: `loss.backward(); optimizer.step(); optimizer.zero_grad()`.

    Args:
        params (iterable of tensors, of `(name, tensor)` pairs or of param groups, or `torch.nn.Module`): the
            weights, every one with 2 or more dimensions (a module's trainable parameters when given a module, as the
            official `AGD(net)`); names, where given, appear in errors.
        lr (`float`, *optional*, defaults to 1.0): multiplier of `gain`, per param group; for schedulers.
        gain (`float`, *optional*, defaults to 1.0): the official gain (its README suggests trying 10 for speed).

    Raises:
        `ValueError`: at construction, if a parameter has fewer than 2 dimensions (named, with the fix), if a param
            group has a nonzero `weight_decay` (AGD has none), or if `lr` / `gain` is negative or not finite.

    Example:

    ```python
    import torch
    from hf_regtools.optim import AGD, agd_init_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 2, bias=False))
    agd_init_(model)
    optimizer = AGD(model.parameters())
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert 0 < optimizer.eta < 1
    ```
    """

    def __init__(self, params, lr: float = 1.0, *, gain: float = 1.0):
        params = params if isinstance(params, torch.nn.Module) else list(params)
        if params and isinstance(params, list) and isinstance(params[0], dict):
            params = [{**group, "params": _tensor_list(group["params"])} for group in params]
        named = [item for group in _named_tensors(params) for item in group]
        if isinstance(params, torch.nn.Module) or (params and isinstance(params[0], tuple)):
            params = [p for _, p in named]
        _check_matrices(named, "AGD")
        for name, value in (("lr", lr), ("gain", gain)):
            _check_multiplier(name, value, "the constructor")
        self.eta: torch.Tensor | None = None
        self.gradient_summary: torch.Tensor | None = None
        self._scales: dict[tuple, torch.Tensor] = {}
        super().__init__(params, dict(lr=lr, gain=gain, weight_decay=0.0))

    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        param_group = {**param_group, "params": _tensor_list(param_group["params"])}
        _check_matrices(_named_tensors([param_group])[0], "AGD")
        decay = param_group.get("weight_decay", 0.0)
        if decay:
            raise ValueError(
                f"AGD has no weight decay (neither the paper's algorithm nor the official code has one); param group "
                f"{index} has weight_decay={decay}. With the Trainer set `TrainingArguments(weight_decay=0.0)` (the "
                f"default); otherwise drop `weight_decay` from the group.")
        for name in ("lr", "gain"):
            if name in param_group:
                _check_multiplier(name, param_group[name], f"param group {index}")
        super().add_param_group(param_group)

    @property
    def depth(self) -> int:
        """`L`: the number of parameter tensors in the optimizer."""
        return sum(len(group["params"]) for group in self.param_groups)

    def _slice_scales(self, device: torch.device, dtype: torch.dtype, shapes: tuple[torch.Size, ...]) -> torch.Tensor:
        """`s_k` once per slice of every weight (kernel positions row-major), cached while the shapes stay."""
        key = (device, dtype, shapes)
        if key not in self._scales:
            if len(self._scales) > 8:
                self._scales.clear()
            values = [_singular_value_scale(shape) for shape in shapes for _ in range(math.prod(shape[2:]))]
            self._scales[key] = torch.tensor(values, dtype=dtype, device=device)
        return self._scales[key]

    @torch.no_grad()
    def step(self, closure=None):
        """One AGD update from the current gradients. Returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_device: dict[torch.device, list[tuple[dict, torch.Tensor]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("AGD does not support sparse gradients (nn.Embedding(sparse=True), ...)")
                    by_device.setdefault(p.device, []).append((group, p))
        if not by_device:
            return loss
        depth = self.depth
        batches, total = [], 0
        for device, layers in by_device.items():
            norms = torch.cat([torch.linalg.vector_norm(p.grad.reshape(p.shape[0] * p.shape[1], -1), dim=0,
                                                        dtype=_norm_dtype(p.grad)) for _, p in layers])
            scales = self._slice_scales(device, norms.dtype, tuple(p.shape for _, p in layers))
            batches.append((device, layers, norms, scales))
            total = total + (scales * norms).sum().to(batches[0][0])
        summary = total / depth
        eta = torch.log(0.5 * (1 + torch.sqrt((1 + 4 * summary).double())))
        for device, layers, norms, scales in batches:
            factors = torch.nan_to_num(scales / norms * (eta / depth).to(device))
            for (group, p), factor in zip(layers, factors.split([math.prod(p.shape[2:]) for _, p in layers])):
                p.addcmul_(p.grad, factor.view(1, 1, *p.shape[2:]), value=-group["gain"] * group["lr"])
        self.eta, self.gradient_summary = eta, summary
        return loss


def _norm_dtype(grad: torch.Tensor) -> torch.dtype | None:
    return torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else None


def _check_multiplier(name: str, value, where: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"AGD's {name} must be a finite number >= 0; got {name}={value!r} in {where}")
