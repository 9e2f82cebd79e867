"""GradInit (Zhu et al., NeurIPS 2021) and its NIO / GradCosine variant (Yang et al., NeurIPS 2022) as functions.

`gradinit_(model, batches)` learns one scale per parameter tensor so that one simulated step of SGD (or Adam) from
the rescaled network lowers the loss on a fresh batch as much as possible, subject to a cap on the gradient norm,
and rescales the model in place (the same `Parameter` objects). `nio_` optimises the NIO gradient-cosine target
instead. Neither touches BatchNorm running statistics, dropout, gradients or the modules' modes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from .batch_norm import batch_norm_double_backward_mode
from .config import GradInitConfig
from .optimizer import RescaleAdam

NIO_DEFAULTS = {"objective": "gc_gn_sqrt", "gamma": 10.0, "lr": 3e-3}
"""The released NIO configuration (`HarborYuan/GradCosine`, `configs/mmcls/resnet_gradcos_init/resnet50_gc_gn.py`);
the other settings (100 iterations, K = 4, r = 0.2, mu = 1, c = 1, alpha = 0.01) are `GradInitConfig` defaults."""


@dataclass
class GradInitReport:
    """What `gradinit_` / `nio_` did.

    Args:
        scales (`dict[str, float]`): parameter name -> learned scale m_i (the tensor is now m_i times its initial
            value; 1.0 for tensors with zero norm, which are never rescaled).
        constraint_steps (`int`): iterations that took the gradient-norm constraint branch.
        objective_steps (`int`): iterations that took the objective branch.
        history (`list[dict]`): per iteration `{"iteration", "branch", "gnorm", "obj"}` (`obj` is `None` on
            constraint iterations; GradInit also logs `"loss"`, the loss on S; NIO logs `"gc"` and `"gv"`).
        config (`dict`): the settings used (`GradInitConfig.to_dict()`).
    """

    scales: dict[str, float]
    constraint_steps: int
    objective_steps: int
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def final_obj(self) -> float | None:
        """The objective of the last objective iteration (None if there was none)."""
        return next((entry["obj"] for entry in reversed(self.history) if entry["obj"] is not None), None)

    def to_dict(self) -> dict:
        return {"scales": dict(self.scales), "constraint_steps": self.constraint_steps,
                "objective_steps": self.objective_steps, "history": [dict(entry) for entry in self.history],
                "config": dict(self.config)}

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as file:
            json.dump(self.to_dict(), file, indent=2)


def gradinit_(model: nn.Module, batches: Iterable, *, config: GradInitConfig | None = None,
              loss_fn: Callable | None = None, progress: bool = False, **overrides) -> GradInitReport:
    """Rescale every parameter tensor of `model` in place with GradInit (or an NIO target, see `config.objective`).

    Args:
        model (`nn.Module`): the freshly initialised model (not a DDP/FSDP wrapper); half-precision parameters are
            cast to fp32 for GradInit and back afterwards.
        batches (`Iterable`): batches, cycled when exhausted: dicts of model inputs (transformers models, user
            modules) or `(inputs, labels)` pairs (timm and plain modules). GradInit draws two batches for S and
            one more for the objective batch per iteration (the official loader holds half a training batch); NIO
            draws one batch per iteration. Batches of token ids of different lengths are right-padded (0, labels
            -100) to be concatenated.
        config (`GradInitConfig`, *optional*): the settings; defaults to `GradInitConfig()`.
        loss_fn (`Callable`, *optional*): `loss_fn(model, batch)` returning the mean loss (NIO: a 1-D tensor of
            per-example losses). Defaults to `model(**batch).loss` for dicts (NIO: cross-entropy of `logits` and
            `batch["labels"]` per example) and `cross_entropy(model(x), y)` for pairs. During the objective step
            `model` is a stand-in that calls the module with the simulated parameters.
        progress (`bool`, *optional*, defaults to `False`): show a tqdm progress bar.
        **overrides: `GradInitConfig` fields replacing those of `config`.

    Returns:
        `GradInitReport`: the learned scales, branch counts and per-iteration history.

    Example:

    ```python
    import torch
    from hf_regtools.gradinit import gradinit_

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]
    report = gradinit_(model, batches, iterations=5, lr=1e-2)
    print(report.scales)
    ```
    """
    config = _resolved_config(config, overrides)
    return _run(model, batches, config, loss_fn, progress)


def nio_(model: nn.Module, batches: Iterable, *, config: GradInitConfig | None = None,
         loss_fn: Callable | None = None, progress: bool = False, **overrides) -> GradInitReport:
    """NIO / GradCosine initialisation: `gradinit_` with the released target `objective="gc_gn_sqrt"` and its
    defaults (`NIO_DEFAULTS`: gamma 10, lr 3e-3) unless `config` or `overrides` set them. Each batch is split into
    `nio_chunks` overlapping chunks; the default loss is the per-example cross-entropy."""
    if config is None:
        config = GradInitConfig(**{**NIO_DEFAULTS, **{k: v for k, v in overrides.items() if k in NIO_DEFAULTS}})
    elif not config.is_nio:
        config = replace(config, objective=NIO_DEFAULTS["objective"])
    config = _resolved_config(config, overrides)
    if not config.is_nio:
        raise ValueError(f"nio_ needs an NIO objective, got objective={config.objective!r}; use gradinit_ for GradInit")
    return _run(model, batches, config, loss_fn, progress)


def nio_chunk_bounds(batch_size: int, chunks: int, overlap: float) -> list[tuple[int, int]]:
    """The `[start, end)` rows of each NIO chunk, as the official `gradcos_initializer.batch_settings` slices them:
    chunk i covers `[int((1 - r) * L * i), int((1 + r) * L * (i + 1)))` with `L = int(B / K)`, the last one to B."""
    if batch_size < chunks:
        raise ValueError(f"NIO splits each batch into nio_chunks={chunks} chunks: batches need at least {chunks} "
                         f"examples, got {batch_size}")
    length = int(batch_size / chunks)
    bounds = []
    for i in range(chunks):
        start = int((1 - overlap) * length * i)
        end = batch_size if i == chunks - 1 else min(int((1 + overlap) * length * (i + 1)), batch_size)
        bounds.append((start, end))
    return bounds


def gradient_cosine(flat_grads: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the rows of `flat_grads` (K x P), diagonal excluded (NIO's GC)."""
    norms = flat_grads.square().sum(1).sqrt()
    similarity = flat_grads @ flat_grads.t() / (norms[:, None] * norms[None])
    count = flat_grads.shape[0]
    return (similarity.sum() - similarity.diagonal().sum()) / (count * count - count)


