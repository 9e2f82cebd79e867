"""StochNorm layers (Kou et al., *Stochastic Normalization*, NeurIPS 2020): BatchNorm whose channels each use the
mini-batch statistics with probability `p` and the moving statistics otherwise, drawn afresh at every training
forward."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_HALF = (torch.float16, torch.bfloat16)


def validate_p(p) -> float:
    """`p` as a float; raises a `ValueError` unless it is a probability."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1] (the chance that a channel uses the mini-batch "
                         f"statistics), got {p!r}")
    return float(p)


class _StochNorm(nn.Module):
    """Shared implementation of `StochNorm1d`, `StochNorm2d` and `StochNorm3d`; see `StochNorm2d`."""

    BATCH_NORM: type[nn.Module]
    INPUT_DIMS: tuple[int, ...]

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, p: float = 0.5, device=None, dtype=None):
        super().__init__()
        if not track_running_stats:
            raise ValueError(f"{type(self).__name__} needs moving statistics to choose from, but "
                             "track_running_stats=False keeps none; keep such layers as BatchNorm (apply_stochnorm's "
                             "exclude=)")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, True
        self.p = p
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @property
    def p(self) -> float:
        """Probability that a channel uses the mini-batch statistics (the usual BatchNorm branch)."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = validate_p(value)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, p={self.p}")

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self.INPUT_DIMS:
            raise ValueError(f"{type(self).__name__} expects a {' or '.join(f'{d}D' for d in self.INPUT_DIMS)} "
                             f"input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        return self._train_forward(input)

    def _train_forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.numel() // max(input.shape[1], 1) < 2:
            raise ValueError(f"{type(self).__name__} needs more than 1 value per channel in training mode (BatchNorm "
                             f"statistics), got an input of size {tuple(input.shape)}")
        use_batch = torch.empty(self.num_features, dtype=torch.bool, device=input.device).bernoulli_(
            self._probabilities(input.device))
        with torch.no_grad():
            mean, var = self._chosen_statistics(input, use_batch)
        return _StochNormFunction.apply(input, self.weight, self.bias, mean, var, use_batch, self.eps)

    def _probabilities(self, device: torch.device) -> torch.Tensor:
        """A `(num_features,)` tensor filled with `p` on `device`, kept between forwards while `p` is unchanged."""
        cached = getattr(self, "_probability_cache", None)
        if cached is None or cached[0] != self.p or cached[1].device != device:
            cached = (self.p, torch.full((self.num_features,), self.p, device=device))
            self._probability_cache = cached
        return cached[1]

    def _chosen_statistics(self, input: torch.Tensor, use_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, `(mean, biased variance)` of the chosen branch: the batch statistics where `use_batch`, the
        moving ones from before this batch elsewhere. Updates the moving statistics with BatchNorm's own kernel, as its
        training forward does, whichever branch each channel uses."""
        compute = input.float() if input.dtype in _HALF else input
        same_dtype = self.running_mean.dtype == compute.dtype
        running_mean = self.running_mean if same_dtype else self.running_mean.to(compute.dtype)
        running_var = self.running_var if same_dtype else self.running_var.to(compute.dtype)
        moving = torch.stack([running_mean, running_var])
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_mean, batch_var = torch.batch_norm_update_stats(compute, running_mean, running_var, factor)
        if not same_dtype:
            self.running_mean.copy_(running_mean)
            self.running_var.copy_(running_var)
        chosen = torch.where(use_batch, torch.stack([batch_mean, batch_var]), moving)
        return chosen[0], chosen[1]

    @classmethod
    def from_batchnorm(cls, batch_norm: nn.Module, *, p: float = 0.5) -> _StochNorm:
        """A StochNorm layer sharing `batch_norm`'s `Parameter` objects and buffers (same tensors) and its mode."""
        layer = cls(batch_norm.num_features, eps=batch_norm.eps, momentum=batch_norm.momentum,
                    affine=batch_norm.affine, track_running_stats=batch_norm.track_running_stats, p=p, device="meta")
        _share_tensors(batch_norm, layer)
        return layer.train(batch_norm.training)

    def to_batchnorm(self) -> nn.Module:
        """The equivalent `BatchNorm{1,2,3}d`, sharing this layer's `Parameter` objects and buffers, in its mode."""
        batch_norm = self.BATCH_NORM(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                                     track_running_stats=True, device="meta")
        _share_tensors(self, batch_norm)
        return batch_norm.train(self.training)


