"""StochNorm: Kou et al., *Stochastic Normalization*, NeurIPS 2020. See the method card (`README.md`).

Names resolve lazily, so that reading the technique's registry entry imports no torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

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


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