def default_loss(model, batch) -> torch.Tensor:
    """`model(**batch).loss` for dict batches, `cross_entropy(model(inputs), labels)` for `(inputs, labels)`."""
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss for a dict batch: include `labels` in the batches or pass "
                             "loss_fn=lambda model, batch: ...")
        return loss
    inputs, labels = batch
    return F.cross_entropy(_logits(model(inputs)), labels)


def default_per_example_loss(model, batch) -> torch.Tensor:
    """Per-example cross-entropy of the model's `logits` and the batch's labels (NIO's default loss)."""
    if isinstance(batch, Mapping):
        if batch.get("labels") is None:
            raise ValueError("NIO's default loss needs `labels` in dict batches; or pass loss_fn returning one loss "
                             "per example")
        logits, labels = _logits(model(**batch)), batch["labels"]
    else:
        inputs, labels = batch
        logits = _logits(model(inputs))
    if logits.dim() != 2:
        raise ValueError(f"NIO's default loss handles classification logits (batch x classes), got shape "
                         f"{tuple(logits.shape)}; pass loss_fn returning a 1-D tensor of per-example losses")
    return F.cross_entropy(logits, labels, reduction="none")


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(f"cannot find logits in the model's output ({type(outputs).__name__}); pass loss_fn")
    return logits


def _resolved_config(config: GradInitConfig | None, overrides: dict) -> GradInitConfig:
    if config is not None and not isinstance(config, GradInitConfig):
        raise TypeError(f"config must be a GradInitConfig, got {type(config).__name__}")
    unknown = sorted(set(overrides) - set(GradInitConfig.field_names()))
    if unknown:
        raise TypeError(f"unknown GradInit settings {unknown}; valid ones: {list(GradInitConfig.field_names())}")
    return replace(config or GradInitConfig(), **overrides)


