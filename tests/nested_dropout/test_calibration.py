"""Expected calibration error and predictions averaged over stochastic passes."""

import pytest
import torch

from hf_regtools.nested_dropout.calibration import expected_calibration_error, predict_mean


def reference_ece(logits, labels, n_bins=15):
    """A direct loop over the bins (the textbook definition, as in the official `ECELoss`)."""
    confidences, predictions = logits.softmax(1).max(1)
    correct = predictions.eq(labels)
    boundaries = torch.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lower, upper in zip(boundaries[:-1], boundaries[1:]):
        in_bin = confidences.gt(lower) & confidences.le(upper)
        if in_bin.any():
            share = in_bin.float().mean()
            ece += (confidences[in_bin].mean() - correct[in_bin].float().mean()).abs() * share
    return float(ece)


def test_matches_the_bin_loop_on_logits_and_probabilities():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 10, generator=generator)
    labels = torch.randint(0, 10, (500,), generator=generator)
    for n_bins in (1, 10, 15):
        expected = reference_ece(logits, labels, n_bins)
        assert expected_calibration_error(logits, labels, n_bins) == pytest.approx(expected, abs=1e-6)
        assert expected_calibration_error(logits.softmax(1), labels, n_bins) == pytest.approx(expected, abs=1e-6)
    assert expected_calibration_error(logits.softmax(1), labels, from_logits=False) == pytest.approx(
        reference_ece(logits, labels), abs=1e-6)


def test_calibrated_and_overconfident_extremes():
    probabilities = torch.tensor([[0.8, 0.2]]).repeat(1000, 1)
    labels = torch.cat([torch.zeros(800), torch.ones(200)]).long()
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(probabilities, torch.ones(1000).long()) == pytest.approx(0.8)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]] * 4), torch.ones(4).long()) == pytest.approx(1.0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="labels must have shape"):
        expected_calibration_error(torch.zeros(4, 3), torch.zeros(5).long())
    with pytest.raises(ValueError, match="non-empty"):
        expected_calibration_error(torch.zeros(4), torch.zeros(4).long())
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.zeros(4, 3), torch.zeros(4).long(), n_bins=0)
    with pytest.raises(ValueError, match="passes"):
        predict_mean(torch.nn.Linear(2, 2), torch.zeros(1, 2), passes=0)


class NoisyClassifier(torch.nn.Module):
    """Adds fresh noise to its logits in every pass, also in eval mode (like a sampled sub-network)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, pixel_values, labels=None):
        assert labels is None
        return {"logits": self.linear(self.bn(pixel_values)) + torch.randn(len(pixel_values), 3)}


def test_mean_over_passes_of_softmax_and_logits_restores_modes():
    model, inputs = NoisyClassifier(), torch.randn(6, 4)
    model.train()
    model.bn.eval()
    torch.manual_seed(1)
    mean = predict_mean(model, {"pixel_values": inputs, "labels": torch.zeros(6).long()}, passes=5)
    assert model.training and not model.bn.training and model.linear.training
    torch.manual_seed(1)
    model.eval()
    with torch.no_grad():
        passes = torch.stack([model(inputs)["logits"] for _ in range(5)])
    torch.testing.assert_close(mean.logits, passes.mean(0))
    torch.testing.assert_close(mean.probabilities, passes.softmax(-1).mean(0))
    assert not torch.allclose(mean.probabilities, mean.logits.softmax(-1))


def test_deterministic_model_gives_its_softmax():
    model, inputs = torch.nn.Linear(4, 3), torch.randn(6, 4)
    mean = predict_mean(model, inputs, passes=3)
    torch.testing.assert_close(mean.logits, model(inputs).detach())
    torch.testing.assert_close(mean.probabilities, model(inputs).detach().softmax(-1))
