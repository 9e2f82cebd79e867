"""Schedules as pure functions of the optimizer step: resuming needs no stored state.

Conventions follow the official code of each paper, indexed by `it = epoch * steps_per_epoch + step`, which is the
Trainer's `state.global_step` at `on_step_begin`.
"""

from __future__ import annotations

import math

import numpy as np

DROP_MODES = ("standard", "early", "late")
DROP_SCHEDULES = ("constant", "linear")


def drop_schedule(step: int, *, p: float, cutoff_step: int, mode: str = "early", schedule: str = "constant") -> float:
    """Dropout / drop-path rate at optimizer step `step` (`facebookresearch/dropout`, `drop_scheduler.py`).

    - `"standard"`: `p` at every step;
    - `"early"`, `"constant"`: `p` before `cutoff_step`, then 0;
    - `"early"`, `"linear"`: `linspace(p, 0, cutoff_step)[step]` before the cutoff (first value `p`, last early value
      exactly 0), then 0;
    - `"late"` (constant only): 0 before `cutoff_step`, then `p`.

    `cutoff_step=0` gives the official all-0 (early) and all-`p` (late) schedules.

    Example:

    ```python
    [round(drop_schedule(t, p=0.1, cutoff_step=10, schedule="linear"), 4) for t in (0, 1, 9, 10)]
    # [0.1, 0.0889, 0.0, 0.0]
    ```
    """
    _validate(p, cutoff_step, mode, schedule)
    if mode == "standard":
        return float(p)
    if mode == "late":
        return 0.0 if step < cutoff_step else float(p)
    if step >= cutoff_step:
        return 0.0
    if schedule == "constant" or cutoff_step == 1:
        return float(p)
    if step == cutoff_step - 1:
        return 0.0
    return float(p + step * ((0.0 - p) / (cutoff_step - 1)))


def drop_schedule_array(*, p: float, total_steps: int, cutoff_step: int, mode: str = "early",
                        schedule: str = "constant") -> np.ndarray:
    """The whole per-step schedule as the official `drop_scheduler` builds it (parity helper)."""
    _validate(p, cutoff_step, mode, schedule)
    if mode == "standard":
        return np.full(total_steps, p, dtype=float)
    if mode == "late":
        return np.concatenate([np.zeros(cutoff_step), np.full(total_steps - cutoff_step, p)])
    early = np.linspace(p, 0, cutoff_step) if schedule == "linear" else np.full(cutoff_step, p, dtype=float)
    return np.concatenate([early, np.zeros(total_steps - cutoff_step)])


def _validate(p: float, cutoff_step: int, mode: str, schedule: str) -> None:
    if mode not in DROP_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {DROP_MODES}")
    if schedule not in DROP_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {DROP_SCHEDULES}")
    if mode == "late" and schedule != "constant":
        raise ValueError("late mode has only the constant schedule (as in the official code)")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"rate p must be in [0, 1), got {p}")
    if mode != "standard" and cutoff_step < 0:
        raise ValueError(f"cutoff_step must be >= 0 for mode {mode!r} (0: early is off, late is on from the start, "
                         f"as in the official drop_scheduler), got {cutoff_step}")


SVRG_KINDS = ("linear", "constant")


