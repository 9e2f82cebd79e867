"""Weight selection: initialize a small model with weights selected from a larger pretrained one.

Xu et al., *Initializing Models with Larger Ones*, ICLR 2024 (arXiv:2311.18823). See the method card
(`README.md` in this folder).
"""

from .config import WeightSelectionConfig
from .functional import (
    IndexPlan,
    SelectionReport,
    WeightSelectionError,
    consecutive_indices,
    random_indices,
    select_tensor,
    select_weights,
    uniform_indices,
)
from .student import SelectedStudent, initialize_student, model_card, save_student

__all__ = [
    "IndexPlan",
    "SelectedStudent",
    "SelectionReport",
    "WeightSelectionConfig",
    "WeightSelectionError",
    "consecutive_indices",
    "initialize_student",
    "model_card",
    "random_indices",
    "save_student",
    "select_tensor",
    "select_weights",
    "uniform_indices",
]
