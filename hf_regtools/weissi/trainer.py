"""Trainer integration of WEISSI: a mixin that adds `coefficient(progress) * R(theta)` to the training loss and keeps
weight decay off the regularized weights.

Built on `hf_regtools.trainer.LossTermTrainerMixin`: the penalty is computed in fp32 outside autocast (also under
bf16/fp16 mixed precision), added once per optimizer step under gradient accumulation, and its parts are logged as
`hf_regtools/weissi/{penalty,log_norm_sum,l1_direction,coefficient}`. The structure (which layers and residual blocks)
is found once, when the Trainer is built.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field

from .._trainer_utils import config_from_value, unwrap_optimizer
from ..schedules import COEFFICIENT_KINDS, coefficient_schedule
from ..trainer import LossTermTrainerMixin
from .core import BN_MODES, NORMS, WeissiRegularizer, managed_parameter_names

METRIC_PREFIX = "hf_regtools/weissi/"
STATE_FILE = "weissi_state.pt"

WEIGHT_DECAY_WARNING = (
    "WeissiTrainerMixin: {count} of {total} weights WEISSI regularizes (e.g. {example}) are in optimizer parameter "
    "groups with weight_decay > 0. WEISSI replaces weight decay on them (decay is not invariant to weight scale "
    "shifts). Let the Trainer build the optimizer (the mixin filters get_decay_parameter_names), or build it from "
    "weissi_param_groups(model, weight_decay)."
)


@dataclass
class WeissiConfig:
    """Settings of `WeissiTrainerMixin` (`weissi=WeissiConfig(...)` or the same keys as a dict)."""

    lambda1: float = field(metadata={"help": "coefficient of the log-norm part (no paper value is verified)"})
    lambda2: float = field(metadata={"help": "coefficient of the L1 part on weight directions"})
    norm: str = field(default="fro", metadata={"help": f"layer norm: one of {NORMS}"})
    layers: list[str] | None = field(default=None, metadata={"help": "chain layers (module names) instead of "
                                                                     "discovery"})
    residual_blocks: list | None = field(default=None, metadata={
        "help": "residual blocks: lists of branch module names, or {'branch': [...], 'shortcut': name}"})
    bn: str = field(default="exclude", metadata={"help": f"weights feeding a BatchNorm: one of {BN_MODES}"})
    include_classifier: bool = field(default=True, metadata={"help": "regularize the last weight layer too"})
    power_iterations: int = field(default=1, metadata={"help": "power iterations per step for norm='spectral'"})
    schedule: str = field(default="constant", metadata={"help": f"coefficient schedule: one of {COEFFICIENT_KINDS}"})
    warmup: float = field(default=0.0, metadata={"help": "fraction of training over which the coefficient ramps "
                                                         "up from 0"})

    def __post_init__(self):
        coefficient_schedule(0.0, kind=self.schedule, warmup=self.warmup)

    @classmethod
    def from_value(cls, value) -> WeissiConfig:
        return config_from_value(cls, value, "weissi")


class WeissiTrainerMixin(LossTermTrainerMixin):
    """Trainer mixin for WEISSI (Liu, Cui and Chan, arXiv:2008.02965): `loss + coefficient * R(theta)`, no weight
    decay on the regularized weights.

    Args (keyword, to the Trainer's constructor):
        weissi (`WeissiConfig` or `dict`): the settings; `lambda1` and `lambda2` are required.

    The coefficient is `coefficient_schedule(global_step / max_steps, kind=schedule, warmup=warmup)` (1 for the
    default constant schedule). `get_decay_parameter_names` leaves the regularized weights out, so the optimizer the
    Trainer builds does not decay them; when the optimizer comes from elsewhere and still decays them, training warns
    once. With `norm="spectral"` the power-iteration vectors are saved in each checkpoint (`weissi_state.pt`) and
    restored on resume. In a custom loop: `loss = loss + WeissiRegularizer(model, ...)()` (see
    `hf_regtools.weissi.core`).

    Example:

    ```py
    class MyTrainer(WeissiTrainerMixin, Trainer):
        pass

    trainer = MyTrainer(model, TrainingArguments("out", weight_decay=5e-4), train_dataset=train,
                        weissi={"lambda1": 1e-3, "lambda2": 1e-5})
    ```
    """

    def __init__(self, *args, weissi=None, **kwargs):
        if weissi is None:
            raise ValueError("WeissiTrainerMixin needs weissi={'lambda1': ..., 'lambda2': ...} (or a WeissiConfig)")
        self.weissi_config = WeissiConfig.from_value(weissi)
        super().__init__(*args, **kwargs)
        if getattr(self.args, "fsdp", None):
            raise ValueError("WeissiTrainerMixin does not support FSDP: parameters are sharded, so the layer norms "
                             "would be wrong. Train with DDP (parameters replicated).")
        config = self.weissi_config
        self.weissi_regularizer = WeissiRegularizer(
            self.model, lambda1=config.lambda1, lambda2=config.lambda2, norm=config.norm, layers=config.layers,
            residual_blocks=config.residual_blocks, bn=config.bn, include_classifier=config.include_classifier,
            power_iterations=config.power_iterations)
        self._checked_decay = False

    def get_decay_parameter_names(self, model) -> list[str]:
        managed = managed_parameter_names(model, self.weissi_regularizer)
        return [name for name in super().get_decay_parameter_names(model) if name not in managed]

    def weissi_coefficient(self) -> float:
        state = self.state
        progress = state.global_step / state.max_steps if state.max_steps else 0.0
        return coefficient_schedule(progress, kind=self.weissi_config.schedule, warmup=self.weissi_config.warmup)

    def loss_term(self, model):
        if not self._checked_decay:
            self._warn_if_decayed(model)
        coefficient = self.weissi_coefficient()
        return self._term(coefficient, self.weissi_regularizer.terms())

    def adds_term_gradient(self) -> bool:
        """The Frobenius-norm penalty's gradient is added in place (`WeissiRegularizer.add_gradient_`), without a
        second set of gradient tensors; the spectral norm and DeepSpeed (gradients not in `.grad`) go through
        autograd."""
        return self.weissi_regularizer.norm == "fro" and not getattr(self, "is_deepspeed_enabled", False)

    def add_term_gradient_(self, model, scale: float):
        if not self._checked_decay:
            self._warn_if_decayed(model)
        coefficient = self.weissi_coefficient()
        return self._term(coefficient, self.weissi_regularizer.add_gradient_(coefficient * scale))

    @staticmethod
    def _term(coefficient: float, terms: dict) -> tuple:
        metrics = {f"{METRIC_PREFIX}{name}": value.detach() for name, value in terms.items()}
        metrics[f"{METRIC_PREFIX}coefficient"] = coefficient
        return coefficient * terms["penalty"], metrics

    def technique_metrics(self) -> dict[str, float]:
        """The latest micro-batch's penalty parts as floats (kept as tensors until logged: no device sync per
        step)."""
        return {name: value.item() if hasattr(value, "item") else value
                for name, value in super().technique_metrics().items()}

    def _warn_if_decayed(self, model) -> None:
        self._checked_decay = True
        optimizer = unwrap_optimizer(self.optimizer) if self.optimizer is not None else None
        if optimizer is None:
            return
        managed = {id(weight) for weight in self.weissi_regularizer.weights}
        decayed = {id(p) for group in optimizer.param_groups if group.get("weight_decay", 0) > 0
                   for p in group["params"] if id(p) in managed}
        if decayed:
            names = sorted(name for name, p in model.named_parameters() if id(p) in decayed)
            warnings.warn(WEIGHT_DECAY_WARNING.format(count=len(decayed), total=len(managed), example=names[0]),
                          UserWarning, stacklevel=3)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._checked_decay = False
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)) and os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
            import torch

            saved = torch.load(os.path.join(checkpoint, STATE_FILE), map_location="cpu", weights_only=True)
            device = self.weissi_regularizer.weights[0].device
            self.weissi_regularizer.state = {name: vector.to(device) for name, vector in saved.items()}
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        state = self.weissi_regularizer.state
        if state and _internal_call and output_dir is not None and self.args.should_save and \
                os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
            import torch

            torch.save({name: vector.cpu() for name, vector in state.items()}, os.path.join(output_dir, STATE_FILE))

    def technique_use(self):
        from ..hub import TechniqueUse

        settings = {key: value for key, value in asdict(self.weissi_config).items() if value is not None}
        return TechniqueUse("weissi", {"mixin": "WeissiTrainerMixin", **settings})
