"""The UOT selection core: POT wired as the paper's update rule, target marginals, planted recovery, invariances, the
cost formula, errors (spec data_selection.md §7.1-4)."""

import numpy as np
import pytest
import torch

from hf_regtools.data_selection.uot import UOTSelection, prototype_cost, sinkhorn_unbalanced, uot_select_classes


def generalised_sinkhorn(a, b, M, eps, tau_s, tau_t, max_iter=100_000, tol=1e-15):
    """The spec's §2 update rule, transcribed: K = exp(-M/eps), u, v start at 1/dim."""
    K = np.exp(-M / eps)
    u, v = np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b))
    for _ in range(max_iter):
        u_prev, v_prev = u, v
        u = (a / (K @ v)) ** (tau_s / (tau_s + eps))
        v = (b / (K.T @ u)) ** (tau_t / (tau_t + eps))
        change_u = np.abs(u - u_prev).max() / max(np.abs(u).max(), np.abs(u_prev).max(), 1.0)
        change_v = np.abs(v - v_prev).max() / max(np.abs(v).max(), np.abs(v_prev).max(), 1.0)
        if (change_u + change_v) / 2 < tol:
            break
    return u[:, None] * K * v[None, :]


def planted(seed, num_source=50, num_target=8, dim=16, noise=0.3):
    rng = np.random.default_rng(seed)
    source = rng.standard_normal((num_source, dim))
    return source, source[:num_target] + noise * rng.standard_normal((num_target, dim))


@pytest.mark.parametrize("seed", range(3))
def test_pot_call_matches_the_generalised_sinkhorn_rule(seed):
    # §7.1: reg_m = (tau_s, tau_t) means (source, target) relaxation, reg the entropy weight, all-ones marginals
    rng = np.random.default_rng(seed)
    M = rng.uniform(0.0, 20.0, (50, 8))
    ones_s, ones_t = np.ones(50), np.ones(8)
    plan = sinkhorn_unbalanced(ones_s, ones_t, M, reg=1.0, reg_m=(1.0, 100.0))
    np.testing.assert_allclose(plan, generalised_sinkhorn(ones_s, ones_t, M, 1.0, 1.0, 100.0), rtol=0, atol=1e-6)
    swapped = generalised_sinkhorn(ones_s, ones_t, M, 1.0, 100.0, 1.0)
    assert np.abs(plan - swapped).max() > 1e-2