class _Simulated:
    """Stands in for the model in `loss_fn` during the objective step: calls it with the simulated parameters."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]):
        self._module, self._tensors = module, tensors

    def __call__(self, *args, **kwargs):
        return functional_call(self._module, self._tensors, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


class _Cycle:
    """Batches from an iterable, re-iterated (or replayed, for one-shot iterators) when exhausted."""

    def __init__(self, batches: Iterable, device: torch.device):
        if not isinstance(batches, Iterable) or isinstance(batches, (torch.Tensor, Mapping, str)):
            raise TypeError(f"batches must be an iterable of batches (a DataLoader, a list of dicts or of (inputs, "
                            f"labels) pairs), got {type(batches).__name__}")
        self.source, self.device = batches, device
        self.iterator = iter(batches)
        self.one_shot = self.iterator is batches
        self.cache: list = []

    def __next__(self):
        for _ in range(2):
            try:
                batch = next(self.iterator)
                break
            except StopIteration:
                if self.one_shot:
                    self.source, self.one_shot = list(self.cache), False
                self.iterator = iter(self.source)
        else:
            raise ValueError("batches is empty: give at least one batch")
        if self.one_shot:
            self.cache.append(batch)
        return _to_device(_checked_batch(batch), self.device)


def _checked_batch(batch):
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return tuple(batch)
    raise TypeError(f"each batch must be a dict of model inputs or an (inputs, labels) pair, got "
                    f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_to_device(value, device) for value in batch)
    return batch


def _concat(first, second):
    if isinstance(first, Mapping):
        if set(first) != set(second):
            raise ValueError(f"batches have different keys: {sorted(first)} and {sorted(second)}")
        return {key: _concat_values(first[key], second[key], key) for key in first}
    return tuple(_concat_values(a, b, None) for a, b in zip(first, second))


def _concat_values(first, second, key):
    if isinstance(first, torch.Tensor):
        if first.dim() >= 2 and first.shape[2:] == second.shape[2:] and first.shape[1] != second.shape[1]:
            length, pad = max(first.shape[1], second.shape[1]), -100 if key == "labels" else 0
            first, second = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]), value=pad)
                             for t in (first, second))
        if first.shape[1:] != second.shape[1:]:
            raise ValueError(f"cannot concatenate batches{f' (key {key!r})' if key else ''} of shapes "
                             f"{tuple(first.shape)} and {tuple(second.shape)}: give batches of equal shapes")
        return torch.cat([first, second])
    if isinstance(first, list):
        return first + second
    if first == second:
        return first
    raise ValueError(f"cannot concatenate batch values{f' for key {key!r}' if key else ''} of type "
                     f"{type(first).__name__}")


def _selected(model: nn.Module, config: GradInitConfig):
    """`(stepped, scaled)`: named tensors of the simulated step / gradient norm, and named tensors given a scale.

    With `module_types`, a module matches when its class or a base class has one of the names (the official code's
    `isinstance` checks: timm's `BatchNormAct2d` is a `BatchNorm2d`)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True): nothing to "
                         "rescale")
    if config.module_types is None:
        return trainable, trainable
    wanted, names = set(config.module_types), {id(p): name for name, p in trainable}
    stepped, seen = [], set()
    for module in model.modules():
        if any(cls.__name__ in wanted for cls in type(module).__mro__):
            for p in module.parameters(recurse=False):
                if id(p) in names and id(p) not in seen:
                    seen.add(id(p))
                    stepped.append((names[id(p)], p))
    if not stepped:
        found = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))})
        raise ValueError(f"no trainable tensors in modules of types {sorted(wanted)}; the model's modules with "
                         f"parameters are {found}")
    scaled = [(name, p) for name, p in trainable if "weight" in name or "bias" in name or id(p) in seen]
    return stepped, scaled


def _optimizer(scaled, config: GradInitConfig) -> RescaleAdam:
    max_scale = math.inf if config.max_scale is None else config.max_scale
    weights = [p for name, p in scaled if "bias" not in name]
    biases = [p for name, p in scaled if "bias" in name]
    groups = [{"params": weights, "min_scale": config.min_scale}, {"params": biases, "min_scale": 0.0}]
    return RescaleAdam([group for group in groups if group["params"]], lr=config.lr, betas=config.betas,
                       max_scale=max_scale, grad_clip=config.grad_clip)


