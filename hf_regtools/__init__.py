"""hf_regtools: research techniques for initializing, optimizing and regularizing networks, for the HF stack.

Importing `hf_regtools` is cheap: it imports neither transformers nor timm. Public names resolve lazily.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "TECHNIQUES": "hf_regtools._registry",
    "TechniqueInfo": "hf_regtools._registry",
    "get_technique": "hf_regtools._registry",
    "list_techniques": "hf_regtools._registry",
    "select_weights": "hf_regtools.weight_selection",
    "initialize_student": "hf_regtools.weight_selection",
    "SelectionReport": "hf_regtools.weight_selection",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from ._registry import TECHNIQUES, TechniqueInfo, get_technique, list_techniques
    from .weight_selection import SelectionReport, initialize_student, select_weights


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_regtools' has no attribute {name!r}")
