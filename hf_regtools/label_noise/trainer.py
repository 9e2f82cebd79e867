"""Trainer adapters of label-noise SGD: `label_noise_loss(...)` for `Trainer(compute_loss_func=...)` and
`LabelNoiseTrainerMixin`.

Both only decide which rows of which step a micro-batch holds; the noise and the loss are
`hf_regtools.label_noise.functional`. A micro-batch's rows in the step's global batch follow Accelerate's sharding
(process `r` of `W` gets batch `m * W + r` of the sampler's batches at micro-batch `m`): row
`(m * W + r) * B + i` of `G * W * B` rows, with `B = args.train_batch_size`, `G` the accumulation steps. So 1 process
with batch 8, 2 processes with batch 4 and batch 4 with 2 accumulation steps draw the same noise for the same example,
and a resumed run the same noise as the uninterrupted one (the step comes from `state.global_step`).
"""

from __future__ import annotations

import torch

from ..trainer import RegtoolsTrainerMixin, TechniqueMetricsCallback
from .functional import LabelNoiseConfig, label_noise_loss_value

METRIC_PREFIX = "hf_regtools/label_noise/"

NOT_A_CALLBACK = (
    "label_noise_loss: the loss was called in training without having seen the start of training. Pass it to the "
    "Trainer twice, `Trainer(compute_loss_func=loss, callbacks=[loss])` (it reads the step and the process from the "
    "callback events), or use `class T(LabelNoiseTrainerMixin, Trainer)`."
)


class LabelNoiseLoss(TechniqueMetricsCallback):
    """`compute_loss_func` of label-noise SGD, and the callback that tells it the step: pass it as both.

    Called as `loss(outputs, labels, num_items_in_batch=None)`. In training (gradients enabled, between
    `on_train_begin` and `on_train_end`) it draws the noise of the current step for the micro-batch's rows; otherwise
    (evaluation runs under `no_grad`) it computes the same loss on the clean labels. It holds no state beyond the
    current step, which resuming recomputes, so it is not an `ExportableState`.

    In a custom loop, call `label_noise_loss_value(outputs, labels, config, seed=..., step=..., offset=..., total=...)`
    with your step and the rows of your micro-batch in the step's global batch.
    """

    def __init__(self, config: LabelNoiseConfig):
        self.config = LabelNoiseConfig.from_value(config)
        self.training = False
        self.model_training: bool | None = None  # set by LabelNoiseTrainerMixin for each compute_loss
        self.step = self.micro_batch = 0
        self.seed = self.config.seed if self.config.seed is not None else 0
        self.batch_size, self.world_size, self.rank, self.accumulation = 1, 1, 0, 1

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        self.seed = self.config.seed if self.config.seed is not None else args.seed
        self.batch_size, self.world_size = args.train_batch_size, max(1, args.world_size)
        self.rank, self.accumulation = args.process_index, args.gradient_accumulation_steps
        self.step, self.micro_batch = state.global_step, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step, self.micro_batch = state.global_step, 0

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def rows(self, n: int) -> tuple[int, int]:
        """`(offset, total)` of the next training micro-batch of `n` examples in the current step's global batch."""
        if n > self.batch_size:
            raise ValueError(f"a micro-batch of {n} examples exceeds the batch size {self.batch_size}")
        total = self.accumulation * self.world_size * self.batch_size
        index = self.micro_batch * self.world_size + self.rank
        if index * self.batch_size + n > total:
            raise ValueError(f"more than {self.accumulation} micro-batches in step {self.step}: the step's rows are "
                             f"exhausted (gradient_accumulation_steps={self.accumulation})")
        return index * self.batch_size, total

    def __call__(self, outputs, labels, num_items_in_batch=None):
        noisy = self.model_training if self.model_training is not None else torch.is_grad_enabled()
        if noisy and not self.training:
            raise RuntimeError(NOT_A_CALLBACK)
        if labels is None:
            raise ValueError("label_noise_loss got no labels: the Trainer drops the 'labels' column when the model's "
                             "forward takes no `labels`; set TrainingArguments(label_names=['labels']) (or "
                             "remove_unused_columns=False), or use LabelNoiseTrainerMixin, which does")
        offset = total = None
        if noisy:
            offset, total = self.rows(labels.shape[0])
            self.micro_batch += 1
        return label_noise_loss_value(outputs, labels, self.config, seed=self.seed, step=self.step,
                                      offset=offset or 0, total=total, num_items_in_batch=num_items_in_batch,
                                      noisy=noisy)

    def metrics(self) -> dict[str, float]:
        scale = "p" if self.config.kind == "flip" else "sigma"
        return {METRIC_PREFIX + scale: float(getattr(self.config, scale))}

    def technique_use(self):
        from ..hub import TechniqueUse

        return TechniqueUse("label_noise", self.config.to_dict())


