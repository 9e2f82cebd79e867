"""`RegtoolsTrainerMixin`: the one Trainer extension point shared by every technique.

Combine it with your own Trainer subclass: `class MyTrainer(RegtoolsTrainerMixin, Trainer)`. It only overrides public
hooks:

- `log`: adds the current metrics of every hf_regtools callback (`callback.metrics()`, e.g. the dropout rate) before
  the Trainer hands the logs to its reporters, so TensorBoard, W&B and `state.log_history` receive them. (Without the
  mixin, callbacks add them in `on_log`, which reporters have already run before.)
- `save_model`: checkpoints are written in the model's own key layout, so that resuming restores them under
  transformers 5 (`hf_regtools._compat.checkpoints_in_model_layout`); models saved at the end keep the original
  layout for the Hub.

Techniques that need the batch, the loss or an extra forward/backward (alpha-SVRG) subclass this mixin.
"""

from __future__ import annotations

from ._compat import checkpoints_in_model_layout


class RegtoolsTrainerMixin:
    """Mixin for `transformers.Trainer` subclasses; see the module docstring."""

    def technique_metrics(self) -> dict[str, float]:
        metrics = {}
        for callback in self.callback_handler.callbacks:
            if callable(getattr(callback, "metrics", None)):
                metrics.update(callback.metrics())
        return metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        super().log({**logs, **self.technique_metrics()}, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call:
            return super().save_model(output_dir, _internal_call=_internal_call)
        with checkpoints_in_model_layout(self.model):
            return super().save_model(output_dir, _internal_call=_internal_call)
