"""Weight rescaling (WRS), the functional core: find the scale-invariant weights and rescale them in place.

A convolution or linear layer whose output goes straight into a BatchNorm computes a function that does not change
when one of its output channels (a filter, with its bias) is multiplied by c > 0, as long as the BatchNorm uses
batch statistics. Weight rescaling puts each such filter back to norm `r` after every optimizer step instead of
decaying it (Liu et al., arXiv:2102.03497):

```
w_c <- r * w_c / ||w_c||_2,   b_c <- r * b_c / ||w_c||_2   for every output channel c
```

In a custom loop:

```py
pairs = find_scale_invariant_pairs(model)            # once
optimizer = torch.optim.SGD(wrs_param_groups(model, weight_decay=5e-4, pairs=pairs), lr=0.1, momentum=0.9)
for batch in loader:
    loss = loss_fn(model(batch))
    loss.backward()
    optimizer.step()
    rescale_weights_(pairs)                         # after the step, before the next forward
    optimizer.zero_grad()
```
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from .._trainer_utils import unwrap_optimizer
from ..adapters.norm_pairs import fits, is_norm, is_weight_layer, matching_rules, name_map_pairs

METHODS = ("auto", "fx", "names")
GRANULARITIES = ("channel", "tensor")
DEFAULT_EPS = 1e-12
MOMENTS = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
"""Optimizer-state tensors rescaled with `rescale_optimizer_state`: name -> power of the factor n / r (SGD momentum,
Adam/AdamW moments). Gradients at the rescaled weights are the old ones times n / r."""


class ScaleInvariantPair(NamedTuple):
    """A weight layer whose output feeds a BatchNorm directly, with both modules' names in the model."""

    name: str
    module: torch.nn.Module
    norm_name: str
    norm: torch.nn.Module

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.module.weight


