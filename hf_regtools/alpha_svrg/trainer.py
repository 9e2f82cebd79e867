"""`AlphaSVRGTrainerMixin`: alpha-SVRG in `transformers.Trainer` (the extra forward/backward needs the batch)."""

from __future__ import annotations

import copy
import math
import warnings

import torch

from .._compat import gradient_accumulation_steps, trainer_divides_loss_by_ga
from .._trainer_utils import current_loss_scale, rng_state, set_rng_state, updates_per_epoch
from ..schedules import svrg_alpha_schedule
from ..trainer import RegtoolsTrainerMixin
from .config import AlphaSVRGConfig
from .optimizer import AlphaSVRG

MIN_LOSS_SCALE = 2.0 ** -24


def _batch_size(batch) -> int:
    return len(next(v for v in batch.values() if torch.is_tensor(v)))


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in like]), like)]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _first(batches, count: int):
    """The first `count` batches; the rest are read and dropped, so the data loader ends its epoch normally."""
    for index, batch in enumerate(batches):
        if index < count:
            yield batch


def _concatenated(batches, per_chunk: int):
    """Consecutive batches joined `per_chunk` at a time (the last chunk may be shorter)."""
    chunk = []
    for batch in batches:
        chunk.append(batch)
        if len(chunk) == per_chunk:
            yield _concatenate(chunk)
            chunk = []
    if chunk:
        yield _concatenate(chunk)


def _concatenate(batches: list[dict]) -> dict:
    if len(batches) == 1:
        return batches[0]
    joined = {}
    for key, value in batches[0].items():
        if not torch.is_tensor(value):
            raise ValueError(f"AlphaSVRGConfig(full_gradient_batch_size=...) joins batches, but the batch entry "
                             f"{key!r} is a {type(value).__name__}, not a tensor: leave full_gradient_batch_size unset")
        try:
            joined[key] = torch.cat([batch[key] for batch in batches])
        except RuntimeError as error:
            raise ValueError(f"AlphaSVRGConfig(full_gradient_batch_size=...) joins batches, but the batch entry "
                             f"{key!r} changes shape from batch to batch ({error}): pad it to a fixed length or leave "
                             f"full_gradient_batch_size unset") from None
    return joined


