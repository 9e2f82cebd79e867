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

    def __post_init__(self):
        if self.kind not in SVRG_KINDS:
            raise ValueError(f"unknown alpha schedule {self.kind!r}; choose one of {SVRG_KINDS}")
        if not (self.snapshot_every == "epoch" or (isinstance(self.snapshot_every, int) and self.snapshot_every > 0)):
            raise ValueError(f"snapshot_every must be a positive number of steps or 'epoch', got {self.snapshot_every!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown alpha-SVRG mode {self.mode!r}; choose one of {MODES}")
        if self.mode == "cache" and self.snapshot_every != "epoch":
            raise ValueError(f"mode='cache' caches one epoch of snapshot gradients and needs snapshot_every='epoch', "
                             f"got {self.snapshot_every!r}; use mode='snapshot' for shorter intervals")

    def to_dict(self) -> dict:
        return asdict(self)
