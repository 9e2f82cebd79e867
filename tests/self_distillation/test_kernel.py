"""The kernel ridge regression theory (spec section 7, tests 1-3): closed-form shrinkage, the growing constant,
collapse, constraint tightness."""

import numpy as np
import pytest

from hf_regtools.self_distillation import kernel_self_distillation, rbf_kernel

K = 40


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, K)
    y = np.sin(3 * x) + 0.3 * rng.standard_normal(K)
    return x, y


def test_fixed_c_shrinks_each_eigen_direction_by_the_closed_form(data):
    x, y = data
    c = 0.05
    result = kernel_self_distillation(x, y, c=c, rounds=5)
    d, v = result.eigenvalues, result.eigenvectors
    gram = rbf_kernel(x, x, bandwidth=0.2)
    step = gram @ np.linalg.inv(c * np.eye(K) + gram)
    y_t = y.copy()
    for t, round_ in enumerate(result.rounds, start=1):
        np.testing.assert_allclose(v.T @ round_.y, (d / (d + c)) ** t * (v.T @ y), atol=1e-8, rtol=0)
        y_t = step @ y_t
        np.testing.assert_allclose(round_.y, y_t, atol=1e-8, rtol=0)
        np.testing.assert_allclose(result.predict(x, t), round_.y, atol=1e-8, rtol=0)
    assert result.collapsed_at is None and [r.c for r in result.rounds] == [c] * 5


def top3_share(z):
    return float(np.sum(z[-3:] ** 2) / np.sum(z ** 2))  # eigh sorts ascending: the top directions are last


@pytest.mark.parametrize("eps", [0.02, 0.01])
def test_constrained_rounds_grow_c_concentrate_on_top_directions_and_collapse(data, eps):
    x, y = data
    result = kernel_self_distillation(x, y, eps=eps, rounds=100)
    cs = [r.c for r in result.rounds]
    assert len(cs) >= 2 and all(b >= a for a, b in zip(cs, cs[1:]))
    assert result.collapsed_at == len(result.rounds) + 1
    last = result.rounds[-1].y
    assert last @ last <= K * eps  # the next round cannot meet the constraint
    shares = [top3_share(result.z0)] + [top3_share(r.z) for r in result.rounds]
    assert all(b >= a - 1e-12 for a, b in zip(shares, shares[1:]))
    train_mse = [np.mean((r.y - y) ** 2) for r in result.rounds]
    assert all(b >= a - 1e-12 for a, b in zip(train_mse, train_mse[1:]))
    np.testing.assert_array_equal(result.predict(x, result.collapsed_at), np.zeros(K))


def test_smaller_eps_collapses_later(data):
    x, y = data
    assert kernel_self_distillation(x, y, eps=0.01, rounds=200).collapsed_at > \
        kernel_self_distillation(x, y, eps=0.02, rounds=200).collapsed_at


@pytest.mark.parametrize("eps", [0.02, 0.01])
def test_each_round_meets_the_constraint_exactly(data, eps):
    x, y = data
    result = kernel_self_distillation(x, y, eps=eps, rounds=100)
    previous = y
    for round_ in result.rounds:
        assert np.mean((previous - round_.y) ** 2) == pytest.approx(eps, abs=1e-8)
        previous = round_.y


def test_collapse_at_round_one_when_the_labels_already_meet_the_constraint(data):
    x, y = data
    result = kernel_self_distillation(x, y, eps=1.001 * float(y @ y) / K, rounds=3)
    assert result.collapsed_at == 1 and result.rounds == []
    assert np.all(result.predict(x, 2) == 0)


def test_callable_kernel_and_bad_input(data):
    x, y = data
    linear = kernel_self_distillation(x, y, kernel=lambda a, b: np.outer(a, b) + 1.0, c=0.1, rounds=2)
    assert len(linear.rounds) == 2
    with pytest.raises(ValueError, match="exactly one of eps"):
        kernel_self_distillation(x, y, rounds=2)
    with pytest.raises(ValueError, match="exactly one of eps"):
        kernel_self_distillation(x, y, eps=0.1, c=0.1)
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernel_self_distillation(x, y, kernel="laplace", c=0.1)
    with pytest.raises(ValueError, match="as many examples"):
        kernel_self_distillation(x, y[:-1], c=0.1)
    with pytest.raises(ValueError, match="rounds must be"):
        kernel_self_distillation(x, y, c=0.1, rounds=0)
    with pytest.raises(ValueError, match="was not run"):
        linear.predict(x, 3)
