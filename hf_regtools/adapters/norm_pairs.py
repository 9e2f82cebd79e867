"""Which convolutions and linear layers feed a BatchNorm directly, per family, from module classes and names.

These are the name maps of weight rescaling's pair discovery (`hf_regtools.weight_rescaling.
find_scale_invariant_pairs(method="names")`), for models that `torch.fx` cannot trace in one piece (transformers
models check their inputs with Python control flow). A `NormPairRule` applies to every module whose class is named
as it says (a user's copy of torchvision's ResNet counts, whatever package it lives in) and names the child pairs
whose forward is `norm(conv(x))` in that class:

- timm / torchvision(-style) ResNet, `ResNet`: `conv1` (its last layer for timm's deep stems) -> `bn1`;
- timm / torchvision(-style) ResNet blocks, `BasicBlock` and `Bottleneck`: `conv1` -> `bn1`, `conv2` -> `bn2`,
  `conv3` -> `bn3`;
- timm conv-norm-act layers, `ConvNormAct` (`ConvBnAct`): `conv` -> `bn`;
- transformers ResNet, `ResNetConvLayer` and `ResNetShortCut`: `convolution` -> `normalization`;
- any library, `nn.Sequential` (with its own forward): a conv or linear child followed directly by a BatchNorm child
  (timm and torchvision `downsample.0` -> `downsample.1`, or `downsample.1` -> `downsample.2` after an average pool).

A pair is kept only if its two modules have the expected types (a convolution or `nn.Linear`, a BatchNorm) and the
BatchNorm has one feature per output channel; absent children (`conv3` of a `BasicBlock`) are skipped. Pre-activation
blocks (BN before the convolution) have other class names and match no rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
WEIGHT_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


@dataclass(frozen=True)
class NormPairRule:
    """Children pairs `(conv, norm)` whose forward is `norm(conv(x))` in modules whose class is named in `classes`.

    Args:
        family (`str`): what the rule is for, for messages and docs.
        classes (`tuple[str, ...]`): class names the rule applies to (the class itself, not its bases).
        pairs (`tuple[tuple[str, str], ...]`): child names `(weight layer, norm)`; a weight-layer child that is an
            `nn.Sequential` stands for its last module (timm's deep stem `conv1`).
    """

    family: str
    classes: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]


RULES: tuple[NormPairRule, ...] = (
    NormPairRule("timm / torchvision ResNet stem", ("ResNet",), (("conv1", "bn1"),)),
    NormPairRule("timm / torchvision ResNet block", ("BasicBlock", "Bottleneck"),
                 (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))),
    NormPairRule("timm ConvNormAct", ("ConvNormAct",), (("conv", "bn"),)),
    NormPairRule("transformers ResNet", ("ResNetConvLayer", "ResNetShortCut"), (("convolution", "normalization"),)),
)


def is_weight_layer(module: torch.nn.Module) -> bool:
    """A convolution (not transposed) or linear layer with a weight: what weight rescaling can manage."""
    return isinstance(module, WEIGHT_TYPES) and isinstance(getattr(module, "weight", None), torch.nn.Parameter)


def is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def out_channels(module: torch.nn.Module) -> int:
    return module.weight.shape[0]


def fits(layer: torch.nn.Module, norm: torch.nn.Module) -> bool:
    """`layer` is a weight layer and `norm` a BatchNorm over its output channels."""
    return is_weight_layer(layer) and is_norm(norm) and norm.num_features == out_channels(layer)


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sequential_pairs(prefix: str, module: torch.nn.Sequential) -> list[tuple[str, str]]:
    children = list(module.named_children())
    return [(_qualify(prefix, a), _qualify(prefix, b)) for (a, first), (b, second) in zip(children, children[1:])
            if fits(first, second)]


def _rule_pairs(prefix: str, module: torch.nn.Module, rule: NormPairRule) -> list[tuple[str, str]]:
    children = dict(module.named_children())
    found = []
    for layer_name, norm_name in rule.pairs:
        layer, norm = children.get(layer_name), children.get(norm_name)
        if layer is None or norm is None:
            continue
        if type(layer).forward is torch.nn.Sequential.forward and len(layer):
            last = str(len(layer) - 1)
            layer_name, layer = f"{layer_name}.{last}", layer[-1]
        if fits(layer, norm):
            found.append((_qualify(prefix, layer_name), _qualify(prefix, norm_name)))
    return found


def matching_rules(model: torch.nn.Module) -> list[NormPairRule]:
    """The rules that apply to some module of `model` (empty: the name maps do not know the model)."""
    names = {type(module).__name__ for module in model.modules()}
    return [rule for rule in RULES if names & set(rule.classes)]


def name_map_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """`(weight layer, BatchNorm)` module names of `model` (its own names, wrappers included) that the rules give,
    in module order, each weight layer once."""
    found, seen = [], set()
    for prefix, module in model.named_modules():
        pairs = []
        if type(module).forward is torch.nn.Sequential.forward:
            pairs += _sequential_pairs(prefix, module)
        for rule in RULES:
            if type(module).__name__ in rule.classes:
                pairs += _rule_pairs(prefix, module, rule)
        for pair in pairs:
            if pair[0] not in seen:
                seen.add(pair[0])
                found.append(pair)
    return found
