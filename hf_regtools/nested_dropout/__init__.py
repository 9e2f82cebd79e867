"""Bayesian nested networks (variational nested dropout): Cui et al., *Bayesian Nested Neural Networks for Uncertainty
Calibration and Adaptive Compression*, CVPR 2021. See the method card (`README.md`).

Names resolve lazily, so that reading the technique's registry entry imports no torch.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "NestedConv2d": ".layers",
    "LinearVDO": ".layers",
    "nested_kl": ".layers",
    "nested_layers": ".layers",
    "downhill_sample": ".layers",
    "keep_probabilities": ".layers",
    "convert_to_nested": ".convert",
    "NestedDropoutTrainerMixin": ".trainer",
    "extract_subnet": ".extract",
    "recalibrate_bn": ".extract",
    "masked_width": ".extract",
    "subnet_info": ".extract",
    "SubnetInfo": ".extract",
    "SampledConv2d": ".extract",
    "SampledLinear": ".extract",
    "expected_calibration_error": ".calibration",
    "predict_mean": ".calibration",
    "MeanPrediction": ".calibration",
    "save_subnet": ".hub",
    "load_subnet": ".hub",
    "push_subnet": ".hub",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .calibration import MeanPrediction, expected_calibration_error, predict_mean
    from .convert import convert_to_nested
    from .extract import (SampledConv2d, SampledLinear, SubnetInfo, extract_subnet, masked_width, recalibrate_bn,
                          subnet_info)
    from .hub import load_subnet, push_subnet, save_subnet
    from .layers import LinearVDO, NestedConv2d, downhill_sample, keep_probabilities, nested_kl, nested_layers
    from .trainer import NestedDropoutTrainerMixin


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
