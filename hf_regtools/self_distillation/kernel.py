"""The kernel ridge regression theory of self-distillation (Mobahi, Farajtabar and Bartlett, NeurIPS 2020, section
2): each round refits the previous round's predictions on the training points, which shrinks the solution along
the eigenbasis of the Gram matrix `G = V diag(d) V^T`:

```
f_t(x) = g(x, X) (c_t I + G)^{-1} y_{t-1},   y_t = f_t(X),   z_t = V^T y_t = prod_{i<=t} d / (d + c_i) * z_0
```

With a fixed `c` the shrinkage is `(d / (d + c))^t`. With the paper's constraint `(1/K) ||f_t(X) - y_{t-1}||^2 = eps`,
`c_t` is the root of `sum_j (c / (c + d_j))^2 z_j^2 = K eps` (found by bisection; the left side increases with `c`);
it exists only while `||y_{t-1}||^2 > K eps`, and afterwards the solution collapses to the zero function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

KERNELS = ("rbf",)


def rbf_kernel(a, b, *, bandwidth: float = 0.2) -> np.ndarray:
    """`exp(-||a_i - b_j||^2 / (2 bandwidth^2))` for rows (or scalars) `a_i`, `b_j`."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-np.maximum(squared, 0.0) / (2.0 * bandwidth ** 2))


@dataclass
class KernelRound:
    """One round `t`: the regularization constant `c`, the coefficients `alpha` of `f_t = g(., X) alpha`, the
    training predictions `y = f_t(X)` and their eigenbasis coordinates `z = V^T y`."""

    round: int
    c: float
    alpha: np.ndarray
    y: np.ndarray
    z: np.ndarray


@dataclass
class KernelSelfDistillation:
    """The result of `kernel_self_distillation`: the Gram eigen-decomposition (`eigenvalues` ascending, after
    clipping at 0 and adding `jitter`), `z0 = V^T y`, the `rounds` run, and `collapsed_at`, the first round whose
    constraint could not be met (`f_t = 0` from there on), or `None`."""

    x: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    z0: np.ndarray
    rounds: list[KernelRound] = field(default_factory=list)
    collapsed_at: int | None = None
    kernel: Callable | None = None

    def predict(self, x_new, round: int) -> np.ndarray:
        """`f_round(x_new)`; 0 for a round at or after the collapse."""
        if round < 1:
            raise ValueError(f"round must be >= 1, got {round}")
        if round > len(self.rounds):
            if self.collapsed_at is not None and round >= self.collapsed_at:
                return np.zeros(len(x_new))
            raise ValueError(f"round {round} was not run (rounds run: {len(self.rounds)})")
        return self.kernel(x_new, self.x) @ self.rounds[round - 1].alpha


def _constraint_c(d: np.ndarray, z: np.ndarray, target: float) -> float:
    """The `c > 0` with `sum_j (c / (c + d_j))^2 z_j^2 = target`, for `0 < target < ||z||^2`, by bisection."""
    def excess(c: float) -> float:
        return float(np.sum((c / (c + d)) ** 2 * z ** 2) - target)

    low, high = 0.0, max(float(d.max()), 1.0)
    while excess(high) < 0.0:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if excess(middle) < 0.0:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def kernel_self_distillation(x, y, *, kernel: str | Callable = "rbf", bandwidth: float = 0.2, eps: float | None = None,
                             c: float | None = None, rounds: int = 10, jitter: float = 1e-10
                             ) -> KernelSelfDistillation:
    """Self-distillation rounds of kernel ridge regression, the paper's closed form (spec section 2).

    Args:
        x (`array`): the `K` training inputs (scalars or rows).
        y (`array`): their `K` targets.
        kernel (`str` or `callable`, *optional*, defaults to `"rbf"`): `"rbf"` (`rbf_kernel` with `bandwidth`) or a
            function `kernel(a, b) -> Gram matrix` (the Green's function `g` of the regularizer).
        bandwidth (`float`, *optional*, defaults to 0.2): the RBF bandwidth.
        eps (`float`, *optional*): the constraint `(1/K) ||f_t(X) - y_{t-1}||^2 = eps`; `c_t` is solved for each
            round, and the rounds stop at the collapse (`||y_{t-1}||^2 <= K eps`).
        c (`float`, *optional*): a fixed regularization constant instead (the fixed-c variant). Give `eps` or `c`.
        rounds (`int`, *optional*, defaults to 10): the most rounds to run.
        jitter (`float`, *optional*, defaults to 1e-10): added to the Gram eigenvalues (clipped at 0 first): an RBF
            Gram matrix is nearly singular.

    Returns:
        `KernelSelfDistillation`, with one `KernelRound` per round run.
    """
    if (eps is None) == (c is None):
        raise ValueError("kernel_self_distillation needs exactly one of eps= (the constraint) or c= (a fixed "
                         f"regularization constant); got eps={eps!r}, c={c!r}")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if c is not None and not c > 0:
        raise ValueError(f"c must be > 0, got {c!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS} or a callable kernel(a, b), got {kernel!r}")
        kernel_fn = lambda a, b: rbf_kernel(a, b, bandwidth=bandwidth)  # noqa: E731
    elif callable(kernel):
        kernel_fn = lambda a, b: np.asarray(kernel(a, b), dtype=np.float64)  # noqa: E731
    else:
        raise ValueError(f"kernel must be one of {KERNELS} or a callable kernel(a, b), got {type(kernel).__name__}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"x and y must hold as many examples; got {len(x)} and {len(y)}")
    gram = kernel_fn(x, x)
    if gram.shape != (len(y), len(y)):
        raise ValueError(f"kernel(x, x) must be a {len(y)}x{len(y)} Gram matrix, got shape {gram.shape}")
    d, v = np.linalg.eigh(0.5 * (gram + gram.T))
    d = np.maximum(d, 0.0) + jitter
    z = v.T @ y
    result = KernelSelfDistillation(x=x, eigenvalues=d, eigenvectors=v, z0=z.copy(), kernel=kernel_fn)
    size = len(y)
    for t in range(1, rounds + 1):
        if c is not None:
            c_t = float(c)
        else:
            if float(z @ z) <= size * eps:
                result.collapsed_at = t
                break
            c_t = _constraint_c(d, z, size * eps)
        alpha = v @ (z / (d + c_t))
        z = d / (d + c_t) * z
        result.rounds.append(KernelRound(round=t, c=c_t, alpha=alpha, y=v @ z, z=z.copy()))
    return result
