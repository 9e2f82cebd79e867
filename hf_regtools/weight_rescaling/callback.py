"""Trainer integration of weight rescaling: a callback that rescales after optimizer steps, and a mixin that keeps
weight decay off the managed weights.

The callback only decides *when*: at `on_optimizer_step` (after `optimizer.step()`, before `zero_grad`) of every
`every`-th optimizer step it calls `rescale_weights_` on the pairs found once at `on_train_begin`. Whether a step
rescales is a function of `global_step`, so resuming needs no stored state.
"""

from __future__ import annotations

import warnings

from transformers.trainer_callback import ExportableState

from ..trainer import RegtoolsTrainerMixin, TechniqueMetricsCallback
from .functional import (DEFAULT_EPS, METHODS, _validate, check_not_sharded,
                         find_scale_invariant_pairs, managed_parameter_names, managed_parameters, rescale_weights_)

METRIC_PREFIX = "hf_regtools/weight_rescaling/"

WEIGHT_DECAY_WARNING = (
    "WeightRescalingCallback: {count} of {total} managed weights (e.g. {example}) are in optimizer parameter groups "
    "with weight_decay > 0. Weight rescaling replaces weight decay on them (decaying them only changes their "
    "effective learning rate, and rescaling undoes it). Train with `class MyTrainer(WeightRescalingTrainerMixin, "
    "Trainer)`, or build the optimizer from `wrs_param_groups(model, weight_decay)`."
)


def _loss_scale(optimizer) -> float | None:
    scaler = getattr(optimizer, "scaler", None)
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None


def step_was_skipped(optimizer, scale_before: float | None) -> bool:
    """Whether the fp16 loss scaler skipped the optimizer step that just ran.

    Accelerate's `AcceleratedOptimizer.step_was_skipped` says so for optimizers the scaler skips, but an optimizer that
    skips inside its own step (`_step_supports_amp_scaling`: fused AdamW, transformers 5's default `optim`) reports
    `False` (accelerate 1.15). A skipped step always lowers the scale (`GradScaler.update` backs off on inf/nan), so a
    scale below the one before the step (`scale_before`, from `on_pre_optimizer_step`) counts as skipped too.
    """
    if getattr(optimizer, "step_was_skipped", False):
        return True
    scale_after = _loss_scale(optimizer)
    return scale_before is not None and scale_after is not None and scale_after < scale_before


