"""Weight rescaling (WRS): Liu et al., *Weight Rescaling: Effective and Robust Regularization for Deep Neural Networks
with Batch Normalization*, arXiv:2102.03497.

See the method card (`README.md` in this folder). Names resolve lazily, so that reading the technique's registry
entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "ScaleInvariantPair": ".functional",
    "WeightRescalingCallback": ".callback",
    "WeightRescalingTrainerMixin": ".callback",
    "find_scale_invariant_pairs": ".functional",
    "rescale_weights_": ".functional",
    "wrs_param_groups": ".functional",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .callback import WeightRescalingCallback, WeightRescalingTrainerMixin
    from .functional import ScaleInvariantPair, find_scale_invariant_pairs, rescale_weights_, wrs_param_groups


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
