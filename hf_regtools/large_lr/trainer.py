"""Trainer adapters of the large-initial-learning-rate technique: a scheduler mixin, the patch transform for
`datasets.Dataset.set_transform` with its epoch callback, and the annealed activation-noise callback."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import TrainerCallback

from .._trainer_utils import updates_per_epoch
from ..trainer import RegtoolsTrainerMixin, TechniqueMetricsCallback
from .functional import (activation_noise, apply_patch, large_initial_lr_lambda, noise_generator, noise_level, patch_draws,
                         patch_pattern)


class LargeLRTrainerMixin(RegtoolsTrainerMixin):
    """`class T(LargeLRTrainerMixin, Trainer)`: `create_scheduler` builds the `large_initial_lr_lambda` schedule from
    `large_lr={...}` (its keyword arguments: `schedule`, `milestones`, `factors`, `unit`, `one_based`) with the
    Trainer's updates per epoch and total steps; a pure function of the step, so resuming restores it. The peak
    learning rate is `TrainingArguments.learning_rate`; `warmup_steps` must be 0."""

    def __init__(self, *args, large_lr: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.large_lr = dict(large_lr or {})
        unknown = set(self.large_lr) - {"schedule", "milestones", "factors", "unit", "one_based"}
        if unknown:
            raise ValueError(f"unknown large_lr settings {sorted(unknown)}; use schedule, milestones, factors, unit, "
                             "one_based")
        if getattr(self.args, "warmup_steps", 0) or getattr(self.args, "warmup_ratio", 0):
            raise ValueError("LargeLRTrainerMixin sets the whole schedule: set warmup_steps=0 and warmup_ratio=0")
        large_initial_lr_lambda(1, total_steps=1, **self.large_lr)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        from torch.optim.lr_scheduler import LambdaLR

        steps = updates_per_epoch(len(self.get_train_dataloader()), self.args.gradient_accumulation_steps)
        self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer,
                                     large_initial_lr_lambda(steps, total_steps=num_training_steps, **self.large_lr))
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def technique_metrics(self) -> dict[str, float]:
        metrics = super().technique_metrics()
        if self.lr_scheduler is not None:
            metrics["hf_regtools/large_lr/lr_factor"] = float(self.lr_scheduler.lr_lambdas[0](self.state.global_step))
        return metrics


class PatchTransform:
    """The class-dependent patch of the CIFAR-10 diagnostic as a `datasets.Dataset.set_transform` function.

    A fixed share `prop` of the examples (by index) is patched; each access of a patched example writes `z + s *
    zeta[y]` into the centre region (sign `s = +-1`), or with probability `patch_only_prob` zeroes the image and writes
    `z + s * a * zeta[y]`, `a ~ U(0, patch_only_scale)`. Draws are keyed by `(seed, epoch, index)`: the dataset needs
    an index column (`index_column`), and `PatchEpochCallback` sets the epoch. Images are expected normalised.

    Args:
        num_classes, patch, channels: the pattern's shape (`patch_pattern`).
        z_scale, sep, num_patterns: the pattern (official 1.25, 0.1, 1).
        patch_only_prob, patch_only_scale, prop: the mix (official 0.2, 1.75, 0.8).
        seed (`int`, defaults to 2): the pattern's and the draws' seed.
        loc (`str`, defaults to `"center"`): `"center"` or `"corner"`.
        image_column, label_column, index_column: column names; `return_kind` adds `patch_kind` (0, 1, 2).
    """

    def __init__(self, num_classes: int = 10, patch: int = 7, channels: int = 3, *, z_scale: float = 1.25,
                 sep: float = 0.1, num_patterns: int = 1, patch_only_prob: float = 0.2, patch_only_scale: float = 1.75,
                 prop: float = 0.8, seed: int = 2, loc: str = "center", image_column: str = "pixel_values",
                 label_column: str = "labels", index_column: str = "idx", return_kind: bool = False):
        for name, value in (("patch_only_prob", patch_only_prob), ("prop", prop)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {value}")
        if patch_only_scale < 0:
            raise ValueError(f"patch_only_scale must be >= 0, got {patch_only_scale}")
        self.z, self.zeta = patch_pattern(num_classes, patch, channels, z_scale=z_scale, sep=sep,
                                          num_patterns=num_patterns, seed=seed)
        self.draw_kwargs = dict(seed=seed, prop=prop, patch_only_prob=patch_only_prob,
                                patch_only_scale=patch_only_scale, num_patterns=num_patterns)
        self.loc, self.epoch, self.return_kind = loc, 0, return_kind
        self.image_column, self.label_column, self.index_column = image_column, label_column, index_column

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def patch(self, images: torch.Tensor, labels, indices, epoch: int | None = None, **overrides):
        """`(patched images, kinds)` for tensors; `overrides` replace draw settings (e.g. `prop=1.0`)."""
        draws = patch_draws(indices, self.epoch if epoch is None else epoch, **{**self.draw_kwargs, **overrides})
        return apply_patch(images, labels, draws, self.z, self.zeta, self.loc), torch.as_tensor(draws.kind)

    def __call__(self, batch: dict) -> dict:
        for column in (self.image_column, self.label_column, self.index_column):
            if column not in batch:
                raise ValueError(f"PatchTransform needs the column {column!r}; add an index column with "
                                 "dataset.map(lambda _, i: {'idx': i}, with_indices=True)" if column == self.index_column
                                 else f"PatchTransform needs the column {column!r}, got {sorted(batch)}")
        images = torch.stack([torch.as_tensor(np.asarray(image), dtype=torch.float32)
                              for image in batch[self.image_column]])
        patched, kind = self.patch(images, torch.as_tensor(np.asarray(batch[self.label_column])),
                                   [int(i) for i in batch[self.index_column]])
        out = {self.image_column: patched, self.label_column: torch.as_tensor(np.asarray(batch[self.label_column]))}
        if self.return_kind:
            out["patch_kind"] = kind
        return out


def patch_only_eval_set(transform: PatchTransform, n: int = 1000, image_shape: Sequence[int] = (3, 32, 32),
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `TransformOnlyDataset`: `n` all-zero images with uniform random labels (seeded), each carrying
    the patch of its label through `transform` (every image patched). Returns `(images, labels)`."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, transform.zeta.shape[0], (n,), generator=generator)
    images, _ = transform.patch(torch.zeros(n, *image_shape), labels, range(n), epoch=10 ** 6 + seed, prop=1.0)
    return images, labels


class PatchEpochCallback(TrainerCallback):
    """Sets `PatchTransform.set_epoch` at each epoch start (the floor of `state.epoch`, also when resuming)."""

    def __init__(self, transform: PatchTransform):
        self.transform = transform

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.set_epoch(math.floor((state.epoch or 0) + 1e-6))


class ActivationNoise:
    """Forward hooks adding `level * N(0, 1)` to the outputs of `sites` in training mode only.

    Args:
        model (`torch.nn.Module`): the model.
        std (`float`, defaults to 0.4): the initial level (`set_level` changes it).
        sites (`str` or `Sequence[str | type]`, defaults to `"batchnorm"`): `"batchnorm"` (every BatchNorm output:
            before the ReLU in pre-activation ResNets, as the official WideResNet `forward_noise`), or module classes
            and name suffixes (e.g. `("intermediate.dense", "mlp.fc1")` for the pre-GELU layer of ViT/BERT across transformers versions).
        shared (`bool`, defaults to `True`): one map broadcast over the batch (and channels), as the official code;
            its draw is the same in every process. `False`: per element, also keyed by the process rank.
        seed (`int`, defaults to 0): the noise seed; the draw of each forward is keyed by `(seed, step, rank, call)`.
    """

    def __init__(self, model: torch.nn.Module, std: float = 0.4, sites="batchnorm", shared: bool = True,
                 seed: int = 0, rank: int = 0):
        self.level, self.shared, self.seed, self.rank = float(std), shared, seed, rank
        self.step, self.call = 0, 0
        modules = self._sites(model, sites)
        if not modules:
            raise ValueError(f"no module of {type(model).__name__} matches the noise sites {sites!r}; pass module "
                             "classes or name suffixes, e.g. sites=('intermediate.dense',)")
        self.handles = [module.register_forward_hook(self._hook) for _, module in modules]

    @staticmethod
    def _sites(model, sites):
        if sites == "batchnorm":
            sites = (torch.nn.modules.batchnorm._BatchNorm,)
        if isinstance(sites, (str, type)):
            sites = (sites,)
        return [(name, module) for name, module in model.named_modules()
                if any(isinstance(module, s) if isinstance(s, type) else name.endswith(s) for s in sites)]

    def set_step(self, step: int) -> None:
        self.step, self.call = int(step), 0

    def set_level(self, level: float) -> None:
        self.level = float(level)

    def _hook(self, module, inputs, output):
        if not module.training or self.level == 0 or not torch.is_tensor(output):
            return None
        generator = noise_generator(self.seed, self.step, 0 if self.shared else self.rank, self.call)
        self.call += 1
        return activation_noise(output, self.level, generator, self.shared)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@dataclass
class _NoiseSettings:
    std: float
    anneal: tuple
    factor: float
    unit: str
    one_based: bool


class ActivationNoiseCallback(TechniqueMetricsCallback):
    """Annealed pre-activation noise (the official `step_early`): `ActivationNoise` hooks on the model from
    `on_train_begin`, level `std` times `factor` from the anneal milestone(s) (1-based epoch 30 by default), set at
    every step from `state.global_step` (no stored state: resuming draws the same noise)."""

    def __init__(self, std: float = 0.4, anneal: Sequence[float] = (30,), factor: float = 1e-5, *,
                 unit: str = "epochs", one_based: bool = True, sites="batchnorm", shared: bool = True, seed: int = 0):
        self.settings = _NoiseSettings(float(std), tuple(anneal), float(factor), unit, one_based)
        self.sites, self.shared, self.seed = sites, shared, seed
        noise_level(0, std=std, steps_per_epoch=1, anneal=anneal, factor=factor, unit=unit, one_based=one_based,
                    total_steps=1)
        self.noise, self._steps_per_epoch, self._total = None, None, None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.noise is not None:
            self.noise.remove()
        self.noise = ActivationNoise(model, self.settings.std, self.sites, self.shared, self.seed,
                                     rank=args.process_index)
        batches = len(train_dataloader) if train_dataloader is not None else 1
        self._steps_per_epoch = updates_per_epoch(batches, args.gradient_accumulation_steps)
        self._total = max(state.max_steps, 1)

    def level(self, step: int) -> float:
        s = self.settings
        return noise_level(step, std=s.std, steps_per_epoch=self._steps_per_epoch, anneal=s.anneal, factor=s.factor,
                           unit=s.unit, one_based=s.one_based, total_steps=self._total)

    def metrics(self) -> dict[str, float]:
        return {} if self.noise is None else {"hf_regtools/large_lr/noise_level": self.noise.level}

    def on_step_begin(self, args, state, control, **kwargs):
        self.noise.set_step(state.global_step)
        self.noise.set_level(self.level(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        if self.noise is not None:
            self.noise.remove()
            self.noise = None
