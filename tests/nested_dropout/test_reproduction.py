"""Digits reproduction: a Bayesian nested VGG-style CNN against fixed-rate nested dropout, 3 seeds, on the mean.

The paper claims that Bayesian nested networks beat nested networks with a fixed nested-dropout rate in accuracy
and calibration at every width. Here both networks are the same nested CNN trained for the same steps: the Bayesian
one learns its ordering (`beta_r`) and weight posteriors (`log_alpha`) with the KL (`kl_weight=1e-5`, the official
value), and is evaluated with sampled weights (8 passes, the official count); the baseline keeps the ordering unit's
`beta_r` at its initial value (geometric keep probabilities `sigmoid(3)^i`, not learned) and has no weight noise.
Sub-networks are extracted at 4 widths and their BatchNorm statistics recalibrated on the training set.

Run `python tests/nested_dropout/test_reproduction.py` for the table recorded in the method card.
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch

from hf_regtools.nested_dropout import (LinearVDO, NestedConv2d, convert_to_nested, expected_calibration_error,
                                        extract_subnet, nested_kl, predict_mean)
from hf_regtools.testing.digits import digits_dataset, tensors
from hf_regtools.testing.tiny_models import VGGClassifier

SEEDS = (0, 1, 2)
WIDTHS = (0.0, 1 / 3, 2 / 3, 1.0)
STEPS = 200
MONOTONE_TOLERANCE = 0.01
"""Accuracy may drop by at most this much (absolute, mean over seeds) from one width to the next wider one."""


def nested_cnn(seed: int, *, bayesian: bool) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = convert_to_nested(VGGClassifier(config=(16, "M", 32, 32), hidden=32, num_labels=10, channels=1),
                              num_div=8, freeze=2, prior_pi=0.95)
    if not bayesian:
        for module in model.modules():
            if isinstance(module, (NestedConv2d, LinearVDO)):
                with torch.no_grad():
                    module.log_alpha.fill_(-30.0)
                module.log_alpha.requires_grad_(False)
            if isinstance(module, NestedConv2d):
                module.beta_r.requires_grad_(False)
    return model


def train_and_evaluate(seed: int, *, bayesian: bool, steps: int = STEPS, kl_weight: float = 1e-5) -> dict:
    """`{width: {"accuracy", "ece", "ece_of_mean_probabilities", "confidence", "parameters"}}` of one run."""
    (images, labels), (test_images, test_labels) = (tensors(digits_dataset(split=split)) for split in ("train", "test"))
    model = nested_cnn(seed, bayesian=bayesian)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images[batch])["logits"], labels[batch])
        if bayesian:
            loss = loss + kl_weight * nested_kl(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loader = [images[start:start + 128] for start in range(0, len(labels), 128)]
    results = {}
    for rho in WIDTHS:
        subnet = extract_subnet(model, rho, weight_mode="sampled" if bayesian else "deterministic", loader=loader)
        mean = predict_mean(subnet, test_images, passes=8 if bayesian else 1)
        results[rho] = {
            "accuracy": (mean.logits.argmax(1) == test_labels).float().mean().item(),
            "ece": expected_calibration_error(mean.logits, test_labels, from_logits=True),
            "ece_of_mean_probabilities": expected_calibration_error(mean.probabilities, test_labels,
                                                                    from_logits=False),
            "confidence": mean.logits.softmax(1).max(1).values.mean().item(),
            "parameters": extract_subnet(model, rho).nested_subnet_info.parameters,
        }
    return results


@functools.cache
def reproduction() -> dict[str, dict[float, dict[str, float]]]:
    """Mean over `SEEDS` of every metric, per network (`"bayesian"`, `"fixed"`) and width."""
    table = {}
    for name in ("bayesian", "fixed"):
        runs = [train_and_evaluate(seed, bayesian=name == "bayesian") for seed in SEEDS]
        table[name] = {rho: {key: statistics.fmean(run[rho][key] for run in runs) for key in runs[0][rho]}
                       for rho in WIDTHS}
    return table


@pytest.fixture(scope="module")
def measured():
    return reproduction()


def test_accuracy_does_not_fall_with_the_width(measured):
    for name, rows in measured.items():
        accuracies = [rows[rho]["accuracy"] for rho in WIDTHS]
        for narrow, wide in zip(accuracies, accuracies[1:]):
            assert wide >= narrow - MONOTONE_TOLERANCE, (name, accuracies)
        assert accuracies[-1] >= 0.95, (name, accuracies)
        assert accuracies[-1] - accuracies[0] >= 0.03, (name, accuracies)


def test_parameters_grow_with_the_width(measured):
    counts = [measured["fixed"][rho]["parameters"] for rho in WIDTHS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_calibration_against_fixed_rate_nested_dropout(measured):
    """Measured, not the paper's claim: on digits at this budget the Bayesian network's sampled predictions are less
    confident than the baseline's at every width; its ECE is not lower (recorded in the method card's results, not
    asserted)."""
    bayesian, fixed = measured["bayesian"], measured["fixed"]
    for rho in WIDTHS:
        assert bayesian[rho]["confidence"] < fixed[rho]["confidence"], rho
        assert bayesian[rho]["ece"] < 0.2 and fixed[rho]["ece"] < 0.2, rho


if __name__ == "__main__":
    print("| network | width | accuracy | ECE (mean logits) | ECE (mean softmax) | confidence | parameters |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in reproduction().items():
        for rho, row in rows.items():
            print(f"| {name} | {rho:.2f} | {row['accuracy']:.4f} | {row['ece']:.4f} | "
                  f"{row['ece_of_mean_probabilities']:.4f} | {row['confidence']:.4f} | {row['parameters']:.0f} |")
