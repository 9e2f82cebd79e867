"""Sub-networks of a Bayesian nested network: cut every nested convolution to its first channels.

`extract_subnet(model, rho)` returns a smaller copy of a network converted with `convert_to_nested`: every
`NestedConv2d` keeps `kept_channels(rho)` output channels (fewer channels, not a mask), and its BatchNorm and the
layers consuming its output (the next convolution, or the classifier's first `Linear`) are cut to match.
`masked_width(model, rho)` computes the same network without cutting, with channel masks (the official code's
evaluation, `Conv2dVND_eval`); `recalibrate_bn` re-estimates BatchNorm statistics for a width.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.nested_sites import NestedSite, nested_sites
from .layers import VARIANCE_EPS, LinearVDO, NestedConv2d, _variance_operands, nested_layers

WEIGHT_MODES = ("deterministic", "sampled")
SUBNET_ATTRIBUTE = "nested_subnet_info"


class SampledConv2d(nn.Conv2d):
    """A bias-free convolution that samples its weights from `N(theta, alpha theta^2)` in every forward, in training
    and evaluation mode alike (local reparameterisation, as `NestedConv2d` in training, without a channel mask): the
    layers of a sub-network extracted with `weight_mode="sampled"`. An all-zero filter (a dropped channel kept by
    `fold_bn=False`) has zero variance and outputs exactly 0, without the `1e-8` guard's noise. Average several passes
    (`predict_mean`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.log_alpha = nn.Parameter(torch.full_like(self.weight, -1.0))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        mean = self._conv_forward(input, self.weight, self.bias)
        squared, weight_variance, precision = _variance_operands(
            input, torch.exp(self.log_alpha) * self.weight * self.weight, mean)
        with precision:
            variance = self._conv_forward(squared, weight_variance, None)
        std = torch.sqrt(variance.float() + VARIANCE_EPS).to(mean.dtype)
        live = (self.weight != 0).flatten(1).any(1).to(mean.dtype).view(1, -1, 1, 1)  # an all-zero filter: no noise
        return mean + std * live * torch.randn_like(mean)


class SampledLinear(LinearVDO):
    """A `LinearVDO` that samples its weights in evaluation mode too (the official `weight_prob_fwd=True`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        training = self.training
        self.training = True
        try:
            return super().forward(input)
        finally:
            self.training = training


@dataclass(frozen=True)
class SubnetInfo:
    """How a sub-network was extracted (attached to it as `subnet.nested_subnet_info`; recorded in its card).

    Attributes:
        rho (`float`): the width, the kept fraction of the ordered groups of every nested convolution.
        channels (`dict[str, tuple[int, int]]`): `(kept, total)` output channels of each nested convolution.
        parameters (`int`): parameters of the sub-network.
        full_parameters (`int`): parameters of the same network at full width (without the ordering parameters,
            and without `log_alpha` for deterministic weights).
        scale_by_keep_prob (`bool`), weight_mode (`str`), fold_bn (`bool`): the `extract_subnet` settings.
        uncut (`tuple[str, ...]`): nested convolutions whose dropped channels were kept as zero-weight channels
            (`fold_bn=False` with a BatchNorm after them).
        recalibration_batches (`int`): batches `recalibrate_bn` ran on (0: the model's statistics are kept).
    """

    rho: float
    channels: dict[str, tuple[int, int]]
    parameters: int
    full_parameters: int
    scale_by_keep_prob: bool
    weight_mode: str
    fold_bn: bool
    uncut: tuple[str, ...] = ()
    recalibration_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "channels": {name: list(kept) for name, kept in self.channels.items()},
                "parameters": self.parameters, "full_parameters": self.full_parameters,
                "scale_by_keep_prob": self.scale_by_keep_prob, "weight_mode": self.weight_mode,
                "fold_bn": self.fold_bn, "uncut": list(self.uncut),
                "recalibration_batches": self.recalibration_batches}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubnetInfo:
        return cls(rho=data["rho"], channels={name: tuple(kept) for name, kept in data["channels"].items()},
                   parameters=data["parameters"], full_parameters=data["full_parameters"],
                   scale_by_keep_prob=data["scale_by_keep_prob"], weight_mode=data["weight_mode"],
                   fold_bn=data["fold_bn"], uncut=tuple(data.get("uncut", ())),
                   recalibration_batches=data.get("recalibration_batches", 0))


def _check_rho(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho (the kept fraction of the ordered channel groups) must be a number in [0, 1], got "
                         f"{rho!r}")
    return float(rho)


def _check_n_batches(n_batches) -> int | None:
    if n_batches is not None and (isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1):
        raise ValueError(f"n_batches must be a positive integer or None (the whole loader), got {n_batches!r}")
    return n_batches


def _nested_sites_of(model: nn.Module) -> dict[str, NestedSite]:
    """`{conv name: site}` for every `NestedConv2d` of `model`; raises if one is no site (its cut is unknown)."""
    layers = [name for name, _ in nested_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no NestedConv2d layer: convert it first with "
                         "`convert_to_nested(model)` and train it")
    sites = {site.conv: site for site in nested_sites(model) if site.conv in layers}
    lost = [name for name in layers if name not in sites]
    if lost:
        raise ValueError(f"the NestedConv2d layers {lost} are not nested sites (see "
                         "hf_regtools.adapters.nested_sites): the layers consuming their channels are unknown, so "
                         "they cannot be cut; convert only the sites (`convert_to_nested` does)")
    return sites


def _channel_scale(layer: NestedConv2d, rho: float, scale_by_keep_prob: bool) -> torch.Tensor:
    """The per-channel factor of the width-`rho` network on the conv output (0 for dropped channels)."""
    scale = layer.channel_scale(rho, scale_by_keep_prob)
    return torch.cat([scale, scale.new_zeros(layer.out_channels - len(scale))])


@contextmanager
def masked_width(model: nn.Module, rho: float, *, scale_by_keep_prob: bool = True,
                 fold_bn: bool = True) -> Iterator[nn.Module]:
    """Evaluate `model` at width `rho` with channel masks, without cutting it (what `extract_subnet` computes).

    Inside the block every `NestedConv2d` output is multiplied by its `channel_scale(rho)` on the kept channels. The
    dropped channels are zeroed after the BatchNorm that follows the convolution with `fold_bn=True` (they then
    contribute exactly nothing downstream), and on the convolution output, before the BatchNorm, with
    `fold_bn=False`: the official `Conv2dVND_eval` (where a dropped channel leaves the BatchNorm as its constant
    `beta - gamma * mean / sqrt(var + eps)`). Use it in evaluation mode (deterministic weights); the forward hooks
    are removed on exit.

    ```py
    with masked_width(model.eval(), 0.5) as masked:
        logits = masked(pixel_values)["logits"]
    ```
    """
    rho = _check_rho(rho)
    sites = _nested_sites_of(model)
    modules = dict(model.named_modules())
    handles = []

    def multiply(factor: torch.Tensor):
        def hook(module, inputs, output):
            shape = (1, -1) + (1,) * (output.ndim - 2)
            return output * factor.to(output.device, output.dtype).view(shape)
        return hook

    try:
        for name, site in sites.items():
            layer = modules[name]
            scale = _channel_scale(layer, rho, scale_by_keep_prob).detach()
            if fold_bn and site.norm is not None:
                kept = scale != 0
                handles.append(layer.register_forward_hook(multiply(torch.where(kept, scale, torch.ones_like(scale)))))
                handles.append(modules[site.norm].register_forward_hook(multiply(kept.to(scale.dtype))))
            else:
                handles.append(layer.register_forward_hook(multiply(scale)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def extract_subnet(model: nn.Module, rho: float, *, scale_by_keep_prob: bool = True,
                   weight_mode: str = "deterministic", fold_bn: bool = True, loader: Iterable | None = None,
                   n_batches: int | None = None) -> nn.Module:
    """The width-`rho` sub-network of a Bayesian nested network, as a smaller copy (`model` is not changed).

    Every `NestedConv2d` keeps its first `kept_channels(rho) = group_size * (freeze + floor(rho * D))` output
    channels: its weight, the BatchNorm after it and the input channels of the layers consuming it (the next
    convolution, or the `Linear` after global pooling) are sliced. The kept channels are multiplied by
    `channel_scale(rho, scale_by_keep_prob)` (the keep probability `prod_{j<=i} beta_j` of their group: the
    official "times_prob"), folded into the convolution's weight: the official code scales the convolution output,
    before the BatchNorm, which is the same. The result equals `masked_width(model, rho, ...)` in evaluation mode.

    Dropped channels: with `fold_bn=True` they are cut after the BatchNorm, so they contribute exactly zero and the
    network is exactly smaller. The official evaluation masks before the BatchNorm, where a dropped channel leaves it
    as the constant `beta - gamma * mean / sqrt(var + eps)` (after recalibration: `beta`); folding that constant
    into the next layer's bias is exact for a `Linear` after global pooling but not at the borders of a
    zero-padded convolution, so `fold_bn=False` (parity with the official masked network) keeps those channels, with
    zero weights, at every site with a BatchNorm (listed in `SubnetInfo.uncut`); sites without one are cut.

    `NestedConv2d` layers become `nn.Conv2d` with `deterministic_weight()` (weights of `log alpha >= threshold`
    zeroed) for `weight_mode="deterministic"`, or `SampledConv2d` (weights drawn from the Gaussian posterior in every
    forward) for `"sampled"`; `LinearVDO` layers likewise become `nn.Linear` or `SampledLinear`. With `loader`,
    `recalibrate_bn(subnet, loader, n_batches=n_batches)` re-estimates the BatchNorm statistics for this width (the
    official evaluation does, over one epoch of training data). The sub-network is returned in evaluation mode, with
    a `SubnetInfo` as `subnet.nested_subnet_info`.

    ```py
    from hf_regtools.nested_dropout import extract_subnet

    half = extract_subnet(model, 0.5, loader=train_batches)
    print(half.nested_subnet_info.parameters, half.nested_subnet_info.channels)
    ```

    Args:
        model (`nn.Module`): a network converted with `convert_to_nested` (typically trained).
        rho (`float`): the width, in [0, 1] (0 keeps the `freeze` groups only).
        scale_by_keep_prob (`bool`, *optional*, defaults to `True`): scale kept channels by their keep probability.
        weight_mode (`str`, *optional*, defaults to `"deterministic"`): `"deterministic"` or `"sampled"`.
        fold_bn (`bool`, *optional*, defaults to `True`): drop channels after the BatchNorm (see above).
        loader (`Iterable`, *optional*): batches for `recalibrate_bn` (tensors, tuples whose first item is the
            input, or dicts of keyword arguments).
        n_batches (`int`, *optional*): recalibrate on the first `n_batches` batches only.

    Raises:
        `ValueError`: `rho` out of range, an unknown `weight_mode`, a model without `NestedConv2d`, or a
            `NestedConv2d` that is not a nested site.
    """
    rho = _check_rho(rho)
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    n_batches = _check_n_batches(n_batches)
    sampled = weight_mode == "sampled"
    sites = _nested_sites_of(model)
    full_parameters = sum(parameter.numel() for name, parameter in model.named_parameters()
                          if not name.endswith("beta_r") and (sampled or not name.endswith("log_alpha")))
    subnet = copy.deepcopy(model)
    modules = dict(subnet.named_modules())
    channels, uncut, replacements = {}, [], {}
    with torch.no_grad():
        for name, site in sites.items():
            layer = modules[name]
            kept, total = layer.kept_channels(rho), layer.out_channels
            scale = _channel_scale(layer, rho, scale_by_keep_prob).to(layer.weight.dtype)
            weight = (layer.weight if sampled else layer.deterministic_weight()) * scale.view(-1, 1, 1, 1)
            log_alpha = layer.log_alpha.detach()
            channels[name] = (kept, total)
            if fold_bn or site.norm is None:
                weight, log_alpha = weight[:kept], log_alpha[:kept]
                if site.norm is not None:
                    _slice_norm(modules[site.norm], kept)
                for consumer in site.consumers:
                    _slice_inputs(modules[consumer], consumer, kept, total)
            elif kept < total:
                uncut.append(name)
            replacements[name] = (layer, weight, log_alpha)
        for name, (layer, weight, log_alpha) in replacements.items():
            _replace(subnet, name, _plain_conv(layer, weight, log_alpha if sampled else None))
        for name, module in list(subnet.named_modules()):
            if isinstance(module, LinearVDO) and not isinstance(module, SampledLinear):
                _replace(subnet, name, _plain_linear(module, sampled))
    subnet.eval()
    batches = recalibrate_bn(subnet, loader, n_batches=n_batches) if loader is not None else 0
    info = SubnetInfo(rho=rho, channels=channels, parameters=sum(p.numel() for p in subnet.parameters()),
                      full_parameters=full_parameters, scale_by_keep_prob=bool(scale_by_keep_prob),
                      weight_mode=weight_mode, fold_bn=bool(fold_bn), uncut=tuple(uncut),
                      recalibration_batches=batches)
    setattr(subnet, SUBNET_ATTRIBUTE, info)
    return subnet


def subnet_info(subnet: nn.Module) -> SubnetInfo:
    """The `SubnetInfo` of a sub-network made by `extract_subnet` (or loaded with `load_subnet`)."""
    info = getattr(subnet, SUBNET_ATTRIBUTE, None)
    if not isinstance(info, SubnetInfo):
        raise ValueError(f"{type(subnet).__name__} was not made by extract_subnet (it has no `{SUBNET_ATTRIBUTE}`); "
                         "extract it with `extract_subnet(model, rho)` first")
    return info


def _parameter(tensor: torch.Tensor, like: nn.Parameter | None = None) -> nn.Parameter:
    requires_grad = True if like is None else like.requires_grad
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=requires_grad)


def _slice_norm(norm: nn.Module, kept: int) -> None:
    for name in ("weight", "bias"):
        parameter = getattr(norm, name, None)
        if parameter is not None:
            setattr(norm, name, _parameter(parameter[:kept], parameter))
    for name in ("running_mean", "running_var"):
        buffer = getattr(norm, name, None)
        if buffer is not None:
            setattr(norm, name, buffer[:kept].clone())
    norm.num_features = kept


def _slice_inputs(consumer: nn.Module, name: str, kept: int, total: int) -> None:
    """Keep the inputs of the first `kept` of `total` channels (a `Linear` may take `total * k` flattened inputs)."""
    if isinstance(consumer, nn.Conv2d):
        if consumer.groups != 1:
            raise ValueError(f"cannot cut the input channels of the grouped convolution {name!r} (groups="
                             f"{consumer.groups})")
        columns = lambda tensor: tensor[:, :kept]  # noqa: E731
        consumer.in_channels = kept
    elif isinstance(consumer, nn.Linear):
        if consumer.in_features % total:
            raise ValueError(f"the Linear {name!r} takes {consumer.in_features} inputs, not a multiple of the "
                             f"{total} channels it consumes")
        per_channel = consumer.in_features // total
        columns = lambda tensor: tensor.reshape(tensor.shape[0], total, per_channel)[:, :kept].reshape(  # noqa: E731
            tensor.shape[0], kept * per_channel)
        consumer.in_features = kept * per_channel
    else:
        raise ValueError(f"cannot cut the input channels of {name!r} ({type(consumer).__name__}); nested sites are "
                         "consumed by Conv2d or Linear layers")
    consumer.weight = _parameter(columns(consumer.weight), consumer.weight)
    if isinstance(getattr(consumer, "log_alpha", None), nn.Parameter):
        consumer.log_alpha = _parameter(columns(consumer.log_alpha), consumer.log_alpha)


def _plain_conv(layer: NestedConv2d, weight: torch.Tensor, log_alpha: torch.Tensor | None) -> nn.Conv2d:
    cls = nn.Conv2d if log_alpha is None else SampledConv2d
    conv = torch.nn.utils.skip_init(cls, layer.in_channels, weight.shape[0], layer.kernel_size, stride=layer.stride,
                                    padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=False,
                                    padding_mode=layer.padding_mode, device=weight.device, dtype=weight.dtype)
    conv.weight = _parameter(weight, layer.weight)
    if log_alpha is not None:
        conv.log_alpha = _parameter(log_alpha, layer.log_alpha)
    return conv


def _plain_linear(layer: LinearVDO, sampled: bool) -> nn.Linear:
    if sampled:
        linear = torch.nn.utils.skip_init(SampledLinear, layer.in_features, layer.out_features,
                                          bias=layer.bias is not None, threshold=layer.threshold,
                                          device=layer.weight.device, dtype=layer.weight.dtype)
        linear.weight, linear.log_alpha = _parameter(layer.weight), _parameter(layer.log_alpha)
    else:
        linear = torch.nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features,
                                          bias=layer.bias is not None, device=layer.weight.device,
                                          dtype=layer.weight.dtype)
        linear.weight = _parameter(layer.deterministic_weight(), layer.weight)
    if layer.bias is not None:
        linear.bias = _parameter(layer.bias, layer.bias)
    return linear


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


def _batch_input(batch: Any, device: torch.device | None):
    move = (lambda value: value.to(device) if isinstance(value, torch.Tensor) and device is not None  # noqa: E731
            else value)
    if isinstance(batch, Mapping):
        return (), {key: move(value) for key, value in batch.items() if key not in ("labels", "label")}
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("recalibrate_bn got an empty batch from the loader")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"recalibrate_bn cannot feed a batch of type {type(batch).__name__} to the model; the loader "
                        "must yield tensors, tuples whose first item is the input, or dicts of keyword arguments")
    return (move(batch),), {}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, n_batches: int | None = None) -> int:
    """Re-estimate the running statistics of every BatchNorm of `model` on `loader`; returns the batches used.

    The statistics are reset and re-estimated as a cumulative average over the batches (`momentum=None`), with
    train-mode forwards of the BatchNorm layers only and no gradients: every other module keeps its mode (a
    `NestedConv2d` in evaluation mode stays a deterministic full-width convolution, dropout stays off), as the
    official evaluation does for each width (`set_bn_train` then one epoch of forwards). Each module's mode and each
    BatchNorm's momentum are restored afterwards, and on an error the previous statistics too. Unlike
    `torch.optim.swa_utils.update_bn`, which this otherwise follows, it leaves non-BatchNorm modules in their mode,
    accepts dict batches and can stop after `n_batches`.

    Args:
        model (`nn.Module`): the network (e.g. a sub-network from `extract_subnet`).
        loader (`Iterable`): batches: tensors, tuples or lists whose first item is the input, or dicts of keyword
            arguments (`labels` is not passed on). Tensors are moved to the device of the model's first parameter.
        n_batches (`int`, *optional*): use the first `n_batches` batches only (default: the whole loader).

    Raises:
        `ValueError`: `n_batches` is not a positive integer, or the loader yields no batch while the model has
            BatchNorm layers.
    """
    n_batches = _check_n_batches(n_batches)
    norms = [module for module in model.modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]
    if not norms:
        return 0
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else None
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    saved = {norm: {name: buffer.clone() for name, buffer in norm.named_buffers(recurse=False)} for norm in norms}
    used = 0
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for batch in loader:
            if n_batches is not None and used >= n_batches:
                break
            args, kwargs = _batch_input(batch, device)
            model(*args, **kwargs)
            used += 1
        if used == 0:
            raise ValueError("recalibrate_bn got no batch from the loader; pass a loader of (training) batches")
    except BaseException:
        for norm, buffers in saved.items():
            for name, buffer in buffers.items():
                getattr(norm, name).copy_(buffer)
        raise
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return used
