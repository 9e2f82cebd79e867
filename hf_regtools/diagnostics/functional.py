"""Gradient-variance diagnostics of *Dropout Reduces Underfitting* and *A Coefficient Makes SVRG Effective*.

All functions take `G`, a `(N, d)` tensor of N flattened mini-batch gradients (or a list of such vectors).

- `gradient_direction_variance(G)` (GDV; alpha-SVRG's "cosine distance"): mean over unordered pairs of
  `(1 - cos(g_i, g_j)) / 2`, in [0, 1].
- `gradient_direction_error(G, g_full)` (GDE): mean of `(1 - cos(g_i, g_full)) / 2` against the whole-data gradient.
- `gradient_variance_metrics(G)`: `(cosine distance, trace of the covariance, its largest eigenvalue)`, with the
  population covariance (1/N); the eigenvalue comes from the N x N centred Gram matrix (same non-zero spectrum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _stack(gradients: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    G = gradients if isinstance(gradients, torch.Tensor) else torch.stack([g.reshape(-1) for g in gradients])
    if G.ndim != 2 or G.shape[0] < 2:
        raise ValueError(f"expected at least 2 flattened gradients as an (N, d) tensor, got shape {tuple(G.shape)}")
    return G.double()


def gradient_direction_variance(gradients) -> float:
    """Mean over unordered pairs of `(1 - cos(g_i, g_j)) / 2`; identical gradients 0, opposite ones 1."""
    G = torch.nn.functional.normalize(_stack(gradients), dim=1)
    cosines = G @ G.T
    n = G.shape[0]
    pairs = cosines[torch.triu_indices(n, n, offset=1).unbind()]
    return float(((1 - pairs) / 2).mean())


def gradient_direction_error(gradients, full_gradient: torch.Tensor) -> float:
    """Mean of `(1 - cos(g_i, g_full)) / 2` over the mini-batch gradients."""
    G = torch.nn.functional.normalize(_stack(gradients), dim=1)
    full = torch.nn.functional.normalize(full_gradient.reshape(-1).double(), dim=0)
    return float(((1 - G @ full) / 2).mean())


def gradient_variance_metrics(gradients) -> tuple[float, float, float]:
    """`(cosine distance, trace variance, spectral norm)` as in `davidyyd/alpha-SVRG` `svrg.py`."""
    G = _stack(gradients)
    X = G - G.mean(dim=0, keepdim=True)
    n = G.shape[0]
    trace = float((X * X).sum() / n)
    spectral = float(torch.linalg.eigvalsh(X @ X.T / n).max())
    return gradient_direction_variance(G), trace, spectral


def flat_gradient(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """The gradient of `loss` w.r.t. the trainable parameters, flattened, without touching `.grad`."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).detach().float()
                      for g, p in zip(grads, parameters)])
