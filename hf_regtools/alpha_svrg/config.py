"""Settings of alpha-SVRG."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..schedules import SVRG_KINDS


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
    copy_buffers: bool = field(default=False, metadata={
        "help": "also copy buffers (BN statistics) to the snapshot; the official code copies parameters only"})

    def __post_init__(self):
        if self.kind not in SVRG_KINDS:
            raise ValueError(f"unknown alpha schedule {self.kind!r}; choose one of {SVRG_KINDS}")
        if not (self.snapshot_every == "epoch" or (isinstance(self.snapshot_every, int) and self.snapshot_every > 0)):
            raise ValueError(f"snapshot_every must be a positive number of steps or 'epoch', got {self.snapshot_every!r}")

    def to_dict(self) -> dict:
        return asdict(self)
