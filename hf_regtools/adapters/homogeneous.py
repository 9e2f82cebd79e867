"""Which weight layers of a network form a positively homogeneous chain and which form residual blocks, per family.

WEISSI (`hf_regtools.weissi`) regularizes the weights of networks built from convolutions, linear layers and
positively homogeneous activations (ReLU, max pooling); a residual block `y = s(x) + F(x)` counts as one factor
`s + prod(||W|| for W in F)` of the input-gradient bound. This module knows, by module class name (the class itself,
wherever it is defined), the residual blocks of the supported families:

- timm / torchvision(-style) ResNet, `BasicBlock` (branch `conv1`, `conv2`) and `Bottleneck` (`conv1`, `conv2`,
  `conv3`); the shortcut is the identity, or the convolution inside `downsample` (after an average pool in timm's
  `avg_down` variants);
- transformers ResNet, `ResNetBasicLayer` and `ResNetBottleNeckLayer`: the branch is the `convolution` of each
  `ResNetConvLayer` in `layer`, the shortcut `shortcut.convolution` (a `ResNetShortCut`) or the identity.

Every other `nn.Conv1d/2d/3d` and `nn.Linear` (stems, classifier heads, a plain MLP) is a chain layer. Which weights
feed a BatchNorm directly comes from `hf_regtools.adapters.norm_pairs` through weight rescaling's discovery
(`find_scale_invariant_pairs`). Families with LayerNorm, GroupNorm or attention (ViT, DeiT, Swin, ConvNeXt, BERT) are
not positively homogeneous and have no rule: `non_homogeneous_modules` names what breaks the homogeneity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .norm_pairs import is_weight_layer


@dataclass(frozen=True)
class ResidualBlockRule:
    """Residual blocks of modules whose class is named in `classes`: `branch` child names (a `"name.*"` entry stands
    for the `suffix` module of every child of the `nn.Sequential` `name`), the projection shortcut child `shortcut`."""

    family: str
    classes: tuple[str, ...]
    branch: tuple[str, ...]
    shortcut: str
    suffix: str = ""


RULES: tuple[ResidualBlockRule, ...] = (
    ResidualBlockRule("timm / torchvision ResNet", ("BasicBlock", "Bottleneck"), ("conv1", "conv2", "conv3"),
                      "downsample"),
    ResidualBlockRule("transformers ResNet", ("ResNetBasicLayer", "ResNetBottleNeckLayer"), ("layer.*",),
                      "shortcut", suffix="convolution"),
)

NON_HOMOGENEOUS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.MultiheadAttention, torch.nn.Softmax)


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _weight_layers_in(module: torch.nn.Module, prefix: str) -> list[str]:
    return [_qualify(prefix, name) for name, child in module.named_modules() if is_weight_layer(child)]


def _rule_block(prefix: str, module: torch.nn.Module, rule: ResidualBlockRule) -> tuple[tuple[str, ...], str | None]:
    children = dict(module.named_children())
    branch: list[str] = []
    for entry in rule.branch:
        if entry.endswith(".*"):
            sequence = children.get(entry[:-2])
            for name, child in (sequence.named_children() if sequence is not None else ()):
                target = child.get_submodule(rule.suffix) if rule.suffix else child
                if is_weight_layer(target):
                    branch.append(_qualify(prefix, ".".join(filter(None, (entry[:-2], name, rule.suffix)))))
        elif entry in children and is_weight_layer(children[entry]):
            branch.append(_qualify(prefix, entry))
    shortcut = children.get(rule.shortcut)
    projections = [] if shortcut is None else _weight_layers_in(shortcut, _qualify(prefix, rule.shortcut))
    if len(projections) > 1:
        raise ValueError(f"{_qualify(prefix, rule.shortcut)!r}: a shortcut with {len(projections)} weight layers is "
                         "not supported; pass residual_blocks=[...] explicitly")
    return tuple(branch), (projections[0] if projections else None)


def residual_blocks(model: torch.nn.Module) -> list[tuple[tuple[str, ...], str | None]]:
    """`(branch weight-layer names, projection shortcut name or None)` of every residual block the rules know, in
    module order, with `model`'s own names (`backbone.layer1.0.conv1`)."""
    blocks = []
    for prefix, module in model.named_modules():
        for rule in RULES:
            if type(module).__name__ in rule.classes:
                branch, shortcut = _rule_block(prefix, module, rule)
                if branch:
                    blocks.append((branch, shortcut))
    return blocks


def weight_layers(model: torch.nn.Module) -> list[str]:
    """Names of every convolution and linear layer of `model`, in module order."""
    return _weight_layers_in(model, "")


def non_homogeneous_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules that make `model` not positively homogeneous (LayerNorm, GroupNorm, attention,
    softmax; a class named `*Attention*`)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, NON_HOMOGENEOUS) or "Attention" in type(module).__name__]
