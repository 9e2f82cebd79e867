"""Plot logged diagnostics over training (PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_KEYS = ("hf_regtools/diagnostics/gdv", "hf_regtools/diagnostics/gde", "hf_regtools/diagnostics/grad_norm",
                "hf_regtools/diagnostics/dist_from_init")
SHARPNESS_KEYS = ("hf_regtools/diagnostics/hessian_trace", "hf_regtools/diagnostics/hessian_top_eigenvalue")


def plot_diagnostics(runs: dict[str, list[dict]], path: str | os.PathLike, *, keys: Sequence[str] = DEFAULT_KEYS) -> Path:
    """Draw each metric of `keys` over the optimizer step, one line per run, into one PNG.

    Args:
        runs (`dict[str, list[dict]]`): run name -> `trainer.state.log_history` (or any list of log dicts with a
            `"step"` key).
        path (`str` or `os.PathLike`): the PNG to write.
        keys (`Sequence[str]`, *optional*): the metrics to draw (default: the four diagnostics).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for name, history in runs.items():
            points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
            if points:
                axis.plot(*zip(*points), label=name)
        axis.set(title=key.rsplit("/", 1)[-1], xlabel="optimizer step")
    axes[0][0].legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
