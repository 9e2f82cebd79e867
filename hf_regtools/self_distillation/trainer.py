"""Trainer integration of (self-)distillation: a mixin whose training loss learns from a frozen teacher's
predictions on the same batch.

The teacher is any model with the student's label space: the previous round's model (self-distillation,
`run_self_distillation`), or a larger model (knowledge distillation, e.g. after weight selection from it). It is kept
by the Trainer, not by the model, so it is in no checkpoint and never wrapped by Accelerate / DDP: every process holds
its own copy on its device, in eval mode, without gradients, and runs it under the student's autocast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .._compat import gradient_accumulation_steps, trainer_divides_loss_by_ga
from .._trainer_utils import config_from_value
from ..trainer import RegtoolsTrainerMixin
from .functional import LOSSES, per_example_distillation_loss, teacher_logits_of, validate_settings

METRIC_PREFIX = "hf_regtools/self_distillation/"
TARGETS = ("online", "precomputed")
TEACHER_LOGITS_COLUMN = "teacher_logits"


@dataclass
class DistillationConfig:
    """Settings of `DistillationTrainerMixin` (`distillation=DistillationConfig(...)` or the same keys as a dict)."""

    loss: str = field(default="mse", metadata={"help": f"distillation loss: one of {LOSSES} (mse: the paper's "
                                                       "square loss on the predictions; kl: soft targets)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the kl loss (times T^2)"})
    alpha: float = field(default=0.0, metadata={"help": "weight of the true labels' loss; 0: the paper's "
                                                        "pure-prediction setting"})
    targets: str = field(default="online", metadata={
        "help": f"one of {TARGETS}: the teacher run on each training batch, or its predictions stored in the "
                f"dataset column '{TEACHER_LOGITS_COLUMN}' (remove_unused_columns=False)"})

    def __post_init__(self):
        validate_settings(self.loss, self.temperature, self.alpha)
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")

    @classmethod
    def from_value(cls, value) -> DistillationConfig:
        if value is None:
            return cls()
        return config_from_value(cls, value, "distillation")


class DistillationTrainerMixin(RegtoolsTrainerMixin):
    """Trainer mixin for distillation from a frozen teacher (self-distillation: Mobahi, Farajtabar and Bartlett,
    arXiv:2002.05715; knowledge distillation from any model with the student's label space).

    Args (keyword, to the Trainer's constructor):
        teacher (`torch.nn.Module`, *optional*): the teacher; `None` trains on the true labels alone (round 1 of
            self-distillation). It is frozen in place (`eval()`, `requires_grad_(False)`) and moved to the
            student's device; it must not share parameters with the student (pass `copy.deepcopy(model)`).
        distillation (`DistillationConfig` or `dict`, *optional*): `loss` (`"mse"` or `"kl"`), `temperature`,
            `alpha` (weight of the true labels), `targets` (`"online"` or `"precomputed"`).
        distillation_round (`int`, *optional*): logged as `hf_regtools/self_distillation/round`.

    In training, the loss is `(1 - alpha) * distill + alpha * gt`, where `gt` is the Trainer's own loss of the true
    labels and `distill` the teacher-student term (`per_example_distillation_loss`, fp32), normalized as the
    Trainer normalizes `gt` (per micro-batch, or over `num_items_in_batch` when the loss is scaled for gradient
    accumulation). The teacher runs on the training batch's inputs (so on the same augmented images) under
    `accelerator.autocast()` without gradients; with `targets="precomputed"` its logits come from the batch's
    `teacher_logits` column instead. Evaluation keeps the Trainer's own loss. Logged:
    `hf_regtools/self_distillation/{distill_loss,gt_loss}` (means over processes) and `round`. In a custom loop:
    `distillation_loss(student_logits, teacher_logits, labels, ...)` (see `hf_regtools.self_distillation.functional`).

    Example:

    ```py
    class MyTrainer(DistillationTrainerMixin, Trainer):
        pass

    trainer = MyTrainer(student, args, train_dataset=train, teacher=teacher,
                        distillation={"loss": "kl", "temperature": 4.0, "alpha": 0.5})
    ```
    """

    def __init__(self, *args, teacher=None, distillation=None, distillation_round: int | None = None, **kwargs):
        self.distillation_config = DistillationConfig.from_value(distillation)
        if teacher is not None and not _is_module(teacher):
            raise TypeError(f"teacher= takes a torch.nn.Module (or None), got {type(teacher).__name__}")
        if distillation_round is not None and (not isinstance(distillation_round, int) or distillation_round < 1):
            raise ValueError(f"distillation_round must be an int >= 1, got {distillation_round!r}")
        self.distillation_round = distillation_round
        self._distillation_metrics = None
        super().__init__(*args, **kwargs)
        if getattr(self.args, "fsdp", None) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("DistillationTrainerMixin supports DDP and single devices, not FSDP or DeepSpeed (the "
                             "teacher is a plain replicated module)")
        self.teacher = None
        if teacher is not None:
            self.set_teacher(teacher)

    def set_teacher(self, teacher) -> None:
        """Freeze `teacher` (eval mode, no gradients) on the student's device and distill from it from now on."""
        from .functional import freeze_teacher

        model = self.model
        if model is not None:
            if teacher is model:
                raise ValueError("the teacher is the student itself; pass a frozen copy: teacher=copy.deepcopy(model)")
            student_parameters = {id(p) for p in model.parameters()}
            shared = [name for name, p in teacher.named_parameters() if id(p) in student_parameters]
            if shared:
                raise ValueError(f"the teacher shares {len(shared)} parameters with the student (e.g. {shared[0]}); "
                                 "pass a copy: teacher=copy.deepcopy(model)")
        self.teacher = freeze_teacher(teacher, self.args.device)

    def _teacher_logits(self, inputs):
        import torch

        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad(), self.accelerator.autocast():
            return teacher_logits_of(self.teacher, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.distillation_config
        precomputed = inputs.get(TEACHER_LOGITS_COLUMN)
        if precomputed is not None:
            inputs = {name: value for name, value in inputs.items() if name != TEACHER_LOGITS_COLUMN}
        if not model.training or (config.targets == "online" and self.teacher is None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from .functional import logits_from_outputs

        if config.targets == "precomputed":
            if precomputed is None:
                raise ValueError(f"targets='precomputed' needs a '{TEACHER_LOGITS_COLUMN}' column in every training "
                                 "batch: add it with add_teacher_logits(dataset, teacher) and train with "
                                 "TrainingArguments(remove_unused_columns=False)")
            teacher_logits = precomputed
        else:
            teacher_logits = self._teacher_logits(inputs)
        gt, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        student_logits = logits_from_outputs(outputs)
        per_example = per_example_distillation_loss(student_logits, teacher_logits.to(student_logits.device),
                                                    loss=config.loss, temperature=config.temperature)
        loss = self._normalized(per_example, num_items_in_batch)
        if config.alpha > 0:
            loss = (1.0 - config.alpha) * loss + config.alpha * gt.float()
        gt_mean = gt.detach().float()
        if not trainer_divides_loss_by_ga(self, num_items_in_batch):
            gt_mean = gt_mean * gradient_accumulation_steps(self)
        self._distillation_metrics = {"distill_loss": per_example.detach().mean(), "gt_loss": gt_mean}
        loss = loss.to(gt.dtype)
        return (loss, outputs) if return_outputs else loss

    def _normalized(self, per_example, num_items_in_batch):
        """The batch's distillation term, scaled as the Trainer scales its own loss of the labels: the micro-batch
        mean when the Trainer divides by the accumulation steps, else the sum over `num_items_in_batch` (times the
        process count with `average_tokens_across_devices`)."""
        if trainer_divides_loss_by_ga(self, num_items_in_batch):
            return per_example.mean()
        if num_items_in_batch is None:  # a compute_loss_func without a count: one share of the update
            return per_example.mean() / gradient_accumulation_steps(self)
        total = per_example.sum() / num_items_in_batch
        if self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func):
            total = total * self.accelerator.num_processes
        return total

    def technique_metrics(self) -> dict[str, float]:
        metrics = dict(super().technique_metrics())
        if self.distillation_round is not None:
            metrics[f"{METRIC_PREFIX}round"] = self.distillation_round
        if self._distillation_metrics:
            import torch

            values = torch.stack([value.float().reshape(()) for value in self._distillation_metrics.values()])
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            for name, value in zip(self._distillation_metrics, values.tolist()):
                metrics[f"{METRIC_PREFIX}{name}"] = value
        return metrics

    def technique_use(self):
        from ..hub import TechniqueUse

        settings = {"mixin": "DistillationTrainerMixin", **asdict(self.distillation_config)}
        if self.teacher is not None:
            settings["teacher"] = type(self.teacher).__name__
        if self.distillation_round is not None:
            settings["round"] = self.distillation_round
        return TechniqueUse("self_distillation", settings)

    def technique_uses(self) -> list:
        return super().technique_uses() + [self.technique_use()]


SelfDistillationTrainerMixin = DistillationTrainerMixin
"""The spec's name of `DistillationTrainerMixin` (the same class)."""


def _is_module(value) -> bool:
    import torch

    return isinstance(value, torch.nn.Module)


def add_teacher_logits(dataset, teacher, *, batch_size: int = 64, device=None, column: str = TEACHER_LOGITS_COLUMN):
    """`dataset` with a column of the frozen `teacher`'s logits on its (un-augmented) examples, for
    `targets="precomputed"`: the theory's targets, predictions at the training points."""
    import torch

    from .functional import freeze_teacher

    freeze_teacher(teacher, device)
    parameter = next(teacher.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    formatted = dataset.with_format("torch")
    inputs = [name for name in formatted.column_names if name not in ("labels", column)]
    logits = []
    with torch.no_grad():
        for start in range(0, len(formatted), batch_size):
            batch = formatted[start:start + batch_size]
            logits.append(teacher_logits_of(teacher, {name: batch[name].to(device) for name in inputs}).float().cpu())
    values = torch.cat(logits).numpy()
    return dataset.add_column(column, list(values))
