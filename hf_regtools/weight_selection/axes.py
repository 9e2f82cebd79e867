"""Named axes: one index set per axis name, so that every tensor sharing a dimension keeps the same entries.

A family's `ModelFamily.axes` rules name each axis of each tensor (`"hidden"`, `"mlp{layer}"`, `"3*hidden"`,
`"kv_heads*group*head_dim"`). An axis may be a product of factors, outermost first; each factor gets one index set,
drawn the first time the factor is seen, and the axis's indices are the combinations of its factors' indices. A
factor that comes back with other lengths raises, so consistency holds by construction. Axes that no rule names use
one index set per `(D, d)` pair, the rule of the official code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .config import SELECTION_MODES


class WeightSelectionError(ValueError):
    """A teacher/student pair or an argument that weight selection cannot work with."""


def uniform_indices(teacher_dim: int, student_dim: int) -> torch.Tensor:
    """Uniformly spaced indices: `[0, r, 2r, ...]` for an integer ratio `r = D/d`, else `round(linspace(0, D-1, d))`.

    This is the official rule after `OscarXZQ/weight-selection` PR #8 (round half to even, float32 linspace).

    Example:

    ```python
    uniform_indices(10, 4).tolist()  # [0, 3, 6, 9]
    ```
    """
    _check_dims(teacher_dim, student_dim)
    if teacher_dim % student_dim == 0:
        return torch.arange(0, teacher_dim, teacher_dim // student_dim)
    return torch.round(torch.linspace(0, teacher_dim - 1, student_dim)).long()


def consecutive_indices(teacher_dim: int, student_dim: int) -> torch.Tensor:
    """The first `d` indices (the paper's "consecutive" ablation)."""
    _check_dims(teacher_dim, student_dim)
    return torch.arange(student_dim)


def random_indices(teacher_dim: int, student_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`d` distinct indices drawn at random, sorted (the paper's "random with consistency" ablation when reused)."""
    _check_dims(teacher_dim, student_dim)
    return torch.randperm(teacher_dim, generator=generator)[:student_dim].sort().values


def top_indices(scores: torch.Tensor, student_dim: int) -> torch.Tensor:
    """The `d` entries of highest score, in index order (ties to the lower index)."""
    _check_dims(len(scores), student_dim)
    order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices
    return order[:student_dim].sort().values


def rotary_pair_indices(teacher_dim: int, student_dim: int, half_indices) -> torch.Tensor:
    """Indices of a rotary head dimension that keep rotary pairs together.

    transformers' `rotate_half` pairs entry `j` of a head with entry `j + head_dim / 2`; the student keeps the pairs
    of the `d / 2` first-half entries that `half_indices(D / 2, d / 2)` selects, and reads them in the same order, so
    its rotation of each kept pair is the teacher's.
    """
    if teacher_dim % 2 or student_dim % 2:
        raise WeightSelectionError(f"a rotary head dimension must be even in teacher and student, got {teacher_dim} "
                                   f"and {student_dim}")
    half = half_indices(teacher_dim // 2, student_dim // 2)
    return torch.cat([half, half + teacher_dim // 2])


def _check_dims(teacher_dim: int, student_dim: int) -> None:
    if not 0 < student_dim <= teacher_dim:
        raise WeightSelectionError(f"cannot select {student_dim} of {teacher_dim} entries")


def _per_block_base(name: str) -> str:
    """The name of a per-block factor without its block index (`"heads3"` -> `"heads"`, `"mlp2.8"` -> `"mlp"`)."""
    return re.sub(r"[\d.]+$", "", name)


class IndexPlan:
    """Index sets by axis factor name (and by `(D, d)` for unnamed axes), drawn once and reused for every tensor.

    Args:
        mode (`str`, *optional*, defaults to `"uniform"`): one of `"uniform"`, `"consecutive"`, `"random"`,
            `"importance"` (the entries of highest `scores`; uniform for factors without scores).
        seed (`int`, *optional*, defaults to 0): seed of the `"random"` mode (torch RNG).
        scores (`Mapping[str, Tensor]`, *optional*): importance of every teacher entry of a factor, by factor name.
        teacher_sizes, student_sizes (`Mapping[str, int]`, *optional*): lengths of factors that a tensor's shape
            alone does not give (heads, head dimension), from the family's `factor_sizes`; a per-block factor
            (`"heads3"`) takes the length of its base name (`"heads"`) when not given on its own.
        paired (`tuple[str, ...]`, *optional*): factors selected in rotary pairs (`rotary_pair_indices`).
    """

    def __init__(self, mode: str = "uniform", *, seed: int = 0, scores: Mapping[str, torch.Tensor] | None = None,
                 teacher_sizes: Mapping[str, int] | None = None, student_sizes: Mapping[str, int] | None = None,
                 paired: tuple[str, ...] = ()):
        if mode not in SELECTION_MODES:
            raise WeightSelectionError(f"unknown selection mode {mode!r}; choose one of {SELECTION_MODES}")
        if mode == "importance" and not scores:
            raise WeightSelectionError('mode="importance" needs importance scores: compute them with '
                                       "`hf_regtools.weight_selection.importance_scores` on calibration data")
        self.mode = mode
        self.generator = torch.Generator().manual_seed(seed)
        self.scores = dict(scores or {})
        self.teacher_sizes, self.student_sizes = dict(teacher_sizes or {}), dict(student_sizes or {})
        self.paired = tuple(paired)
        self.sets: dict[str | tuple[int, int], torch.Tensor] = {}
        self._lengths: dict[str, tuple[int, int]] = {}

    def __call__(self, teacher_dim: int, student_dim: int) -> torch.Tensor:
        """The index set of an unnamed axis of length `teacher_dim` in the teacher and `student_dim` in the student."""
        key = (teacher_dim, student_dim)
        if key not in self.sets:
            self.sets[key] = self._draw(teacher_dim, student_dim)
        return self.sets[key]

    def _draw(self, teacher_dim: int, student_dim: int, name: str | None = None, *, pairs: bool = False
              ) -> torch.Tensor:
        """`student_dim` of `teacher_dim` indices; with `pairs`, of the first halves of a rotary axis twice as long,
        scored by the sum of each pair's scores."""
        if name is not None and name in self.scores:
            scores = self.scores[name]
            length = 2 * teacher_dim if pairs else teacher_dim
            if len(scores) != length:
                raise WeightSelectionError(f"importance scores of axis {name!r} have {len(scores)} entries, the "
                                           f"teacher's axis {length}")
            if pairs:
                scores = scores[:teacher_dim] + scores[teacher_dim:]
            return top_indices(scores, student_dim)
        if self.mode == "consecutive":
            return consecutive_indices(teacher_dim, student_dim)
        if self.mode == "random":
            return random_indices(teacher_dim, student_dim, generator=self.generator)
        return uniform_indices(teacher_dim, student_dim)

    def factor(self, name: str, teacher_dim: int, student_dim: int) -> torch.Tensor:
        """The index set of factor `name`; raises when `name` was drawn before with other lengths."""
        if student_dim > teacher_dim:
            raise WeightSelectionError(
                f"axis {name!r} has {student_dim} entries in the student but {teacher_dim} in the teacher: weight "
                "selection needs a student no larger on any axis (hidden size, MLP width, heads, key/value heads, "
                "query heads per key/value head, head dimension)")
        seen = self._lengths.setdefault(name, (teacher_dim, student_dim))
        if seen != (teacher_dim, student_dim):
            raise WeightSelectionError(
                f"axis {name!r} has length {teacher_dim} -> {student_dim} here but {seen[0]} -> {seen[1]} in another "
                "tensor; teacher or student config does not describe these weights (check hidden sizes, heads and "
                "head dimensions)")
        if name not in self.sets:
            if name in self.paired and teacher_dim != student_dim:
                self.sets[name] = rotary_pair_indices(teacher_dim, student_dim,
                                                      lambda D, d: self._draw(D, d, name, pairs=True))
            else:
                self.sets[name] = self._draw(teacher_dim, student_dim, name)
        return self.sets[name]

    def axis(self, spec: str, teacher_dim: int, student_dim: int, *, key: str = "tensor") -> torch.Tensor:
        """The indices of an axis named `spec` (`"hidden"`, `"3*hidden"`, `"kv_heads*group*head_dim"`)."""
        factors = spec.split("*")
        teacher = factor_lengths(factors, teacher_dim, self.teacher_sizes, "teacher", spec, key)
        student = factor_lengths(factors, student_dim, self.student_sizes, "student", spec, key)
        index = torch.zeros(1, dtype=torch.long)
        for factor, t, s in zip(factors, teacher, student):
            if factor.isdigit():
                if t != s:
                    raise WeightSelectionError(f"{key!r}: axis {spec!r} needs {factor} equal chunks in both")
                chosen = torch.arange(t)
            else:
                chosen = self.factor(factor, t, s)
            index = (index[:, None] * t + chosen[None, :]).flatten()
        return index


def factor_lengths(factors: list[str], total: int, sizes: Mapping[str, int], role: str, spec: str,
                   key: str) -> list[int]:
    """The length of every factor of an axis `spec` of length `total`: from `sizes` (a per-block factor takes its
    base name's), the one factor `sizes` does not give from the total."""
    known = [int(f) if f.isdigit() else sizes.get(f, sizes.get(_per_block_base(f))) for f in factors]
    unknown = [i for i, length in enumerate(known) if length is None]
    if len(unknown) > 1:
        raise WeightSelectionError(
            f"{key!r}: the {role}'s lengths of {[factors[i] for i in unknown]} (axis {spec!r}) are unknown; pass "
            f"the {role}'s config (teacher_config= / student_config=)")
    product = 1
    for length in known:
        product *= length or 1
    if unknown:
        if total % product:
            raise WeightSelectionError(f"{key!r}: the {role}'s axis {spec!r} has length {total}, not a multiple "
                                       f"of {product}")
        known[unknown[0]] = total // product
    elif product != total:
        raise WeightSelectionError(f"{key!r}: the {role}'s axis {spec!r} has length {total}, but its factors "
                                   f"{dict(zip(factors, known))} give {product}; the {role}'s config does not "
                                   "describe its weights")
    return known