class WeightRescalingCallback(TechniqueMetricsCallback, ExportableState):
    """Weight rescaling (Liu et al., arXiv:2102.03497) during `Trainer.train()`: after every `every`-th optimizer
    step, each weight followed by a BatchNorm is rescaled to norm `r` per output channel.

    Args:
        r (`float`, *optional*, defaults to 1.0): the target norm (the paper's unit norm).
        every (`int`, *optional*, defaults to 1): rescale after every `every`-th optimizer step.
        granularity (`str`, *optional*, defaults to `"channel"`): `"channel"` or `"tensor"` (see `rescale_weights_`).
        rescale_running_stats (`bool`, *optional*, defaults to `True`): rescale the BatchNorm running statistics with
            the weights (eval-mode output unchanged).
        rescale_optimizer_state (`bool`, *optional*, defaults to `False`): also rescale SGD momentum and Adam moments of
            the managed weights and their biases.
        pairs (`list[tuple[str, str]]`, *optional*): explicit `(layer, BatchNorm)` module names (the Trainer's model's
            names) instead of discovery.
        method (`str`, *optional*, defaults to `"auto"`): discovery method (`find_scale_invariant_pairs`).
        eps (`float`, *optional*, defaults to 1e-12): norms at or below it are not rescaled.

    A step the fp16 loss scaler skipped (`optimizer.step_was_skipped`, or a loss scale lowered by the step, see
    `step_was_skipped`) changed nothing and is not rescaled. The norms
    before the last rescale are logged as `hf_regtools/weight_rescaling/{mean_norm_before,max_norm_before}` (over all
    managed filters). Training warns once when the optimizer still decays managed weights, and raises for sharded
    parameters (FSDP, DeepSpeed ZeRO-3). In a custom loop, call `rescale_weights_(pairs)` after `optimizer.step()`
    with `pairs = find_scale_invariant_pairs(model)` found once.

    Example:

    ```py
    class MyTrainer(WeightRescalingTrainerMixin, Trainer):   # no weight decay on the rescaled weights
        pass

    trainer = MyTrainer(model, TrainingArguments("out", weight_decay=5e-4), train_dataset=train,
                        callbacks=[WeightRescalingCallback(r=1.0)])
    ```
    """

    def __init__(self, r: float = 1.0, *, every: int = 1, granularity: str = "channel",
                 rescale_running_stats: bool = True, rescale_optimizer_state: bool = False,
                 pairs: list[tuple[str, str]] | None = None, method: str = "auto", eps: float = DEFAULT_EPS):
        _validate(r, granularity, eps)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (rescale after every k-th optimizer step), "
                             f"got {every!r}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        self.r, self.every, self.granularity, self.method, self.eps = float(r), every, granularity, method, eps
        self.rescale_running_stats, self.rescale_optimizer_state = rescale_running_stats, rescale_optimizer_state
        self.pair_names = None if pairs is None else [tuple(pair) for pair in pairs]
        self.pairs = None
        self.norms_before = self._scale_before = None
        self._warned_weight_decay = False

    def find_pairs(self, model):
        """The pairs this callback manages in `model` (explicit `pairs` checked, or discovered with `method`)."""
        return find_scale_invariant_pairs(model, method=self.method, pairs=self.pair_names)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "fsdp", None):
            raise ValueError("WeightRescalingCallback does not support FSDP: parameters are sharded, so per-filter "
                             "norms would be wrong. Train with DDP.")
        self.pairs = self.find_pairs(model)
        if not self.pairs:
            raise ValueError(f"WeightRescalingCallback found no convolution or linear layer followed directly by a "
                             f"BatchNorm in {type(model).__name__} (method={self.method!r}); pass pairs=[(layer, "
                             "batchnorm), ...] with the model's module names, or use a BatchNorm model")
        check_not_sharded(managed_parameters(self.pairs))
        self._warn_if_decayed(model, optimizer)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._scale_before = _loss_scale(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scale_before, self._scale_before = self._scale_before, None
        if self.pairs is None or (state.global_step + 1) % self.every or step_was_skipped(optimizer, scale_before):
            return
        self.norms_before = rescale_weights_(self.pairs, r=self.r, granularity=self.granularity,
                                             rescale_running_stats=self.rescale_running_stats, eps=self.eps,
                                             optimizer=optimizer if self.rescale_optimizer_state else None)

    def _warn_if_decayed(self, model, optimizer) -> None:
        if self._warned_weight_decay or optimizer is None:
            return
        managed = {id(parameter) for parameter in managed_parameters(self.pairs)}
        decayed = {id(p) for group in optimizer.param_groups if group.get("weight_decay", 0) > 0
                   for p in group["params"] if id(p) in managed}
        if decayed:
            names = sorted(managed_parameter_names(model, [pair for pair in self.pairs if id(pair.weight) in decayed]))
            warnings.warn(WEIGHT_DECAY_WARNING.format(count=len(decayed), total=len(managed), example=names[0]),
                          UserWarning, stacklevel=2)
            self._warned_weight_decay = True

    def metrics(self) -> dict[str, float]:
        """Mean and max per-filter norm before the last rescale, for `RegtoolsTrainerMixin.log`."""
        if not self.norms_before:
            return {}
        import torch

        norms = torch.cat([norm.reshape(-1) for norm in self.norms_before.values()])
        return {f"{METRIC_PREFIX}mean_norm_before": norms.mean().item(),
                f"{METRIC_PREFIX}max_norm_before": norms.max().item()}

    def state(self) -> dict:
        return {"args": self._ctor_args(), "attributes": {}}

    def technique_use(self):
        """This callback and its settings, for model cards (`RegtoolsTrainerMixin.create_model_card`)."""
        from ..hub import TechniqueUse

        return TechniqueUse("weight_rescaling", {"callback": type(self).__name__, **self._ctor_args()})

    def _ctor_args(self) -> dict:
        args = dict(r=self.r, every=self.every, granularity=self.granularity,
                    rescale_running_stats=self.rescale_running_stats,
                    rescale_optimizer_state=self.rescale_optimizer_state, method=self.method, eps=self.eps)
        if self.pair_names is not None:
            args["pairs"] = [list(pair) for pair in self.pair_names]
        return args


class WeightRescalingTrainerMixin(RegtoolsTrainerMixin):
    """Trainer mixin: no weight decay on the weights the run's `WeightRescalingCallback` rescales.

    It filters the public `Trainer.get_decay_parameter_names` (which `Trainer.create_optimizer` uses to build its
    decay / no-decay groups), so `optim`, `weight_decay` and the other hf_regtools mixins keep working; combined with
    `PaperWeightDecayMixin`, it filters the papers' grouping (`wrs_param_groups`):

    ```py
    class MyTrainer(WeightRescalingTrainerMixin, PaperWeightDecayMixin, Trainer):
        pass
    ```

    Raises a `ValueError` when building the optimizer if no `WeightRescalingCallback` is among the callbacks.
    """

    def get_decay_parameter_names(self, model) -> list[str]:
        callback = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, WeightRescalingCallback)),
                        None)
        if callback is None:
            raise ValueError("WeightRescalingTrainerMixin removes weight decay from the weights a "
                             "WeightRescalingCallback rescales, but the Trainer has none: add "
                             "callbacks=[WeightRescalingCallback(...)]")
        managed = managed_parameter_names(model, callback.find_pairs(model))
        return [name for name in super().get_decay_parameter_names(model) if name not in managed]

