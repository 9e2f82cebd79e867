"""Early/late dropout and stochastic depth: Liu et al., *Dropout Reduces Underfitting*, ICML 2023.

See the method card (`README.md` in this folder).
"""

from .functional import TARGETS, DropRateController, apply_drop_rate, block_rates

__all__ = [
    "TARGETS",
    "DropRateController",
    "DropScheduleCallback",
    "EarlyDropoutCallback",
    "EarlyStochasticDepthCallback",
    "LateDropoutCallback",
    "LateStochasticDepthCallback",
    "apply_drop_rate",
    "block_rates",
]

_CALLBACKS = {"DropScheduleCallback", "EarlyDropoutCallback", "EarlyStochasticDepthCallback", "LateDropoutCallback",
              "LateStochasticDepthCallback"}


def __getattr__(name):
    if name in _CALLBACKS:
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
