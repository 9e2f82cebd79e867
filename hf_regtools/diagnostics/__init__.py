"""Gradient-variance diagnostics (see `README.md` in this folder): pure functions, a Trainer callback, a plot."""

from .functional import (flat_gradient, gradient_direction_error, gradient_direction_variance,
                         gradient_variance_metrics)
from .plot import plot_diagnostics

__all__ = ["GradientDiagnosticsCallback", "flat_gradient", "gradient_direction_error", "gradient_direction_variance",
           "gradient_variance_metrics", "plot_diagnostics"]


def __getattr__(name):
    if name == "GradientDiagnosticsCallback":
        from .callback import GradientDiagnosticsCallback

        return GradientDiagnosticsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
