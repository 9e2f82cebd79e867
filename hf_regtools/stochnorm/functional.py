"""Surgery: BatchNorm layers of any model (transformers, timm, your own) to StochNorm and back."""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable

from torch import nn

from ..surgery import replace_modules
from .modules import StochNorm1d, StochNorm2d, StochNorm3d, StochNormAct2d, _StochNorm, validate_p

CONVERSIONS: dict[type[nn.Module], type[_StochNorm]] = {
    nn.BatchNorm1d: StochNorm1d,
    nn.BatchNorm2d: StochNorm2d,
    nn.BatchNorm3d: StochNorm3d,
}
"""BatchNorm class -> StochNorm class (and timm's `BatchNormAct2d` -> `StochNormAct2d`, see `_conversions`)."""

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
                nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def _conversions() -> dict[type[nn.Module], type[_StochNorm]]:
    """`CONVERSIONS`, and timm's `BatchNormAct2d` -> `StochNormAct2d` once timm is imported (a model holding a
    `BatchNormAct2d` implies it is; converting other models then does not import timm)."""
    timm_layers = sys.modules.get("timm.layers")
    batch_norm_act = getattr(timm_layers, "BatchNormAct2d", None)
    return CONVERSIONS if batch_norm_act is None else {**CONVERSIONS, batch_norm_act: StochNormAct2d}


def _patterns(patterns: str | Iterable[str] | None, argument: str) -> list[re.Pattern] | None:
    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    try:
        return [re.compile(pattern) for pattern in patterns]
    except (re.error, TypeError) as error:
        raise ValueError(f"{argument} must be a regex or a list of regexes matched against module names "
                         f"(model.named_modules()), got {patterns!r}: {error}") from None


def _selected(name: str, include: list[re.Pattern] | None, exclude: list[re.Pattern] | None) -> bool:
    if include is not None and not any(pattern.search(name) for pattern in include):
        return False
    return not (exclude and any(pattern.search(name) for pattern in exclude))


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, _BATCH_NORMS)


