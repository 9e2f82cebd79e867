"""`AlphaSVRGTrainerMixin`: alpha-SVRG in `transformers.Trainer` (the extra forward/backward needs the batch)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .._compat import gradient_accumulation_steps, trainer_divides_loss_by_ga
from .._trainer_utils import rng_state, set_rng_state
from ..schedules import svrg_alpha_schedule
from ..trainer import RegtoolsTrainerMixin
from .config import AlphaSVRGConfig
from .optimizer import AlphaSVRG

MIN_LOSS_SCALE = 2.0 ** -24


@dataclass
class _CachedStep:
    gradient: torch.Tensor  # flat fp32, averaged across processes
    fingerprints: list[dict[str, torch.Tensor]]


def _batch_size(batch) -> int:
    return len(next(v for v in batch.values() if torch.is_tensor(v)))


def _fingerprint(batch) -> dict[str, torch.Tensor]:
    """Per-sample sums of every tensor in the batch (catches another order, other samples or other augmentations)."""
    return {key: value.detach().reshape(len(value), -1).sum(1, dtype=torch.float64)
            for key, value in batch.items() if torch.is_tensor(value) and value.dim() > 0}


def _same_fingerprint(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in like]), like)]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class AlphaSVRGTrainerMixin(RegtoolsTrainerMixin):
    """alpha-SVRG for your Trainer: `class MyTrainer(AlphaSVRGTrainerMixin, Trainer)`.

    - `create_optimizer` wraps the Trainer's optimizer (AdamW, SGD, ... or yours) in `AlphaSVRG`;
    - at every snapshot refresh (`global_step % snapshot_every == 0`) the snapshot model takes the current parameters
      and `mu`, the mean snapshot gradient over the full batches of the epoch's train data, is computed (all RNG
      states saved and restored, averaged across processes);
    - `mode="snapshot"` (default), every micro-batch: after the normal forward/backward, the RNG is rewound and the
      snapshot computes its gradient on the same inputs with the same dropout masks and the same loss normalisation;
      the RNG is then put back where training left it;
    - `mode="cache"` (the official `Cache_SVRG`, for small models): at each epoch's start one pass of the snapshot over
      the epoch caches every step's gradient (`fill_cache`); training then replays the same batches and RNG stream
      and takes the cached gradients. About 2x the compute of the base optimizer instead of 3x, for steps x model size
      of memory. Needs a reproducible data order (the Trainer's default seedable sampler; no unseeded random
      transforms in the main process): a batch that differs from the cached one raises;
    - `AlphaSVRG.step` adds `alpha_t (mu - acc)` to the (DDP-averaged) gradients and steps the base optimizer;
      `alpha_t` is `svrg_alpha_schedule(global_step)`, logged as `hf_regtools/alpha_svrg/alpha`. When it is 0 the
      snapshot work is skipped.

    Order: the Trainer clips (`max_grad_norm`, default 1.0) *before* the correction; the official code does not clip.
    Set `max_grad_norm=0` for parity, and `AlphaSVRGConfig(clip_norm=...)` to clip the corrected gradient.
    bf16 autocast and fp16 with loss scaling work, with fp32 SVRG buffers: under fp16 the snapshot's gradient is taken
    at the GradScaler's scale and unscaled (a snapshot pass that overflows is repeated at half the scale), and a step
    whose own gradient overflows is skipped by the scaler as usual. In a custom loop, use `AlphaSVRG` directly (see
    its docstring).

    Args:
        alpha_svrg (`AlphaSVRGConfig` or `dict`, *optional*): the settings; every other argument goes to the Trainer.
    """

    def __init__(self, *args, alpha_svrg: AlphaSVRGConfig | dict | None = None, **kwargs):
        config = alpha_svrg or AlphaSVRGConfig()
        self.alpha_svrg = config if isinstance(config, AlphaSVRGConfig) else AlphaSVRGConfig(**config)
        super().__init__(*args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("alpha-SVRG supports DDP and single-device training; FSDP and DeepSpeed shard the "
                             "parameters the snapshot needs")
        self.snapshot_model, self._steps_per_epoch = None, None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._accumulating_for = self._refreshed_at = self._loss_scale = self._replay_dataloader = None
        self._micro_batch, self._cache, self._cache_epoch, self._expected_batches = 0, {}, None, []

    def train(self, *args, **kwargs):
        self._reset_run_state()
        return super().train(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if isinstance(getattr(optimizer, "optimizer", optimizer), AlphaSVRG) and self.snapshot_model is not None:
            return optimizer  # a later train() on the same Trainer: already wrapped (possibly by Accelerate)
        if not isinstance(optimizer, AlphaSVRG):
            optimizer = AlphaSVRG(optimizer, clip_norm=self.alpha_svrg.clip_norm)
        self.optimizer = optimizer
        self.snapshot_model = copy.deepcopy(self.model)
        names = {id(p): name for name, p in self.model.named_parameters()}
        snapshot = dict(self.snapshot_model.named_parameters())
        optimizer.snapshot_parameters = [snapshot[names[id(p)]] for p in optimizer.parameters()]
        optimizer.reduce = self._mean_across_processes
        return optimizer

    @property
    def svrg_optimizer(self) -> AlphaSVRG:
        optimizer = self.optimizer
        return optimizer if isinstance(optimizer, AlphaSVRG) else optimizer.optimizer

    def snapshot_interval(self) -> int:
        """Optimizer steps between snapshot refreshes (at most one epoch)."""
        n = self._update_steps_per_epoch()
        return n if self.alpha_svrg.snapshot_every == "epoch" else min(self.alpha_svrg.snapshot_every, n)

    def alpha_at(self, step: int) -> float:
        epochs = max(math.ceil(self.state.num_train_epochs), 1)
        return svrg_alpha_schedule(step, alpha0=self.alpha_svrg.alpha0, epochs=epochs,
                                   steps_per_epoch=self._update_steps_per_epoch(),
                                   snapshot_every=self.snapshot_interval(), kind=self.alpha_svrg.kind)

    def training_step(self, model, inputs, num_items_in_batch=None):
        optimizer, step = self.svrg_optimizer, self.state.global_step
        if self._accumulating_for != step:
            optimizer.reset_snapshot_gradient()
            optimizer.alpha = self.alpha_at(step)
            self._accumulating_for, self._micro_batch = step, 0
            self._loss_scale = self._current_loss_scale() if optimizer.alpha else None
        if optimizer.alpha == 0.0:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.alpha_svrg.mode == "cache":
            self._take_cached_snapshot_gradient(step, inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            loss = self._training_step_with_snapshot(model, inputs, num_items_in_batch, step)
        self._micro_batch += 1
        return loss

    def _training_step_with_snapshot(self, model, inputs, num_items_in_batch, step: int):
        if self._refresh_due(step):
            self.refresh_snapshot()
            self._refreshed_at = step
        snapshot_inputs = dict(inputs)
        before = rng_state()
        loss = super().training_step(model, inputs, num_items_in_batch)
        after = rng_state()
        set_rng_state(before)
        self.svrg_optimizer.accumulate_snapshot_gradient(
            self._snapshot_gradient([snapshot_inputs], num_items_in_batch, per_update=True))
        set_rng_state(after)
        return loss

    def _refresh_due(self, step: int) -> bool:
        starts_interval = (step % self._update_steps_per_epoch()) % self.snapshot_interval() == 0
        return (starts_interval and self._refreshed_at != step) or self.svrg_optimizer.full_gradient is None

    def _take_snapshot(self) -> None:
        optimizer = self.svrg_optimizer
        with torch.no_grad():
            for snapshot, parameter in zip(optimizer.snapshot_parameters, optimizer.parameters()):
                snapshot.copy_(parameter)
            if self.alpha_svrg.copy_buffers:
                for snapshot, buffer in zip(self.snapshot_model.buffers(), self.model.buffers()):
                    snapshot.copy_(buffer)

    def refresh_snapshot(self) -> None:
        """theta~ <- theta; mu <- mean snapshot gradient over the full batches of the epoch's train data."""
        optimizer = self.svrg_optimizer
        self._take_snapshot()
        saved = rng_state()
        totals = [torch.zeros_like(p, dtype=torch.float32) for p in optimizer.parameters()]
        batches, full_size = 0, None
        for batch in self._replay_epoch(self.state.global_step // self._update_steps_per_epoch())[1]:
            size = _batch_size(batch)
            full_size = full_size or size
            if size < full_size:
                continue
            for total, g in zip(totals, self._snapshot_gradient([batch], None, per_update=False)):
                if g is not None:
                    total.add_(g)
            batches += 1
        set_rng_state(saved)
        optimizer.set_full_gradient(self._mean_across_processes(t / batches) for t in totals)

    def _take_cached_snapshot_gradient(self, step: int, inputs) -> None:
        """Cache mode: hand the step's cached snapshot gradient to the optimizer and check the batch is the cached one."""
        epoch, update = divmod(step, self._update_steps_per_epoch())
        if self._micro_batch == 0:
            if self._cache_epoch != epoch or update not in self._cache:
                self.fill_cache(step)
            cached, optimizer = self._cache.pop(update), self.svrg_optimizer
            optimizer.accumulate_snapshot_gradient(_split(cached.gradient, optimizer.snapshot_gradient), reduced=True)
            self._expected_batches = cached.fingerprints
        expected = self._expected_batches
        if self._micro_batch >= len(expected) or not _same_fingerprint(_fingerprint(inputs),
                                                                        expected[self._micro_batch]):
            raise RuntimeError(
                f"alpha-SVRG cache mode: micro-batch {self._micro_batch} of step {step} is not the batch the cache "
                "pass saw, so the Trainer's data order or augmentation is not reproducible. Keep the seedable sampler "
                "(TrainingArguments(accelerator_config={'use_seedable_sampler': True}), the default), make random "
                "transforms draw from a seeded generator (or the dataloader workers), or use mode='snapshot'")

    def fill_cache(self, step: int) -> None:
        """Cache mode: run the snapshot over the epoch's remaining steps, one fp32 gradient per optimizer step.

        At the epoch's first step this is the refresh: theta~ <- theta, then mu is the mean cached gradient over the
        full steps. The pass replays the Trainer's data order (seedable sampler, `set_epoch`), gradient-accumulation
        grouping, loss normalisation and RNG stream, so training sees the same batches and dropout masks; on a resume
        inside an epoch only the remaining steps are cached, with theta~ and mu from the checkpoint.
        """
        optimizer = self.svrg_optimizer
        n = self._update_steps_per_epoch()
        epoch, first = divmod(step, n)
        if first == 0:
            self._take_snapshot()
        elif optimizer.full_gradient is None:
            raise RuntimeError(f"alpha-SVRG cache mode starts at step {step}, inside an epoch, without the snapshot's "
                               "full gradient: resume from a checkpoint written by AlphaSVRGTrainerMixin")
        saved = stream = rng_state()
        dataloader, iterator = self._replay_epoch(epoch)
        accumulation = self.args.gradient_accumulation_steps
        last = len(dataloader) % accumulation or accumulation
        trainer_accumulation = getattr(self, "current_gradient_accumulation_steps", None)
        total, full_steps, full_shape, self._cache = None, 0, None, {}
        for update in range(n):
            batches, num_items_in_batch = self.get_batch_samples(
                iterator, accumulation if update != n - 1 else last, self.args.device)
            if update < first:
                continue
            self.current_gradient_accumulation_steps = len(batches)
            set_rng_state(stream)
            gradient = self._snapshot_gradient(batches, num_items_in_batch, per_update=True)
            stream = rng_state()
            flat = self._mean_across_processes(torch.cat([
                (torch.zeros_like(p, dtype=torch.float32) if g is None else g).reshape(-1)
                for p, g in zip(optimizer.snapshot_parameters, gradient)]))
            self._cache[update] = _CachedStep(flat, [_fingerprint(batch) for batch in batches])
            shape = (len(batches), *map(_batch_size, batches))
            full_shape = full_shape or shape
            if first == 0 and shape == full_shape:
                total = flat.clone() if total is None else total.add_(flat)
                full_steps += 1
        self.current_gradient_accumulation_steps = trainer_accumulation
        set_rng_state(saved)
        self._cache_epoch = epoch
        if first == 0:
            optimizer.set_full_gradient(_split(total / full_steps, optimizer.snapshot_gradient))

    def _snapshot_gradient(self, batches, num_items_in_batch, *, per_update: bool) -> list[torch.Tensor | None]:
        """The snapshot's fp32 gradient summed over `batches`.

        Under fp16 the loss is scaled like the training loss and the gradient unscaled; the snapshot's gradient is
        needed exactly, so a pass that overflows is repeated at half the scale from the same RNG state. (A training
        step that overflows is skipped by the GradScaler as usual; its snapshot gradient is then discarded.)
        """
        parameters = self.svrg_optimizer.snapshot_parameters
        scale = self._loss_scale
        start = rng_state() if scale is not None else None
        while True:
            total = None
            for batch in batches:
                loss = self._snapshot_loss(batch, num_items_in_batch, per_update=per_update)
                gradient = torch.autograd.grad(loss if scale is None else loss * scale, parameters, allow_unused=True)
                total = list(gradient) if total is None else [_add(a, b) for a, b in zip(total, gradient)]
            if scale is None:
                return total
            present = [g for g in total if g is not None]
            if bool(torch.stack([torch.isfinite(g).all() for g in present]).all()):
                return [None if g is None else g.float().div_(scale) for g in total]
            if scale <= MIN_LOSS_SCALE:
                raise FloatingPointError("alpha-SVRG: the snapshot's gradient is not finite at any loss scale; the "
                                         "snapshot model has diverged")
            scale /= 2
            set_rng_state(start)

    def _current_loss_scale(self) -> float | None:
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def _replay_epoch(self, epoch: int):
        """The train dataloader and a fresh iterator over it in the order the Trainer uses for `epoch`."""
        if self._replay_dataloader is None:
            self._replay_dataloader = self.get_train_dataloader()
        dataloader = self._replay_dataloader
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        sampler = getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return dataloader, iter(dataloader)

    def _snapshot_loss(self, inputs, num_items_in_batch, *, per_update: bool) -> torch.Tensor:
        device = next(self.snapshot_model.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        self.snapshot_model.train()
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            loss = self.compute_loss(self.snapshot_model, inputs, num_items_in_batch=num_items_in_batch)
        if per_update and trainer_divides_loss_by_ga(self, num_items_in_batch):
            loss = loss / gradient_accumulation_steps(self)
        return loss

    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        self._steps_per_epoch = max(math.ceil(len(dataloader) / self.args.gradient_accumulation_steps), 1)
        return dataloader

    def _update_steps_per_epoch(self) -> int:
        if self._steps_per_epoch is None:
            raise RuntimeError("alpha-SVRG needs a train dataloader with a length (map-style dataset)")
        return self._steps_per_epoch

    def _mean_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor.contiguous(), reduction="mean")

    def technique_uses(self) -> list:
        from ..hub import TechniqueUse

        return [*super().technique_uses(), TechniqueUse("alpha_svrg", self.alpha_svrg.to_dict())]

    def technique_metrics(self) -> dict[str, float]:
        metrics = super().technique_metrics()
        if self.optimizer is not None:
            metrics["hf_regtools/alpha_svrg/alpha"] = self.svrg_optimizer.alpha
        return metrics
