"""alpha-SVRG: Yin et al., *A Coefficient Makes SVRG Effective*, ICLR 2025. See the method card (`README.md`).

Names resolve lazily, so that reading the technique's registry entry imports no torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_LAZY = {
    "AlphaSVRG": ".optimizer",
    "AlphaSVRGConfig": ".config",
    "AlphaSVRGTrainerMixin": ".trainer",
    "svrg_alpha_schedule": "..schedules",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from ..schedules import svrg_alpha_schedule
    from .config import AlphaSVRGConfig
    from .optimizer import AlphaSVRG
    from .trainer import AlphaSVRGTrainerMixin


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
