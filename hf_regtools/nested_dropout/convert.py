"""`convert_to_nested`: module surgery turning a CNN into a Bayesian nested network, keeping its weights."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from ..adapters.nested_sites import nested_sites
from ..surgery import replace_modules
from .layers import LinearVDO, NestedConv2d, check_grouping

CONV_OPTIONS = ("num_div", "freeze", "prior_pi", "tau", "sampler_logits", "log_alpha_init", "beta_r_init",
                "threshold")
LINEAR_OPTIONS = ("log_alpha_init", "threshold")


def _patterns(name: str, value) -> list[re.Pattern]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
    if values is None or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a regex string or a list of them, got {value!r}")
    return [re.compile(v) for v in values]


def _working_num_div(channels: list[int], num_div: int, freeze: int) -> int | None:
    common = math.gcd(*channels)
    return next((d for d in range(num_div, freeze, -1) if common % d == 0), None)


def convert_to_nested(model: nn.Module, include=None, exclude=None, *, keep_first_conv: bool = True,
                      linear_vdo: bool = True, **layer_options) -> nn.Module:
    """Replace the nested sites' convolutions by `NestedConv2d` and the `Linear` layers by `LinearVDO`, in place.

    The new layers compute with the old `Parameter` objects (`hf_regtools.surgery.replace_modules`), so weights,
    optimizers built afterwards and weight tying are unaffected; build the optimizer (or the `Trainer`) after
    converting. Sites are the convolutions whose output channels can be cut (`hf_regtools.adapters.nested_sites`):
    VGG-style chains, the inner convolutions of timm / torchvision ResNet blocks and of transformers ResNet layers.

    ```py
    from hf_regtools.nested_dropout import convert_to_nested, nested_layers
    from hf_regtools.testing.tiny_models import vgg_classifier

    model = convert_to_nested(vgg_classifier(), num_div=4, freeze=1, prior_pi=0.95)
    print([name for name, _ in nested_layers(model)])  # ['features.4', 'features.8', 'features.11']
    ```

    Args:
        model (`nn.Module`): the model, changed in place (and returned).
        include (`str` or `list[str]`, *optional*): regexes (`re.search` on module names); only matching sites and
            `Linear` layers are converted.
        exclude (`str` or `list[str]`, *optional*): regexes of module names left as they are.
        keep_first_conv (`bool`, *optional*, defaults to `True`): leave the model's first convolution ordinary, as the
            official VGG does (in ResNets the stem is no site anyway).
        linear_vdo (`bool`, *optional*, defaults to `True`): also turn every `nn.Linear` into a `LinearVDO` (in these
            CNNs the classifier's layers, as the official VGG's dense layers).
        **layer_options: `NestedConv2d` options (`num_div`, `freeze`, `prior_pi`, `tau`, `sampler_logits`,
            `log_alpha_init`, `beta_r_init`, `threshold`); `log_alpha_init` and `threshold` also apply to `LinearVDO`.

    Returns:
        `nn.Module`: `model`.

    Raises:
        `TypeError`: unknown options, or patterns that are not strings.
        `ValueError`: the model has no site, a pattern matches nothing, a convolution has a bias, or `num_div` does not
            divide a selected convolution's output channels (the message names it and a `num_div` that works).
    """
    unknown = sorted(set(layer_options) - set(CONV_OPTIONS))
    if unknown:
        raise TypeError(f"unknown NestedConv2d options {unknown}; allowed: {list(CONV_OPTIONS)}")
    includes, excludes = _patterns("include", include), _patterns("exclude", exclude)
    modules = dict(model.named_modules())
    sites = nested_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no convolution whose output channels nested dropout can cut "
                         "(supported: VGG-style nn.Sequential chains, timm / torchvision ResNet blocks, transformers "
                         "ResNet layers)")
    convs = [site.conv for site in sites if not isinstance(modules[site.conv], NestedConv2d)]
    first = next((name for name, module in modules.items() if isinstance(module, nn.Conv2d)), None)
    if keep_first_conv:
        convs = [name for name in convs if name != first]
    linears = [name for name, module in modules.items()
               if linear_vdo and isinstance(module, nn.Linear) and not isinstance(module, LinearVDO)]
    candidates = convs + linears
    for kind, patterns in (("include", includes), ("exclude", excludes)):
        for pattern in patterns:
            if not any(pattern.search(name) for name in candidates):
                hint = f"; the first convolution {first!r} stays ordinary unless keep_first_conv=False" if \
                    keep_first_conv and first is not None and pattern.search(first) else ""
                raise ValueError(f"{kind} pattern {pattern.pattern!r} matches none of the layers convert_to_nested "
                                 f"can convert: {candidates}{hint}")
    selected = lambda name: (not includes or any(p.search(name) for p in includes)) and \
        not any(p.search(name) for p in excludes)  # noqa: E731
    convs, linears = [n for n in convs if selected(n)], [n for n in linears if selected(n)]

    num_div, freeze = layer_options.get("num_div", 32), layer_options.get("freeze", 2)
    for name in convs:
        conv = modules[name]
        if conv.bias is not None:
            raise ValueError(f"convolution {name!r} has a bias; NestedConv2d is bias-free (the official Conv2dVND's "
                             "bias diverges): build it with bias=False, or exclude it")
        if conv.out_channels % num_div:
            working = _working_num_div([modules[n].out_channels for n in convs], num_div, freeze)
            hint = (f"num_div={working} divides every selected convolution" if working else
                    "exclude it, or lower freeze and num_div")
            raise ValueError(f"convolution {name!r} has {conv.out_channels} output channels, not divisible by "
                             f"num_div={num_div} (the channels form num_div equal groups); {hint}")
        check_grouping(conv.out_channels, num_div, freeze, layer=f"convolution {name!r}")
    linear_options = {key: value for key, value in layer_options.items() if key in LINEAR_OPTIONS}
    replacements = {name: NestedConv2d.from_conv(modules[name], **layer_options) for name in convs}
    replacements.update({name: LinearVDO.from_linear(modules[name], **linear_options) for name in linears})
    with torch.no_grad():
        replace_modules(model, replacements)
    return model
