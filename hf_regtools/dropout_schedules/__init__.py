"""Early/late dropout and stochastic depth: Liu et al., *Dropout Reduces Underfitting*, ICML 2023.

See the method card (`README.md` in this folder). Names resolve lazily, so that reading the technique's registry
entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