def _step(optimizer: RescaleAdam, params, grads, *, is_constraint: bool) -> None:
    for p, grad in zip(params, grads):
        p.grad = None if grad is None else grad.detach()
    optimizer.step(is_constraint=is_constraint)
    for p in params:
        p.grad = None


@contextmanager
def _gradinit_mode(model: nn.Module):
    """eval() (dropout off), then BatchNorm in batch-statistics mode without running-stat updates (the official order);
    fp32 parameters and buffers; no Accelerate autocast patch on `forward`; no gradients; everything restored on
    exit."""
    modes = [(module, module.training, getattr(module, "track_running_stats", None)) for module in model.modules()]
    parameters = list(model.parameters())
    grads = [p.grad for p in parameters]
    cast = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in (torch.float16, torch.bfloat16)]
    dtypes = [t.dtype for t in cast]
    patched = "forward" in vars(model) and "_original_forward" in vars(model)
    forward = vars(model).get("forward")
    try:
        for p in parameters:
            p.grad = None
        for tensor in cast:
            tensor.data = tensor.data.float()
        if patched:
            model.forward = model._original_forward
        model.eval()
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.training = True
                module.track_running_stats = False
        yield
    finally:
        if patched:
            model.forward = forward
        for tensor, dtype in zip(cast, dtypes):
            tensor.data = tensor.data.to(dtype)
        for p, grad in zip(parameters, grads):
            p.grad = grad
        for module, training, track in modes:
            module.training = training
            if isinstance(module, _BatchNorm):
                module.track_running_stats = track


@contextmanager
def _attention_with_double_backward(needed: bool):
    """Restrict `scaled_dot_product_attention` to its math kernel, which has a double backward (the CPU flash kernel
    has none), when the constraint step or NIO differentiates through gradients."""
    if not needed:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _run(model, batches, config: GradInitConfig, loss_fn, progress: bool) -> GradInitReport:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("pass the unwrapped module (model.module), not a DataParallel/DistributedDataParallel wrapper")
    stepped, scaled = _selected(model, config)
    device = stepped[0][1].device
    source = _Cycle(batches, device)
    first = next(source)
    loss_fn = loss_fn or (default_per_example_loss if config.is_nio else default_loss)
    optimizer = _optimizer(scaled, config)
    from tqdm.auto import tqdm

    history, counts, branch_guess = [], {"constraint": 0, "objective": 0}, {"constraint": True}
    needs_double_backward = config.is_nio or config.second_order or math.isfinite(config.gamma)
    with _gradinit_mode(model), torch.autocast(device.type, enabled=False), torch.enable_grad(), \
            _attention_with_double_backward(needs_double_backward):
        bar = tqdm(range(config.iterations), desc="NIO" if config.is_nio else "GradInit", disable=not progress)
        for iteration in bar:
            batch, first = (first, None) if first is not None else (next(source), None)
            if config.is_nio:
                entry = _nio_iteration(model, batch, stepped, scaled, optimizer, config, loss_fn)
            else:
                entry = _gradinit_iteration(model, batch, source, stepped, scaled, optimizer, config, loss_fn,
                                            branch_guess)
            counts[entry["branch"]] += 1
            history.append({"iteration": iteration, **entry})
            bar.set_postfix(gnorm=f"{entry['gnorm']:.3g}", constraint_steps=counts["constraint"])
    names = {id(p): name for name, p in scaled}
    scales = {names[id(p)]: optimizer.scale(p) for _, p in scaled}
    return GradInitReport(scales=scales, constraint_steps=counts["constraint"], objective_steps=counts["objective"],
                          history=history, config=config.to_dict())


def _mean_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar loss tensor, got "
                         f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
    return loss


def _grads(output, params, **kwargs) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _scale_grads(output, params) -> list[torch.Tensor | None]:
    """Gradients for RescaleAdam; `None` for tensors the output does not depend on (skipped, as in the official
    code, where they keep no gradient)."""
    return list(torch.autograd.grad(output, params, allow_unused=True))


