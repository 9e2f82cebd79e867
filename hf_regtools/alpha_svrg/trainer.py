"""`AlphaSVRGTrainerMixin`: alpha-SVRG in `transformers.Trainer` (the extra forward/backward needs the batch)."""

from __future__ import annotations

import copy
import math

import torch

from .._compat import gradient_accumulation_steps, trainer_divides_loss_by_ga
from .._trainer_utils import rng_state, set_rng_state
from ..schedules import svrg_alpha_schedule
from ..trainer import RegtoolsTrainerMixin
from .config import AlphaSVRGConfig
from .optimizer import AlphaSVRG


class AlphaSVRGTrainerMixin(RegtoolsTrainerMixin):
    """alpha-SVRG for your Trainer: `class MyTrainer(AlphaSVRGTrainerMixin, Trainer)`.

    - `create_optimizer` wraps the Trainer's optimizer (AdamW, SGD, ... or yours) in `AlphaSVRG`;
    - at every snapshot refresh (`global_step % snapshot_every == 0`) the snapshot model takes the current parameters
      and `mu`, the mean snapshot gradient over the full batches of a fresh train dataloader, is computed (all RNG
      states saved and restored, averaged across processes);
    - every micro-batch: after the normal forward/backward, the RNG is rewound and the snapshot computes its gradient
      on the same inputs with the same dropout masks and the same loss normalisation; the RNG is then put back where
      training left it;
    - `AlphaSVRG.step` adds `alpha_t (mu - acc)` to the (DDP-averaged) gradients and steps the base optimizer;
      `alpha_t` is `svrg_alpha_schedule(global_step)`, logged as `hf_regtools/alpha_svrg/alpha`. When it is 0 the
      snapshot work is skipped.

    Order: the Trainer clips (`max_grad_norm`, default 1.0) *before* the correction; the official code does not clip.
    Set `max_grad_norm=0` for parity, and `AlphaSVRGConfig(clip_norm=...)` to clip the corrected gradient.
    fp16 is rejected (GradScaler); bf16 autocast works with fp32 SVRG buffers. In a custom loop, use `AlphaSVRG`
    directly (see its docstring).

    Args:
        alpha_svrg (`AlphaSVRGConfig` or `dict`, *optional*): the settings; every other argument goes to the Trainer.
    """

    def __init__(self, *args, alpha_svrg: AlphaSVRGConfig | dict | None = None, **kwargs):
        config = alpha_svrg or AlphaSVRGConfig()
        self.alpha_svrg = config if isinstance(config, AlphaSVRGConfig) else AlphaSVRGConfig(**config)
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError("alpha-SVRG does not support fp16 (GradScaler would skip corrected steps "
                             "inconsistently); use bf16 or fp32, as the official code (fp32 only)")
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("alpha-SVRG supports DDP and single-device training; FSDP and DeepSpeed shard the "
                             "parameters the snapshot needs")
        self.snapshot_model = None
        self._accumulating_for = self._refreshed_at = self._steps_per_epoch = None

    def train(self, *args, **kwargs):
        self._accumulating_for = self._refreshed_at = None
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
            self._accumulating_for = step
        if optimizer.alpha == 0.0:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._refresh_due(step):
            self.refresh_snapshot()
            self._refreshed_at = step
        snapshot_inputs = dict(inputs)
        before = rng_state()
        loss = super().training_step(model, inputs, num_items_in_batch)
        after = rng_state()
        set_rng_state(before)
        snapshot_loss = self._snapshot_loss(snapshot_inputs, num_items_in_batch, per_update=True)
        optimizer.accumulate_snapshot_gradient(
            torch.autograd.grad(snapshot_loss, optimizer.snapshot_parameters, allow_unused=True))
        set_rng_state(after)
        return loss

    def _refresh_due(self, step: int) -> bool:
        starts_interval = (step % self._update_steps_per_epoch()) % self.snapshot_interval() == 0
        return (starts_interval and self._refreshed_at != step) or self.svrg_optimizer.full_gradient is None

    def refresh_snapshot(self) -> None:
        """theta~ <- theta; mu <- mean snapshot gradient over the full batches of a fresh train dataloader."""
        optimizer = self.svrg_optimizer
        with torch.no_grad():
            for snapshot, parameter in zip(optimizer.snapshot_parameters, optimizer.parameters()):
                snapshot.copy_(parameter)
            if self.alpha_svrg.copy_buffers:
                for snapshot, buffer in zip(self.snapshot_model.buffers(), self.model.buffers()):
                    snapshot.copy_(buffer)
        saved = rng_state()
        totals = [torch.zeros_like(p, dtype=torch.float32) for p in optimizer.parameters()]
        batches, full_size = 0, None
        for batch in self.get_train_dataloader():
            size = len(next(v for v in batch.values() if torch.is_tensor(v)))
            full_size = full_size or size
            if size < full_size:
                continue
            loss = self._snapshot_loss(batch, None, per_update=False)
            for total, g in zip(totals, torch.autograd.grad(loss, optimizer.snapshot_parameters, allow_unused=True)):
                if g is not None:
                    total.add_(g.float())
            batches += 1
        set_rng_state(saved)
        optimizer.set_full_gradient(self._mean_across_processes(t / batches) for t in totals)

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
