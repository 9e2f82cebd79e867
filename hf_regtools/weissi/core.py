"""WEISSI, the functional core: which weights are regularized, and the weight-scale-shift-invariant penalty.

For a network of linear maps and positively homogeneous activations, `W_l -> g_l W_l` with `prod(g_l) = 1` (biases
scaled by the cumulative products) leaves the function unchanged; weight decay is not invariant to this shift, so it
can be lowered by re-balancing norms without changing the function. WEISSI (Liu, Cui and Chan, arXiv:2008.02965)
penalizes instead

```
R(theta) = lambda1 * (sum_{l in chain} log||W_l|| + sum_{b in blocks} log(s_b + prod_{l in branch b} ||W_l||))
         + lambda2 * sum_l || W_l / ||W_l|| ||_1
```

where a residual block `y = shortcut(x) + branch(x)` has `s_b = 1` for an identity shortcut and `s_b = ||W_s||` for a
projection shortcut `W_s`. Both parts are unchanged by scale shifts inside the chain and inside each branch; the first
is the log of the product-of-norms bound on the input gradient (`hf_regtools.weissi.bounds`).

In a custom loop:

```py
regularizer = WeissiRegularizer(model, lambda1=1e-3, lambda2=1e-5)     # once: finds the layers and blocks
optimizer = torch.optim.SGD(weissi_param_groups(model, 5e-4, regularizer=regularizer), lr=0.1, momentum=0.9)
for batch in loader:
    loss = loss_fn(model(batch)) + regularizer()                           # fp32
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
```
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..adapters.homogeneous import non_homogeneous_modules, weight_layers
from ..adapters.homogeneous import residual_blocks as family_residual_blocks
from ..adapters.norm_pairs import is_weight_layer

NORMS = ("fro", "spectral")
BN_MODES = ("exclude", "include")
EPS = 1e-12


@dataclass(frozen=True)
class ResidualBlock:
    """A residual block: the weight layers of its branch (module names, in order) and its projection shortcut
    (`None`: the identity)."""

    branch: tuple[str, ...]
    shortcut: str | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        return self.branch + ((self.shortcut,) if self.shortcut else ())


@dataclass(frozen=True)
class WeissiStructure:
    """The weight layers WEISSI regularizes: `chain` layers (one `log||W||` each) and residual `blocks`."""

    chain: tuple[str, ...]
    blocks: tuple[ResidualBlock, ...] = ()

    @property
    def layers(self) -> tuple[str, ...]:
        """Every managed layer: chain layers, then the layers of each block."""
        return self.chain + tuple(name for block in self.blocks for name in block.layers)


def _close(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3)
    return f"; did you mean {close}?" if close else ""


def _check_layer(modules: dict, name, where: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{where}: module names are strings, got {name!r}")
    if name not in modules:
        raise ValueError(f"{where}: the model has no module named {name!r}{_close(name, modules)} (use the names of "
                         "model.named_modules())")
    if not is_weight_layer(modules[name]):
        raise ValueError(f"{where}: {name!r} is a {type(modules[name]).__name__}; WEISSI regularizes nn.Conv1d/2d/3d "
                         "and nn.Linear layers")
    return name


def _parse_blocks(modules: dict, blocks) -> list[ResidualBlock]:
    parsed = []
    for entry in blocks:
        if isinstance(entry, ResidualBlock):
            branch, shortcut = entry.branch, entry.shortcut
        elif isinstance(entry, Mapping):
            unknown = set(entry) - {"branch", "shortcut"}
            if unknown or "branch" not in entry:
                raise ValueError(f"residual_blocks: a mapping entry has keys 'branch' (and optionally 'shortcut'), "
                                 f"got {sorted(entry)}")
            branch, shortcut = entry["branch"], entry.get("shortcut")
        elif isinstance(entry, str) or not isinstance(entry, Sequence):
            raise ValueError(f"residual_blocks: each entry is a list of the branch's module names, e.g. "
                             f"['blocks.0.fc1', 'blocks.0.fc2'], or {{'branch': [...], 'shortcut': name}}; "
                             f"got {entry!r}")
        else:
            branch, shortcut = entry, None
        branch = tuple(_check_layer(modules, name, "residual_blocks") for name in branch)
        if not branch:
            raise ValueError("residual_blocks: a block needs at least one branch layer")
        shortcut = None if shortcut is None else _check_layer(modules, shortcut, "residual_blocks shortcut")
        parsed.append(ResidualBlock(branch, shortcut))
    return parsed


def find_weissi_structure(model: torch.nn.Module, *, layers: Sequence[str] | None = None,
                          residual_blocks: Sequence | None = None, bn: str = "exclude",
                          include_classifier: bool = True) -> WeissiStructure:
    """The chain layers and residual blocks of `model` that WEISSI regularizes (module names of `model`).

    Without `layers`, the chain is every convolution and linear layer outside the residual blocks, the blocks are those
    of `residual_blocks` or, without it, those the per-family rules of `hf_regtools.adapters.homogeneous` find (timm,
    torchvision and transformers ResNets). With `bn="exclude"` (default) a weight feeding a BatchNorm directly is left
    out, and so is every block whose branch or shortcut has one (BatchNorm makes the function independent of that
    weight's scale, and `log||W||` would then decrease without bound). Explicit `layers` and `residual_blocks` are
    taken as given (checked, never filtered).

    Raises:
        `ValueError`: an unknown `bn`, a bad explicit name, a layer listed twice, a model that is not positively
            homogeneous (LayerNorm, attention: ViT, ConvNeXt, BERT) without explicit `layers`, or nothing to
            regularize.
    """
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn {bn!r}; choose one of {BN_MODES}")
    modules = dict(model.named_modules())
    explicit_blocks = residual_blocks is not None
    if layers is None and residual_blocks is None:
        breaking = non_homogeneous_modules(model)
        if breaking:
            raise ValueError(f"{type(model).__name__} is not positively homogeneous ({breaking[0]!r} is a "
                             f"{type(modules[breaking[0]]).__name__}), so WEISSI's invariance and input-gradient bound "
                             "do not hold for it; pass layers=[...] (and residual_blocks=[...]) to regularize chosen "
                             "layers anyway")
    if explicit_blocks:
        blocks = _parse_blocks(modules, residual_blocks)
    elif layers is None:
        blocks = [ResidualBlock(branch, shortcut) for branch, shortcut in family_residual_blocks(model)]
    else:
        blocks = []
    if layers is not None:
        chain = [_check_layer(modules, name, "layers") for name in layers]
    else:
        in_blocks = {name for block in blocks for name in block.layers}
        chain = [name for name in weight_layers(model) if name not in in_blocks]
        if not include_classifier and chain:
            chain = chain[:-1]
        if bn == "exclude":
            from ..weight_rescaling import find_scale_invariant_pairs

            fed = {pair.name for pair in find_scale_invariant_pairs(model)}
            chain = [name for name in chain if name not in fed]
            if not explicit_blocks:
                blocks = [block for block in blocks if not fed & set(block.layers)]
    seen = set()
    for name in [*chain, *(name for block in blocks for name in block.layers)]:
        if name in seen:
            raise ValueError(f"{name!r} is listed twice (in layers or residual_blocks); each layer counts once")
        seen.add(name)
    if not seen:
        raise ValueError(f"WEISSI found no layer to regularize in {type(model).__name__} (bn={bn!r}: every weight "
                         "feeds a BatchNorm?); pass bn='include' or layers=[...]")
    return WeissiStructure(tuple(chain), tuple(blocks))


def _validate(lambda1: float, lambda2: float, norm: str, power_iterations: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not isinstance(power_iterations, int) or power_iterations < 1:
        raise ValueError(f"power_iterations must be a positive integer, got {power_iterations!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 weights."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).to(compute_dtype(weight.dtype))


class WeissiRegularizer:
    """WEISSI's penalty on one model, with the structure found once; calling it returns `R(theta)` in fp32.

    Args:
        model (`nn.Module`): the model (module names are its own).
        lambda1 (`float`): coefficient of the log-norm part.
        lambda2 (`float`): coefficient of the L1 part on weight directions.
        norm (`str`, *optional*, defaults to `"fro"`): `"fro"` (Frobenius, one fused `torch._foreach_norm` over the
            weights) or `"spectral"` (of each weight as an `out x (in * kernel)` matrix, by power iteration with vectors
            kept in `state` between calls).
        layers, residual_blocks, bn, include_classifier: see `find_weissi_structure`.
        power_iterations (`int`, *optional*, defaults to 1): power iterations per call for `norm="spectral"`.
        structure (`WeissiStructure`, *optional*): use this structure instead of finding one.

    Attributes:
        structure (`WeissiStructure`), weights (`list[nn.Parameter]`: the managed weights, in `structure.layers`
        order), state (`dict[str, Tensor]`: power-iteration vectors by layer name; save it to resume bit for bit).
    """

    def __init__(self, model: torch.nn.Module, *, lambda1: float, lambda2: float, norm: str = "fro",
                 layers: Sequence[str] | None = None, residual_blocks: Sequence | None = None, bn: str = "exclude",
                 include_classifier: bool = True, power_iterations: int = 1, structure: WeissiStructure | None = None):
        _validate(lambda1, lambda2, norm, power_iterations)
        self.lambda1, self.lambda2, self.norm, self.power_iterations = float(lambda1), float(lambda2), norm, \
            power_iterations
        self.structure = structure if structure is not None else find_weissi_structure(
            model, layers=layers, residual_blocks=residual_blocks, bn=bn, include_classifier=include_classifier)
        modules = dict(model.named_modules())
        self.names = list(self.structure.layers)
        self.weights = [modules[name].weight for name in self.names]
        self.state: dict[str, torch.Tensor] = {}
        position = {name: index for index, name in enumerate(self.names)}
        blocks = self.structure.blocks
        self._chain = len(self.structure.chain)
        self._branch_positions = [position[name] for block in blocks for name in block.branch]
        self._branch_block = [index for index, block in enumerate(blocks) for _ in block.branch]
        self._shortcuts = [(index, position[block.shortcut]) for index, block in enumerate(blocks) if block.shortcut]
        self._index_cache: dict[torch.device, tuple] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.weights)

    def layer_norms(self) -> torch.Tensor:
        """The norm of every managed weight (`norm`), fp32, differentiable, in `structure.layers` order."""
        if self.norm == "fro":
            return weight_norms(self.weights, with_l1=False)[0]
        return torch.stack([self._spectral_norm(name, weight) for name, weight in zip(self.names, self.weights)])

    def _spectral_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        matrix = _as_matrix(weight)
        with torch.no_grad():
            u = self.state.get(name)
            if u is None or u.shape != matrix.shape[:1] or u.device != matrix.device or u.dtype != matrix.dtype:
                generator = torch.Generator().manual_seed(len(self.state))
                u = torch.randn(matrix.shape[0], generator=generator, dtype=matrix.dtype).to(matrix.device)
                u = u / u.norm().clamp_min(EPS)
            for _ in range(self.power_iterations):
                v = torch.nn.functional.normalize(matrix.t() @ u, dim=0, eps=EPS)
                u = torch.nn.functional.normalize(matrix @ v, dim=0, eps=EPS)
            self.state[name] = u
        return torch.dot(u, matrix @ v)

    def _indices(self, device: torch.device) -> tuple:
        if device not in self._index_cache:
            as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
            self._index_cache[device] = (as_long(self._branch_positions), as_long(self._branch_block),
                                         as_long([b for b, _ in self._shortcuts]),
                                         as_long([p for _, p in self._shortcuts]))
        return self._index_cache[device]

    def terms(self) -> dict[str, torch.Tensor]:
        """`{"penalty", "log_norm_sum", "l1_direction"}`: `R = lambda1 * log_norm_sum + lambda2 * l1_direction` and
        its two parts (fp32 tensors, differentiable)."""
        with_l1 = bool(self.lambda2)
        if self.norm == "fro":
            norms, l1_norms = weight_norms(self.weights, with_l1=with_l1, scratch=self._scratch)
        else:
            norms = self.layer_norms()
            l1_norms = weight_norms(self.weights, with_l1=True, scratch=self._scratch)[1] if with_l1 else None
        return self._terms_of_norms(norms, l1_norms)

    def add_gradient_(self, scale: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
        """Add `scale * grad R(theta)` to the managed weights' `.grad` in place (`norm="fro"` only) and return the
        terms of `terms()`, detached.

        The same gradient as `(scale * self()).backward()`, without autograd's extra gradient tensors: the norms are
        computed without a graph, R is differentiated with respect to them only, and each weight's gradient
        `a * W + b * sign(W)` is added into its `.grad` (one pass for the log-norm part, a sign into a reused buffer and
        one pass for the L1 part). `WeissiTrainerMixin` calls it after each micro-batch's backward.
        """
        if self.norm != "fro":
            raise ValueError(f"add_gradient_ needs norm='fro', got norm={self.norm!r}; use (scale * regularizer())"
                             ".backward() for the spectral norm")
        with_l1 = bool(self.lambda2)
        with torch.no_grad():
            norms = _fused_norms(self.weights, 2)
            l1_norms = torch.stack([_abs_sum(weight, self._scratch, norms.dtype) for weight in self.weights]) \
                if with_l1 else None
        leaves = [norms.requires_grad_()] + ([l1_norms.requires_grad_()] if with_l1 else [])
        with torch.enable_grad():
            terms = self._terms_of_norms(norms, l1_norms)
            grads = torch.autograd.grad(terms["penalty"], leaves)
        with torch.no_grad():
            radial = (grads[0] / norms.clamp_min(EPS)).mul_(scale)
            directional = grads[1] * scale if with_l1 else None
            for index, weight in enumerate(self.weights):
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                weight.grad.addcmul_(weight, radial[index].to(weight.dtype))
                if with_l1:
                    sign = _scratch_view(weight, self._scratch)
                    torch.sign(weight, out=sign)
                    weight.grad.addcmul_(sign, directional[index].to(weight.dtype))
        return {name: value.detach() for name, value in terms.items()}

    def _terms_of_norms(self, norms: torch.Tensor, l1_norms: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with_l1 = l1_norms is not None
        norms = norms.clamp_min(EPS)
        log_norms = norms.log()
        log_norm_sum = log_norms[:self._chain].sum()
        blocks = self.structure.blocks
        if blocks:
            positions, block_of, shortcut_blocks, shortcut_positions = self._indices(norms.device)
            zeros = torch.zeros(len(blocks), dtype=norms.dtype, device=norms.device)
            log_branch = zeros.index_add(0, block_of, log_norms[positions])
            log_shortcut = zeros
            if self._shortcuts:
                log_shortcut = log_shortcut.index_put((shortcut_blocks,), log_norms[shortcut_positions])
            log_norm_sum = log_norm_sum + torch.logaddexp(log_shortcut, log_branch).sum()
        l1_direction = (l1_norms / norms).sum() if with_l1 else norms.new_zeros(())
        penalty = self.lambda1 * log_norm_sum + self.lambda2 * l1_direction
        return {"penalty": penalty, "log_norm_sum": log_norm_sum, "l1_direction": l1_direction}

    def __call__(self) -> torch.Tensor:
        return self.terms()["penalty"]


class _WeightNorms(torch.autograd.Function):
    """`stack([l2 norms, l1 norms])` of a list of weights, with one fused pass per norm and a backward that writes each
    weight's gradient `a * W + b * sign(W)` into one new tensor (autograd's own backward allocates several)."""

    @staticmethod
    def forward(ctx, with_l1: bool, scratch: dict, *weights: torch.Tensor) -> torch.Tensor:
        l2 = _fused_norms(list(weights), 2)
        l1 = torch.stack([_abs_sum(weight, scratch, l2.dtype) for weight in weights]) if with_l1 else \
            torch.zeros_like(l2)
        ctx.with_l1 = with_l1
        ctx.save_for_backward(l2, *weights)
        return torch.stack([l2, l1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        l2, *weights = ctx.saved_tensors
        radial = torch.where(l2 > 0, grad[0] / l2.clamp_min(EPS), torch.zeros_like(l2))
        grads = []
        for index, (weight, needed) in enumerate(zip(weights, ctx.needs_input_grad[2:])):
            if not needed:
                grads.append(None)
                continue
            scale = radial[index].to(weight.dtype)
            if ctx.with_l1:
                gradient = torch.sign(weight)
                gradient.mul_(grad[1, index].to(weight.dtype)).addcmul_(weight, scale)
            else:
                gradient = weight * scale
            grads.append(gradient)
        return (None, None, *grads)


def _scratch_view(weight: torch.Tensor, scratch: dict) -> torch.Tensor:
    """A tensor of `weight`'s shape in a buffer reused between calls (one per device and dtype)."""
    key = (weight.device, weight.dtype)
    buffer = scratch.get(key)
    if buffer is None or buffer.numel() < weight.numel():
        buffer = scratch[key] = torch.empty(weight.numel(), dtype=weight.dtype, device=weight.device)
    return buffer[:weight.numel()].view(weight.shape)


