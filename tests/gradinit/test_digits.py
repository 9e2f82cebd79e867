"""Digits reproduction (spec §6.10): a deep MLP without normalisation, initialised 3x too large, diverges under SGD
lr 0.1; after 50 GradInit iterations (eta 0.1, gamma 1, normalize_grad, tau 1e-2) it trains."""

import math

import pytest
import torch

from hf_regtools.gradinit import gradinit_
from hf_regtools.testing.digits import digits_dataset, tensors

SEEDS = range(4)
EPOCHS = 3


@pytest.fixture(scope="module")
def digits():
    train_x, train_y = tensors(digits_dataset(split="train"))
    test_x, test_y = tensors(digits_dataset(split="test"))
    return train_x.flatten(1), train_y, test_x.flatten(1), test_y


def too_large_mlp(seed, depth=10, width=64, factor=3.0):
    """PyTorch's default Linear init times `factor`, ReLU, no normalisation."""
    torch.manual_seed(seed)
    sizes = [64, *[width] * (depth - 1), 10]
    layers = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        linear = torch.nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.mul_(factor)
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def sgd(model, digits, seed, *, epochs=EPOCHS, lr=0.1, batch_size=64):
    """Mean training loss of each epoch and the final test accuracy."""
    train_x, train_y, test_x, test_y = digits
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    epoch_losses = []
    for _ in range(epochs):
        order, losses = torch.randperm(len(train_y), generator=generator), []
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    with torch.no_grad():
        accuracy = (model(test_x).argmax(-1) == test_y).float().mean().item()
    return epoch_losses, accuracy


def half_batches(digits, seed, size=32):
    train_x, train_y = digits[:2]
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed + 100))
    return [(train_x[order[i:i + size]], train_y[order[i:i + size]]) for i in range(0, len(order) - size + 1, size)]


@pytest.mark.slow
def test_gradinit_makes_a_diverging_deep_mlp_train(digits):
    plain, rescaled = [], []
    for seed in SEEDS:
        plain.append(sgd(too_large_mlp(seed), digits, seed))
        model = too_large_mlp(seed)
        report = gradinit_(model, half_batches(digits, seed), iterations=50, lr=1e-2, inner_lr=0.1, gamma=1.0)
        assert report.constraint_steps > 0 and report.objective_steps > 0
        rescaled.append(sgd(model, digits, seed))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    plain_first = mean([losses[0] for losses, _ in plain])
    first = mean([losses[0] for losses, _ in rescaled])
    assert not math.isfinite(plain_first) or plain_first > math.log(10)  # measured: NaN for every seed
    assert first < math.log(10)  # measured: 2.18 (mean of 4 seeds)
    assert mean([losses[-1] for losses, _ in rescaled]) < 2.0  # measured: 1.72 after 3 epochs
    assert mean([accuracy for _, accuracy in rescaled]) > 0.3  # measured: 0.49; chance is 0.1
    assert mean([accuracy for _, accuracy in plain]) < 0.15  # measured: 0.10 (diverged)
