"""Settings of alpha-SVRG."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..schedules import SVRG_KINDS

MODES = ("snapshot", "cache")


@dataclass
class AlphaSVRGConfig:
    """How `AlphaSVRGTrainerMixin` runs alpha-SVRG (defaults: every command of the official README)."""

    alpha0: float = field(default=0.75, metadata={"help": "initial coefficient (1 with kind='constant' is SVRG)"})
    kind: str = field(default="linear", metadata={"help": f"alpha schedule, one of {SVRG_KINDS}",
                                                  "choices": SVRG_KINDS})
    snapshot_every: int | str = field(default="epoch", metadata={
        "help": "snapshot interval in optimizer steps (at most one epoch), or 'epoch'"})
    clip_norm: float | None = field(default=None, metadata={
        "help": "clip the corrected gradient to this norm (set the Trainer's max_grad_norm=0 for parity)"})
    mode: str = field(default="snapshot", metadata={
        "help": "'snapshot' (a snapshot forward/backward per micro-batch) or 'cache' (one snapshot pass per epoch "
                "caches every step's gradient, then the epoch trains on the same batches: less compute, memory of "
                "steps x model size plus the epoch's batches)",
        "choices": MODES})
    copy_buffers: bool = field(default=False, metadata={
        "help": "also copy buffers (BN statistics) to the snapshot; the official code copies parameters only"})
    svrg_end: int | None = field(default=None, metadata={
        "help": "last epoch (0-based, included) with SVRG, as the official --svrg_end; afterwards alpha is 0 (plain "
                "base optimizer, no snapshot work) while the schedule stays laid out over all epochs"})
    full_gradient_batch_size: int | None = field(default=None, metadata={
        "help": "snapshot mode: compute mu in batches of this many examples per process (a multiple of the "
                "per-device batch) instead of the training batches: same mu for models without BatchNorm, fewer "
                "passes; None (default) batches as the official code does"})

    def __post_init__(self):
        if self.kind not in SVRG_KINDS:
            raise ValueError(f"unknown alpha schedule {self.kind!r}; choose one of {SVRG_KINDS}")
        if not (self.snapshot_every == "epoch" or (isinstance(self.snapshot_every, int) and self.snapshot_every > 0)):
            raise ValueError(f"snapshot_every must be a positive number of steps or 'epoch', got {self.snapshot_every!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown alpha-SVRG mode {self.mode!r}; choose one of {MODES}")
        if self.svrg_end is not None and not (isinstance(self.svrg_end, int) and self.svrg_end >= 0):
            raise ValueError(f"svrg_end must be an epoch index >= 0 or None, got {self.svrg_end!r}")
        batch = self.full_gradient_batch_size
        if batch is not None and not (isinstance(batch, int) and batch > 0):
            raise ValueError(f"full_gradient_batch_size must be a positive number of examples or None, got {batch!r}")
        if batch is not None and self.mode == "cache":
            raise ValueError("full_gradient_batch_size applies to mode='snapshot': in mode='cache' mu is the mean of "
                             "the cached per-step gradients, so the batches are the training steps'")
        if self.mode == "cache" and self.snapshot_every != "epoch":
            raise ValueError(f"mode='cache' caches one epoch of snapshot gradients and needs snapshot_every='epoch', "
                             f"got {self.snapshot_every!r}; use mode='snapshot' for shorter intervals")

    def to_dict(self) -> dict:
        return asdict(self)