class _LeafTracer(torch.fx.Tracer):
    """`torch.fx` tracer that keeps every weight layer and BatchNorm (timm's `BatchNormAct2d` too) as one call."""

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return is_weight_layer(module) or is_norm(module) or super().is_leaf_module(module, qualified_name)


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _graph_pairs(module: torch.nn.Module, graph: torch.fx.Graph, prefix: str) -> list[tuple[str, str]]:
    """Weight layers called once whose only user is a BatchNorm called once on that output alone."""
    modules = dict(module.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    read = {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr" and node.users}
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_weight_layer(modules[node.target]) or calls[node.target] != 1:
            continue
        if node.target in read or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op == "call_module" and calls[user.target] == 1 and user.args == (node,) and not user.kwargs \
                and fits(modules[node.target], modules[user.target]):
            pairs.append((_qualify(prefix, node.target), _qualify(prefix, user.target)))
    return pairs


def fx_pairs(model: torch.nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """`(weight layer, BatchNorm)` names from `torch.fx` graphs, and the names of the modules that did not trace.

    The model is traced in one piece if it can be; a module whose forward does not trace (Python control flow on
    inputs, as in transformers models and DDP) is traced child by child, so pairs inside its children are found and
    a pair spanning two of its children is missed (never managed: the safe side).
    """
    pairs, untraced = [], []

    def visit(module: torch.nn.Module, prefix: str) -> None:
        try:
            graph = _LeafTracer().trace(module)
        except Exception:  # noqa: BLE001 - any tracing failure means: look inside
            untraced.append(prefix)
            for name, child in module.named_children():
                visit(child, _qualify(prefix, name))
            return
        pairs.extend(_graph_pairs(module, graph, prefix))

    visit(model, "")
    return pairs, untraced


def _check_names(model: torch.nn.Module, pairs: Iterable) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    checked, seen = [], set()
    for entry in pairs:
        if isinstance(entry, ScaleInvariantPair):
            entry = (entry.name, entry.norm_name)
        if isinstance(entry, str) or len(entry) != 2 or not all(isinstance(name, str) for name in entry):
            raise ValueError(f"pairs: each entry is a (weight layer name, BatchNorm name) pair of strings, such as "
                             f"('layer1.0.conv1', 'layer1.0.bn1'); got {entry!r}")
        layer_name, norm_name = entry
        for name in entry:
            if name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(f"pairs: {type(model).__name__} has no module named {name!r}{hint} (use the names "
                                 "of model.named_modules())")
        layer, norm = modules[layer_name], modules[norm_name]
        if not is_weight_layer(layer):
            raise ValueError(f"pairs: {layer_name!r} is a {type(layer).__name__}; weight rescaling manages "
                             "nn.Conv1d/2d/3d and nn.Linear layers (transposed convolutions are not supported)")
        if not is_norm(norm):
            raise ValueError(f"pairs: {norm_name!r} is a {type(norm).__name__}, not a BatchNorm; only weights whose "
                             "output feeds a BatchNorm directly are scale-invariant per output channel")
        if not fits(layer, norm):
            raise ValueError(f"pairs: {norm_name!r} normalizes {norm.num_features} features but {layer_name!r} has "
                             f"{layer.weight.shape[0]} output channels")
        if layer_name in seen:
            raise ValueError(f"pairs: {layer_name!r} is listed twice")
        seen.add(layer_name)
        checked.append((layer_name, norm_name))
    return checked


def find_scale_invariant_pairs(model: torch.nn.Module, method: str = "auto",
                               pairs: Sequence[tuple[str, str]] | None = None) -> list[ScaleInvariantPair]:
    """The weight layers of `model` whose output feeds a BatchNorm directly, and their BatchNorms.

    Only `nn.Conv1d/2d/3d` and `nn.Linear` layers are candidates; a layer followed by an activation, a pooling or
    anything but a BatchNorm is never returned, and so are never the classifier, embeddings and the BatchNorm
    parameters. Names are `model`'s own (`backbone.layer1.0.conv1` in a user module holding a timm model,
    `module.…` in DDP).

    Args:
        model (`nn.Module`): the model, possibly wrapped.
        method (`str`, *optional*, defaults to `"auto"`): `"fx"` reads the `torch.fx` graph (a module that does not
            trace is traced child by child, see `fx_pairs`); `"names"` uses the per-family name maps of
            `hf_regtools.adapters.norm_pairs`; `"auto"` uses `"fx"` if the whole model traces, else the name maps if
            they know the model, else `"fx"` child by child.
        pairs (`Sequence[tuple[str, str]]`, *optional*): explicit `(layer name, BatchNorm name)` pairs instead of
            discovery, e.g. `[("layer1.0.conv1", "layer1.0.bn1")]`; checked (names, types, channel counts).

    Raises:
        `ValueError`: unknown method, or a bad explicit pair (the message names the module).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    modules = dict(model.named_modules())
    if pairs is not None:
        names = _check_names(model, pairs)
    elif method == "names":
        names = name_map_pairs(model)
    else:
        names, untraced = fx_pairs(model)
        if method == "auto" and untraced and matching_rules(model):
            names = name_map_pairs(model)
    order = {name: index for index, name in enumerate(modules)}
    names = sorted(names, key=lambda pair: order[pair[0]])
    return [ScaleInvariantPair(layer, modules[layer], norm, modules[norm]) for layer, norm in names]


def managed_parameters(pairs: Sequence[ScaleInvariantPair]) -> list[torch.nn.Parameter]:
    """The weights that rescaling manages (biases are rescaled with them but stay ordinary parameters)."""
    return [pair.weight for pair in pairs]


def check_not_sharded(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Raise for sharded parameters (FSDP, DeepSpeed ZeRO-3), whose per-filter norms a process cannot compute."""
    for parameter in parameters:
        kind = type(parameter).__name__
        if kind in ("DTensor", "FlatParameter") or getattr(parameter, "_is_flat_param", False) or \
                hasattr(parameter, "ds_id"):
            raise ValueError(f"weight rescaling does not support sharded parameters ({kind} from FSDP or DeepSpeed "
                             "ZeRO-3): each process holds a shard, so per-filter norms would be wrong. Train with DDP "
                             "(parameters replicated) or ZeRO-1/2.")


def _resolve(model_or_pairs, pairs) -> list[ScaleInvariantPair]:
    if isinstance(model_or_pairs, torch.nn.Module):
        if pairs is not None and all(isinstance(pair, ScaleInvariantPair) for pair in pairs):
            return list(pairs)
        return find_scale_invariant_pairs(model_or_pairs, pairs=pairs)
    if pairs is not None:
        raise ValueError("pass either a model (and optionally pairs) or a list of ScaleInvariantPair, not both")
    resolved = list(model_or_pairs)
    if not all(isinstance(pair, ScaleInvariantPair) for pair in resolved):
        raise ValueError("rescale_weights_ takes a model or the ScaleInvariantPair list of "
                         "find_scale_invariant_pairs(model); for (name, name) tuples pass the model too")
    return resolved


def _validate(r: float, granularity: str, eps: float) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if not r > 0:
        raise ValueError(f"the target norm r must be positive, got {r!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")


def _rescale_state_(state: dict, factor: torch.Tensor, name: str) -> None:
    for key, value in state.items():
        if key == "step" or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if key not in MOMENTS:
            raise ValueError(f"rescale_optimizer_state: unknown optimizer state {key!r} for {name}; supported: "
                             f"{sorted(MOMENTS)} (SGD momentum, Adam/AdamW moments). Use "
                             "rescale_optimizer_state=False.")
        value.mul_(factor.view(-1, *[1] * (value.dim() - 1)).to(value.dtype) ** MOMENTS[key])


@torch.no_grad()
def rescale_weights_(model_or_pairs: torch.nn.Module | Sequence[ScaleInvariantPair],
                     pairs: Sequence[ScaleInvariantPair] | Sequence[tuple[str, str]] | None = None, *, r: float = 1.0,
                     granularity: str = "channel", rescale_running_stats: bool = True, optimizer=None,
                     eps: float = DEFAULT_EPS) -> dict[str, torch.Tensor]:
    """Rescale every managed weight to norm `r` in place; returns each weight's norms before, in fp32.

    For each pair the norm `n` of every output channel (the weight flattened over its fan-in) is computed in fp32;
    the channel's weight and bias are divided by `n / r`; with `rescale_running_stats` the BatchNorm's running mean is
    divided by `n / r` and its running variance by `(n / r)**2`, so the eval-mode function is unchanged too. A channel
    with `n <= eps` (all zeros) is left as it is.

    Args:
        model_or_pairs (`nn.Module` or `list[ScaleInvariantPair]`): the model (pairs found with
            `find_scale_invariant_pairs(model)`, or resolved from `pairs`), or the pairs found once beforehand.
        pairs (*optional*): with a model, its `ScaleInvariantPair`s or `(layer, BatchNorm)` name pairs.
        r (`float`, *optional*, defaults to 1.0): the target norm (the paper's unit norm).
        granularity (`str`, *optional*, defaults to `"channel"`): `"channel"` (per output channel, the BatchNorm
            symmetry) or `"tensor"` (the whole weight to norm `r`; exact only for whole-tensor invariance).
        rescale_running_stats (`bool`, *optional*, defaults to `True`): keep the BatchNorm running statistics in the
            new scale.
        optimizer (`torch.optim.Optimizer`, *optional*): also rescale its state for the managed weights and their
            biases (SGD momentum and Adam `exp_avg` times `n / r`, `exp_avg_sq` times `(n / r)**2`).
        eps (`float`, *optional*, defaults to 1e-12): norms at or below it are not rescaled.

    Returns:
        `dict[str, torch.Tensor]`: layer name -> norms before rescaling (one per output channel, or a 1-element
        tensor for `"tensor"`).

    Example:

    ```python
    import torch
    from hf_regtools.weight_rescaling import find_scale_invariant_pairs, rescale_weights_

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    pairs = find_scale_invariant_pairs(model)
    before = rescale_weights_(pairs, r=1.0)
    assert [pair.name for pair in pairs] == ["0"] and before["0"].shape == (4,)
    assert torch.allclose(model[0].weight.flatten(1).norm(dim=1), torch.ones(4))
    ```
    """
    _validate(r, granularity, eps)
    resolved = _resolve(model_or_pairs, pairs)
    if not resolved:
        return {}
    check_not_sharded(managed_parameters(resolved))
    weights = [pair.module.weight for pair in resolved]
    flats = [weight.reshape(weight.shape[0], -1) for weight in weights]
    if granularity == "channel":
        norms = [torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32) for flat in flats]
    else:
        norms = [norm.reshape(1) for norm in torch._foreach_norm(flats, dtype=torch.float32)]
    every_norm = torch.cat(norms)
    factors = torch.where(every_norm > eps, every_norm / r, torch.ones_like(every_norm)).split(
        [len(norm) for norm in norms])
    channel_factors = [factor.expand(weight.shape[0]) for factor, weight in zip(factors, weights)]
    shaped = [factor.view(-1, *[1] * (weight.dim() - 1)) for factor, weight in zip(factors, weights)]
    _divide_(weights, shaped)
    biased = [(pair.module.bias, factor) for pair, factor in zip(resolved, channel_factors)
              if getattr(pair.module, "bias", None) is not None]
    if biased:
        _divide_(*map(list, zip(*biased)))
    if rescale_running_stats:
        tracked = [(pair.norm, factor) for pair, factor in zip(resolved, channel_factors)
                   if getattr(pair.norm, "running_mean", None) is not None]
        if tracked:
            modules, tracked_factors = map(list, zip(*tracked))
            _divide_([module.running_mean for module in modules], tracked_factors)
            _divide_([module.running_var for module in modules], torch._foreach_mul(tracked_factors, tracked_factors))
    if optimizer is not None:
        state = unwrap_optimizer(optimizer).state
        for pair, factor in zip(resolved, channel_factors):
            for parameter, name in ((pair.module.weight, f"{pair.name}.weight"),
                                    (getattr(pair.module, "bias", None), f"{pair.name}.bias")):
                if parameter is not None and parameter in state:
                    _rescale_state_(state[parameter], factor, name)
    return {pair.name: norm for pair, norm in zip(resolved, norms)}


def _divide_(tensors: list[torch.Tensor], divisors: list[torch.Tensor]) -> None:
    """`tensors[i] /= divisors[i]` (fp32 divisors, broadcast), in one `torch._foreach_div_` per dtype; half-precision
    tensors are divided in fp32 and cast back."""
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for tensor, divisor in zip(tensors, divisors):
        group = by_dtype.setdefault(tensor.dtype, ([], []))
        group[0].append(tensor)
        group[1].append(divisor)
    for dtype, (group, group_divisors) in by_dtype.items():
        if dtype in (torch.float16, torch.bfloat16):
            for tensor, divisor in zip(group, group_divisors):
                tensor.copy_(tensor.float().div_(divisor))
        else:
            torch._foreach_div_(group, [divisor.to(dtype) for divisor in group_divisors])


def managed_parameter_names(model: torch.nn.Module, pairs: Sequence[ScaleInvariantPair]) -> set[str]:
    """`model.named_parameters()` names of the managed weights."""
    managed = {id(parameter) for parameter in managed_parameters(pairs)}
    return {name for name, parameter in model.named_parameters() if id(parameter) in managed}


def wrs_param_groups(model: torch.nn.Module, weight_decay: float,
                     pairs: Sequence[ScaleInvariantPair] | Sequence[tuple[str, str]] | None = None, *,
                     method: str = "auto") -> list[dict]:
    """Optimizer parameter groups for weight rescaling: `hf_regtools.optim.param_groups_weight_decay` (no decay for
    1-D parameters, biases and `no_weight_decay()` names; `weight_decay` for the rest), with the managed weights
    moved to the no-decay group, since rescaling replaces weight decay on them.

    Args:
        model (`nn.Module`): the model.
        weight_decay (`float`): the weight decay of the unmanaged weights.
        pairs (*optional*): the managed pairs (`find_scale_invariant_pairs`) or `(layer, BatchNorm)` names; found with
            `method` when not given.
        method (`str`, *optional*, defaults to `"auto"`): discovery method when `pairs` is not given.

    Returns:
        `list[dict]`: `[{"params": [...], "weight_decay": 0.0}, {"params": [...], "weight_decay": weight_decay}]`.

    With the Trainer, use `WeightRescalingTrainerMixin` (it filters `get_decay_parameter_names`), or pass the groups
    with `optimizer_cls_and_kwargs=(torch.optim.SGD, {"params": wrs_param_groups(model, 5e-4), "lr": 0.1})`.

    Example:

    ```python
    import torch
    from hf_regtools.weight_rescaling import wrs_param_groups

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10))
    no_decay, decay = wrs_param_groups(model, weight_decay=5e-4)
    assert any(p is model[0].weight for p in no_decay["params"]) and decay["params"] == [model[3].weight]
    ```
    """
    from ..optim import param_groups_weight_decay

    if pairs is None or not all(isinstance(pair, ScaleInvariantPair) for pair in pairs):
        pairs = find_scale_invariant_pairs(model, method=method, pairs=pairs)
    return param_groups_weight_decay(model, weight_decay, exempt=managed_parameters(pairs))
