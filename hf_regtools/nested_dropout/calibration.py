"""Calibration of (Bayesian) classifiers: expected calibration error and predictions averaged over stochastic passes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


def expected_calibration_error(probabilities_or_logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, *,
                               from_logits: bool | None = None) -> float:
    """Expected calibration error with `n_bins` equal-width confidence bins (Guo et al., 2017).

    `ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`, where the confidence of a sample is its largest
    class probability and bin `b` holds the confidences in `(b / n_bins, (b + 1) / n_bins]`: the metric of the
    official code (`modules/calibration.py`), which computes it per test batch and averages over batches; this
    function takes the whole set at once.

    Args:
        probabilities_or_logits (`torch.Tensor`): `(N, num_classes)` class probabilities or logits.
        labels (`torch.Tensor`): `(N,)` integer labels.
        n_bins (`int`, *optional*, defaults to 15): number of confidence bins.
        from_logits (`bool`, *optional*): whether the first argument holds logits (a softmax is applied). By default,
            rows of non-negative values that sum to 1 are taken as probabilities, anything else as logits.

    Returns:
        `float`: the ECE, in [0, 1].
    """
    scores = torch.as_tensor(probabilities_or_logits).detach()
    labels = torch.as_tensor(labels).detach()
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"probabilities_or_logits must be a non-empty (N, num_classes) tensor, got shape "
                         f"{tuple(scores.shape)}")
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"labels must have shape ({scores.shape[0]},) to match the predictions, got "
                         f"{tuple(labels.shape)}")
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    scores = scores.double()
    if from_logits is None:
        from_logits = not (bool((scores >= 0).all()) and bool(torch.allclose(scores.sum(1), torch.ones_like(
            scores[:, 0]), atol=1e-4)))
    probabilities = scores.softmax(1) if from_logits else scores
    confidences, predictions = probabilities.max(1)
    correct = (predictions == labels.to(predictions.device)).double()
    bins = torch.clamp(torch.ceil(confidences * n_bins).long() - 1, 0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(confidences))
    confidence_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidences)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    return float((confidence_sum - correct_sum).abs().sum() / len(labels))


@dataclass(frozen=True)
class MeanPrediction:
    """Predictions averaged over stochastic forward passes.

    Attributes:
        probabilities (`torch.Tensor`): mean of the per-pass softmax (the Bayesian predictive distribution; the
            official code uses it for OOD entropy and max-probability).
        logits (`torch.Tensor`): mean of the per-pass logits (the official code's input to accuracy and ECE).
    """

    probabilities: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def predict_mean(model: torch.nn.Module, inputs: torch.Tensor | Mapping[str, Any], passes: int = 8) -> MeanPrediction:
    """Average `passes` forward passes of `model` on `inputs` (eval mode, no gradients; the mode is restored).

    With a sub-network of `extract_subnet(..., weight_mode="sampled")` every pass draws new weights (8 passes in the
    paper); with deterministic weights all passes agree.

    Args:
        model (`nn.Module`): a classifier returning logits, a dict with `"logits"` or an output with `.logits`.
        inputs (`torch.Tensor` or `Mapping`): the model's input, or keyword arguments for it (a `labels` entry is
            not passed on).
        passes (`int`, *optional*, defaults to 8): number of forward passes.
    """
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise ValueError(f"passes must be a positive integer, got {passes!r}")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        logits_sum = probabilities_sum = None
        for _ in range(passes):
            logits = logits_of_output(_call(model, inputs)).float()
            probabilities = logits.softmax(-1)
            logits_sum = logits if logits_sum is None else logits_sum + logits
            probabilities_sum = probabilities if probabilities_sum is None else probabilities_sum + probabilities
    finally:
        for module, training in modes.items():
            module.training = training
    return MeanPrediction(probabilities=probabilities_sum / passes, logits=logits_sum / passes)


def logits_of_output(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a mapping with `"logits"` or an object with `.logits`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; return a tensor, a dict "
                    "with 'logits' or an output with a `.logits` attribute")


def _call(model: torch.nn.Module, inputs: torch.Tensor | Mapping[str, Any]):
    if isinstance(inputs, Mapping):
        return model(**{key: value for key, value in inputs.items() if key not in ("labels", "label")})
    return model(inputs)
