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

Techniques that need the batch, the loss or an extra forward/backward (alpha-SVRG) subclass this mixin; those that
add a term of the parameters to the loss once per optimizer step (WEISSI, the KL of nested dropout) subclass
`LossTermTrainerMixin`.
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

from ._compat import (
    checkpoint_layout_differs,
    checkpoints_in_model_layout,
    gradient_accumulation_steps,
    trainer_divides_loss_by_ga,
)

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


TRAINING_ARGS_FILE = "training_args.bin"


def save_training_args(args, folder: str | os.PathLike) -> None:
    """Write `args` as the Trainer does (`training_args.bin`), without `hub_token`."""
    import copy

    import torch

    args = copy.copy(args)
    args.hub_token = None
    torch.save(args, Path(folder) / TRAINING_ARGS_FILE)


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
        """The Trainer's `save_model`; checkpoints are written in the model's own key layout, and `training_args.bin`
        never holds `hub_token` (the Trainer pickles the arguments, and `push_to_hub` uploads the file)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not (_internal_call and output_dir is not None and Path(output_dir).name.startswith(PREFIX_CHECKPOINT_DIR)):
            super().save_model(output_dir, _internal_call=_internal_call)
        else:
            with checkpoints_in_model_layout(self.model):
                super().save_model(output_dir, _internal_call=_internal_call)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.hub_token and self.args.should_save and (folder / TRAINING_ARGS_FILE).is_file():
            save_training_args(self.args, folder)

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


def add_per_update_term(trainer, loss, term, num_items_in_batch=None):
    """`loss + term`, scaled so that `term` counts once per optimizer step under gradient accumulation.

    `Trainer.training_step` divides a micro-batch's loss by the accumulation steps unless the loss is already scaled
    (`num_items_in_batch` with a model that accepts loss kwargs, a `compute_loss_func`, or `loss_is_scaled_for_ga`;
    `hf_regtools._compat.trainer_divides_loss_by_ga`). A term of the parameters is added whole when the Trainer divides,
    and divided by the accumulation steps here when it does not, so the accumulated gradient holds it once.
    """
    if not trainer_divides_loss_by_ga(trainer, num_items_in_batch):
        term = term / gradient_accumulation_steps(trainer)
    return loss + term.to(loss.dtype)


class LossTermTrainerMixin(RegtoolsTrainerMixin):
    """Base of the Trainer mixins that add a term of the parameters to the training loss, once per optimizer step.

    A subclass implements `loss_term(model) -> (term, metrics)`: `model` is the unwrapped model, `term` a scalar
    tensor, `metrics` floats to log under their full names (e.g. `hf_regtools/weissi/penalty`). The term is computed
    in fp32 outside autocast (also under bf16/fp16 mixed precision), added by `add_per_update_term`, and only in
    training mode (the evaluation loss is the model's own). The metrics of the latest training micro-batch are logged
    with the Trainer's logs; `technique_use()` (for the model card) is the subclass's.

    A subclass that can add the term's gradient itself, cheaper than autograd, returns True from
    `adds_term_gradient()` and implements `add_term_gradient_(model, scale) -> (term, metrics)`: after each training
    micro-batch's backward it must add `scale * grad(term)` to the parameters' `.grad`, where `scale` is the
    micro-batch's share of the optimizer step (1 / accumulation steps) times the fp16 loss scale, if any; the term's
    value joins the returned (logged) loss with the same share. Under DDP every process adds the same gradient, after
    the reduction of the last micro-batch or before that of the others, so the processes stay equal.
    """

    _loss_term_metrics: dict[str, float] | None = None

    def loss_term(self, model) -> tuple:
        raise NotImplementedError

    def adds_term_gradient(self) -> bool:
        return False

    def add_term_gradient_(self, model, scale: float) -> tuple:
        raise NotImplementedError

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not self.adds_term_gradient():
            return loss
        import torch

        from ._trainer_utils import current_loss_scale

        share = 1.0 / gradient_accumulation_steps(self)
        with torch.autocast(loss.device.type, enabled=False):
            term, metrics = self.add_term_gradient_(self.accelerator.unwrap_model(model),
                                                    share * (current_loss_scale(self) or 1.0))
        self._loss_term_metrics = dict(metrics)
        return loss + (term.detach() * share).to(loss.device, loss.dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and not self.adds_term_gradient():
            import torch

            device_type = loss.device.type
            with torch.autocast(device_type, enabled=False):
                term, metrics = self.loss_term(self.accelerator.unwrap_model(model))
            loss = add_per_update_term(self, loss, term.float(), num_items_in_batch)
            self._loss_term_metrics = dict(metrics)
        return (loss, outputs) if return_outputs else loss

    def technique_metrics(self) -> dict[str, float]:
        return {**super().technique_metrics(), **(self._loss_term_metrics or {})}

    def technique_use(self):
        """This mixin and its settings, for model cards; `None` when a subclass records none."""
        return None

    def technique_uses(self) -> list:
        own = self.technique_use()
        return super().technique_uses() + ([own] if own is not None else [])