def stochnorm_layers(model: nn.Module) -> dict[str, _StochNorm]:
    """The StochNorm layers of `model` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _StochNorm)}


def apply_stochnorm(model: nn.Module, p: float = 0.5, *, include: str | Iterable[str] | None = None,
                    exclude: str | Iterable[str] | None = None) -> list[str]:
    """Replace every BatchNorm layer of `model`, in place, by the StochNorm layer of the same dimension.

    `nn.BatchNorm1d/2d/3d` become `StochNorm1d/2d/3d` and timm's `BatchNormAct2d` becomes `StochNormAct2d` (its
    dropout and activation kept). Each new layer holds the old one's `Parameter` objects and buffers (the same
    tensors), its `eps`, `momentum` and mode, so an optimizer built earlier still updates the weights, state-dict keys
    are unchanged and eval outputs are those of the original model. Run it on a pretrained model, before the
    optimizer and any DDP wrapper exist (with the Trainer: `StochNormCallback`, or before `Trainer(...)`).

    Args:
        model (`nn.Module`): a transformers, timm or plain PyTorch model with BatchNorm layers.
        p (`float`, *optional*, defaults to 0.5): probability that a channel uses the mini-batch statistics (the
            official recipe: 0.5 for every layer).
        include (`str` or `list[str]`, *optional*): regexes (`re.search` on the names of `model.named_modules()`);
            only matching layers are converted.
        exclude (`str` or `list[str]`, *optional*): regexes of layers to keep as BatchNorm.

    Returns:
        `list[str]`: the names of the converted layers.

    Raises:
        `ValueError`: `p` is not a probability; a selected layer is a `SyncBatchNorm` (its batch branch would lose the
            synchronisation), another BatchNorm subclass or tracks no running statistics; no BatchNorm layer is
            selected (e.g. a LayerNorm model such as ViT or ConvNeXt, or a model already converted).

    Example:

    ```python
    from hf_regtools.stochnorm import apply_stochnorm, remove_stochnorm
    from hf_regtools.testing.tiny_models import transformers_resnet

    model = transformers_resnet()
    weight = model.resnet.embedder.embedder.normalization.weight
    names = apply_stochnorm(model, p=0.5)
    layer = model.get_submodule(names[0])
    assert type(layer).__name__ == "StochNorm2d" and layer.p == 0.5 and layer.weight is weight
    assert remove_stochnorm(model) == names
    ```
    """
    p = validate_p(p)
    include_patterns, exclude_patterns = _patterns(include, "include"), _patterns(exclude, "exclude")
    conversions = _conversions()
    replacements = {}
    for name, module in model.named_modules():
        if not (_is_batch_norm(module) and _selected(name, include_patterns, exclude_patterns)):
            continue
        if isinstance(module, nn.SyncBatchNorm):
            raise ValueError(f"{name!r} is a {type(module).__name__}: StochNorm's mini-batch branch would silently "
                             "use per-process statistics. Apply apply_stochnorm before "
                             "SyncBatchNorm.convert_sync_batchnorm (StochNorm layers are then left alone), or exclude "
                             "the layer (exclude=)")
        target = conversions.get(type(module))
        if target is None:
            raise ValueError(f"{name!r} is a {type(module).__name__}, a BatchNorm subclass StochNorm does not know "
                             f"(it converts {', '.join(sorted(c.__name__ for c in conversions))}); exclude it "
                             "(exclude=) or convert it yourself")
        if not module.track_running_stats or module.running_mean is None:
            raise ValueError(f"{name!r} ({type(module).__name__}) tracks no running statistics, so StochNorm has no "
                             "moving statistics to choose from; exclude it (exclude=)")
        replacements[name] = target.from_batchnorm(module, p=p)
    if not replacements:
        raise ValueError(_nothing_to_convert(model, include, exclude))
    replace_modules(model, replacements)
    return list(replacements)


def _nothing_to_convert(model: nn.Module, include, exclude) -> str:
    label = type(model).__name__
    if any(_is_batch_norm(module) for module in model.modules()):
        return (f"apply_stochnorm selected no BatchNorm layer of {label}: include={include!r} and exclude={exclude!r} "
                "leave none")
    if stochnorm_layers(model):
        return (f"{label} has StochNorm layers and no BatchNorm left (already converted); change p with "
                "set_stochnorm_p(model, p)")
    norms = Counter(type(module).__name__ for module in model.modules()
                    if re.search(r"Norm(\d+d)?$", type(module).__name__))
    found = ", ".join(f"{count} {kind}" for kind, count in norms.most_common()) or "no normalization layer"
    return (f"{label} has no BatchNorm layer (found {found}): StochNorm replaces BatchNorm1d/2d/3d and timm "
            "BatchNormAct2d only, so it does not apply to LayerNorm models such as ViT or ConvNeXt")


def remove_stochnorm(model: nn.Module) -> list[str]:
    """Turn every StochNorm layer of `model` back into the BatchNorm it came from, in place, for export.

    `StochNorm1d/2d/3d` become `nn.BatchNorm1d/2d/3d` and `StochNormAct2d` a timm `BatchNormAct2d`, with the same
    `Parameter` objects, buffers, `eps`, `momentum` and mode. Returns the names of the converted layers (possibly
    none). A converted model's state dict already has BatchNorm's keys, so its checkpoints load into the original
    architecture without this step.
    """
    layers = stochnorm_layers(model)
    replace_modules(model, {name: layer.to_batchnorm() for name, layer in layers.items()})
    return list(layers)


def set_stochnorm_p(model: nn.Module, p: float) -> int:
    """Set `p` on every StochNorm layer of `model` (e.g. from a schedule; not in the paper); returns how many.

    Raises:
        `ValueError`: `p` is not a probability, or `model` has no StochNorm layer.
    """
    p = validate_p(p)
    layers = stochnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no StochNorm layer; convert it first with "
                         "apply_stochnorm(model, p=...)")
    for layer in layers.values():
        layer.p = p
    return len(layers)
