"""Label-noise SGD: Damian, Ma and Lee, *Label Noise SGD Provably Prefers Flat Global Minimizers*, NeurIPS 2021
(arXiv:2106.06530).

See the method card (`README.md` in this folder). Names resolve lazily, so that reading the technique's registry
entry imports no torch. The sharpness probe that measures the flatness the paper is about lives in
`hf_regtools.diagnostics` (`hessian_trace`, `hessian_top_eigenvalue`, `SharpnessCallback`).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "LabelNoiseConfig": ".functional",
    "LabelNoiseLoss": ".trainer",
    "LabelNoiseTrainerMixin": ".trainer",
    "label_noise_loss": ".trainer",
    "label_noise_loss_value": ".functional",
    "noisy_targets": ".functional",
    "step_generator": ".functional",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .functional import LabelNoiseConfig, label_noise_loss_value, noisy_targets, step_generator
    from .trainer import LabelNoiseLoss, LabelNoiseTrainerMixin, label_noise_loss


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
