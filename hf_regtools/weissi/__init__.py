"""WEISSI: Liu, Cui and Chan, *Improve Generalization and Robustness of Neural Networks via Weight Scale Shifting
Invariant Regularizations*, arXiv:2008.02965.

See the method card (`README.md` in this folder). Names resolve lazily, so that reading the technique's registry
entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "ResidualBlock": ".core",
    "WeissiConfig": ".trainer",
    "WeissiRegularizer": ".core",
    "WeissiStructure": ".core",
    "WeissiTrainerMixin": ".trainer",
    "find_weissi_structure": ".core",
    "input_gradient_norm": ".bounds",
    "product_of_norms_bound": ".bounds",
    "weissi_param_groups": ".core",
    "weissi_penalty": ".core",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .bounds import input_gradient_norm, product_of_norms_bound
    from .core import (ResidualBlock, WeissiRegularizer, WeissiStructure, find_weissi_structure, weissi_param_groups,
                       weissi_penalty)
    from .trainer import WeissiConfig, WeissiTrainerMixin


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
