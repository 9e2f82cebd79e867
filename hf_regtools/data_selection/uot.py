"""Selection of pre-training classes by entropic unbalanced optimal transport between class prototypes.

Liu et al., *Improved Fine-Tuning by Better Leveraging Pre-Training Data* (NeurIPS 2022): the cost between source class
`j` and target class `k` is `(1 - cos(mu_s_j, mu_t_k)) / p_m` on unit-normalised prototypes; the plan `T` of the
entropic UOT problem with all-ones (unnormalised) marginals, entropy weight `reg` and relaxations `reg_m = (tau_s,
tau_t)` is computed by POT's generalised Sinkhorn solver; the source classes with the most transported mass `T 1` are
selected.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

_COST_BLOCK_ROWS = 2048

__all__ = ["UOTSelection", "prototype_cost", "sinkhorn_unbalanced", "uot_select_classes"]


@dataclass
class UOTSelection:
    """The result of `uot_select_classes`.

    Attributes:
        class_ids (`list[int]`): row indices into the source prototypes of the selected classes, best first.
        importance (`np.ndarray` of shape `(K_s,)`): the transported mass of every source class, `w = T 1`.
        plan (`np.ndarray` of shape `(K_s, K_t)`): the transport plan `T`.
        target_marginal_error (`float`): `max_k |sum_j T_jk - 1|`, how far the target classes are from receiving mass
            one each (small for a large `tau_t`).
    """

    class_ids: list[int]
    importance: np.ndarray
    plan: np.ndarray
    target_marginal_error: float


def _to_numpy(array, name: str) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu()
        if not array.dtype.is_floating_point or array.dtype.itemsize < 4:
            array = array.double()
        array = array.numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected numbers, got an array of dtype {array.dtype}")
    return array


def _prototype_matrix(prototypes, name: str) -> np.ndarray:
    matrix = _to_numpy(prototypes, name)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"{name}: expected a non-empty (num_classes, feature_dim) matrix, got shape {matrix.shape}")
    if matrix.dtype != np.float32:
        matrix = matrix.astype(np.float64, copy=False)
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: rows {np.flatnonzero(bad)[:10].tolist()} contain NaN or infinite values; compute "
                         "the prototypes from finite features")
    return matrix


def _unit_rows(matrix: np.ndarray, name: str) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))
    zero = norms == 0
    if zero.any():
        raise ValueError(f"{name}: rows {np.flatnonzero(zero)[:10].tolist()} are zero vectors, whose cosine is "
                         "undefined; drop those classes or check the features")
    return matrix / norms.astype(matrix.dtype)[:, None]


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _relaxations(reg_m) -> tuple[float, float]:
    if isinstance(reg_m, numbers.Real) and not isinstance(reg_m, bool):
        reg_m = (reg_m, reg_m)
    if not isinstance(reg_m, (tuple, list)) or len(reg_m) != 2:
        raise ValueError(f"reg_m must be a positive number or a pair (tau_s, tau_t), got {reg_m!r}")
    return _positive(reg_m[0], "reg_m[0] (tau_s)"), _positive(reg_m[1], "reg_m[1] (tau_t)")


def _solver_settings(reg, reg_m, max_iter, tol) -> tuple[float, tuple[float, float], int, float]:
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    return _positive(reg, "reg"), _relaxations(reg_m), int(max_iter), _positive(tol, "tol")


def prototype_cost(source_prototypes, target_prototypes, *, p_m: float = 0.1) -> np.ndarray:
    """The cost matrix `M_jk = (1 - cos(source_j, target_k)) / p_m` between class prototypes.

    Rows are normalised to unit L2 norm first; the cosines are a matrix product (in blocks of rows, written straight
    into the float64 result, so no other `(K_s, K_t)` array is made), in float32 when both inputs are float32 and in
    float64 otherwise (half-precision inputs included).

    Args:
        source_prototypes (`np.ndarray` or `torch.Tensor` of shape `(K_s, d)`): source class prototypes.
        target_prototypes (`np.ndarray` or `torch.Tensor` of shape `(K_t, d)`): target class prototypes.
        p_m (`float`, *optional*, defaults to 0.1): the temperature of the cost.

    Returns:
        `np.ndarray` of shape `(K_s, K_t)`, float64.

    Raises:
        `ValueError`: the feature widths differ, a matrix is empty or not 2-D, a row is zero or not finite, or `p_m`
            is not positive.
    """
    p_m = _positive(p_m, "p_m")
    source = _prototype_matrix(source_prototypes, "source_prototypes")
    target = _prototype_matrix(target_prototypes, "target_prototypes")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source_prototypes have {source.shape[1]} features and target_prototypes {target.shape[1]}; "
                         "compute both with the same backbone and feature")
    dtype = np.float32 if source.dtype == target.dtype == np.float32 else np.float64
    source = _unit_rows(source.astype(dtype, copy=False), "source_prototypes")
    target_t = np.ascontiguousarray(_unit_rows(target.astype(dtype, copy=False), "target_prototypes").T)
    cost = np.empty((source.shape[0], target.shape[0]), dtype=np.float64)
    for start in range(0, source.shape[0], _COST_BLOCK_ROWS):
        rows = slice(start, start + _COST_BLOCK_ROWS)
        np.subtract(1.0, source[rows] @ target_t, out=cost[rows])
    cost /= p_m
    return cost


def _marginal(weights, size: int, name: str) -> np.ndarray:
    weights = _to_numpy(weights, name).astype(np.float64, copy=False)
    if weights.shape != (size,):
        raise ValueError(f"{name}: expected shape ({size},) to match the cost matrix, got {weights.shape}")
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError(f"{name}: the marginal must be finite and non-negative")
    return weights


def sinkhorn_unbalanced(a, b, M, *, reg: float = 1.0, reg_m=(1.0, 100.0), max_iter: int = 1000,
                        tol: float = 1e-6) -> np.ndarray:
    """The entropic unbalanced OT plan by POT's generalised Sinkhorn (`ot.unbalanced.sinkhorn_knopp_unbalanced`).

    The update rule is that of the paper's code: `K = exp(-M / reg)`, `u = (a / K v) ** (tau_s / (tau_s + reg))`,
    `v = (b / K^T u) ** (tau_t / (tau_t + reg))`, until the mean relative sup-change of `(u, v)` is below `tol` or after
    `max_iter` iterations; `T = diag(u) K diag(v)`. The entropy's reference measure is the all-ones matrix (POT's
    `reg_type="entropy"`), so the kernel is `exp(-M / reg)` for any `a` and `b`; for all-ones marginals this is also
    POT's default (`reg_type="kl"`, reference `a b^T`).

    Args:
        a (array of shape `(K_s,)`): the source marginal (unnormalised; the selection uses ones).
        b (array of shape `(K_t,)`): the target marginal (unnormalised; the selection uses ones).
        M (array of shape `(K_s, K_t)`): the cost matrix.
        reg (`float`, *optional*, defaults to 1.0): the entropy weight epsilon.
        reg_m (`float` or `(float, float)`, *optional*, defaults to `(1.0, 100.0)`): the marginal relaxations `(tau_s,
            tau_t)`; a number sets both.
        max_iter (`int`, *optional*, defaults to 1000): the iteration limit.
        tol (`float`, *optional*, defaults to 1e-6): the stopping threshold.

    Returns:
        `np.ndarray` of shape `(K_s, K_t)`: the plan, in the dtype of `M` (float32 stays float32).
    """
    reg, (tau_s, tau_t), max_iter, tol = _solver_settings(reg, reg_m, max_iter, tol)
    M = _to_numpy(M, "M")
    if M.ndim != 2 or 0 in M.shape:
        raise ValueError(f"M: expected a non-empty (K_s, K_t) cost matrix, got shape {M.shape}")
    if M.dtype not in (np.float32, np.float64):
        M = M.astype(np.float64)
    if not np.isfinite(M).all():
        raise ValueError("M: the cost matrix contains NaN or infinite values")
    a = _marginal(a, M.shape[0], "a").astype(M.dtype, copy=False)
    b = _marginal(b, M.shape[1], "b").astype(M.dtype, copy=False)
    return _solve(a, b, M, reg, (tau_s, tau_t), max_iter, tol)


def _solve(a: np.ndarray, b: np.ndarray, M: np.ndarray, reg: float, reg_m: tuple[float, float], max_iter: int,
           tol: float) -> np.ndarray:
    import ot

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="If reg_type = entropy", category=UserWarning)
        return ot.unbalanced.sinkhorn_knopp_unbalanced(a, b, M, reg, reg_m, reg_type="entropy",
                                                       numItermax=max_iter, stopThr=tol)


def uot_select_classes(source_prototypes, target_prototypes, n: int, *, p_m: float = 0.1, reg: float = 1.0,
                       reg_m=(1.0, 100.0), max_iter: int = 1000, tol: float = 1e-6) -> UOTSelection:
    """Select the `n` source classes that unbalanced OT moves the most mass from, onto the target classes.

    `M = prototype_cost(source, target, p_m=p_m)`, `T = sinkhorn_unbalanced(1, 1, M, ...)` with all-ones marginals of
    lengths `K_s` and `K_t` (unnormalised, as in the official code: the total mass is about `K_t`), and the classes
    are the `n` largest row sums `w = T 1`, best first (ties: lower index first).

    Args:
        source_prototypes (`np.ndarray` or `torch.Tensor` of shape `(K_s, d)`): source class prototypes (class means).
        target_prototypes (`np.ndarray` or `torch.Tensor` of shape `(K_t, d)`): target class prototypes.
        n (`int`): the number of source classes to select, `1 <= n <= K_s`.
        p_m (`float`, *optional*, defaults to 0.1): the cost temperature.
        reg (`float`, *optional*, defaults to 1.0): the entropy weight.
        reg_m (`(float, float)`, *optional*, defaults to `(1.0, 100.0)`): the source and target relaxations.
        max_iter (`int`, *optional*, defaults to 1000): the solver's iteration limit.
        tol (`float`, *optional*, defaults to 1e-6): the solver's stopping threshold.

    Returns:
        `UOTSelection`.

    Example:

    ```python
    import numpy as np
    from hf_regtools.data_selection.uot import uot_select_classes

    rng = np.random.default_rng(0)
    source = rng.standard_normal((50, 16))
    target = source[:8] + 0.3 * rng.standard_normal((8, 16))
    selection = uot_select_classes(source, target, 8)
    print(sorted(selection.class_ids), selection.target_marginal_error)
    ```
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"n must be an integer number of source classes, got {n!r}")
    reg, reg_m, max_iter, tol = _solver_settings(reg, reg_m, max_iter, tol)
    source_shape = np.shape(_to_numpy(source_prototypes, "source_prototypes"))
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if len(source_shape) == 2 and n > source_shape[0]:
        num_source = source_shape[0]
        raise ValueError(f"n={n} is more than the {num_source} source classes; choose n <= {num_source}")
    cost = prototype_cost(source_prototypes, target_prototypes, p_m=p_m)
    num_source, num_target = cost.shape
    plan = _solve(np.ones(num_source), np.ones(num_target), cost, reg, reg_m, max_iter, tol)
    del cost
    importance = plan.sum(axis=1)
    order = np.argsort(-importance, kind="stable")[:n]
    error = float(np.abs(plan.sum(axis=0) - 1.0).max())
    return UOTSelection(class_ids=[int(i) for i in order], importance=importance, plan=plan,
                        target_marginal_error=error)
