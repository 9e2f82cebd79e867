"""GradInit: Zhu et al., *GradInit: Learning to Initialize Neural Networks for Stable and Efficient Training*,
NeurIPS 2021, with the NIO / GradCosine variant (Yang et al., NeurIPS 2022). See the method card (`README.md`).

Names resolve lazily, so that reading the technique's registry entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
