"""Layers of Bayesian nested networks (Cui et al., CVPR 2021): the variational ordering unit and variational dropout.

`NestedConv2d` is a bias-free convolution whose output channels form `num_div` equal groups. The first `freeze`
groups are always kept; the other `D = num_div - freeze` groups are kept in order: a learned *ordering* distribution
`q(k)` over `k in {0..D}` (the number of optional groups kept) draws one monotone mask per forward ("Downhill"
sampler: a hard Gumbel-softmax sample over `k`, turned into `m_i = [i <= k]`, with straight-through gradients), and
every weight has a Gaussian posterior `N(theta, alpha theta^2)` sampled by local reparameterisation. `LinearVDO` is a
dense layer with the same Gaussian posterior (variational dropout, no ordering). `kl()` of each layer is its term of
the objective's KL; `nested_kl(model)` sums them.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F

SAMPLER_LOGITS = ("log", "prob")
BETA_CLIP = 5.0
VARIANCE_EPS = 1e-8
KL_EPS = 1e-8
CONV_KL_CONSTANTS = (0.7294, -0.2041, 0.3492, 0.5387)
LINEAR_KL_CONSTANTS = (0.792, -0.4826, 0.3451)


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a probability in (0, 1), got {value!r}")
    return float(value)


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_grouping(out_channels: int, num_div: int, freeze: int, *, layer: str = "the layer") -> None:
    """Raise a `ValueError` unless `num_div` groups (of which `freeze` are always kept) split `out_channels`."""
    for name, value in (("num_div", num_div), ("freeze", freeze)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= freeze < num_div:
        raise ValueError(f"freeze must be in [0, num_div) so that at least one group is ordered, got freeze={freeze} "
                         f"with num_div={num_div}")
    if out_channels % num_div:
        working = [d for d in range(num_div, freeze, -1) if out_channels % d == 0]
        hint = f"num_div={working[0]} divides them" if working else f"no num_div > freeze={freeze} divides them"
        raise ValueError(f"{layer} has {out_channels} output channels, not divisible by num_div={num_div} (the "
                         f"channels form num_div equal groups); {hint}, or leave the layer out")


def per_weight_kl_conv(log_alpha: torch.Tensor) -> torch.Tensor:
    """`KL_w` of each weight of a nested convolution (the official code's approximation, `k4` form):
    `0.5 log(1 + 1/alpha) - k1 exp(-e^k4 (k2 + k3 log alpha)^2)`."""
    k1, k2, k3, k4 = CONV_KL_CONSTANTS
    return 0.5 * F.softplus(-log_alpha) - k1 * torch.exp(-math.exp(k4) * (k2 + k3 * log_alpha) ** 2)


def per_weight_kl_linear(log_alpha: torch.Tensor) -> torch.Tensor:
    """`KL_w` of each weight of `LinearVDO`: `0.5 log(1 + 1/alpha) - k1 exp(-(k2 + k3 log alpha)^2)`."""
    k1, k2, k3 = LINEAR_KL_CONSTANTS
    return 0.5 * F.softplus(-log_alpha) - k1 * torch.exp(-(k2 + k3 * log_alpha) ** 2)


def ordering_probabilities(betas: torch.Tensor) -> torch.Tensor:
    """`q(k) = (prod_{j<=k} beta_j)(1 - beta_{k+1})` for `k < D`, `q(D) = prod_j beta_j`: a `Tensor[D + 1]`."""
    one = betas.new_ones(1)
    return torch.cat([one, torch.cumprod(betas, 0)]) * torch.cat([1 - betas, one])


def log_ordering_probabilities(beta_logits: torch.Tensor) -> torch.Tensor:
    """`log q(k)` computed in log space from the logits of the betas (no underflow for large `D`)."""
    log_betas, log_stops = F.logsigmoid(beta_logits), F.logsigmoid(-beta_logits)
    zero = beta_logits.new_zeros(1)
    return torch.cat([zero, torch.cumsum(log_betas, 0)]) + torch.cat([log_stops, zero])


def ordering_mask(sample: torch.Tensor) -> torch.Tensor:
    """The group mask `m_i = 1 - sum_{l < i} s_l` (`i = 1..D`) of a (one-hot or relaxed) sample `s` over `k = 0..D`:
    `m_i = [i <= k]` for a one-hot sample, monotone non-increasing for a relaxed one."""
    return 1.0 - (torch.cumsum(sample, -1) - sample)[..., 1:]


def downhill_sample(logits: torch.Tensor, tau: float, *, hard: bool = True) -> torch.Tensor:
    """A monotone group mask `Tensor[D]` drawn with the Gumbel-softmax over `k` (`logits: Tensor[D + 1]`).

    With `hard=True` the forward value is exactly {0, 1} (a sample of `softmax(logits)`, whatever `tau`) and the
    gradient is the relaxed sample's (straight-through); `hard=False` gives the relaxed mask. Uses the torch RNG.
    """
    return ordering_mask(F.gumbel_softmax(logits, tau=tau, hard=hard))


def _variance_operands(input: torch.Tensor, weight_variance: torch.Tensor, mean: torch.Tensor):
    """`(input^2, alpha theta^2, context)` for the variance path: in fp32 with autocast off when the layer computes in
    fp16 (the path's gradient, `g / (2 std)`, overflows fp16 under loss scaling for small `std`), else as they are."""
    if mean.dtype == torch.float16:
        return input.float() ** 2, weight_variance.float(), torch.autocast(mean.device.type, enabled=False)
    return input * input, weight_variance, contextlib.nullcontext()


def _rename_official_keys(state_dict: dict, prefix: str) -> None:
    """Accept the official modules' state dicts: `log_alp` is our `log_alpha`; `ONE` and `ZERO` are constants."""
    if prefix + "log_alp" in state_dict and prefix + "log_alpha" not in state_dict:
        state_dict[prefix + "log_alpha"] = state_dict.pop(prefix + "log_alp")
    for constant in ("ONE", "ZERO"):
        state_dict.pop(prefix + constant, None)


class NestedConv2d(nn.Conv2d):
    """A bias-free `Conv2d` with a variational ordering unit over groups of its output channels and a Gaussian
    posterior over its weights (`Conv2dVND` of the official code).

    Training mode: `out = (conv(x, theta) + sqrt(conv(x^2, alpha theta^2) + 1e-8) * xi) * mask`, `xi ~ N(0, 1)`,
    `mask` drawn once per forward (shared by the batch) by `sample_mask()`. Evaluation mode: a plain convolution with
    `deterministic_weight()` and no mask, as the official code; sub-networks come from `extract_subnet`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as in `nn.Conv2d`.
        num_div (`int`, *optional*, defaults to 32): number of equal channel groups; must divide `out_channels`.
        freeze (`int`, *optional*, defaults to 2): leading groups that are always kept.
        prior_pi (`float`, *optional*, defaults to 0.9): the prior's `beta` (the CIFAR recipe uses 0.95).
        tau (`float`, *optional*, defaults to 2.0): Gumbel-softmax temperature (gradients only).
        sampler_logits (`str`, *optional*, defaults to `"log"`): `"log"` samples `k` from `q` (the paper);
            `"prob"` passes `q` itself as logits, as the official code does (samples from `softmax(q)`).
        log_alpha_init (`float`, *optional*, defaults to -1.0): initial `log alpha` of every weight.
        beta_r_init (`float`, *optional*, defaults to 3.0): initial logit of every `beta` (`sigmoid(3) = 0.953`).
        threshold (`float`, *optional*, defaults to 3.0): weights with `log alpha >= threshold` are zeroed in
            `deterministic_weight()`.

    State dict: `weight`, `log_alpha`, `beta_r` (the betas' logits) and the fixed prior as buffers `pi` and `pz`; an
    official `Conv2dVND` state dict (`log_alp`, `ONE`, `ZERO`) loads as well.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, *, num_div: int = 32, freeze: int = 2, prior_pi: float = 0.9, tau: float = 2.0,
                 sampler_logits: str = "log", log_alpha_init: float = -1.0, beta_r_init: float = 3.0,
                 threshold: float = 3.0, padding_mode: str = "zeros", device=None, dtype=None):
        check_grouping(out_channels, num_div, freeze, layer=f"NestedConv2d({in_channels}, {out_channels})")
        if sampler_logits not in SAMPLER_LOGITS:
            raise ValueError(f"sampler_logits must be one of {SAMPLER_LOGITS}, got {sampler_logits!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False,
                         padding_mode=padding_mode, device=device, dtype=dtype)
        self.num_div, self.freeze = num_div, freeze
        self.prior_pi = _check_probability("prior_pi", prior_pi)
        self.tau = float(tau)
        self.sampler_logits = sampler_logits
        self.log_alpha_init = _check_number("log_alpha_init", log_alpha_init)
        self.beta_r_init = _check_number("beta_r_init", beta_r_init)
        self.threshold = _check_number("threshold", threshold)
        factory = {"device": device, "dtype": dtype}
        self.log_alpha = nn.Parameter(torch.empty_like(self.weight))
        self.beta_r = nn.Parameter(torch.empty(self.num_groups, **factory))
        self.register_buffer("pi", torch.empty(self.num_groups, **factory))
        self.register_buffer("pz", torch.empty(self.num_groups + 1, **factory))
        self.reset_variational_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options) -> NestedConv2d:
        """A `NestedConv2d` computing with `conv.weight` (the same `Parameter` object), on its device and dtype.

        Raises:
            `TypeError`: `conv` is not an `nn.Conv2d`.
            `ValueError`: `conv` has a bias (the official code disables it: it "goes to nan"), or its output channels
                do not split into `num_div` groups.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.bias is not None:
            raise ValueError(f"{conv} has a bias; NestedConv2d is bias-free (as the official Conv2dVND, whose bias "
                             "diverges): build the convolution with bias=False (a BatchNorm after it makes the bias "
                             "redundant)")
        check_grouping(conv.out_channels, options.get("num_div", 32), options.get("freeze", 2), layer=repr(conv))
        layer = torch.nn.utils.skip_init(
            cls, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
            **options)
        layer.weight = conv.weight
        layer.reset_variational_parameters()
        return layer.train(conv.training)

    @torch.no_grad()
    def reset_variational_parameters(self) -> None:
        """Set `log_alpha`, `beta_r` and the prior to their initial values (the weight is left as it is)."""
        self.log_alpha.fill_(self.log_alpha_init)
        self.beta_r.fill_(self.beta_r_init)
        self.pi.fill_(self.prior_pi)
        self.pz.copy_(ordering_probabilities(self.pi))

    @property
    def num_groups(self) -> int:
        """`D = num_div - freeze`, the number of ordered (droppable) groups."""
        return self.num_div - self.freeze

    @property
    def group_size(self) -> int:
        return self.out_channels // self.num_div

    def betas(self) -> torch.Tensor:
        """`beta_i = sigmoid(clip(r_i, -5, 5))`, `Tensor[D]` in fp32."""
        return torch.sigmoid(self._beta_logits())

    def _beta_logits(self) -> torch.Tensor:
        return torch.clamp(self.beta_r.float(), -BETA_CLIP, BETA_CLIP)

    def ordering_probabilities(self) -> torch.Tensor:
        """`q(k)` for `k = 0..D` (`Tensor[D + 1]`, fp32)."""
        return ordering_probabilities(self.betas())

    def keep_probabilities(self) -> torch.Tensor:
        """`P(group i kept) = P(k >= i) = prod_{j<=i} beta_j` for the ordered groups `i = 1..D` (`Tensor[D]`)."""
        return torch.cumprod(self.betas(), 0)

    def channel_keep_probabilities(self) -> torch.Tensor:
        """`P(channel kept)` for every output channel (1 for the frozen groups), `Tensor[out_channels]`."""
        keep = self.keep_probabilities()
        return torch.cat([keep.new_ones(self.freeze), keep]).repeat_interleave(self.group_size)

    def sampler_logits_tensor(self) -> torch.Tensor:
        """The logits the sampler draws `k` from: `log q` (`"log"`) or `q` itself (`"prob"`, official)."""
        if self.sampler_logits == "prob":
            return self.ordering_probabilities()
        return log_ordering_probabilities(self._beta_logits())

    def sample_mask(self, *, hard: bool = True) -> torch.Tensor:
        """One mask over the output channels (`Tensor[out_channels]`, fp32): exactly {0, 1} with straight-through
        gradients (`hard=True`), the first `freeze` groups 1, then `m_i = [i <= k]` with `k` drawn by the sampler."""
        mask = downhill_sample(self.sampler_logits_tensor(), self.tau, hard=hard)
        return torch.cat([mask.new_ones(self.freeze), mask]).repeat_interleave(self.group_size)

    def kept_channels(self, rho: float) -> int:
        """Channels of the width-`rho` sub-network: `group_size * (freeze + floor(rho * D))`."""
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho (the kept fraction of the ordered groups) must be in [0, 1], got {rho!r}")
        return self.group_size * (self.freeze + int(self.num_groups * rho))

    def channel_scale(self, rho: float, scale_by_keep_prob: bool = True) -> torch.Tensor:
        """Scale of each kept channel of the width-`rho` sub-network (`Tensor[kept_channels(rho)]`): 1 for the frozen
        groups, `prod_{j<=i} beta_j` of its group for the others when `scale_by_keep_prob`, else 1."""
        kept = self.kept_channels(rho)
        if not scale_by_keep_prob:
            return self.weight.new_ones(kept, dtype=torch.float32)
        return self.channel_keep_probabilities()[:kept]

    def deterministic_weight(self) -> torch.Tensor:
        """`theta` with the weights of `log alpha >= threshold` zeroed (the official `weights_clipped`)."""
        return torch.where(self.log_alpha >= self.threshold, torch.zeros_like(self.weight), self.weight)

    def ordering_kl(self) -> torch.Tensor:
        """`KL(q(k) || p(k)) = sum_k q_k log(q_k / p_k)` (with the official `1e-8` inside the log), fp32."""
        q = self.ordering_probabilities()
        return torch.dot(q, torch.log(KL_EPS + q / self.pz.float()))

    def weight_kl(self) -> torch.Tensor:
        """`sum_c P(keep channel c) mean_{w in filter c} KL_w`, fp32."""
        kl_weights = per_weight_kl_conv(self.log_alpha.float()).mean(dim=(1, 2, 3))
        return torch.dot(self.channel_keep_probabilities(), kl_weights)

    def kl(self) -> torch.Tensor:
        """The layer's KL: `ordering_kl() + weight_kl()`, a scalar in fp32."""
        return self.ordering_kl() + self.weight_kl()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._conv_forward(input, self.deterministic_weight(), None)
        mean = self._conv_forward(input, self.weight, None)
        squared, weight_variance, precision = _variance_operands(
            input, torch.exp(self.log_alpha) * self.weight * self.weight, mean)
        with precision:
            variance = self._conv_forward(squared, weight_variance, None)
        std = torch.sqrt(variance.float() + VARIANCE_EPS).to(mean.dtype)
        output = mean + std * torch.randn_like(mean)
        return output * self.sample_mask().to(output.dtype).view(1, -1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_official_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_div={self.num_div}, freeze={self.freeze}, prior_pi={self.prior_pi}, "
                f"tau={self.tau}, sampler_logits={self.sampler_logits!r}, threshold={self.threshold}")


class LinearVDO(nn.Linear):
    """A dense layer with a Gaussian posterior `N(theta, alpha theta^2)` per weight (variational dropout; the official
    `LinearVDO`).

    Training mode: `out = x theta^T + b + sqrt(x^2 (alpha theta^2 + 1e-8)^T) * xi`, `xi ~ N(0, 1)`. Evaluation mode:
    `F.linear(x, deterministic_weight(), bias)`.

    Args:
        in_features, out_features, bias: as in `nn.Linear`.
        log_alpha_init (`float`, *optional*, defaults to -1.0): initial `log alpha` of every weight.
        threshold (`float`, *optional*, defaults to 3.0): weights with `log alpha >= threshold` are zeroed in
            `deterministic_weight()`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, log_alpha_init: float = -1.0,
                 threshold: float = 3.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.log_alpha_init = _check_number("log_alpha_init", log_alpha_init)
        self.threshold = _check_number("threshold", threshold)
        self.log_alpha = nn.Parameter(torch.empty_like(self.weight))
        self.reset_variational_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> LinearVDO:
        """A `LinearVDO` computing with `linear.weight` and `linear.bias` (the same `Parameter` objects).

        Raises:
            `TypeError`: `linear` is not an `nn.Linear`.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = torch.nn.utils.skip_init(cls, linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         device=linear.weight.device, dtype=linear.weight.dtype, **options)
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        layer.reset_variational_parameters()
        return layer.train(linear.training)

    @torch.no_grad()
    def reset_variational_parameters(self) -> None:
        self.log_alpha.fill_(self.log_alpha_init)

    def deterministic_weight(self) -> torch.Tensor:
        """`theta` with the weights of `log alpha >= threshold` zeroed."""
        return torch.where(self.log_alpha >= self.threshold, torch.zeros_like(self.weight), self.weight)

    def kl(self) -> torch.Tensor:
        """`sum_out mean_in KL_w` (`per_weight_kl_linear`), a scalar in fp32."""
        return per_weight_kl_linear(self.log_alpha.float()).mean(dim=1).sum()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(input, self.deterministic_weight(), self.bias)
        mean = F.linear(input, self.weight)
        squared, weight_variance, precision = _variance_operands(
            input, torch.exp(self.log_alpha) * self.weight * self.weight + VARIANCE_EPS, mean)
        with precision:
            variance = F.linear(squared, weight_variance)
        std = torch.sqrt(variance.float().clamp_min(torch.finfo(torch.float32).tiny)).to(mean.dtype)
        output = mean + std * torch.randn_like(mean)
        return output + self.bias if self.bias is not None else output

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_official_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


def keep_probabilities(layer: NestedConv2d) -> torch.Tensor:
    """`P(group i kept) = prod_{j<=i} beta_j` of a `NestedConv2d`'s ordered groups (`Tensor[D]`)."""
    if not isinstance(layer, NestedConv2d):
        raise TypeError(f"keep_probabilities needs a NestedConv2d, got {type(layer).__name__}")
    return layer.keep_probabilities()


def nested_layers(model: nn.Module) -> list[tuple[str, NestedConv2d]]:
    """`(name, layer)` of every `NestedConv2d` in `model`, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, NestedConv2d)]


def variational_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, layer)` of every `NestedConv2d` and `LinearVDO` in `model`, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (NestedConv2d, LinearVDO))]


def nested_kl(model: nn.Module) -> torch.Tensor:
    """The KL term of the objective: the sum of `kl()` over the `NestedConv2d` and `LinearVDO` layers (fp32 scalar;
    0 when there are none)."""
    terms = [module.kl() for _, module in variational_layers(model)]
    if not terms:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=parameter.device if parameter is not None else None)
    return torch.stack(terms).sum()


def mean_keep_probability(model: nn.Module) -> torch.Tensor:
    """The mean over `NestedConv2d` layers of the expected fraction of output channels kept (frozen groups count 1)."""
    layers = nested_layers(model)
    if not layers:
        raise ValueError("the model has no NestedConv2d layer; call convert_to_nested(model) first")
    return torch.stack([layer.channel_keep_probabilities().mean() for _, layer in layers]).mean()
