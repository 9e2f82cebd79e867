"""Digits reproduction (issue 11): label noise reaches a flatter solution (smaller Hessian trace of the clean training
loss) than no noise at equal training loss. Figures in the method card."""

import pytest
import torch

from hf_regtools.diagnostics import hessian_trace
from hf_regtools.label_noise import LabelNoiseConfig, label_noise_loss_value, noisy_targets
from hf_regtools.testing.digits import digits_dataset, tensors

SEEDS, STEPS, LR, SIGMA = (0, 1, 2), 2000, 0.2, 1.5


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def clean_loss(model, x, y, config):
    return label_noise_loss_value(model(x), y, config, noisy=False)


def gradient_descent(model, x, y, config, *, noisy, steps, stop_at=None):
    """Full-batch GD with fresh noise per example and step (spec §7 test 5); stops once the clean loss <= stop_at."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(steps):
        loss = label_noise_loss_value(model(x), y, config, seed=config.seed, step=step, noisy=noisy)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if stop_at is not None and step % 10 == 9:
            with torch.no_grad():
                if float(clean_loss(model, x, y, config)) <= stop_at:
                    return


@pytest.mark.slow
def test_label_noise_finds_a_flatter_solution_at_equal_training_loss():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = tensors(digits_dataset(split="train"))
        x = x.flatten(1)
        results = []
        for seed in SEEDS:
            config = LabelNoiseConfig(kind="soft_mse", sigma=SIGMA, num_classes=10, seed=seed)
            probe = lambda model, batch: clean_loss(model, batch["x"], batch["y"], config)  # noqa: E731
            noisy = mlp(seed)
            gradient_descent(noisy, x, y, config, noisy=True, steps=STEPS)
            with torch.no_grad():
                reached = float(clean_loss(noisy, x, y, config))
            plain = mlp(seed)  # the same initialization, no noise, stopped at the noisy run's training loss
            gradient_descent(plain, x, y, config, noisy=False, steps=4 * STEPS, stop_at=reached)
            with torch.no_grad():
                plain_loss = float(clean_loss(plain, x, y, config))
            results.append((reached, hessian_trace(noisy, probe, {"x": x, "y": y}, 32),
                            plain_loss, hessian_trace(plain, probe, {"x": x, "y": y}, 32)))
    finally:
        torch.set_num_threads(threads)
    _, noisy_trace, _, plain_trace = (sum(column) / len(SEEDS) for column in zip(*results))
    assert all(p <= n and p >= 0.9 * n for n, _, p, _ in results)  # equal training loss (within 10 %)
    assert noisy_trace < 0.95 * plain_trace, results


@pytest.mark.slow
def test_quadratically_parameterized_regression_prefers_the_sparse_flat_solution():
    """Spec §7 test 5: f(x) = <u * u, x>, d = 100, n = 40, 5-sparse w*, u0 = 1, full-batch GD (eta 5e-3, 1e5 steps)
    with fresh Rademacher +-sigma per example and step; tr H and ||u * u - w*||^2 decrease with sigma."""
    import numpy as np

    rng = np.random.default_rng(0)
    d, n, eta = 100, 40, 5e-3
    X = torch.from_numpy(rng.normal(size=(n, d)))
    w_star = torch.zeros(d, dtype=torch.float64)
    w_star[:5] = 1
    y = X @ w_star
    results = []
    for sigma in (0.0, 1.0, 2.0):
        config = LabelNoiseConfig(kind="regression", sigma=sigma)
        u = torch.ones(d, dtype=torch.float64)
        for step in range(100_000):
            targets = noisy_targets(y, config, seed=1, step=step) if sigma else y
            u -= eta * 2 * u * (X.T @ (X @ (u * u) - targets)) / n  # the gradient of (1/2n) sum r^2
        w = u * u
        results.append((float(((w - w_star) ** 2).sum()), float(((2 * u * X) ** 2).sum() / n),
                        float(((X @ w - y) ** 2).mean())))
    distances, traces, errors = zip(*results)
    assert distances[0] > distances[1] > distances[2] and traces[0] > traces[1] > traces[2], results
    assert max(errors) <= 0.03, results
