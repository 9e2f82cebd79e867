"""alpha-SVRG: Yin et al., *A Coefficient Makes SVRG Effective*, ICLR 2025. See the method card (`README.md`)."""

from ..schedules import svrg_alpha_schedule
from .config import AlphaSVRGConfig
from .optimizer import AlphaSVRG

__all__ = ["AlphaSVRG", "AlphaSVRGConfig", "AlphaSVRGTrainerMixin", "svrg_alpha_schedule"]


def __getattr__(name):
    if name == "AlphaSVRGTrainerMixin":
        from .trainer import AlphaSVRGTrainerMixin

        return AlphaSVRGTrainerMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