def _gradinit_iteration(model, batch0, source, stepped, scaled, optimizer, config: GradInitConfig, loss_fn,
                        branch_guess: dict) -> dict:
    """One GradInit iteration. The gradient g on S keeps its graph only where it is differentiated: in the
    constraint branch (the gradient of ||g||) and with `second_order`. Which branch runs is known only once g is
    computed, so g keeps its graph when the previous iteration took the constraint branch (`branch_guess`); when the
    guess was wrong, g is computed again with its graph (the branches change rarely: the constraint holds early)."""
    stepped_params, scaled_params = [p for _, p in stepped], [p for _, p in scaled]
    batch1 = next(source)
    constrained = math.isfinite(config.gamma)
    keep_graph = config.second_order or constrained and branch_guess["constraint"]
    adam = config.algorithm == "adam"

    def gradient(keep_graph: bool):
        with batch_norm_double_backward_mode(keep_graph):
            loss = _mean_loss(loss_fn(model, _concat(batch0, batch1)))
        grads = _grads(loss, stepped_params, create_graph=keep_graph)
        gnorm = sum(g.abs().sum() for g in grads) if adam else sum(g.square().sum() for g in grads).sqrt()
        return loss, grads, gnorm

    loss, grads, gnorm = gradient(keep_graph)
    entry = {"gnorm": gnorm.item(), "loss": loss.item()}
    branch_guess["constraint"] = entry["gnorm"] > config.gamma
    if entry["gnorm"] > config.gamma:
        if not keep_graph:
            gnorm = gradient(True)[2]
        _step(optimizer, scaled_params, _scale_grads(gnorm, scaled_params), is_constraint=True)
        return {"branch": "constraint", **entry, "obj": None}
    if adam:
        directions = [g.sign() for g in grads]
    else:
        directions = [g / gnorm for g in grads] if config.normalize_grad else grads
    simulated = {}
    for (name, p), direction in zip(stepped, directions):
        update = config.inner_lr * direction
        simulated[name] = p - (update if config.second_order else update.detach())
    batch2 = next(source)
    if config.batch_no_overlap:
        batch0 = next(source)
    obj = _mean_loss(loss_fn(_Simulated(model, simulated), _concat(batch0, batch2))) / config.inner_lr
    _step(optimizer, scaled_params, _scale_grads(obj, scaled_params), is_constraint=False)
    return {"branch": "objective", **entry, "obj": obj.item()}


def _nio_iteration(model, batch, stepped, scaled, optimizer, config: GradInitConfig, loss_fn) -> dict:
    stepped_params, scaled_params = [p for _, p in stepped], [p for _, p in scaled]
    with batch_norm_double_backward_mode():
        losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        raise ValueError("NIO needs per-example losses: loss_fn must return a 1-D tensor with one loss per example, "
                         f"got {type(losses).__name__}"
                         f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else ''}")
    flat = torch.stack([
        torch.cat([g.flatten() for g in _grads(losses[start:end].mean(), stepped_params, retain_graph=True,
                                               create_graph=True)])
        for start, end in nio_chunk_bounds(len(losses), config.nio_chunks, config.nio_overlap)])
    norms = flat.square().sum(1).sqrt()
    gnorm = norms.mean()
    gc = gradient_cosine(flat)
    gv = flat.var(0, unbiased=False).sum()
    entry = {"gnorm": gnorm.item(), "gc": gc.item(), "gv": gv.item()}
    if entry["gnorm"] > config.gamma:
        _step(optimizer, scaled_params, _scale_grads(gnorm, scaled_params), is_constraint=True)
        return {"branch": "constraint", **entry, "obj": None}
    obj = nio_objective(config.objective, gc=gc, gv=gv, norms=norms, mu=config.nio_mu)
    _step(optimizer, scaled_params, _scale_grads(obj, scaled_params), is_constraint=False)
    return {"branch": "objective", **entry, "obj": obj.item()}


def nio_objective(objective: str, *, gc: torch.Tensor, gv: torch.Tensor, norms: torch.Tensor,
                  mu: float) -> torch.Tensor:
    """The NIO target to minimise (`gradcos_initializer.GradCosInitializer.train`): `gc` -GC, `gc_gn` -GC - mu *
    sum ||g_k||^2, `gc_gn_sqrt` -GC - mu * sum ||g_k||, and the same with the total gradient variance `gv` for -GC."""
    first = {"gc": -gc, "gv": gv}[objective.split("_")[0]]
    if objective.endswith("_gn_sqrt"):
        return first - norms.sum() * mu
    if objective.endswith("_gn"):
        return first - norms.square().sum() * mu
    return first
