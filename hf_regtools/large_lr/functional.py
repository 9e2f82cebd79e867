"""Functional core of the large-initial-learning-rate technique (Li, Wei and Ma, NeurIPS 2019): the official learning-rate
schedules as pure functions of the optimizer step, the class-dependent patch of the CIFAR-10 diagnostic, and annealed
pre-activation noise. No Trainer needed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..schedules import MultiStepLRLambda

# The official schedules (`train_util.py`, `adjust_lr`; 1-based epochs): the learning rate of the run and its decay.
OFFICIAL_SCHEDULES: dict[str, dict] = {
    "decay_early": {"lr": 0.1, "milestones": (30,), "factors": (0.04,)},  # the large-LR patch run
    "fixed": {"lr": 0.004, "milestones": (), "factors": ()},  # the small-LR and the activation-noise patch runs
    "decay_once": {"lr": 0.004, "milestones": (150,), "factors": (0.2,)},
    "default": {"lr": 0.1, "milestones": (60, 120, 150), "factors": (0.2, 0.2, 0.2)},  # standard CIFAR training
}


def large_initial_lr_lambda(steps_per_epoch: int | None = None, milestones: Sequence[float] | None = None,
                            factors: float | Sequence[float] | None = None, *, schedule: str = "decay_early",
                            unit: str = "epochs", one_based: bool = True,
                            total_steps: int | None = None) -> MultiStepLRLambda:
    """The learning-rate multiplier of a "large learning rate, then anneal by a factor at milestones" schedule.

    Args:
        steps_per_epoch (`int`, *optional*): optimizer updates per epoch (gradient accumulation included); needed for
            milestones in epochs.
        milestones (`Sequence[float]`, *optional*): where the factors apply; defaults to those of `schedule`.
        factors (`float` or `Sequence[float]`, *optional*): one factor, or one per milestone; defaults to those of
            `schedule`.
        schedule (`str`, *optional*, defaults to `"decay_early"`): an official schedule (`OFFICIAL_SCHEDULES`) giving
            the default milestones and factors: `"decay_early"` (x0.04 at epoch 30), `"fixed"` (none),
            `"decay_once"` (x0.2 at 150), `"default"` (x0.2 at 60, 120, 150).
        unit (`str`, *optional*, defaults to `"epochs"`): `"epochs"` (the factor is constant within an epoch, as the
            official per-epoch `adjust_lr`), `"steps"` (optimizer updates) or `"fractions"` of `total_steps`.
        one_based (`bool`, *optional*, defaults to `True`): epoch milestones count epochs from 1, as the official
            code (`epoch >= 30` from the 30th epoch, i.e. 0-based epoch 29).
        total_steps (`int`, *optional*): the run's optimizer updates, for `unit="fractions"`.

    Example:

    ```python
    lam = large_initial_lr_lambda(steps_per_epoch=10)
    [lam(s) for s in (0, 289, 290)]  # 0.1 x this for the large-LR run
    # [1.0, 1.0, 0.04]
    ```
    """
    if schedule not in OFFICIAL_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {tuple(OFFICIAL_SCHEDULES)}")
    official = OFFICIAL_SCHEDULES[schedule]
    milestones = tuple(official["milestones"] if milestones is None else milestones)
    factors = official["factors"] if factors is None else factors
    if unit == "epochs" and one_based:
        if any(m < 1 for m in milestones):
            raise ValueError(f"1-based epoch milestones must be >= 1, got {list(milestones)}; pass one_based=False "
                             "for 0-based epochs")
        milestones = tuple(m - 1 for m in milestones)
    return MultiStepLRLambda(steps_per_epoch, milestones, factors, unit=unit, total_steps=total_steps)


def large_initial_lr_schedule(optimizer: torch.optim.Optimizer, steps_per_epoch: int | None = None,
                              milestones: Sequence[float] | None = None,
                              factors: float | Sequence[float] | None = None, **kwargs):
    """A `LambdaLR` of `large_initial_lr_lambda` (same arguments): pass it as `Trainer(optimizers=(opt, sched))`. The
    peak learning rate is the optimizer's (0.1 for the official large-LR run, 0.004 for the small one)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, large_initial_lr_lambda(steps_per_epoch, milestones, factors, **kwargs))


# ---- the patch diagnostic ----------------------------------------------------------------------------------------

KINDS = ("clean", "patch", "patch_only")


