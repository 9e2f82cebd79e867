"""Weight selection: initialize a small model with weights selected from a larger pretrained one.

Xu et al., *Initializing Models with Larger Ones*, ICLR 2024 (arXiv:2311.18823). See the method card
(`README.md` in this folder). Names resolve lazily, so that reading `WeightSelectionConfig` imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "IndexPlan": ".functional",
    "SelectedStudent": ".student",
    "SelectionReport": ".functional",
    "WeightSelectionConfig": ".config",
    "WeightSelectionError": ".functional",
    "consecutive_indices": ".functional",
    "initialize_student": ".student",
    "model_card": ".student",
    "random_indices": ".functional",
    "save_student": ".student",
    "select_tensor": ".functional",
    "select_weights": ".functional",
    "uniform_indices": ".functional",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .config import WeightSelectionConfig
    from .functional import (IndexPlan, SelectionReport, WeightSelectionError, consecutive_indices, random_indices,
                             select_tensor, select_weights, uniform_indices)
    from .student import SelectedStudent, initialize_student, model_card, save_student


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