def _abs_sum(weight: torch.Tensor, scratch: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """`||weight||_1` through a reused buffer (no allocation per call)."""
    if scratch is None:
        return weight.abs().sum(dtype=dtype)
    view = _scratch_view(weight, scratch)
    torch.abs(weight, out=view)
    return view.sum(dtype=dtype)


def weight_norms(weights: list[torch.Tensor], *, with_l1: bool = True, scratch: dict | None = None) -> tuple:
    """`(l2 norms, l1 norms or None)` of `weights`, fp32 (fp64 for fp64 weights), differentiable; `scratch` (a dict
    kept by the caller) holds the buffer of the L1 pass between calls."""
    norms = _WeightNorms.apply(with_l1, scratch, *weights)
    return norms[0], (norms[1] if with_l1 else None)


def _fused_norms(weights: list[torch.Tensor], order: int) -> torch.Tensor:
    """`[||w||_order for w in weights]` as one fp32 tensor (fp64 for fp64 weights): one `torch._foreach_norm` per
    (device, dtype) group."""
    groups: dict[tuple, list[int]] = {}
    for index, weight in enumerate(weights):
        groups.setdefault((weight.device, weight.dtype), []).append(index)
    if len(groups) == 1:
        (device, dtype), _ = next(iter(groups.items()))
        return torch.stack(_foreach_norm(weights, order, dtype))
    out: list = [None] * len(weights)
    for (_, dtype), indices in groups.items():
        for index, value in zip(indices, _foreach_norm([weights[i] for i in indices], order, dtype)):
            out[index] = value
    return torch.stack(out)


def _foreach_norm(weights: list[torch.Tensor], order: int, dtype: torch.dtype) -> list[torch.Tensor]:
    if dtype in (torch.float32, torch.float64):
        return list(torch._foreach_norm(weights, order))
    if dtype in (torch.float16, torch.bfloat16):
        return list(torch._foreach_norm(weights, order, dtype=torch.float32))
    return [value.float() for value in torch._foreach_norm(weights, order)]


def weissi_penalty(model: torch.nn.Module, *, lambda1: float, lambda2: float, norm: str = "fro",
                   layers: Sequence[str] | None = None, residual_blocks: Sequence | None = None, bn: str = "exclude",
                   include_classifier: bool = True) -> torch.Tensor:
    """WEISSI's penalty `R(theta)` of `model` (fp32 scalar, differentiable); see the module docstring for the formula.

    Finds the structure on every call; in a training loop build a `WeissiRegularizer` once and call it.

    Args:
        model (`nn.Module`): a network of convolutions, linear layers and positively homogeneous activations.
        lambda1 (`float`): coefficient of `sum log||W_l||` (and of the residual blocks' `log(s_b + prod ||W_l||)`).
        lambda2 (`float`): coefficient of `sum ||W_l / ||W_l|| ||_1`.
        norm (`str`, *optional*, defaults to `"fro"`): `"fro"` or `"spectral"` (power iteration, see
            `WeissiRegularizer`; one call starts from a random vector, so use the class for `"spectral"`).
        layers (`list[str]`, *optional*): the chain layers (module names), instead of discovery.
        residual_blocks (`list`, *optional*): residual blocks, each a list of branch module names (identity shortcut)
            or `{"branch": [...], "shortcut": name}`; instead of the per-family rules.
        bn (`str`, *optional*, defaults to `"exclude"`): `"exclude"` leaves out weights feeding a BatchNorm;
            `"include"` keeps them.
        include_classifier (`bool`, *optional*, defaults to `True`): keep the last weight layer (the classifier) in
            the chain.

    Example:

    ```python
    import torch
    from hf_regtools.weissi import weissi_penalty

    model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 2, bias=False))
    before = weissi_penalty(model, lambda1=1.0, lambda2=0.1)
    with torch.no_grad():
        model[0].weight *= 3.0
        model[2].weight /= 3.0                        # the same function
    torch.testing.assert_close(weissi_penalty(model, lambda1=1.0, lambda2=0.1), before)
    ```
    """
    return WeissiRegularizer(model, lambda1=lambda1, lambda2=lambda2, norm=norm, layers=layers,
                             residual_blocks=residual_blocks, bn=bn, include_classifier=include_classifier)()


def weissi_param_groups(model: torch.nn.Module, weight_decay: float, *, regularizer: WeissiRegularizer | None = None,
                        layers: Sequence[str] | None = None, residual_blocks: Sequence | None = None,
                        bn: str = "exclude", include_classifier: bool = True) -> list[dict]:
    """Optimizer parameter groups for WEISSI: `hf_regtools.optim.param_groups_weight_decay` (no decay for 1-D
    parameters, biases and `no_weight_decay()` names; `weight_decay` for the rest) with the weights WEISSI regularizes
    moved to the no-decay group, since WEISSI replaces weight decay on them.

    Args:
        model (`nn.Module`): the model.
        weight_decay (`float`): the weight decay of the other weights.
        regularizer (`WeissiRegularizer`, *optional*): its managed weights; else found from `layers`,
            `residual_blocks`, `bn` and `include_classifier` (see `find_weissi_structure`).

    Returns:
        `list[dict]`: `[{"params": [...], "weight_decay": 0.0}, {"params": [...], "weight_decay": weight_decay}]`.

    Example:

    ```python
    import torch
    from hf_regtools.weissi import weissi_param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    no_decay, *decay = weissi_param_groups(model, weight_decay=5e-4)
    assert len(no_decay["params"]) == 4 and not decay     # both weights (WEISSI) and both biases (1-D)
    ```
    """
    from ..optim import param_groups_weight_decay

    if regularizer is None:
        structure = find_weissi_structure(model, layers=layers, residual_blocks=residual_blocks, bn=bn,
                                          include_classifier=include_classifier)
        modules = dict(model.named_modules())
        managed = {id(modules[name].weight) for name in structure.layers}
    else:
        managed = {id(weight) for weight in regularizer.weights}
    return param_groups_weight_decay(model, weight_decay,
                                     exempt=[p for p in model.parameters() if id(p) in managed])


def managed_parameter_names(model: torch.nn.Module, regularizer: WeissiRegularizer) -> set[str]:
    """`model.named_parameters()` names of the weights `regularizer` manages."""
    managed = {id(weight) for weight in regularizer.weights}
    return {name for name, parameter in model.named_parameters() if id(parameter) in managed}
