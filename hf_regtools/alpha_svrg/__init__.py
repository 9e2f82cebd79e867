"""alpha-SVRG: Yin et al., *A Coefficient Makes SVRG Effective*, ICLR 2025. See the method card (`README.md`).

Names resolve lazily, so that reading the technique's registry entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
