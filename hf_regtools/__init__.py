"""hf_regtools: research techniques for initializing, optimizing and regularizing networks, for the HF stack.

Importing `hf_regtools` is cheap: it imports neither torch, transformers nor timm. The public names of every technique
and of the shared layers resolve lazily, as transformers' do:

```py
from hf_regtools import AlphaSVRGTrainerMixin, EarlyDropoutCallback, RegtoolsTrainerMixin, initialize_student
```

The names of the shared layers are listed here; every technique package's `__all__` is exported as well, collected
from the folders that register a technique (see `hf_regtools._registry`).
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "hf_regtools._registry": ("TECHNIQUES", "TechniqueInfo", "get_technique", "list_techniques"),
    "hf_regtools.trainer": ("RegtoolsTrainerMixin", "TechniqueMetricsCallback"),
    "hf_regtools.hub": ("HubError", "ResolvedModel", "TechniqueUse", "add_techniques_to_card", "load_model",
                        "push_folder", "resolve_model"),
    "hf_regtools.adapters": ("StudentShape", "UnsupportedModelError", "detect_family", "find_supported_model",
                             "save_model"),
    "hf_regtools.checkpoint": ("CheckpointError", "CheckpointReader"),
    "hf_regtools.schedules": ("MultiStepLRLambda", "coefficient_schedule", "drop_schedule", "drop_schedule_array",
                              "multistep_lr_factor", "svrg_alpha_schedule"),
    "hf_regtools.surgery": ("replace_modules",),
    "hf_regtools.optim": ("AGD", "AGDMetricsCallback", "PaperWeightDecayMixin", "agd_init_", "decay_parameter_names",
                          "no_weight_decay_names", "param_groups_weight_decay"),
    "hf_regtools.diagnostics": ("GradientDiagnosticsCallback", "HessianOperator", "SHARPNESS_KEYS", "SharpnessCallback",
                                "flat_gradient", "gradient_direction_error", "gradient_direction_variance",
                                "gradient_variance_metrics", "hessian_top_eigenvalue", "hessian_trace",
                                "plot_diagnostics", "probe_mode"),
}


def _technique_exports() -> dict[str, tuple[str, ...]]:
    from ._registry import technique_folders

    return {f"hf_regtools.{folder}": tuple(import_module(f"hf_regtools.{folder}").__all__)
            for folder in technique_folders()}


_EXPORTS.update(_technique_exports())
_LAZY = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from ._registry import TECHNIQUES, TechniqueInfo, get_technique, list_techniques
    from .adapters import StudentShape, UnsupportedModelError, detect_family, find_supported_model, save_model
    from .checkpoint import CheckpointError, CheckpointReader
    from .diagnostics import (SHARPNESS_KEYS, GradientDiagnosticsCallback, HessianOperator, SharpnessCallback,
                              flat_gradient, gradient_direction_error, gradient_direction_variance,
                              gradient_variance_metrics, hessian_top_eigenvalue, hessian_trace, plot_diagnostics,
                              probe_mode)
    from .hub import (HubError, ResolvedModel, TechniqueUse, add_techniques_to_card, load_model, push_folder,
                      resolve_model)
    from .optim import (AGD, AGDMetricsCallback, PaperWeightDecayMixin, agd_init_, decay_parameter_names,
                        no_weight_decay_names, param_groups_weight_decay)
    from .schedules import (MultiStepLRLambda, coefficient_schedule, drop_schedule, drop_schedule_array,
                            multistep_lr_factor, svrg_alpha_schedule)
    from .surgery import replace_modules
    from .trainer import RegtoolsTrainerMixin, TechniqueMetricsCallback


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_regtools' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})