class AlphaSVRGTrainerMixin(RegtoolsTrainerMixin):
    """alpha-SVRG for your Trainer: `class MyTrainer(AlphaSVRGTrainerMixin, Trainer)`.

    - `create_optimizer` wraps the Trainer's optimizer (AdamW, SGD, ... or yours) in `AlphaSVRG`;
    - at every snapshot refresh (`global_step % snapshot_every == 0`) the snapshot model takes the current parameters
      and `mu`, the snapshot's full gradient, is computed (all RNG states saved and restored): the mean of the
      snapshot's gradients over the epoch's *full optimizer steps*, the first `N // G` steps of the epoch's order (`N`
      examples, global batch `G` = per-device batch x processes x accumulation), as the official code does. For a
      loss that is a mean over examples this is the mean per-example gradient over the first `(N // G) * G` examples
      of the epoch, whatever the number of processes (a short last step, and the samples Accelerate repeats to even
      out the processes' last batches, are left out). `full_gradient_batch_size` computes it in larger batches (same
      `mu` for models without BatchNorm, fewer passes);
    - `mode="snapshot"` (default), every micro-batch: after the normal forward/backward, the RNG is rewound and the
      snapshot computes its gradient on the same inputs with the same dropout masks and the same loss normalisation;
      the RNG is then put back where training left it;
    - `mode="cache"` (the official `Cache_SVRG`, for small models): at each epoch's start `get_batch_samples` takes
      all of the epoch's batches, one pass of the snapshot over them caches every step's gradient (`fill_cache`) with
      the RNG stream training will have, and training then runs on those very batches and takes the cached
      gradients. About 2x the compute of the base optimizer instead of 3x, for memory of steps x model size (plus
      the epoch's batches);
    - `AlphaSVRG.step` adds `alpha_t (mu - acc)` to the (DDP-averaged) gradients and steps the base optimizer;
      `alpha_t` is `svrg_alpha_schedule(global_step)`, logged as `hf_regtools/alpha_svrg/alpha`. When it is 0 the
      snapshot work is skipped.

    Order: the Trainer clips (`max_grad_norm`, default 1.0) *before* the correction; the official code does not clip.
    Set `max_grad_norm=0` for parity (`train()` warns otherwise), and `AlphaSVRGConfig(clip_norm=...)` to clip the
    corrected gradient.
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
        self.snapshot_model, self._steps_per_epoch, self._full_steps_per_epoch = None, None, None
        self._warned_clipping = False
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._accumulating_for = self._refreshed_at = self._loss_scale = self._replay_dataloader = None
        self._micro_batch, self._cache, self._epoch_steps, self._epoch_iterator = 0, {}, {}, None

    def train(self, *args, **kwargs):
        self._reset_run_state()
        self._warn_about_clipping()
        try:
            return super().train(*args, **kwargs)
        finally:
            self._reset_run_state()

    def _warn_about_clipping(self) -> None:
        clip = self.args.max_grad_norm
        if self._warned_clipping or not clip or clip <= 0 or self.alpha_svrg.alpha0 == 0:
            return
        self._warned_clipping = True
        if self.is_world_process_zero():
            warnings.warn(f"alpha-SVRG: the Trainer clips each gradient to max_grad_norm={clip} before the SVRG "
                          "correction, which the paper's recipe never does; set TrainingArguments(max_grad_norm=0) for "
                          "the paper's recipe, and AlphaSVRGConfig(clip_norm=...) to clip the corrected gradient "
                          "instead.", UserWarning, stacklevel=3)

    def _validate_model(self) -> None:
        if self.alpha_svrg.full_gradient_batch_size is None:
            return
        per_device = self.args.per_device_train_batch_size
        if self.alpha_svrg.full_gradient_batch_size % per_device:
            raise ValueError(f"AlphaSVRGConfig(full_gradient_batch_size={self.alpha_svrg.full_gradient_batch_size}) "
                             f"must be a multiple of per_device_train_batch_size ({per_device}): the full-gradient "
                             "pass joins whole batches")
        norms = sorted({type(m).__name__ for m in self.model.modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
        if norms:
            raise ValueError(f"AlphaSVRGConfig(full_gradient_batch_size=...) would change mu for this model: its "
                             f"{', '.join(norms)} layers normalise with batch statistics, so the full gradient depends "
                             "on how the examples are batched; leave full_gradient_batch_size unset")

    def create_optimizer(self, *args, **kwargs):
        self._validate_model()
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
        return n if self.alpha_svrg.snapshot_every == "epoch" else self.alpha_svrg.snapshot_every

    def alpha_at(self, step: int) -> float:
        """`alpha_t` at optimizer step `step`: the schedule over the run's epochs, 0 after epoch `svrg_end`."""
        epochs = max(math.ceil(self.state.num_train_epochs), 1)
        end = self.alpha_svrg.svrg_end
        if end is not None and step // self._update_steps_per_epoch() > end:
            return 0.0
        return svrg_alpha_schedule(step, alpha0=self.alpha_svrg.alpha0, epochs=epochs,
                                   steps_per_epoch=self._update_steps_per_epoch(),
                                   snapshot_every=self.snapshot_interval(), kind=self.alpha_svrg.kind)

    def training_step(self, model, inputs, num_items_in_batch=None):
        optimizer, step = self.svrg_optimizer, self.state.global_step
        if self._accumulating_for != step:
            optimizer.reset_snapshot_gradient()
            optimizer.alpha = self.alpha_at(step)
            self._accumulating_for, self._micro_batch = step, 0
            self._loss_scale = current_loss_scale(self) if optimizer.alpha else None
        if optimizer.alpha == 0.0:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.alpha_svrg.mode == "cache":
            if self._micro_batch == 0:
                self._take_cached_snapshot_gradient(step)
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
        """theta~ <- theta; mu <- the snapshot's mean gradient over the epoch's full optimizer steps.

        Each process takes its first `N // G` steps' batches of the epoch (the data loader's order for that epoch);
        with `full_gradient_batch_size`, they are joined into larger batches, each weighted by its size.
        """
        optimizer = self.svrg_optimizer
        self._take_snapshot()
        saved = rng_state()
        totals = [torch.zeros_like(p, dtype=torch.float32) for p in optimizer.parameters()]
        epoch = self.state.global_step // self._update_steps_per_epoch()
        batches = _first(self._epoch_batches(epoch), self._full_steps() * self.args.gradient_accumulation_steps)
        joined = self.alpha_svrg.full_gradient_batch_size
        if joined is not None:
            batches = _concatenated(batches, joined // self.args.per_device_train_batch_size)
        count = 0
        for batch in batches:
            weight = _batch_size(batch) if joined is not None else 1
            for total, g in zip(totals, self._snapshot_gradient([batch], None, per_update=False)):
                if g is not None:
                    total.add_(g if weight == 1 else g * weight)
            count += weight
        set_rng_state(saved)
        optimizer.set_full_gradient(self._mean_across_processes(t / count) for t in totals)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Cache mode: at an epoch's first step take all of its batches (grouped per optimizer step as the Trainer
        groups them), so that the snapshot's cache pass and training see the very same batches; hand them out one
        step at a time."""
        if self.alpha_svrg.mode != "cache" or self.alpha_at(self.state.global_step) == 0.0:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if epoch_iterator is not self._epoch_iterator:
            self._epoch_iterator, step, self._epoch_steps = epoch_iterator, self.state.global_step, {}
            accumulation = self.args.gradient_accumulation_steps
            while (taken := super().get_batch_samples(epoch_iterator, accumulation, device))[0]:
                self._epoch_steps[step] = taken
                step += 1
        return self._epoch_steps.get(self.state.global_step, ([], None))

    def _take_cached_snapshot_gradient(self, step: int) -> None:
        if step not in self._cache:
            self.fill_cache(step)
        optimizer = self.svrg_optimizer
        optimizer.accumulate_snapshot_gradient(_split(self._cache.pop(step), optimizer.snapshot_gradient), reduced=True)
        self._epoch_steps.pop(step, None)

    def fill_cache(self, step: int) -> None:
        """Cache mode: the snapshot's fp32 gradient for each of the epoch's remaining steps, from `step` on.

        It runs on the batches `get_batch_samples` took for those steps, with their loss normalisation and with the
        RNG stream training will have (restored afterwards), so each step's dropout masks are the ones its cached
        gradient saw. At the epoch's first step this is the refresh: theta~ <- theta, and `mu` is the mean cached
        gradient over the full steps; on a resume inside an epoch, theta~ and `mu` come from the checkpoint.
        """
        optimizer = self.svrg_optimizer
        steps = sorted(s for s in self._epoch_steps if s >= step)
        if not steps or steps[0] != step:
            raise RuntimeError(f"alpha-SVRG cache mode has no batches for step {step}: they are taken in "
                               "get_batch_samples, which this training loop did not call")
        refresh = step % self._update_steps_per_epoch() == 0
        if refresh:
            self._take_snapshot()
        elif optimizer.full_gradient is None:
            raise RuntimeError(f"alpha-SVRG cache mode starts at step {step}, inside an epoch, without the snapshot's "
                               "full gradient: resume from a checkpoint written by AlphaSVRGTrainerMixin")
        saved = stream = rng_state()
        trainer_accumulation = getattr(self, "current_gradient_accumulation_steps", None)
        total, full_steps, self._cache = None, 0, {}
        for cached_step in steps:
            batches, num_items_in_batch = self._epoch_steps[cached_step]
            self.current_gradient_accumulation_steps = len(batches)
            set_rng_state(stream)
            gradient = self._snapshot_gradient(batches, num_items_in_batch, per_update=True)
            stream = rng_state()
            flat = self._mean_across_processes(torch.cat([
                (torch.zeros_like(p, dtype=torch.float32) if g is None else g).reshape(-1)
                for p, g in zip(optimizer.snapshot_parameters, gradient)]))
            self._cache[cached_step] = flat
            if refresh and cached_step - step < self._full_steps():
                total = flat.clone() if total is None else total.add_(flat)
                full_steps += 1
        self.current_gradient_accumulation_steps = trainer_accumulation
        set_rng_state(saved)
        if refresh:
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

    def _epoch_batches(self, epoch: int):
        """A fresh iterator over the train data, in the order the Trainer uses for `epoch`."""
        if self._replay_dataloader is None:
            self._replay_dataloader = self.get_train_dataloader()
        dataloader = self._replay_dataloader
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        sampler = getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return iter(dataloader)

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
        accumulation = self.args.gradient_accumulation_steps
        self._steps_per_epoch = updates_per_epoch(len(dataloader), accumulation)
        every = self.alpha_svrg.snapshot_every
        if every != "epoch" and every > self._steps_per_epoch:
            raise ValueError(f"AlphaSVRGConfig(snapshot_every={every}) is longer than an epoch "
                             f"({self._steps_per_epoch} optimizer steps): intervals span at most one epoch (the "
                             "official code silently treats longer ones as one epoch); use snapshot_every='epoch'")
        examples = getattr(dataloader, "total_dataset_length", None) or len(dataloader.dataset)
        global_batch = (getattr(dataloader, "total_batch_size", None)
                        or dataloader.batch_size * self.accelerator.num_processes) * accumulation
        self._full_steps_per_epoch = examples // global_batch
        if self._full_steps_per_epoch == 0:
            raise ValueError(f"alpha-SVRG computes mu over the epoch's full optimizer steps, and {examples} training "
                             f"examples make none of the global batch {global_batch} (per-device batch x processes "
                             "x gradient accumulation): use a smaller batch")
        return dataloader

    def _full_steps(self) -> int:
        self._update_steps_per_epoch()
        return self._full_steps_per_epoch

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
