"""GradInit: Zhu et al., *GradInit: Learning to Initialize Neural Networks for Stable and Efficient Training*,
NeurIPS 2021, with the NIO / GradCosine variant (Yang et al., NeurIPS 2022). See the method card (`README.md`).

Names resolve lazily, so that reading the technique's registry entry imports no torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_LAZY = {
    "GradInitCallback": ".callback",
    "GradInitConfig": ".config",
    "GradInitReport": ".functional",
    "RescaleAdam": ".optimizer",
    "gradinit_": ".functional",
    "nio_": ".functional",
    "run_gradinit": ".command",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .callback import GradInitCallback
    from .command import run_gradinit
    from .config import GradInitConfig
    from .functional import GradInitReport, gradinit_, nio_
    from .optimizer import RescaleAdam


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