def svrg_alpha_schedule(step: int, *, alpha0: float, epochs: int, steps_per_epoch: int, snapshot_every: int,
                        kind: str = "linear") -> float:
    """The alpha-SVRG coefficient at optimizer step `step` (`davidyyd/alpha-SVRG`, `svrg_scheduler`).

    With `K = ceil(steps_per_epoch / snapshot_every)` snapshot intervals per epoch, `end = linspace(alpha0, 0, E*K)`
    and interval `j` of the run uses `end[j]` for all its steps: piecewise constant, linear across intervals, the
    last interval exactly 0. `kind="constant"` gives `alpha0` everywhere.

    Example:

    ```python
    [svrg_alpha_schedule(e * 4, alpha0=0.75, epochs=5, steps_per_epoch=4, snapshot_every=4) for e in range(5)]
    # [0.75, 0.5625, 0.375, 0.1875, 0.0]
    ```
    """
    if kind not in SVRG_KINDS:
        raise ValueError(f"unknown alpha schedule {kind!r}; choose one of {SVRG_KINDS}")
    if not 1 <= snapshot_every <= steps_per_epoch:
        raise ValueError(f"snapshot_every must be between 1 and the steps per epoch ({steps_per_epoch}), got "
                         f"{snapshot_every}: intervals longer than an epoch are not supported")
    if kind == "constant":
        return float(alpha0)
    intervals = math.ceil(steps_per_epoch / snapshot_every)
    epoch, within = divmod(step, steps_per_epoch)
    index = min(epoch * intervals + within // snapshot_every, epochs * intervals - 1)
    return float(np.linspace(alpha0, 0, epochs * intervals)[index])


COEFFICIENT_KINDS = ("constant", "linear", "cosine")


def coefficient_schedule(progress: float, *, kind: str = "constant", warmup: float = 0.0) -> float:
    """Multiplier in [0, 1] of a loss-term coefficient at training progress `progress` (`global_step / max_steps`).

    A linear ramp from 0 to 1 over the first `warmup` fraction of training (none for `warmup=0`), then `"constant"`
    (1), `"linear"` (1 down to 0 at the end) or `"cosine"` (half a cosine from 1 to 0) over the rest.

    Example:

    ```python
    [coefficient_schedule(p, kind="linear", warmup=0.2) for p in (0.0, 0.1, 0.2, 0.6, 1.0)]
    # [0.0, 0.5, 1.0, 0.5, 0.0]
    ```
    """
    if kind not in COEFFICIENT_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {COEFFICIENT_KINDS}")
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup is a fraction of training in [0, 1], got {warmup!r}")
    progress = min(max(float(progress), 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    if kind == "constant" or warmup >= 1.0:
        return 1.0
    rest = (progress - warmup) / (1.0 - warmup)
    return 1.0 - rest if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * rest))


MILESTONE_UNITS = ("epochs", "steps", "fractions")


def multistep_lr_factor(epoch: float, *, milestones: tuple[float, ...] = (60, 80),
                        gamma: float | tuple[float, ...] = 0.1) -> float:
    """Learning-rate multiplier: the product of the factors of the milestones `<= floor(epoch)` (a step decay).

    `gamma` is one factor for every milestone, or one factor per milestone. The two-head fine-tuning scripts of Liu et
    al. (NeurIPS 2022) use `x0.1` at epochs 60 and 80 of 100 (`adjust_learning_rate`); here the epoch comes from the
    Trainer's step counter, so a single-process run decays too (the official code only counts epochs under
    `world_size > 1`). `epoch` may be any counter (epochs or optimizer steps) in the milestones' unit.

    Example:

    ```python
    [multistep_lr_factor(e) for e in (0, 59.9, 60, 79, 80, 99)]
    # [1.0, 1.0, 0.1, 0.1, 0.01, 0.01] (up to rounding)
    [multistep_lr_factor(e, milestones=(29,), gamma=(0.04,)) for e in (28, 29)]
    # [1.0, 0.04]
    ```
    """
    factors = _milestone_factors(milestones, gamma)
    reached = math.floor(epoch)
    out = 1.0
    for milestone, factor in zip(milestones, factors):
        if reached >= milestone:
            out *= factor
    return float(out)


def _milestone_factors(milestones, gamma) -> tuple[float, ...]:
    if list(milestones) != sorted(milestones) or any(m < 0 for m in milestones):
        raise ValueError(f"milestones must be non-negative and in increasing order, got {list(milestones)}")
    factors = tuple(gamma) if isinstance(gamma, (tuple, list)) else (gamma,) * len(milestones)
    if len(factors) != len(milestones):
        raise ValueError(f"gamma has {len(factors)} factors for {len(milestones)} milestones; give one factor or one "
                         "per milestone")
    if not all(f > 0 for f in factors):
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    return tuple(float(f) for f in factors)


class MultiStepLRLambda:
    """The multiplier of `multistep_lr_factor` at optimizer step `step`, for `torch.optim.lr_scheduler.LambdaLR`.

    Milestones are in `unit`: `"epochs"` (0-based; the factor is constant within an epoch, `step // steps_per_epoch`),
    `"steps"` (optimizer steps) or `"fractions"` of `total_steps` (milestone `f` takes effect from step
    `floor(f * total_steps)`). A callable object, so the scheduler's `state_dict` keeps its settings; a pure function
    of the step, so resuming needs no stored state.

    Example:

    ```python
    schedule = MultiStepLRLambda(10, milestones=(29,), gamma=0.04)  # the official `decay_early`, 1-based epoch 30
    [schedule(s) for s in (289, 290)]
    # [1.0, 0.04]
    ```
    """

    def __init__(self, steps_per_epoch: int | None = None, milestones: tuple[float, ...] = (60, 80),
                 gamma: float | tuple[float, ...] = 0.1, *, unit: str = "epochs", total_steps: int | None = None):
        if unit not in MILESTONE_UNITS:
            raise ValueError(f"unknown milestone unit {unit!r}; choose one of {MILESTONE_UNITS}")
        if unit == "epochs" and (steps_per_epoch is None or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be >= 1 for milestones in epochs, got {steps_per_epoch!r}")
        if unit == "fractions":
            if total_steps is None or total_steps < 1:
                raise ValueError(f"total_steps must be >= 1 for milestones in fractions of training, got "
                                 f"{total_steps!r}")
            if any(not 0 <= m <= 1 for m in milestones):
                raise ValueError(f"fraction milestones must be in [0, 1], got {list(milestones)}")
        factors = _milestone_factors(milestones, gamma)
        self.unit, self.milestones, self.gamma = unit, list(milestones), list(factors)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.total_steps = None if total_steps is None else int(total_steps)
        if unit == "fractions":
            self._step_milestones = [math.floor(m * self.total_steps) for m in milestones]
        elif unit == "steps":
            self._step_milestones = list(milestones)
        else:
            self._step_milestones = None

    def __call__(self, step: int) -> float:
        if self._step_milestones is None:
            return multistep_lr_factor(step // self.steps_per_epoch, milestones=self.milestones, gamma=self.gamma)
        return multistep_lr_factor(step, milestones=self._step_milestones, gamma=self.gamma)