def patch_pattern(num_classes: int = 10, patch: int = 7, channels: int = 3, *, z_scale: float = 1.25,
                  sep: float = 0.1, num_patterns: int = 1, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `pm_sym_pattern`: `z = z_scale * N(0, I)` of shape `(channels, patch, patch)`, shared by all
    classes, then the class offsets `zeta ~ U(-sep, sep)` of shape `(num_classes, num_patterns, channels, patch,
    patch)`, drawn in this order from a generator seeded by `seed`. Class `c` is carried by the two points
    `z +- zeta[c]`."""
    if num_classes < 2 or patch < 1 or channels < 1 or num_patterns < 1:
        raise ValueError(f"num_classes must be >= 2 and patch, channels, num_patterns >= 1, got {num_classes}, "
                         f"{patch}, {channels}, {num_patterns}")
    generator = torch.Generator().manual_seed(seed)
    z = z_scale * torch.randn(channels, patch, patch, generator=generator)
    zeta = torch.empty(num_classes, num_patterns, channels, patch, patch).uniform_(-sep, sep, generator=generator)
    return z, zeta


def patch_start(side: int, patch: int, loc: str = "center") -> int:
    """First row/column of the patch: `int(side / 2 - patch / 2)` (12 for a 7x7 patch on CIFAR's 32x32) or 0."""
    if loc not in ("center", "corner"):
        raise ValueError(f"unknown patch location {loc!r}; choose 'center' or 'corner'")
    if patch > side:
        raise ValueError(f"patch ({patch}) is larger than the image ({side})")
    return 0 if loc == "corner" else int(side / 2 - patch / 2)


def _rng(seed: int, stream: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, epoch, index])


@dataclass
class PatchDraws:
    """The random choices of the patch transform for a list of examples (`kind`: 0 clean, 1 patch, 2 patch only)."""

    kind: np.ndarray
    pattern: np.ndarray
    sign: np.ndarray
    amplitude: np.ndarray


def patch_draws(indices: Sequence[int], epoch: int, *, seed: int = 2, prop: float = 0.8, patch_only_prob: float = 0.2,
                patch_only_scale: float = 1.75, num_patterns: int = 1) -> PatchDraws:
    """Draws of the patch transform, keyed by `(seed, index)` for the fixed patched subset (`U_i < prop`) and by
    `(seed, epoch, index)` for the per-access draws (pattern, sign `+-1`, patch only with `patch_only_prob`, its
    amplitude `a ~ U(0, patch_only_scale)`), never by a global random state."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    n = len(indices)
    kind, pattern = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    sign, amplitude = np.ones(n), np.ones(n)
    for row, index in enumerate(indices):
        if _rng(seed, 0, 0, int(index)).random() >= prop:
            continue
        rng = _rng(seed, 1, epoch, int(index))
        pattern[row] = rng.integers(num_patterns)
        sign[row] = -1.0 if rng.random() > 0.5 else 1.0
        patch_only = rng.random() <= patch_only_prob
        amplitude[row] = patch_only_scale * rng.random() if patch_only else 1.0
        kind[row] = 2 if patch_only else 1
    return PatchDraws(kind, pattern, sign, amplitude)


def apply_patch(images: torch.Tensor, labels: torch.Tensor, draws: PatchDraws, z: torch.Tensor, zeta: torch.Tensor,
                loc: str = "center") -> torch.Tensor:
    """`images` (N, C, H, W, normalised) with the patch written in: `z + s * zeta[y]` in the region (kind 1), or an
    all-zero image with `z + s * a * zeta[y]` in the region (kind 2); kind 0 unchanged. Returns a new tensor."""
    if images.ndim != 4 or images.shape[1] != z.shape[0]:
        raise ValueError(f"images must be (N, {z.shape[0]}, H, W) to match the pattern's channels, got "
                         f"{tuple(images.shape)}")
    patch = z.shape[-1]
    r0, c0 = patch_start(images.shape[2], patch, loc), patch_start(images.shape[3], patch, loc)
    out = images.clone()
    labels = torch.as_tensor(labels, dtype=torch.long)
    kind = torch.as_tensor(draws.kind)
    if labels.max() >= zeta.shape[0] or labels.min() < 0:
        raise ValueError(f"labels must be in [0, {zeta.shape[0]}) (the pattern's num_classes), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    scale = torch.as_tensor(draws.sign * draws.amplitude, dtype=out.dtype).view(-1, 1, 1, 1)
    offsets = zeta[labels, torch.as_tensor(draws.pattern)].to(out.dtype)
    values = z.to(out.dtype) + scale * offsets
    out[kind == 2] = 0
    patched = kind > 0
    out[patched, :, r0:r0 + patch, c0:c0 + patch] = values[patched]
    return out


# ---- activation noise --------------------------------------------------------------------------------------------

def noise_generator(seed: int, step: int, rank: int, call: int) -> torch.Generator:
    """A CPU generator keyed by `(seed, step, rank, call)`: the noise of a forward is reproducible on resume."""
    mixed = int(np.random.SeedSequence([seed, step, rank, call]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(mixed & ((1 << 63) - 1))


def activation_noise(output: torch.Tensor, std: float, generator: torch.Generator, shared: bool = True) -> torch.Tensor:
    """`output + std * N(0, 1)`: with `shared`, one map over the trailing dimensions broadcast over the batch and, for
    4-D outputs, over the channels (the official `forward_noise`: one H x W map); else one draw per element."""
    if shared:
        shape = (1, 1, *output.shape[2:]) if output.ndim == 4 else (1, *output.shape[1:])
    else:
        shape = tuple(output.shape)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=output.device, dtype=output.dtype)
    return output + std * noise


def noise_level(step: int, *, std: float = 0.4, steps_per_epoch: int | None = None,
                anneal: Sequence[float] = (30,), factor: float = 1e-5, unit: str = "epochs",
                one_based: bool = True, total_steps: int | None = None) -> float:
    """The official `step_early` noise level at optimizer step `step`: `std`, times `factor` from the anneal
    milestone(s) (1-based epoch 30 by default, i.e. switched off)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return std * large_initial_lr_lambda(steps_per_epoch, tuple(anneal), factor, unit=unit, one_based=one_based,
                                         total_steps=total_steps)(step)


