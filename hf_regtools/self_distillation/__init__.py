"""Self-distillation: Mobahi, Farajtabar and Bartlett, *Self-Distillation Amplifies Regularization in Hilbert Space*,
NeurIPS 2020 (arXiv:2002.05715); and knowledge distillation from any teacher with the student's label space.

See the method card (`README.md` in this folder). Names resolve lazily, so that reading the technique's registry
entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "DistillationConfig": ".trainer",
    "DistillationTrainerMixin": ".trainer",
    "KernelRound": ".kernel",
    "KernelSelfDistillation": ".kernel",
    "RoundResult": ".rounds",
    "SelfDistillationTrainerMixin": ".trainer",
    "add_teacher_logits": ".trainer",
    "distillation_loss": ".functional",
    "freeze_teacher": ".functional",
    "kernel_self_distillation": ".kernel",
    "load_round_model": ".rounds",
    "save_round_model": ".rounds",
    "per_example_distillation_loss": ".functional",
    "rbf_kernel": ".kernel",
    "run_self_distillation": ".rounds",
    "teacher_logits_of": ".functional",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .functional import distillation_loss, freeze_teacher, per_example_distillation_loss, teacher_logits_of
    from .kernel import KernelRound, KernelSelfDistillation, kernel_self_distillation, rbf_kernel
    from .rounds import RoundResult, load_round_model, run_self_distillation, save_round_model
    from .trainer import (DistillationConfig, DistillationTrainerMixin, SelfDistillationTrainerMixin,
                          add_teacher_logits)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