def label_noise_loss(kind: str, *, sigma: float | None = None, p: float | None = None,
                     num_classes: int | None = None, noise: str = "rademacher",
                     seed: int | None = None) -> LabelNoiseLoss:
    """A `compute_loss_func` that trains on labels perturbed afresh at every step (label-noise SGD).

    Pass the result both as the loss and as a callback:

    ```py
    loss = label_noise_loss("flip", p=0.2, num_classes=10)
    trainer = Trainer(model, args, train_dataset=train, compute_loss_func=loss, callbacks=[loss])
    ```

    Args:
        kind (`str`): `"regression"` (`0.5 (f - y - eps)^2`), `"flip"` (cross-entropy, each label replaced by a
            uniform class with probability `p`) or `"soft_mse"` (`0.5 ||logits - one_hot(y) - eps||^2`).
        sigma (`float`): noise scale of `regression` and `soft_mse` (no default).
        p (`float`): replacement probability of `flip` (no default).
        num_classes (`int`): for `flip` and `soft_mse`.
        noise (`str`, *optional*, defaults to `"rademacher"`): eps in {-1, +1} (the paper's form) or `"gaussian"`.
        seed (`int`, *optional*): seed of the noise; defaults to `TrainingArguments.seed`.

    The loss is normalised by `num_items_in_batch` (labels other than -100 over the accumulated batch of all
    processes), as the Trainer expects of a `compute_loss_func`; evaluation computes it on the clean labels.
    """
    return LabelNoiseLoss(LabelNoiseConfig(kind=kind, sigma=sigma, p=p, num_classes=num_classes, noise=noise,
                                           seed=seed))


class LabelNoiseTrainerMixin(RegtoolsTrainerMixin):
    """Trainer mixin for label-noise SGD (Damian, Ma and Lee, NeurIPS 2021): `class T(LabelNoiseTrainerMixin, Trainer)`.

    Args (keyword, to the Trainer's constructor):
        label_noise (`LabelNoiseConfig` or `dict`): the settings of `label_noise_loss` (`kind` and its `sigma` or
            `p`, `num_classes`, `noise`, `seed`).

    The mixin installs a `LabelNoiseLoss` as the Trainer's `compute_loss_func` and as a callback, and adds noise only
    while the model is in training mode (`model.training`), whatever the autograd mode. The model's outputs may be
    a tensor, a tuple (logits first) or a dict / `ModelOutput` with `logits`; labels are taken from the batch, so the
    model's own loss is never computed; a model whose forward takes no `labels` still gets its batch's `labels`
    column to the loss (the mixin sets the Trainer's `label_names` to `["labels"]` unless `TrainingArguments` name
    them).
    """

    def __init__(self, *args, label_noise=None, **kwargs):
        if label_noise is None:
            raise ValueError("LabelNoiseTrainerMixin needs label_noise={'kind': ..., 'sigma' or 'p': ...}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("LabelNoiseTrainerMixin sets compute_loss_func itself; do not pass one")
        self.label_noise = LabelNoiseLoss(LabelNoiseConfig.from_value(label_noise))
        super().__init__(*args, compute_loss_func=self.label_noise, **kwargs)
        self.add_callback(self.label_noise)
        if self.args.label_names is None and "labels" not in self.label_names:
            self.label_names = ["labels"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.label_noise.model_training = model.training
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self.label_noise.model_training = None