class _StochNormFunction(torch.autograd.Function):
    """BatchNorm with given per-channel statistics (`mean`, `var`: batch statistics where `use_batch`, moving ones
    elsewhere), differentiated as BatchNorm's training mode on the batch-statistics channels (the gradient flows
    through the batch mean and variance) and as its eval mode on the others (the moving statistics are constants).

    The output equals the official `(1 - s) * z0 + s * z1` (z0 normalized by the moving statistics, z1 by the batch
    statistics) at the cost of one normalization: one fused `batch_norm` applies the chosen statistics, and the
    backward is one fused BatchNorm backward plus one pass.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, use_batch, eps):
        half = input.dtype in _HALF
        compute = input.float() if half else input
        if half:
            weight_c = None if weight is None else weight.float()
            bias_c = None if bias is None else bias.float()
        else:
            weight_c, bias_c = weight, bias
        output = F.batch_norm(compute, mean, var, weight_c, bias_c, False, 0.0, eps)
        ctx.save_for_backward(input, weight, mean, var, use_batch)
        ctx.eps, ctx.bias_dtype = eps, None if bias is None else bias.dtype
        return output.to(input.dtype) if half else output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, var, use_batch = ctx.saved_tensors
        half = input.dtype in _HALF
        compute = input.float() if half else input
        grad = grad_output.to(compute.dtype) if half else grad_output
        needs_weight = weight is not None and ctx.needs_input_grad[1]
        needs_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        invstd = torch.rsqrt(var + ctx.eps)
        if weight is None:
            batch_weight = use_batch.to(compute.dtype)
            moving_coefficient = torch.where(use_batch, 0.0, invstd)
        else:
            gamma = weight.float() if half else weight
            batch_weight = torch.where(use_batch, gamma, 0.0)
            moving_coefficient = torch.where(use_batch, 0.0, gamma * invstd)
        # training-mode gradient, zero on the moving-statistics channels (their weight is 0 here) ...
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, compute, batch_weight, None, None, mean, invstd, True, ctx.eps, [True, needs_weight, needs_bias])
        # ... plus the eval-mode gradient grad * gamma * invstd on the moving-statistics channels
        grad_input.addcmul_(grad, moving_coefficient.view((1, -1) + (1,) * (input.dim() - 2)))
        if half:
            grad_input = grad_input.to(input.dtype)
        return (grad_input, grad_weight.to(weight.dtype) if needs_weight else None,
                grad_bias.to(ctx.bias_dtype) if needs_bias else None, None, None, None, None)


def _share_tensors(source: nn.Module, target: nn.Module) -> None:
    for name in ("weight", "bias"):
        if getattr(source, name) is not None:
            setattr(target, name, getattr(source, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(target, name, getattr(source, name))


class StochNorm1d(_StochNorm):
    """StochNorm over a 2D or 3D input `(N, C)` / `(N, C, L)`; the counterpart of `nn.BatchNorm1d`. See
    `StochNorm2d`."""

    BATCH_NORM = nn.BatchNorm1d
    INPUT_DIMS = (2, 3)


class StochNorm2d(_StochNorm):
    """Stochastic normalization over a 4D input `(N, C, H, W)`; the counterpart of `nn.BatchNorm2d`.

    In training mode each channel is normalized, over the whole batch and spatial extent, either by the mini-batch
    statistics (probability `p`, as `BatchNorm2d.train()`) or by the moving statistics (as `BatchNorm2d.eval()`, with
    the values from before this batch's update; no gradient flows through them). A fresh mask is drawn from torch's
    random generator on the input's device at every forward. The moving statistics are updated at every training
    forward exactly as BatchNorm updates them (`momentum=None`: cumulative average). In eval mode the layer is
    `BatchNorm2d.eval()`. State-dict keys are BatchNorm's (`num_batches_tracked` included).

    Args:
        num_features (`int`): number of channels `C`.
        eps (`float`, *optional*, defaults to 1e-5): added to the variance.
        momentum (`float`, *optional*, defaults to 0.1): weight of the new batch in the moving statistics; `None` for
            a cumulative average.
        affine (`bool`, *optional*, defaults to `True`): learnable scale and shift (initialized to 1 and 0).
        track_running_stats (`bool`, *optional*, defaults to `True`): must be `True` (the moving branch needs them).
        p (`float`, *optional*, defaults to 0.5): probability that a channel uses the mini-batch statistics
            (keyword only).

    Example:

    ```python
    import torch
    from hf_regtools.stochnorm import StochNorm2d

    layer = StochNorm2d(8, p=0.5)
    out = layer(torch.randn(4, 8, 5, 5))
    assert out.shape == (4, 8, 5, 5) and layer.num_batches_tracked.item() == 1
    ```
    """

    BATCH_NORM = nn.BatchNorm2d
    INPUT_DIMS = (4,)


class StochNorm3d(_StochNorm):
    """StochNorm over a 5D input `(N, C, D, H, W)`; the counterpart of `nn.BatchNorm3d`. See `StochNorm2d`."""

    BATCH_NORM = nn.BatchNorm3d
    INPUT_DIMS = (5,)


class StochNormAct2d(StochNorm2d):
    """`StochNorm2d` followed by the dropout and activation of a timm `BatchNormAct2d` (the same modules, so the
    state-dict keys, `act.*` included, stay those of `BatchNormAct2d`)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, p: float = 0.5, act: nn.Module | None = None,
                 drop: nn.Module | None = None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, p=p, device=device, dtype=dtype)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))

    @classmethod
    def from_batchnorm(cls, batch_norm: nn.Module, *, p: float = 0.5) -> StochNormAct2d:
        layer = super().from_batchnorm(batch_norm, p=p)
        layer.drop, layer.act = batch_norm.drop, batch_norm.act
        return layer

    def to_batchnorm(self) -> nn.Module:
        """The equivalent timm `BatchNormAct2d`, sharing this layer's parameters, buffers, dropout and activation."""
        from timm.layers import BatchNormAct2d

        batch_norm = BatchNormAct2d(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                                    track_running_stats=True, apply_act=False, device="meta")
        _share_tensors(self, batch_norm)
        batch_norm.drop, batch_norm.act = self.drop, self.act
        return batch_norm.train(self.training)
