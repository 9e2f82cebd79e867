"""Functional core of label-noise SGD (Damian, Ma and Lee, NeurIPS 2021): noisy targets and the loss on them.

The noise of a training step is a pure function of `(seed, step)` and of an example's row in the step's global batch
(all gradient-accumulation micro-batches of all processes, in the order the data loader hands them out), so a resumed
run, any process count and any split into micro-batches draw the same noise for the same example. Labels equal to
`IGNORE_INDEX` (-100, padding) are never altered and never count in the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .._trainer_utils import config_from_value

IGNORE_INDEX = -100
KINDS = ("regression", "flip", "soft_mse")
NOISES = ("rademacher", "gaussian")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class LabelNoiseConfig:
    """Settings of label-noise SGD (`label_noise_loss(...)`, `LabelNoiseTrainerMixin(label_noise=...)`)."""

    kind: str = field(metadata={"help": f"one of {KINDS}: square loss on y + eps; cross-entropy on labels replaced "
                                        "by a uniform class with probability p; square loss on one_hot(y) + eps"})
    sigma: float | None = field(default=None, metadata={"help": "noise scale (regression, soft_mse); no default"})
    p: float | None = field(default=None, metadata={"help": "replacement probability (flip); no default"})
    num_classes: int | None = field(default=None, metadata={"help": "number of classes (flip, soft_mse)"})
    noise: str = field(default="rademacher", metadata={"help": f"distribution of eps: one of {NOISES} (+-sigma or "
                                                               "N(0, sigma^2))"})
    seed: int | None = field(default=None, metadata={"help": "seed of the noise; None: TrainingArguments.seed"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"label noise kind={self.kind!r}; allowed: {KINDS}")
        if self.noise not in NOISES:
            raise ValueError(f"label noise noise={self.noise!r}; allowed: {NOISES}")
        needs_sigma, needs_classes = self.kind in ("regression", "soft_mse"), self.kind in ("flip", "soft_mse")
        if needs_sigma and (self.sigma is None or not self.sigma >= 0):
            raise ValueError(f"label noise kind={self.kind!r} needs sigma >= 0 (there is no default), got {self.sigma}")
        if not needs_sigma and self.sigma is not None:
            raise ValueError(f"label noise kind={self.kind!r} takes p, not sigma (got sigma={self.sigma})")
        if self.kind == "flip" and (self.p is None or not 0 <= self.p <= 1):
            raise ValueError(f"label noise kind='flip' needs 0 <= p <= 1 (there is no default), got p={self.p}")
        if self.kind != "flip" and self.p is not None:
            raise ValueError(f"label noise kind={self.kind!r} takes sigma, not p (got p={self.p})")
        if needs_classes and (self.num_classes is None or self.num_classes < 2):
            raise ValueError(f"label noise kind={self.kind!r} needs num_classes >= 2, got {self.num_classes}")

    @classmethod
    def from_value(cls, value) -> LabelNoiseConfig:
        return config_from_value(cls, value, "label_noise")

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The torch generator of training step `step`: seeded by a hash of `(seed, step)`, on `device`."""
    key = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(key)


def _eps(noise: str, shape, generator, device, dtype) -> torch.Tensor:
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype).mul_(2).sub_(1)


