"""Large initial learning rate, then anneal: Li, Wei and Ma, *Towards Explaining the Regularization Effect of Initial
Large Learning Rate in Training Neural Networks*, NeurIPS 2019 (arXiv:1907.04595).

See the method card (`README.md` in this folder). Names resolve lazily, so that reading the technique's registry
entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "OFFICIAL_SCHEDULES": ".functional",
    "ActivationNoise": ".trainer",
    "ActivationNoiseCallback": ".trainer",
    "LargeLRTrainerMixin": ".trainer",
    "PatchEpochCallback": ".trainer",
    "PatchTransform": ".trainer",
    "activation_noise": ".functional",
    "apply_patch": ".functional",
    "large_initial_lr_lambda": ".functional",
    "large_initial_lr_schedule": ".functional",
    "noise_level": ".functional",
    "patch_draws": ".functional",
    "patch_only_eval_set": ".trainer",
    "patch_pattern": ".functional",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .functional import (OFFICIAL_SCHEDULES, activation_noise, apply_patch, large_initial_lr_lambda,
                             large_initial_lr_schedule, noise_level, patch_draws, patch_pattern)
    from .trainer import (ActivationNoise, ActivationNoiseCallback, LargeLRTrainerMixin, PatchEpochCallback,
                          PatchTransform, patch_only_eval_set)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
