"""Per-family adapters: what each supported model family looks like to our techniques.

A `ModelFamily` knows, from the state-dict key names alone, where the classifier, the fused qkv projections and
the positional embeddings of a family live, and which techniques do not apply to it. The library-specific modules
(`adapters.timm`, `adapters.transformers`) know how to read configs and build models of that family.
`find_supported_model` finds the model of a supported family inside the wrappers a Trainer or a user puts around it;
every per-family use of a module goes through it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class UnsupportedModelError(ValueError):
    """The model is not of a supported family, or teacher and student do not match."""


@dataclass(frozen=True)
class ModelFamily:
    """Key-level description of one model family in one library.

    Args:
        library (`str`): `"timm"` or `"transformers"`.
        name (`str`): `"vit"`, `"deit"`, `"convnext"`, `"convnextv2"` or `"swin"`.
        layout (`str`): `"isotropic"` (one stack of blocks) or `"hierarchical"` (stages).
        signature (`tuple[str, ...]`): regexes that must all match some key of the state dict.
        exclude (`tuple[str, ...]`): regexes none of which may match (distinguishes e.g. DeiT from ViT).
        classifier (`tuple[str, ...]`): key prefixes of the classification head(s).
        fused_qkv (`str`, *optional*): regex of keys holding q, k and v stacked along dim 0.
        token_axes (`dict[str, int]`): regex -> axis that must have equal length in teacher and student
            (the token axis of positional embeddings).
        not_kernels (`tuple[str, ...]`): regexes of 4-D tensors that are not convolution kernels (their last
            axes are channels, e.g. transformers ConvNeXt-V2's GRN parameters of shape `(1, 1, 1, C)`).
        head_dropout (`str`, *optional*): regex of the classifier-head dropout module's name.
        attention_dropout (`tuple[str, ...]`): float attributes holding an attention dropout rate.
        no_weight_decay (`tuple[str, ...]`): regexes of parameters the papers' recipes keep out of weight decay beyond
            every 1-D parameter and bias: what timm's `model.no_weight_decay()` lists, for the families whose library
            has no such method (transformers: class and distillation tokens, position embeddings, relative position
            bias tables; ConvNeXt-V2's GRN weight, 1-D in timm).
        unsupported (`dict[str, str]`): technique name -> why the technique does not apply to this family.
        axes (`tuple[tuple[str, tuple], ...]`): weight selection's axis names, as ordered rules `(regex, names)`: the
            first rule whose regex matches a teacher key and whose names have one entry per axis of the tensor names
            its axes. An entry is `None` (same length in teacher and student: kernels, tokens, vocabulary, classes),
            `""` (an unnamed axis: one index set per `(D, d)`, e.g. image channels of a stem), or a name, or a product of factors outermost first (`"3*hidden"`, `"kv_heads*group*head_dim"`); names
            may hold `{layer}`, `{stage}` (groups of the regex) and `{last}` (the last stage), each optionally offset
            by one (`{stage-1}`, `{stage+1}`, `{last+1}`). Every tensor sharing a factor name keeps the same entries of
            it.
        layers (`str`, *optional*): regex locating a key's block index (group `layer`, and `stage` for staged
            families), for layer selection.
        factor_sizes (`Callable`, *optional*): a model config -> the lengths of factors a tensor's shape does not give
            (heads, head dimension).
        paired_factors (`tuple[str, ...]`): factors selected in rotary pairs (a RoPE head dimension).
        tied (`tuple[tuple[str, str], ...]`): `(student key regex, teacher key)`: a student tensor tied to another
            reads that teacher tensor when the checkpoint does not store it (tied word embeddings).
        flat_blocks (`Callable`, *optional*): for a family whose keys number its layers in one flat sequence (timm
            VGG's `features`), so that no regex finds a block index: the keys of a checkpoint -> `(stage, block,
            part)` of every key inside a block, `part` naming the tensor within its block. Layer selection then maps
            student block `(stage, i)` to teacher block `(stage, map[i])`, part by part; it replaces `layers`.
        shared_axes (`tuple[tuple[str, str, str], ...]`): `(regex, name, same_as)`, each holding `{stage}` (offsets as
            in `axes`): for every stage of a checkpoint (the `stage` group of `layers`) where no key matches `regex`,
            axis `name` is axis `same_as`, one index set for both. A residual connection without a projection adds
            its input to its output, so the two must keep the same channels: a ResNet stage whose first block has no
            downsampling shortcut (`regex` finds the shortcut's keys) keeps the channels of the stage (or stem) before
            it. Teacher and student must agree on which stages have the projection (`axis_aliases`).
        keep_first_block (`bool`): the first block of every stage changes the width or resolution (a ResNet's strided
            block with its shortcut), so student block 0 always reads teacher block 0 and layer selection chooses the
            other blocks among the teacher's others.
    """

    library: str
    name: str
    layout: str
    signature: tuple[str, ...]
    classifier: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    fused_qkv: str | None = None
    token_axes: dict[str, int] = field(default_factory=dict)
    not_kernels: tuple[str, ...] = ()
    head_dropout: str | None = None
    attention_dropout: tuple[str, ...] = ()
    no_weight_decay: tuple[str, ...] = ()
    unsupported: dict[str, str] = field(default_factory=dict)
    axes: tuple[tuple[str, tuple], ...] = ()
    layers: str | None = None
    factor_sizes: Callable[[Any], dict[str, int]] | None = None
    paired_factors: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()
    flat_blocks: Callable[[Iterable[str]], dict[str, tuple[str, int, str]]] | None = None
    shared_axes: tuple[tuple[str, str, str], ...] = ()
    keep_first_block: bool = False

    @property
    def label(self) -> str:
        return f"{self.library} {self.name}"

    def matches(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        found = lambda pattern: any(re.search(pattern, k) for k in keys)  # noqa: E731
        return all(found(p) for p in self.signature) and not any(found(p) for p in self.exclude)

    def is_classifier(self, key: str) -> bool:
        return key.startswith(self.classifier)

    def is_fused_qkv(self, key: str) -> bool:
        return self.fused_qkv is not None and re.search(self.fused_qkv, key) is not None

    def fixed_axes(self, key: str, ndim: int) -> tuple[int, ...]:
        """Axes whose length must not change: conv kernel sizes and the positional-embedding token axis."""
        is_kernel = ndim == 4 and not any(re.search(pattern, key) for pattern in self.not_kernels)
        axes = {2, 3} if is_kernel else set()
        axes |= {axis for pattern, axis in self.token_axes.items() if re.search(pattern, key)}
        return tuple(sorted(axes))

    def axis_names(self, key: str, ndim: int, *, last_stage: int | None = None,
                   aliases: dict[str, str] | None = None) -> tuple[str | None, ...] | None:
        """The names of the axes of teacher tensor `key` (see `axes`), or `None` when no rule names them; factors
        renamed by `aliases` (see `axis_aliases`)."""
        for pattern, names in self.axes:
            if len(names) == ndim and (match := re.search(pattern, key)):
                names = _format_axis_names(names, match, last_stage)
                if not aliases:
                    return names
                return tuple(name and "*".join(aliases.get(f, f) for f in name.split("*")) for name in names)
        return None

    def axis_aliases(self, keys: Iterable[str]) -> dict[str, str]:
        """Axis name -> the name of the axis it is in the checkpoint of `keys` (see `shared_axes`)."""
        if not self.shared_axes or self.layers is None:
            return {}
        keys = list(keys)
        stages = sorted({int(match["stage"]) for key in keys if (match := re.search(self.layers, key))})
        aliases: dict[str, str] = {}
        for stage in stages:
            for pattern, name, same_as in self.shared_axes:
                pattern, name, same_as = (_PLACEHOLDER.sub(lambda found: str(stage + int(found[2] or 0)), text)
                                          for text in (pattern, name, same_as))
                if not any(re.search(pattern, key) for key in keys):
                    aliases[name] = aliases.get(same_as, same_as)
        return aliases


_PLACEHOLDER = re.compile(r"\{(\w+)([+-]1)?\}")


def _format_axis_names(names: tuple, match: re.Match, last_stage: int | None) -> tuple[str | None, ...]:
    """Axis names with `{group}`, `{group-1}`, `{group+1}` and `{last}` filled from a key's match and the model's
    last stage."""
    values = {name: value for name, value in match.groupdict().items() if value is not None}

    def fill(found: re.Match) -> str:
        if found[1] == "last":
            if last_stage is None:
                raise ValueError(f"axis name placeholder {{last}} in {names} needs a family with stages")
            value = str(last_stage)
        else:
            value = values[found[1]]
        return str(int(value) + int(found[2])) if found[2] else value

    return tuple(name and _PLACEHOLDER.sub(fill, name) for name in names)


def _linear(pattern: str, out: str | None, into: str | None, *, kernel: bool = False) -> tuple[tuple[str, tuple], ...]:
    """Axis rules of a Linear (or, with `kernel`, also a 1x1-conv) layer's weight `[out, in]` and bias `[out]`."""
    rules = [(pattern + r"\.weight$", (out, into)), (pattern + r"\.bias$", (out,))]
    if kernel:
        rules.append((pattern + r"\.weight$", (out, into, None, None)))
    return tuple(rules)


# ViT axes as in the paper: one `hidden` set for the residual stream and the attention width (heads are not kept
# whole), one MLP set per block.
_VIT_AXES = (
    (r"(^|\.)(cls_token|reg_token|dist_token|pos_embed|position_embeddings|distillation_token|mask_token)$",
     (None, None, "hidden")),
    (r"(^patch_embed\.proj|patch_embeddings\.projection)\.weight$", ("hidden", "", None, None)),
    (r"\.attn\.(q|k)_norm\.", ("",)),
    *_linear(r"\.attn\.qkv", "3*hidden", "hidden"),
    *_linear(r"(^|\.)(blocks|layers?)\.(?P<layer>\d+)\.(mlp\.fc1|intermediate\.dense)", "mlp{layer}", "hidden"),
    *_linear(r"(^|\.)(blocks|layers?)\.(?P<layer>\d+)\.(mlp\.fc2|output\.dense)", "hidden", "mlp{layer}"),
    *_linear(r"^(head|head_dist|classifier|cls_classifier|distillation_classifier)", None, "hidden"),
    (r"", ("hidden", "hidden")),
    (r"", ("hidden",)),
)
_TIMM_VIT = ModelFamily(
    library="timm", name="vit", layout="isotropic",
    signature=(r"^patch_embed\.proj\.weight$", r"^blocks\.\d+\.attn\.qkv\.weight$"),
    exclude=(r"^dist_token$",),
    classifier=("head.",),
    fused_qkv=r"^blocks\.\d+\.attn\.qkv\.(weight|bias)$",
    token_axes={r"^pos_embed$": 1},
    head_dropout=r"^head_drop$",
    axes=_VIT_AXES,
    layers=r"^blocks\.(?P<layer>\d+)\.",
)
# ConvNeXt axes: one channel set per stage (`c0`..), one MLP set per block; the downsampling convolution maps the
# previous stage's channels to this stage's.
_STAGE = r"stages\.(?P<stage>\d+)\."
_TIMM_BLOCK = _STAGE + r"blocks\.(?P<layer>\d+)\."
_TIMM_CONVNEXT = ModelFamily(
    library="timm", name="convnext", layout="hierarchical",
    signature=(r"^stages\.\d+\.blocks\.\d+\.conv_dw\.weight$",),
    exclude=(r"\.grn\.",),
    classifier=("head.fc.",),
    head_dropout=r"^head\.drop$",
    axes=(
        (r"^stem\.0\.weight$", ("c0", "", None, None)),
        (r"^stem\.", ("c0",)),
        (r"^" + _STAGE + r"downsample\.0\.", ("c{stage-1}",)),
        (r"^" + _STAGE + r"downsample\.1\.weight$", ("c{stage}", "c{stage-1}", None, None)),
        (r"^" + _TIMM_BLOCK + r"conv_dw\.weight$", ("c{stage}", None, None, None)),
        *_linear(r"^" + _TIMM_BLOCK + r"mlp\.fc1", "mlp{stage}.{layer}", "c{stage}", kernel=True),
        *_linear(r"^" + _TIMM_BLOCK + r"mlp\.fc2", "c{stage}", "mlp{stage}.{layer}", kernel=True),
        (r"^" + _TIMM_BLOCK + r"mlp\.grn\.", ("mlp{stage}.{layer}",)),
        (r"^" + _STAGE, ("c{stage}",)),
        (r"^head\.norm\.", ("c{last}",)),
        *_linear(r"^head\.fc", None, "c{last}"),
    ),
    layers=r"^" + _TIMM_BLOCK,
)
_SWIN_NOT_SELECTABLE = (
    "Swin's patch merging stacks 2x2 neighbouring tokens along the channel axis (4C), so one index set over 4C "
    "leaves the stage's channel set for non-integer width ratios; its relative-position bias tables hold one column "
    "per head, and channel selection does not keep whole heads; neither the paper nor the official code covers it."
)
_TIMM_SWIN = ModelFamily(
    library="timm", name="swin", layout="hierarchical",
    signature=(r"^layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$",),
    classifier=("head.fc.",),
    head_dropout=r"^head\.drop$",
    unsupported={"weight_selection": _SWIN_NOT_SELECTABLE},
)
_TRANSFORMERS_STAGE_BLOCK = r"(^|\.)encoder\.layers\.\d+\.blocks\.\d+\."
_TRANSFORMERS_SWIN = ModelFamily(
    library="transformers", name="swin", layout="hierarchical",
    signature=(_TRANSFORMERS_STAGE_BLOCK + r"attention\.(self|relative_position_bias)\.relative_position_bias_table$",),
    classifier=("classifier.",),
    attention_dropout=("attention_dropout",),
    no_weight_decay=(r"(^|\.)embeddings\.position_embeddings$", r"\.relative_position_bias_table$"),
    unsupported={"weight_selection": _SWIN_NOT_SELECTABLE},
)
_TRANSFORMERS_VIT = ModelFamily(
    library="transformers", name="vit", layout="isotropic",
    signature=(r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$",),
    exclude=(r"(^|\.)embeddings\.distillation_token$", r"^deit\.", _TRANSFORMERS_STAGE_BLOCK),
    classifier=("classifier.",),
    token_axes={r"(^|\.)embeddings\.position_embeddings$": 1},
    attention_dropout=("attention_dropout", "dropout_prob"),
    no_weight_decay=(r"(^|\.)embeddings\.(cls_token|position_embeddings)$",),    axes=_VIT_AXES,
    layers=r"(^|\.)layers?\.(?P<layer>\d+)\.",
)
_TRANSFORMERS_BLOCK = r"(^|\.)" + _STAGE + r"layers\.(?P<layer>\d+)\."
_TRANSFORMERS_CONVNEXT = ModelFamily(
    library="transformers", name="convnext", layout="hierarchical",
    signature=(r"(^|\.)encoder\.stages\.\d+\.layers\.\d+\.dwconv\.weight$",),
    exclude=(r"\.grn\.", r"^convnextv2\."),
    classifier=("classifier.",),
    axes=(
        (r"embeddings\.patch_embeddings\.weight$", ("c0", "", None, None)),
        (r"embeddings\.(patch_embeddings|layernorm)\.", ("c0",)),
        (_STAGE + r"downsampling_layer\.0\.", ("c{stage-1}",)),
        (_STAGE + r"downsampling_layer\.1\.weight$", ("c{stage}", "c{stage-1}", None, None)),
        (_TRANSFORMERS_BLOCK + r"dwconv\.weight$", ("c{stage}", None, None, None)),
        *_linear(_TRANSFORMERS_BLOCK + r"pwconv1", "mlp{stage}.{layer}", "c{stage}"),
        *_linear(_TRANSFORMERS_BLOCK + r"pwconv2", "c{stage}", "mlp{stage}.{layer}"),
        (_TRANSFORMERS_BLOCK + r"grn\.", (None, None, None, "mlp{stage}.{layer}")),
        (_STAGE, ("c{stage}",)),
        *_linear(r"^classifier", None, "c{last}"),
        (r"layernorm\.", ("c{last}",)),
    ),
    layers=_TRANSFORMERS_BLOCK,
)

from . import families  # noqa: E402  (the families of other modules, built with ModelFamily above)

FAMILIES: tuple[ModelFamily, ...] = (
    _TIMM_VIT,
    replace(_TIMM_VIT, name="deit", exclude=(), signature=(*_TIMM_VIT.signature, r"^dist_token$"),
            classifier=("head.", "head_dist.")),
    _TIMM_CONVNEXT,
    replace(_TIMM_CONVNEXT, name="convnextv2", exclude=(), signature=(*_TIMM_CONVNEXT.signature, r"\.grn\.")),
    _TIMM_SWIN,
    _TRANSFORMERS_VIT,
    replace(_TRANSFORMERS_VIT, name="deit", exclude=(),
            signature=(*_TRANSFORMERS_VIT.signature, r"(^|\.)embeddings\.distillation_token$"),
            classifier=("cls_classifier.", "distillation_classifier.", "classifier."),
            no_weight_decay=(r"(^|\.)embeddings\.(cls_token|position_embeddings|distillation_token)$",)),
    _TRANSFORMERS_CONVNEXT,
    replace(_TRANSFORMERS_CONVNEXT, name="convnextv2", exclude=(),
            signature=(*_TRANSFORMERS_CONVNEXT.signature, r"\.grn\."), not_kernels=(r"\.grn\.(weight|bias)$",),
            no_weight_decay=(r"\.grn\.weight$",)),
    _TRANSFORMERS_SWIN,
    *families.ALL,
)


def supported_families(technique: str | None = None) -> list[str]:
    """Labels of the families (that `technique` supports, if given)."""
    return list(dict.fromkeys(family.label for family in FAMILIES if technique not in family.unsupported))


def detect_family(model_or_keys: torch.nn.Module | Iterable[str], *, role: str = "model",
                  technique: str | None = None, name: str | None = None) -> ModelFamily:
    """The `ModelFamily` of a module (found inside wrappers, see `find_supported_model`) or of state-dict keys.

    Args:
        model_or_keys (`nn.Module` or `Iterable[str]`): a model, or the keys of its state dict or checkpoint.
        role (`str`, *optional*, defaults to `"model"`): what the model is, for error messages (`"teacher"`, ...).
        technique (`str`, *optional*): also require that this technique supports the family.
        name (`str`, *optional*): what the model is called in error messages (`"timm resnet18"`, `"transformers
            bert"`, a checkpoint path). Derived from a module when not given.

    Raises:
        `UnsupportedModelError`: no or several families match, or `technique` does not support the family; the
            message names the model and lists the supported families.
    """
    import torch

    if isinstance(model_or_keys, torch.nn.Module):
        return find_supported_model(model_or_keys, role=role, technique=technique, name=name).family
    keys = list(model_or_keys)
    found = [family for family in FAMILIES if family.matches(keys)]
    if len(found) != 1:
        hint = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        _raise_unsupported(role, name, technique, hint=f"keys: {hint}")
    return _check_technique(found[0], role, technique)


def _raise_unsupported(role: str, name: str | None, technique: str | None, *, hint: str | None = None):
    described = f" ({name})" if name else ""
    hint = f" ({hint})" if hint and not name else ""
    purpose = f" for {technique.replace('_', ' ')}" if technique else ""
    raise UnsupportedModelError(f"the {role}{described} is not of a supported family{purpose}{hint}. "
                                f"Supported: {', '.join(supported_families(technique))}.")


def _check_technique(family: ModelFamily, role: str, technique: str | None) -> ModelFamily:
    if technique in family.unsupported:
        raise UnsupportedModelError(f"{technique.replace('_', ' ')} does not support the {role}'s family, "
                                    f"{family.label}: {family.unsupported[technique]} "
                                    f"Supported: {', '.join(supported_families(technique))}.")
    return family


@dataclass(frozen=True)
class SupportedModel:
    """A model of a supported family found inside another module (or the module itself).

    Attributes:
        module (`nn.Module`): the timm or transformers model.
        prefix (`str`): its name in the outer module (`"timm_model"`, `"module"`, `"_orig_mod"`, ...), `""` if it is
            the outer module itself.
        family (`ModelFamily`): its family.
    """

    module: torch.nn.Module
    prefix: str
    family: ModelFamily

    @property
    def library(self) -> str:
        return self.family.library

    def qualified(self, name: str) -> str:
        """The outer module's name of the inner module's `name` (a submodule or parameter name)."""
        return f"{self.prefix}.{name}" if self.prefix and name else self.prefix or name


def find_supported_model(model: torch.nn.Module, *, role: str = "model", technique: str | None = None,
                         name: str | None = None) -> SupportedModel:
    """The model of a supported family inside `model`, at any depth, and its name prefix.

    Finds the timm or transformers model in transformers' `TimmWrapperForImageClassification` (`.timm_model`), in a
    user module holding one as an attribute, and in DDP / FSDP / DeepSpeed (`.module`), `torch.compile`
    (`._orig_mod`) and other wrappers that register the model as a submodule. The shallowest timm or transformers
    model whose state-dict keys match a family wins; a module from neither library counts only if nothing inside it
    matches. Per-family adapters (sites, surgery, weight selection) work on the result and name what they change with
    the outer module's names (`SupportedModel.qualified`), so surgery on the outer module keeps every `Parameter`.

    Args:
        model (`nn.Module`): the model, possibly wrapped.
        role, technique, name: as in `detect_family`.

    Raises:
        `UnsupportedModelError`: nothing inside `model` is of a supported family, or `technique` does not support it.
    """
    keys = list(model.state_dict())
    candidates = sorted(((prefix, module) for prefix, module in model.named_modules() if _library_of_class(module)),
                        key=lambda item: item[0].count(".") + bool(item[0]))
    if not _library_of_class(model):
        candidates.append(("", model))
    for prefix, module in candidates:
        start = f"{prefix}." if prefix else ""
        inner_keys = [key[len(start):] for key in keys if key.startswith(start)]
        found = [family for family in FAMILIES if family.matches(inner_keys)]
        if len(found) == 1:
            return SupportedModel(module, prefix, _check_technique(found[0], role, technique))
    _raise_unsupported(role, name or describe_model(model), technique)


def describe_model(model: torch.nn.Module) -> str:
    """A short name for error messages: `"timm resnet18"`, `"transformers bert in MyWrapper"`, `"MyNet"`.

    The shallowest timm model (its `pretrained_cfg` architecture, else its class) is preferred, then the shallowest
    transformers model (its `config.model_type`, else its class).
    """
    modules = sorted(model.named_modules(), key=lambda item: item[0].count(".") + bool(item[0]))
    for library in ("timm", "transformers"):
        for prefix, module in modules:
            if _library_of_class(module) != library or not _is_library_model(module, library):
                continue
            if library == "timm":
                label = (getattr(module, "pretrained_cfg", None) or {}).get("architecture") or type(module).__name__
            else:
                label = getattr(getattr(module, "config", None), "model_type", None) or type(module).__name__
            inside = f" in {type(model).__name__}" if prefix else ""
            return f"{library} {label}{inside}"
    return type(model).__name__


def _is_library_model(module: torch.nn.Module, library: str) -> bool:
    if library == "timm":
        return hasattr(module, "pretrained_cfg") or hasattr(module, "default_cfg")
    return hasattr(module, "config") and hasattr(module, "base_model_prefix")


def _library_of_class(module: torch.nn.Module) -> str | None:
    """`"timm"` or `"transformers"` when the module's class (or a base class) comes from that library."""
    for cls in type(module).__mro__:
        for library in ("timm", "transformers"):
            if cls.__module__.startswith(library + "."):
                return library
    return None


@dataclass(frozen=True)
class StudentShape:
    """Library-neutral architecture overrides for a student.

    Args:
        hidden_size (`int` or `tuple[int, ...]`, *optional*): ViT embedding width; ConvNeXt and ResNet per-stage
            widths (an `int` is the first stage's width, doubled at each stage; a ResNet stage's width is its output
            channels, 4 x timm's `channels` for bottleneck blocks).
        depth (`int` or `tuple[int, ...]`, *optional*): ViT block count; ConvNeXt and ResNet blocks per stage.
        num_heads (`int`, *optional*): ViT attention heads; wins over `head_dim`.
        mlp_dim (`int`, *optional*): ViT MLP hidden width; wins over `mlp_ratio`.
        head_dim (`int`, *optional*): ViT head dimension, giving `num_heads = hidden_size / head_dim`. Defaults to
            the teacher's head dimension (a preset sets its own).
        mlp_ratio (`float`, *optional*): ViT MLP width over embedding width. Defaults to the teacher's ratio (a
            preset sets its own).
        num_key_value_heads (`int`, *optional*): key/value heads of a grouped-query-attention decoder; defaults to
            the teacher's.
    """

    hidden_size: int | tuple[int, ...] | None = None
    depth: int | tuple[int, ...] | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    head_dim: int | None = None
    mlp_ratio: float | None = None
    num_key_value_heads: int | None = None

    def is_empty(self) -> bool:
        return all(value is None for value in self.__dict__.values())

    def merged(self, overrides: StudentShape) -> StudentShape:
        """These values, replaced by those `overrides` sets."""
        return StudentShape(**{name: getattr(overrides, name) if getattr(overrides, name) is not None else value
                               for name, value in self.__dict__.items()})


# ViT presets keep the head dimension (64) and the MLP ratio (4) of their namesakes, so that a preset with a
# hidden_size override derives heads and MLP width from them (`vit-tiny` at width 128: 2 heads, MLP 512).
PRESETS: dict[str, tuple[str, StudentShape]] = {
    "vit-tiny": ("isotropic", StudentShape(hidden_size=192, depth=12, head_dim=64, mlp_ratio=4.0)),
    "vit-small": ("isotropic", StudentShape(hidden_size=384, depth=12, head_dim=64, mlp_ratio=4.0)),
    "vit-base": ("isotropic", StudentShape(hidden_size=768, depth=12, head_dim=64, mlp_ratio=4.0)),
    "convnext-atto": ("hierarchical", StudentShape(hidden_size=(40, 80, 160, 320), depth=(2, 2, 6, 2))),
    "convnext-femto": ("hierarchical", StudentShape(hidden_size=(48, 96, 192, 384), depth=(2, 2, 6, 2))),
    "convnext-pico": ("hierarchical", StudentShape(hidden_size=(64, 128, 256, 512), depth=(2, 2, 6, 2))),
    "convnext-nano": ("hierarchical", StudentShape(hidden_size=(80, 160, 320, 640), depth=(2, 2, 8, 2))),
    "convnext-tiny": ("hierarchical", StudentShape(hidden_size=(96, 192, 384, 768), depth=(3, 3, 9, 3))),
}


def check_preset(name: str) -> None:
    """Raise a `ValueError` listing the presets if `name` is not one."""
    if name not in PRESETS:
        raise ValueError(f"unknown student preset {name!r}; available presets: {sorted(PRESETS)} (or pass a Hub id "
                         "`org/name` or a folder holding the student's config.json)")


def preset_shape(name: str, family: ModelFamily) -> StudentShape:
    """The `StudentShape` of a preset, checked against the teacher's family layout."""
    check_preset(name)
    layout, shape = PRESETS[name]
    if layout != family.layout:
        fitting = sorted(n for n, (lay, _) in PRESETS.items() if lay == family.layout)
        raise UnsupportedModelError(
            f"preset {name!r} is a {layout} model but the teacher is {family.label} ({family.layout}); "
            f"teacher and student must be of the same family. Presets that fit: {fitting}"
        )
    return shape


def vit_dims(shape: StudentShape, *, teacher_width: int, teacher_heads: int, teacher_mlp: int
             ) -> tuple[int, int, int]:
    """Student (width, heads, mlp width) for a ViT.

    Explicit `num_heads` / `mlp_dim` win; else the heads keep `shape.head_dim` and the MLP `shape.mlp_ratio` (set by
    presets), else the teacher's head dimension and MLP ratio.
    """
    if shape.num_key_value_heads is not None:
        raise ValueError("num_key_value_heads applies to grouped-query-attention decoders (Llama, Mistral, Qwen), "
                         "not to this family; use num_heads")
    width = shape.hidden_size if shape.hidden_size is not None else teacher_width
    if not isinstance(width, int):
        raise ValueError(f"hidden_size for a ViT must be one integer, got {width!r}")
    heads = shape.num_heads
    if heads is None:
        head_dim, whose = (shape.head_dim, "the student's") if shape.head_dim else (
            teacher_width // teacher_heads, "the teacher's")
        if width % head_dim:
            raise ValueError(f"hidden_size {width} is not a multiple of {whose} head dimension {head_dim}; pass the "
                             "number of heads explicitly (--num-heads, or num_heads=)")
        heads = width // head_dim
    if width % heads:
        raise ValueError(f"hidden_size {width} is not divisible by num_heads {heads}; choose a number of heads that "
                         "divides it (--num-heads, or num_heads=)")
    if shape.mlp_dim is not None:
        mlp = shape.mlp_dim
    elif shape.mlp_ratio is not None:
        mlp = width * shape.mlp_ratio
        if mlp != int(mlp):
            raise ValueError(f"hidden_size {width} times the MLP ratio {shape.mlp_ratio} is not an integer; pass the "
                             "MLP width explicitly (--mlp-dim, or mlp_dim=)")
        mlp = int(mlp)
    else:
        mlp = teacher_mlp * width // teacher_width
    return width, heads, mlp


def convnext_dims(shape: StudentShape, *, teacher_widths: tuple[int, ...], teacher_depths: tuple[int, ...]
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Student (per-stage widths, per-stage depths) for a ConvNeXt (see `stage_dims`)."""
    return stage_dims(shape, teacher_widths=teacher_widths, teacher_depths=teacher_depths, model="ConvNeXt")


def stage_dims(shape: StudentShape, *, teacher_widths: tuple[int, ...], teacher_depths: tuple[int, ...],
               model: str, check_sizes: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Student (per-stage widths, per-stage depths) for a CNN of stages (`model` names it in messages): `hidden_size`
    is the widths, an `int` the first stage's, doubled at each stage; `depth` the blocks per stage. With
    `check_sizes`, a stage wider or deeper than the teacher's raises."""
    if any(value is not None for value in (shape.num_heads, shape.mlp_dim, shape.head_dim, shape.mlp_ratio,
                                           shape.num_key_value_heads)):
        raise ValueError("num_heads, num_key_value_heads, mlp_dim, head_dim and mlp_ratio do not apply to a CNN; use "
                         "hidden_size and depth")
    stages = len(teacher_widths)
    widths = shape.hidden_size if shape.hidden_size is not None else teacher_widths
    if isinstance(widths, int):
        widths = tuple(widths * 2**i for i in range(stages))
    depths = shape.depth if shape.depth is not None else teacher_depths
    if isinstance(depths, int):
        raise ValueError(f"depth for a {model} is one count per stage ({stages} stages), got {depths!r}")
    widths, depths = tuple(widths), tuple(depths)
    if len(widths) != stages or len(depths) != stages:
        raise ValueError(f"the teacher has {stages} stages; got hidden_size {widths} and depth {depths}")
    if check_sizes:
        problems = [f"stage {i + 1} {what} {value} (the teacher's {limit})"
                    for what, values, limits in (("width", widths, teacher_widths), ("depth", depths, teacher_depths))
                    for i, (value, limit) in enumerate(zip(values, limits)) if not 1 <= value <= limit]
        if problems:
            raise ValueError(f"cannot build this {model} student: {'; '.join(problems)}. Every stage needs between 1 "
                             "and the teacher's number of channels and blocks")
    return widths, depths


def library_adapter(library: str):
    """The adapter module of a library: `hf_regtools.adapters.timm` or `hf_regtools.adapters.transformers`."""
    if library not in ("timm", "transformers"):
        raise UnsupportedModelError(f"unsupported library {library!r}; supported: timm, transformers")
    from importlib import import_module

    return import_module(f"{__name__}.{library}")


def library_of(model: torch.nn.Module) -> str:
    """`"timm"` or `"transformers"`: the library of the supported model inside `model` (see `find_supported_model`),
    else of the module's class."""
    try:
        return find_supported_model(model).library
    except UnsupportedModelError:
        library = _library_of_class(model)
    if library is None:
        raise UnsupportedModelError(f"{type(model).__name__} (from {type(model).__module__}) is neither a timm nor a "
                                    "transformers model, nor holds one")
    return library


def save_model(model: torch.nn.Module, folder) -> None:
    """Save a timm or transformers model in its library's Hub format (safetensors + config)."""
    library = _library_of_class(model)
    if library is None:
        raise UnsupportedModelError(f"{type(model).__name__} (from {type(model).__module__}) is neither a timm nor a "
                                    "transformers model")
    library_adapter(library).save(model, folder)
