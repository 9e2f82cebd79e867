"""Training diagnostics (see `README.md` in this folder): gradient variance and the sharpness of the training loss, as
pure functions, Trainer callbacks and a plot."""

from .functional import (flat_gradient, gradient_direction_error, gradient_direction_variance,
                         gradient_variance_metrics)
from .plot import SHARPNESS_KEYS, plot_diagnostics
from .sharpness import HessianOperator, hessian_top_eigenvalue, hessian_trace, probe_mode

__all__ = ["GradientDiagnosticsCallback", "HessianOperator", "SHARPNESS_KEYS", "SharpnessCallback", "flat_gradient",
           "gradient_direction_error", "gradient_direction_variance", "gradient_variance_metrics",
           "hessian_top_eigenvalue", "hessian_trace", "plot_diagnostics", "probe_mode"]

_CALLBACKS = ("GradientDiagnosticsCallback", "SharpnessCallback")


def __getattr__(name):
    if name in _CALLBACKS:
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
