"""Where nested dropout can cut output channels, per family, from module classes and names.

A `NestedSite` is a convolution whose output channels only feed layers that can drop the same channels from their
input: the next convolution of a VGG-style chain or of a residual block's inner path, or the first `Linear` after
global pooling. A convolution whose output joins a residual sum (a block's last convolution, its shortcut, the stem)
is not a site: its channels are shared with the other branch.

Rules (every module whose class is named as listed counts, whatever package it lives in):

- VGG-style `nn.Sequential` chains holding at least two convolutions: `conv -> [BN] -> act / pool / dropout ->
  next conv`; the chain's last convolution feeds the first `Linear` after it in module order when only pooling,
  flattening, activation or dropout modules lie in between and the `Linear` takes one input per channel (global
  pooling);
- timm / torchvision ResNet blocks: `BasicBlock` `conv1 -> bn1 -> conv2`; `Bottleneck` `conv1 -> bn1 -> conv2` and
  `conv2 -> bn2 -> conv3`;
- transformers ResNet layers, `ResNetBasicLayer` and `ResNetBottleNeckLayer`: the `convolution` of each inner
  `ResNetConvLayer` of `layer` but the last -> its `normalization` -> the next one's `convolution`.

Only ungrouped convolutions (`groups == 1`) are sites or consumers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .norm_pairs import NORM_TYPES

RESNET_BLOCKS = {"BasicBlock": (("conv1", "bn1", "conv2"),),
                 "Bottleneck": (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3"))}
TRANSFORMERS_RESNET_LAYERS = ("ResNetBasicLayer", "ResNetBottleNeckLayer")
PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d,
                nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
BEFORE_LINEAR = (*PASS_THROUGH, nn.Flatten, nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class NestedSite:
    """A convolution whose output channels may be cut (module names relative to the model given).

    Attributes:
        conv (`str`): the convolution.
        norm (`str`, *optional*): the BatchNorm directly after it, `None` if there is none.
        consumers (`tuple[str, ...]`): the layers taking its output channels as their input channels.
    """

    conv: str
    norm: str | None
    consumers: tuple[str, ...]


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_conv(module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _is_norm_of(norm, conv) -> bool:
    return isinstance(norm, NORM_TYPES) and norm.num_features == conv.out_channels


def _site(conv_name: str, conv, norm_name: str | None, norm, consumer_name: str, consumer) -> NestedSite | None:
    if not _is_conv(conv):
        return None
    takes = consumer.in_channels if _is_conv(consumer) else getattr(consumer, "in_features", None) \
        if isinstance(consumer, nn.Linear) else None
    if takes != conv.out_channels:
        return None
    norm_name = norm_name if norm is not None and _is_norm_of(norm, conv) else None
    return NestedSite(conv_name, norm_name, (consumer_name,))


def _sequential_sites(prefix: str, sequential: nn.Sequential, model: nn.Module, order: list[str]) -> list[NestedSite]:
    children = list(sequential.named_children())
    if sum(isinstance(child, nn.Conv2d) for _, child in children) < 2:
        return []
    sites = []
    for index, (name, conv) in enumerate(children):
        if not isinstance(conv, nn.Conv2d):
            continue
        norm_name, norm = None, None
        rest = children[index + 1:]
        if rest and isinstance(rest[0][1], NORM_TYPES):
            (norm_name, norm), rest = rest[0], rest[1:]
        consumer, flattened = None, False
        for next_name, module in rest:
            if isinstance(module, PASS_THROUGH):
                continue
            flattened = flattened or isinstance(module, nn.Flatten)
            if isinstance(module, nn.Flatten):
                continue
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and not flattened):
                consumer = (_qualify(prefix, next_name), module)
            break
        else:
            consumer = _linear_after(prefix, model, order) if prefix else None
        if consumer is not None:
            site = _site(_qualify(prefix, name), conv, norm_name and _qualify(prefix, norm_name), norm, *consumer)
            if site is not None:
                sites.append(site)
    return sites


def _linear_after(prefix: str, model: nn.Module, order: list[str]):
    """The first `Linear` after the module `prefix` (and its children) in module order, if only pooling-like
    modules lie in between."""
    start = order.index(prefix) + 1
    modules = dict(model.named_modules())
    for name in order[start:]:
        if name.startswith(prefix + "."):
            continue
        module = modules[name]
        if isinstance(module, nn.Linear):
            return name, module
        if not isinstance(module, BEFORE_LINEAR) and type(module).__name__ not in ("SelectAdaptivePool2d",):
            return None
    return None


def _resnet_block_sites(prefix: str, block: nn.Module) -> list[NestedSite]:
    sites = []
    for conv_name, norm_name, consumer_name in RESNET_BLOCKS[type(block).__name__]:
        conv, norm, consumer = (getattr(block, n, None) for n in (conv_name, norm_name, consumer_name))
        if isinstance(conv, nn.Module) and isinstance(consumer, nn.Module):
            site = _site(_qualify(prefix, conv_name), conv, _qualify(prefix, norm_name), norm,
                         _qualify(prefix, consumer_name), consumer)
            if site is not None:
                sites.append(site)
    return sites


def _transformers_layer_sites(prefix: str, layer: nn.Module) -> list[NestedSite]:
    inner = getattr(layer, "layer", None)
    if not isinstance(inner, nn.Sequential):
        return []
    conv_layers = list(inner.named_children())
    sites = []
    for (name, conv_layer), (next_name, next_layer) in zip(conv_layers, conv_layers[1:]):
        conv, consumer = getattr(conv_layer, "convolution", None), getattr(next_layer, "convolution", None)
        if isinstance(conv, nn.Module) and isinstance(consumer, nn.Module):
            base = _qualify(prefix, f"layer.{name}")
            site = _site(f"{base}.convolution", conv, f"{base}.normalization", getattr(conv_layer, "normalization",
                         None), _qualify(prefix, f"layer.{next_name}.convolution"), consumer)
            if site is not None:
                sites.append(site)
    return sites


def nested_sites(model: torch.nn.Module) -> list[NestedSite]:
    """Every `NestedSite` of `model` (see the module docstring), in module order, each convolution once."""
    order = [name for name, _ in model.named_modules()]
    sites, seen = [], set()
    for prefix, module in model.named_modules():
        class_name = type(module).__name__
        if type(module).forward is nn.Sequential.forward:
            found = _sequential_sites(prefix, module, model, order)
        elif class_name in RESNET_BLOCKS:
            found = _resnet_block_sites(prefix, module)
        elif class_name in TRANSFORMERS_RESNET_LAYERS:
            found = _transformers_layer_sites(prefix, module)
        else:
            continue
        for site in found:
            if site.conv not in seen:
                seen.add(site.conv)
                sites.append(site)
    return sorted(sites, key=lambda site: order.index(site.conv))
