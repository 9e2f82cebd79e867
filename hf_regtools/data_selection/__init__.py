"""Pre-training data selection by unbalanced optimal transport, with two-head fine-tuning: Liu, Xu, Xu, Qian, Li, Ji,
Chan and Jin, *Improved Fine-Tuning by Better Leveraging Pre-Training Data*, NeurIPS 2022, arXiv:2111.12292.

See the method card (`README.md` in this folder). Names resolve lazily, so that reading the technique's registry
entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "ClassPrototypes": ".prototypes",
    "DataSelection": ".selection",
    "DataSelectionReport": ".report",
    "SourceStream": ".streams",
    "TwoHeadModel": ".two_head",
    "TwoStreamConfig": ".trainer",
    "TwoStreamTrainerMixin": ".trainer",
    "UOTSelection": ".uot",
    "class_label_names": ".report",
    "class_prototypes": ".prototypes",
    "fixmatch_loss": ".two_head",
    "prototype_cost": ".uot",
    "select_pretraining_data": ".selection",
    "select_pretraining_subset": ".report",
    "sinkhorn_unbalanced": ".uot",
    "two_stream_loss": ".two_head",
    "uot_select_classes": ".uot",
    "write_selection_card": ".two_head",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .prototypes import ClassPrototypes, class_prototypes
    from .report import DataSelectionReport, class_label_names, select_pretraining_subset
    from .selection import DataSelection, select_pretraining_data
    from .streams import SourceStream
    from .trainer import TwoStreamConfig, TwoStreamTrainerMixin
    from .two_head import TwoHeadModel, fixmatch_loss, two_stream_loss, write_selection_card
    from .uot import UOTSelection, prototype_cost, sinkhorn_unbalanced, uot_select_classes


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
