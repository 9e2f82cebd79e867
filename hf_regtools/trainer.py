"""`RegtoolsTrainerMixin`: the one Trainer extension point shared by every technique.

Combine it with your own Trainer subclass: `class MyTrainer(RegtoolsTrainerMixin, Trainer)`. It only overrides public
hooks:

- `log`: adds the current metrics of every hf_regtools callback (`callback.metrics()`, e.g. the dropout rate) before
  the Trainer hands the logs to its reporters, so TensorBoard, W&B and `state.log_history` receive them. (Without the
  mixin, callbacks add them in `on_log`, which reporters have already run before.)
- `save_model`: checkpoints (`checkpoint-*` folders) are written in the model's own key layout, so that resuming
  restores them under transformers 5 (`hf_regtools._compat.checkpoints_in_model_layout`); the final model and
  `push_to_hub` keep the original layout for the Hub. Without the mixin, an hf_regtools callback warns when a run
  resumes a model whose checkpoints it would not restore (transformers 5 ViT, DeiT, Swin).
- `create_model_card` (also run by `push_to_hub`): the card gets the tag `hf-regtools`, one tag per technique and a
  section listing each technique with its settings and paper (`hf_regtools.hub.add_techniques_to_card`). A model
  without `config` (a user module holding a timm model) can be pushed too: transformers' card summary reads
  `model.config`, which it gets, empty, while the card is written.

Techniques that need the batch, the loss or an extra forward/backward (alpha-SVRG) subclass this mixin.
"""

from __future__ import annotations

import os
import warnings
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import SimpleNamespace

from transformers import TrainerCallback

from ._compat import checkpoint_layout_differs, checkpoints_in_model_layout

_TRAINING_WITH_MIXIN: ContextVar[bool] = ContextVar("hf_regtools_training_with_mixin", default=False)
_checked_run: weakref.ref | None = None  # the TrainerState of the run `warn_if_resume_is_inexact` checked last

RESUME_WARNING = (
    "Resuming {model} without RegtoolsTrainerMixin is not exact with this transformers version: its checkpoints hold "
    "another key layout than the model and the Trainer restores none of the renamed weights "
    "(huggingface/transformers#43701); train with `class MyTrainer(RegtoolsTrainerMixin, Trainer)` from the first run."
)


def warn_if_resume_is_inexact(state, model) -> None:
    """Warn once per run when training resumes (`global_step > 0` at its first epoch) without `RegtoolsTrainerMixin`
    on a model whose checkpoints the Trainer would not restore (`hf_regtools._compat.checkpoint_layout_differs`)."""
    global _checked_run
    if _checked_run is not None and _checked_run() is state:
        return
    _checked_run = weakref.ref(state)
    if state.global_step > 0 and model is not None and not _TRAINING_WITH_MIXIN.get() and \
            checkpoint_layout_differs(model):
        warnings.warn(RESUME_WARNING.format(model=type(model).__name__), UserWarning, stacklevel=3)


class TechniqueMetricsCallback(TrainerCallback):
    """Base of hf_regtools callbacks: what `metrics()` returns is logged.

    With `RegtoolsTrainerMixin` the metrics join the logs before the reporters run; without it, `on_log` adds them to
    the printed logs and to `state.log_history` (reporters have already run by then).
    """

    def metrics(self) -> dict[str, float]:
        return {}

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        warn_if_resume_is_inexact(state, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self.metrics()
        if logs is None or not metrics:
            return
        latest = state.log_history[-1] if state.log_history and state.log_history[-1].get("step") == \
            state.global_step else {}
        for name, value in metrics.items():
            logs.setdefault(name, value)
            latest.setdefault(name, value)


@contextmanager
def _training_with_mixin():
    token = _TRAINING_WITH_MIXIN.set(True)
    try:
        yield
    finally:
        _TRAINING_WITH_MIXIN.reset(token)


@contextmanager
def _config_for_model_card(model):
    """An empty `model.config` within the block for a model without one: `TrainingSummary.from_trainer` (4.57 and 5.x)
    reads `trainer.model.config`, so `Trainer.push_to_hub` fails for a plain module otherwise."""
    if model is None or hasattr(model, "config"):
        yield
        return
    model.config = SimpleNamespace()
    try:
        yield
    finally:
        del model.config


class RegtoolsTrainerMixin:
    """Mixin for `transformers.Trainer` subclasses; see the module docstring."""

    def train(self, *args, **kwargs):
        with _training_with_mixin():
            return super().train(*args, **kwargs)

    def technique_metrics(self) -> dict[str, float]:
        metrics = {}
        for callback in self.callback_handler.callbacks:
            if callable(getattr(callback, "metrics", None)):
                metrics.update(callback.metrics())
        return metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        super().log({**logs, **self.technique_metrics()}, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not (_internal_call and output_dir is not None and Path(output_dir).name.startswith(PREFIX_CHECKPOINT_DIR)):
            return super().save_model(output_dir, _internal_call=_internal_call)
        with checkpoints_in_model_layout(self.model):
            return super().save_model(output_dir, _internal_call=_internal_call)

    def technique_uses(self) -> list:
        """The hf_regtools techniques of this run (from callbacks and Trainer mixins) with their settings."""
        return [callback.technique_use() for callback in self.callback_handler.callbacks
                if callable(getattr(callback, "technique_use", None))]

    def create_model_card(self, *args, **kwargs) -> None:
        with _config_for_model_card(self.model):
            super().create_model_card(*args, **kwargs)
        card = os.path.join(self.args.output_dir, "README.md")
        uses = self.technique_uses()
        if uses and self.is_world_process_zero() and os.path.isfile(card):
            from .hub import add_techniques_to_card

            add_techniques_to_card(card, uses)