def noisy_targets(labels: torch.Tensor, config: LabelNoiseConfig, *, seed: int, step: int, offset: int = 0,
                  total: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The targets of `labels` (rows `offset ... offset + len(labels)` of step `step`'s global batch of `total` rows).

    - `regression`: `labels + sigma * eps` (float), eps in {-1, +1} (`rademacher`) or N(0, 1) (`gaussian`);
    - `flip`: each label replaced, with probability `p`, by a class drawn uniformly from `range(num_classes)` (which
      may be the label itself, so `E[one_hot(y')] = (1 - p) one_hot(y) + p / K`);
    - `soft_mse`: `one_hot(labels) + sigma * eps`, shape `labels.shape + (num_classes,)`.

    Entries equal to -100 stay -100 (`soft_mse`: their rows are returned as they are drawn and must be masked, as
    `label_noise_loss_value` does). `total` (default: `len(labels)`) is the number of rows of the step's global batch;
    the noise of every row is drawn and this slice taken, so the noise of a row depends on `(seed, step, row)` only.
    """
    n = labels.shape[0]
    total = n if total is None else total
    if offset < 0 or offset + n > total:
        raise ValueError(f"rows {offset}..{offset + n} do not fit in a global batch of {total} rows")
    generator = step_generator(seed, step, labels.device)
    shape, rows = (total, *labels.shape[1:]), slice(offset, offset + n)
    valid = labels != IGNORE_INDEX
    if config.kind == "regression":
        dtype = dtype or (labels.dtype if labels.is_floating_point() else torch.get_default_dtype())
        eps = _eps(config.noise, shape, generator, labels.device, dtype)[rows]
        return torch.where(valid, labels.to(dtype) + config.sigma * eps, labels.to(dtype))
    if config.kind == "flip":
        _check_classes(labels, valid, config.num_classes)
        flip = torch.rand(shape, generator=generator, device=labels.device)[rows] < config.p
        random_class = torch.randint(0, config.num_classes, shape, generator=generator, device=labels.device)[rows]
        return torch.where(flip & valid, random_class.to(labels.dtype), labels)
    _check_classes(labels, valid, config.num_classes)
    dtype = dtype or torch.get_default_dtype()
    eps = _eps(config.noise, (*shape, config.num_classes), generator, labels.device, dtype)[rows]
    return one_hot_targets(labels, config.num_classes, dtype) + config.sigma * eps


def one_hot_targets(labels: torch.Tensor, num_classes: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`one_hot(labels)` as floats (rows of -100 are all zeros)."""
    valid = labels != IGNORE_INDEX
    hot = torch.nn.functional.one_hot(torch.where(valid, labels, 0).long(), num_classes)
    return (hot * valid.unsqueeze(-1)).to(dtype or torch.get_default_dtype())


def _check_classes(labels, valid, num_classes):
    if labels.is_floating_point():
        raise ValueError(f"class labels must be integers, got {labels.dtype} (use kind='regression' for real targets)")
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"labels {labels[bad].unique().tolist()[:5]} are outside range(num_classes={num_classes})")


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _predictions(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):  # also transformers' ModelOutput
        if "logits" not in outputs:
            raise ValueError(f"the model's outputs have no 'logits' (keys: {list(outputs)}); return them as "
                             "'logits', or call label_noise_loss_value on your predictions")
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    raise TypeError(f"cannot read predictions from model outputs of type {type(outputs).__name__}")


def label_noise_loss_value(outputs, labels: torch.Tensor, config: LabelNoiseConfig, *, seed: int = 0, step: int = 0,
                           offset: int = 0, total: int | None = None, num_items_in_batch=None,
                           noisy: bool = True) -> torch.Tensor:
    """The loss of `outputs` (a tensor, or model outputs with `logits`) on noisy (or, `noisy=False`, clean) targets.

    `regression`: `0.5 * sum (f - y')^2`; `flip`: `sum CE(logits, y')`; `soft_mse`: `0.5 * sum ||logits - y'||^2`,
    over the entries whose label is not -100, divided by `num_items_in_batch` (the Trainer's count of such labels over
    the whole accumulated batch of all processes) or, when it is `None`, by their number here.
    """
    predictions = _predictions(outputs)
    valid = labels != IGNORE_INDEX
    denominator = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
    if config.kind == "regression":
        if predictions.shape != labels.shape:
            if predictions.numel() != labels.numel():
                raise ValueError(f"regression predictions of shape {tuple(predictions.shape)} do not match labels of "
                                 f"shape {tuple(labels.shape)}")
            predictions = predictions.reshape(labels.shape)
        predictions = _full_precision(predictions)
        targets = noisy_targets(labels, config, seed=seed, step=step, offset=offset, total=total,
                                dtype=predictions.dtype) if noisy else labels.to(predictions.dtype)
        loss = 0.5 * ((predictions - targets) ** 2 * valid).sum()
    elif predictions.shape[:-1] != labels.shape or predictions.shape[-1] != config.num_classes:
        raise ValueError(f"logits of shape {tuple(predictions.shape)} do not match labels of shape "
                         f"{tuple(labels.shape)} with num_classes={config.num_classes} (labels must be aligned with "
                         "the logits; shift them before for causal language models)")
    elif config.kind == "flip":
        targets = noisy_targets(labels, config, seed=seed, step=step, offset=offset, total=total) if noisy else labels
        loss = torch.nn.functional.cross_entropy(_full_precision(predictions.reshape(-1, config.num_classes)),
                                                 targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        predictions = _full_precision(predictions)
        targets = noisy_targets(labels, config, seed=seed, step=step, offset=offset, total=total,
                                dtype=predictions.dtype) if noisy else one_hot_targets(labels, config.num_classes,
                                                                                       predictions.dtype)
        loss = 0.5 * (((predictions - targets) ** 2).sum(-1) * valid).sum()
    return loss / denominator
