"""Trainer callbacks for early/late dropout and stochastic depth (Liu et al., ICML 2023).

The callback only decides *when*: at `on_train_begin` and at every `on_step_begin` it sets the rate
`drop_schedule(state.global_step)` through a `DropRateController`. The rate is a pure function of the step, so
resuming needs no stored state; `ExportableState` holds only the constructor arguments.
"""

from __future__ import annotations

import math

from transformers.trainer_callback import ExportableState

from .._trainer_utils import updates_per_epoch
from ..schedules import drop_schedule
from ..trainer import TechniqueMetricsCallback
from .functional import TARGETS, DropRateController

GRANULARITIES = ("step", "epoch")


class DropScheduleCallback(TechniqueMetricsCallback, ExportableState):
    """Schedule dropout or stochastic depth during `Trainer.train()`.

    Args:
        p (`float`): the rate while active (drop path: the rate of the deepest block).
        target (`str`, *optional*, defaults to `"dropout"`): `"dropout"` or `"drop_path"`.
        mode (`str`, *optional*, defaults to `"early"`): `"early"` (active before the cutoff), `"late"` (after) or
            `"standard"` (always).
        schedule (`str`, *optional*, defaults to `"linear"` for early, `"constant"` otherwise): early mode decays
            linearly from `p` to 0 at the cutoff (`"linear"`) or stays at `p` (`"constant"`).
        cutoff_epochs, cutoff_steps, cutoff_fraction (*optional*): the cutoff, exactly one of them, in epochs (times
            the Trainer's optimizer steps per epoch), in optimizer steps, or as a fraction of `max_steps`.
        granularity (`str`, *optional*, defaults to `"step"`): update every optimizer step (official), or keep the
            rate constant within an epoch (`"epoch"`).
        include_head (`bool`, *optional*, defaults to `False`): also schedule the classifier-head dropout.
        on_identity (`str`, *optional*, defaults to `"install"`): replace `Identity` drop-path placeholders of
            models built with rate 0 by `DropPath` modules at `on_init_end` (`"install"`), or raise (`"error"`).

    The current rate is logged as `hf_regtools/dropout_schedules/{dropout,drop_path}_rate`. In a custom loop, call
    `DropRateController(model, target=...).set(drop_schedule(step, ...))` before each optimizer step's first
    micro-batch instead.

    Example:

    ```py
    trainer = Trainer(model, args, train_dataset=train,
                      callbacks=[EarlyDropoutCallback(p=0.1, cutoff_epochs=50)])
    ```
    """

    def __init__(self, *, p: float, target: str = "dropout", mode: str = "early", schedule: str | None = None,
                 cutoff_epochs: float | None = None, cutoff_steps: int | None = None,
                 cutoff_fraction: float | None = None, granularity: str = "step", include_head: bool = False,
                 on_identity: str = "install"):
        schedule = schedule or ("linear" if mode == "early" else "constant")
        cutoffs = {"cutoff_epochs": cutoff_epochs, "cutoff_steps": cutoff_steps, "cutoff_fraction": cutoff_fraction}
        given = [name for name, value in cutoffs.items() if value is not None]
        if mode != "standard" and len(given) != 1:
            raise ValueError(f"give exactly one of cutoff_epochs, cutoff_steps, cutoff_fraction (got {given or 'none'})")
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
        drop_schedule(0, p=p, cutoff_step=1, mode=mode, schedule=schedule)  # validates p, mode and schedule
        self.p, self.target, self.mode, self.schedule = p, target, mode, schedule
        self.cutoffs, self.granularity = cutoffs, granularity
        self.include_head, self.on_identity = include_head, on_identity
        self.controller: DropRateController | None = None
        self._model = self.cutoff_step = self.steps_per_epoch = None

    @property
    def metric_name(self) -> str:
        return f"hf_regtools/dropout_schedules/{self.target}_rate"

    def _controller(self, model) -> DropRateController:
        if self.controller is None or self._model is not model:
            self.controller = DropRateController(model, target=self.target, include_head=self.include_head,
                                                 on_identity=self.on_identity)
            self._model = model
        return self.controller

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._controller(model)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        controller = self._controller(model)
        controller.rate = None
        self.steps_per_epoch = self._steps_per_epoch(args, state, train_dataloader)
        self.cutoff_step = self._cutoff_step(state)
        controller.set(self.rate_at(state.global_step))

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.set(self.rate_at(state.global_step))

    def metrics(self) -> dict[str, float]:
        """The current rate, for `RegtoolsTrainerMixin.log` (so reporters such as TensorBoard receive it)."""
        rate = None if self.controller is None else self.controller.rate
        return {} if rate is None else {self.metric_name: rate}

    def rate_at(self, step: int) -> float:
        """The scheduled rate at optimizer step `step` (after `on_train_begin` resolved the cutoff)."""
        if self.granularity == "epoch":
            step = step // self.steps_per_epoch * self.steps_per_epoch
        return drop_schedule(step, p=self.p, cutoff_step=1 if self.cutoff_step is None else self.cutoff_step,
                             mode=self.mode, schedule=self.schedule)

    @staticmethod
    def _steps_per_epoch(args, state, train_dataloader) -> int:
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            return updates_per_epoch(len(train_dataloader), args.gradient_accumulation_steps)
        return max(state.max_steps // max(int(math.ceil(state.num_train_epochs)), 1), 1)

    def _cutoff_step(self, state) -> int | None:
        if self.cutoffs["cutoff_steps"] is not None:
            return int(self.cutoffs["cutoff_steps"])
        if self.cutoffs["cutoff_epochs"] is not None:
            return int(round(self.cutoffs["cutoff_epochs"] * self.steps_per_epoch))
        if self.cutoffs["cutoff_fraction"] is not None:
            return int(round(self.cutoffs["cutoff_fraction"] * state.max_steps))
        return None

    def state(self) -> dict:
        return {"args": self._ctor_args(), "attributes": {}}

    def technique_use(self):
        """This callback and its settings, for model cards (`RegtoolsTrainerMixin.create_model_card`)."""
        from ..hub import TechniqueUse

        return TechniqueUse("dropout_schedules", {"callback": type(self).__name__, **self._ctor_args()})

    def _ctor_args(self) -> dict:
        return dict(p=self.p, target=self.target, mode=self.mode, schedule=self.schedule, granularity=self.granularity,
                    include_head=self.include_head, on_identity=self.on_identity,
                    **{k: v for k, v in self.cutoffs.items() if v is not None})


class _FixedScheduleCallback(DropScheduleCallback):
    TARGET = MODE = None

    def __init__(self, *, p: float, schedule: str | None = None, cutoff_epochs: float | None = None,
                 cutoff_steps: int | None = None, cutoff_fraction: float | None = None, granularity: str = "step",
                 include_head: bool = False, on_identity: str = "install"):
        super().__init__(p=p, target=self.TARGET, mode=self.MODE, schedule=schedule, cutoff_epochs=cutoff_epochs,
                         cutoff_steps=cutoff_steps, cutoff_fraction=cutoff_fraction, granularity=granularity,
                         include_head=include_head, on_identity=on_identity)

    def _ctor_args(self) -> dict:
        args = super()._ctor_args()
        del args["target"], args["mode"]
        return args


class EarlyDropoutCallback(_FixedScheduleCallback):
    """Dropout only before the cutoff (linear decay to 0 by default). See `DropScheduleCallback`."""

    TARGET, MODE = "dropout", "early"


class LateDropoutCallback(_FixedScheduleCallback):
    """Dropout only after the cutoff (constant). See `DropScheduleCallback`."""

    TARGET, MODE = "dropout", "late"


class EarlyStochasticDepthCallback(_FixedScheduleCallback):
    """Stochastic depth only before the cutoff (linear decay to 0 by default). See `DropScheduleCallback`."""

    TARGET, MODE = "drop_path", "early"


class LateStochasticDepthCallback(_FixedScheduleCallback):
    """Stochastic depth only after the cutoff (constant). See `DropScheduleCallback`."""

    TARGET, MODE = "drop_path", "late"