def test_pot_call_matches_the_rule_for_other_marginals_and_settings():
    rng = np.random.default_rng(3)
    M, a, b = rng.uniform(0.0, 10.0, (50, 8)), rng.uniform(0.5, 2.0, 50), rng.uniform(0.5, 2.0, 8)
    plan = sinkhorn_unbalanced(a, b, M, reg=0.5, reg_m=(2.0, 50.0), tol=1e-9)
    np.testing.assert_allclose(plan, generalised_sinkhorn(a, b, M, 0.5, 2.0, 50.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_target_marginals_are_within_one_percent_of_one(seed):
    # §7.2: tau_t = 100 gives every target class mass ~1 (each has a close source class); tau_s = 1 lets source
    # classes starve; with tau_t = 1 the target marginal is loose
    source, target = planted(seed)
    selection = uot_select_classes(source, target, 5)
    columns = selection.plan.sum(axis=0)
    assert np.abs(columns - 1).max() < 0.01
    assert selection.target_marginal_error == pytest.approx(np.abs(columns - 1).max(), abs=1e-15)
    assert selection.importance[8:].max() < 0.5
    assert uot_select_classes(source, target, 5, reg_m=(1.0, 1.0)).target_marginal_error > 0.05


@pytest.mark.parametrize("seed", range(5))
def test_planted_source_classes_are_recovered(seed):
    # §7.3
    source, target = planted(seed)
    selection = uot_select_classes(source, target, 8)
    assert set(selection.class_ids) == set(range(8))
    w = selection.importance
    assert list(selection.class_ids) == sorted(range(8), key=lambda j: -w[j])
    assert w[selection.class_ids[-1]] > w[8:].max()


def test_selection_is_invariant_to_feature_scale():
    # §7.4: cosine cost, so scaling every feature by c > 0 changes nothing
    source, target = planted(0)
    reference = uot_select_classes(source, target, 12)
    for c in (1e-3, 7.5, 1e4):
        scaled = uot_select_classes(c * source, c * target, 12)
        assert scaled.class_ids == reference.class_ids
        np.testing.assert_allclose(scaled.importance, reference.importance, rtol=1e-9)
    per_row = uot_select_classes(source * np.arange(1, 51)[:, None], target * 3.0, 12)
    assert per_row.class_ids == reference.class_ids


def test_permuting_source_classes_permutes_the_masses():
    source, target = planted(1)
    reference = uot_select_classes(source, target, 10)
    permutation = np.random.default_rng(0).permutation(50)
    permuted = uot_select_classes(source[permutation], target, 10)
    np.testing.assert_allclose(permuted.importance, reference.importance[permutation], rtol=1e-9, atol=1e-15)
    assert [int(permutation[i]) for i in permuted.class_ids] == reference.class_ids
    np.testing.assert_allclose(permuted.plan, reference.plan[permutation], rtol=1e-9, atol=1e-15)


def test_cost_is_one_minus_cosine_over_p_m():
    rng = np.random.default_rng(0)
    source, target = rng.standard_normal((7, 5)) * 3, rng.standard_normal((4, 5))
    expected = np.array([[(1 - s @ t / np.linalg.norm(s) / np.linalg.norm(t)) / 0.25 for t in target] for s in source])
    cost = prototype_cost(source, target, p_m=0.25)
    assert cost.dtype == np.float64 and cost.shape == (7, 4)
    np.testing.assert_allclose(cost, expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.diag(prototype_cost(source, source)), 0.0, atol=1e-13)
    single = prototype_cost(source.astype(np.float32), target.astype(np.float32), p_m=0.25)
    assert single.dtype == np.float64
    np.testing.assert_allclose(single, expected, rtol=0, atol=1e-5)


def test_cost_blocks_cover_every_row(monkeypatch):
    from hf_regtools.data_selection import uot

    rng = np.random.default_rng(1)
    source, target = rng.standard_normal((11, 6)), rng.standard_normal((3, 6))
    whole = prototype_cost(source, target)
    monkeypatch.setattr(uot, "_COST_BLOCK_ROWS", 4)
    np.testing.assert_array_equal(prototype_cost(source, target), whole)


def test_torch_and_numpy_inputs_agree():
    source, target = planted(2)
    from_numpy = uot_select_classes(source, target, 8)
    from_torch = uot_select_classes(torch.from_numpy(source).requires_grad_(), torch.from_numpy(target), 8)
    assert isinstance(from_torch, UOTSelection)
    assert from_torch.class_ids == from_numpy.class_ids
    np.testing.assert_allclose(from_torch.plan, from_numpy.plan, rtol=1e-12)
    half = uot_select_classes(torch.from_numpy(source).half(), torch.from_numpy(target).bfloat16(), 8)
    assert set(half.class_ids) == set(range(8))


def test_uot_select_classes_is_prototype_cost_then_sinkhorn():
    source, target = planted(4)
    selection = uot_select_classes(source, target, 3, p_m=0.2, reg=0.7, reg_m=(2.0, 30.0))
    plan = sinkhorn_unbalanced(np.ones(50), np.ones(8), prototype_cost(source, target, p_m=0.2), reg=0.7,
                               reg_m=(2.0, 30.0))
    np.testing.assert_array_equal(selection.plan, plan)
    np.testing.assert_array_equal(selection.importance, plan.sum(axis=1))
    assert selection.class_ids == np.argsort(-plan.sum(axis=1), kind="stable")[:3].tolist()


@pytest.mark.parametrize("n, message", [(51, "more than the 50 source classes"), (0, "at least 1"),
                                        (-2, "at least 1"), (2.5, "must be an integer"), (True, "must be an integer")])
def test_bad_number_of_classes(n, message):
    source, target = planted(0)
    with pytest.raises(ValueError, match=message):
        uot_select_classes(source, target, n)


def test_bad_prototypes():
    source, target = planted(0)
    with pytest.raises(ValueError, match="16 features and target_prototypes 12"):
        uot_select_classes(source, target[:, :12], 3)
    nan = source.copy()
    nan[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"source_prototypes: rows \[7\] contain NaN"):
        uot_select_classes(nan, target, 3)
    zero = target.copy()
    zero[[2, 5]] = 0.0
    with pytest.raises(ValueError, match=r"target_prototypes: rows \[2, 5\] are zero vectors"):
        uot_select_classes(source, zero, 3)
    with pytest.raises(ValueError, match="num_classes, feature_dim"):
        prototype_cost(source[0], target)
    with pytest.raises(ValueError, match="num_classes, feature_dim"):
        prototype_cost(source[:0], target)
    with pytest.raises(ValueError, match="p_m must be a positive number"):
        prototype_cost(source, target, p_m=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reg=0.0), "reg must be a positive"), (dict(reg_m=(1.0, -1.0)), r"reg_m\[1\] \(tau_t\)"),
    (dict(reg_m=(1.0, 2.0, 3.0)), "pair"), (dict(max_iter=0), "max_iter"), (dict(tol=float("nan")), "tol")])
def test_bad_solver_settings_fail_before_the_cost(kwargs, message, monkeypatch):
    from hf_regtools.data_selection import uot

    monkeypatch.setattr(uot, "prototype_cost", lambda *args, **kw: pytest.fail("cost computed before validation"))
    source, target = planted(0)
    with pytest.raises(ValueError, match=message):
        uot_select_classes(source, target, 3, **kwargs)


def test_sinkhorn_unbalanced_checks_shapes_and_values():
    M = np.ones((5, 3))
    with pytest.raises(ValueError, match=r"a: expected shape \(5,\)"):
        sinkhorn_unbalanced(np.ones(4), np.ones(3), M)
    with pytest.raises(ValueError, match="non-negative"):
        sinkhorn_unbalanced(np.ones(5), -np.ones(3), M)
    M[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        sinkhorn_unbalanced(np.ones(5), np.ones(3), M)
    plan = sinkhorn_unbalanced(np.ones(5, dtype=np.float32), np.ones(3), np.zeros((5, 3), dtype=np.float32), reg_m=2.0)
    assert plan.dtype == np.float32
    np.testing.assert_allclose(plan, generalised_sinkhorn(np.ones(5), np.ones(3), np.zeros((5, 3)), 1.0, 2.0, 2.0),
                               atol=1e-6)
