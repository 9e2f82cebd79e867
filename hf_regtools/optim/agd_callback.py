"""`AGDMetricsCallback`: logs the automatic learning rate of `AGD` under the Trainer (imports transformers)."""

from __future__ import annotations

import warnings

from .._trainer_utils import unwrap_optimizer
from ..trainer import TechniqueMetricsCallback
from .agd import AGD

__all__ = ["AGDMetricsCallback"]


def _find_agd(optimizer) -> AGD | None:
    found = unwrap_optimizer(optimizer)
    return found if isinstance(found, AGD) else None


class AGDMetricsCallback(TechniqueMetricsCallback):
    """Logs `hf_regtools/agd/eta` (AGD's automatic learning rate) and `hf_regtools/agd/gradient_summary` (`G`) of the
    last step, and warns at `on_train_begin` when the Trainer clips gradients (`max_grad_norm > 0`: clipping happens
    before `AGD.step` and lowers `G`, hence `eta`; the official code does not clip).

    The Trainer's optimizer must be `AGD` (`optimizer_cls_and_kwargs=(AGD, {})`). With `RegtoolsTrainerMixin` the
    metrics reach the reporters. In a custom loop, read `optimizer.eta` and `optimizer.gradient_summary` after
    `optimizer.step()`.
    """

    def __init__(self):
        self._optimizer: AGD | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        found = _find_agd(optimizer)
        if found is None:
            raise ValueError(f"AGDMetricsCallback needs the Trainer to train with AGD; its optimizer is "
                             f"{type(optimizer).__name__}. Pass `optimizer_cls_and_kwargs=(AGD, {{}})` to the Trainer.")
        self._optimizer = found
        if args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(f"the Trainer clips gradients to norm {args.max_grad_norm} before AGD's step, which lowers "
                          f"AGD's gradient summary G and so its automatic learning rate; the official AGD does not "
                          f"clip: set `TrainingArguments(max_grad_norm=0.0)`.", UserWarning, stacklevel=2)

    def metrics(self) -> dict[str, float]:
        if self._optimizer is None or self._optimizer.eta is None:
            return {}
        return {"hf_regtools/agd/eta": self._optimizer.eta.item(),
                "hf_regtools/agd/gradient_summary": self._optimizer.gradient_summary.item()}
