"""Early/late dropout and stochastic depth: Liu et al., *Dropout Reduces Underfitting*, ICML 2023.

See the method card (`README.md` in this folder). Names resolve lazily, so that reading the technique's registry
entry imports no torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_LAZY = {
    "TARGETS": ".functional",
    "DropRateController": ".functional",
    "DropScheduleCallback": ".callback",
    "EarlyDropoutCallback": ".callback",
    "EarlyStochasticDepthCallback": ".callback",
    "LateDropoutCallback": ".callback",
    "LateStochasticDepthCallback": ".callback",
    "apply_drop_rate": ".functional",
    "block_rates": ".functional",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .callback import (DropScheduleCallback, EarlyDropoutCallback, EarlyStochasticDepthCallback,
                           LateDropoutCallback, LateStochasticDepthCallback)
    from .functional import TARGETS, DropRateController, apply_drop_rate, block_rates


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
