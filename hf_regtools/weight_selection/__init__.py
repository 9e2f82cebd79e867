"""Weight selection: initialize a small model with weights selected from a larger pretrained one.

Xu et al., *Initializing Models with Larger Ones*, ICLR 2024 (arXiv:2311.18823). See the method card
(`README.md` in this folder). Names resolve lazily, so that reading `WeightSelectionConfig` imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "ImportanceScores": ".importance",
    "IndexPlan": ".axes",
    "SelectedStudent": ".student",
    "SelectionReport": ".functional",
    "WeightSelectionConfig": ".config",
    "WeightSelectionError": ".axes",
    "consecutive_indices": ".axes",
    "importance_scores": ".importance",
    "initialize_student": ".student",
    "layer_map": ".layers",
    "rotary_pair_indices": ".axes",
    "top_indices": ".axes",
    "model_card": ".student",
    "random_indices": ".axes",
    "save_student": ".student",
    "select_tensor": ".functional",
    "select_weights": ".functional",
    "uniform_indices": ".axes",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .config import WeightSelectionConfig
    from .axes import (IndexPlan, WeightSelectionError, consecutive_indices, random_indices, rotary_pair_indices,
                       top_indices, uniform_indices)
    from .functional import SelectionReport, select_tensor, select_weights
    from .importance import ImportanceScores, importance_scores
    from .layers import layer_map
    from .student import SelectedStudent, initialize_student, model_card, save_student


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
