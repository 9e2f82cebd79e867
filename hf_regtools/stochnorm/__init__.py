"""StochNorm: Kou et al., *Stochastic Normalization*, NeurIPS 2020. See the method card (`README.md`).

Names resolve lazily, so that reading the technique's registry entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "StochNorm1d": ".modules",
    "StochNorm2d": ".modules",
    "StochNorm3d": ".modules",
    "StochNormAct2d": ".modules",
    "StochNormCallback": ".callback",
    "apply_stochnorm": ".functional",
    "remove_stochnorm": ".functional",
    "set_stochnorm_p": ".functional",
    "stochnorm_layers": ".functional",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .callback import StochNormCallback
    from .functional import apply_stochnorm, remove_stochnorm, set_stochnorm_p, stochnorm_layers
    from .modules import StochNorm1d, StochNorm2d, StochNorm3d, StochNormAct2d


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
