import pytest
import torch

from hf_regtools.weight_selection import (IndexPlan, WeightSelectionError, consecutive_indices, random_indices,
                                          select_tensor, uniform_indices)


def official_uniform_indices(D, d):
    """Copy of the rule in OscarXZQ/weight-selection `weight_selection.py` after PR #8."""
    if D % d == 0:
        return torch.arange(0, D, D // d)
    return torch.round(torch.linspace(0, D - 1, d)).long()


@pytest.mark.parametrize(
    "D, d, expected_start",
    [
        (384, 192, [0, 2, 4, 6]),
        (1152, 576, [0, 2, 4, 6]),
        (10, 4, [0, 3, 6, 9]),
        (7, 3, [0, 3, 6]),
        (768, 320, [0, 2, 5, 7, 10, 12]),
        (384, 320, [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]),
        (96, 96, list(range(10))),
    ],
)
def test_uniform_indices_match_spec_and_official_rule(D, d, expected_start):
    index = uniform_indices(D, d)
    assert index.tolist()[: len(expected_start)] == expected_start
    assert torch.equal(index, official_uniform_indices(D, d))
    assert len(index) == d and index.unique().numel() == d and int(index.max()) < D


@pytest.mark.parametrize("D, d", [(9, 4), (100, 37), (1152, 960), (5, 5), (2, 1)])
def test_uniform_indices_are_sorted_in_range_and_end_at_last(D, d):
    index = uniform_indices(D, d)
    assert torch.all(index[1:] > index[:-1])
    assert index[0] == 0
    if D % d:
        assert index[-1] == D - 1


def test_integer_ratio_is_strided():
    assert uniform_indices(12, 4).tolist() == [0, 3, 6, 9]


def test_other_modes():
    assert consecutive_indices(10, 4).tolist() == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    index = random_indices(50, 10, generator=g)
    assert len(index.unique()) == 10 and torch.all(index[1:] > index[:-1]) and int(index.max()) < 50


def test_random_plan_is_consistent_and_seeded():
    plan = IndexPlan("random", seed=3)
    assert torch.equal(plan(64, 16), plan(64, 16))
    assert torch.equal(IndexPlan("random", seed=3)(64, 16), plan(64, 16))
    assert not torch.equal(IndexPlan("random", seed=4)(64, 16), plan(64, 16))


@pytest.mark.parametrize("D, d", [(3, 4), (4, 0)])
def test_invalid_sizes_raise(D, d):
    with pytest.raises(WeightSelectionError):
        uniform_indices(D, d)


def test_unknown_mode_lists_choices():
    with pytest.raises(WeightSelectionError, match="uniform"):
        IndexPlan("strided")


def test_select_tensor_selects_every_axis():
    t = torch.arange(6 * 8 * 3 * 3).reshape(6, 8, 3, 3).float()
    out = select_tensor(t, (3, 4, 3, 3))
    assert torch.equal(out, t[[0, 2, 4]][:, [0, 2, 4, 6]])


def test_select_tensor_per_chunk_qkv():
    t = torch.arange(3 * 384).float()
    per_chunk = select_tensor(t, (3 * 320,), qkv_chunks=3)
    embed = uniform_indices(384, 320)
    assert torch.equal(per_chunk, torch.cat([t[embed + i * 384] for i in range(3)]))


def test_select_tensor_fixed_axes_and_growth_raise():
    with pytest.raises(WeightSelectionError, match="axis 1 must be equal"):
        select_tensor(torch.zeros(1, 17, 8), (1, 9, 4), fixed_axes=(1,), name="pos_embed")
    with pytest.raises(WeightSelectionError, match="larger than the teacher"):
        select_tensor(torch.zeros(4, 4), (8, 4), name="w")
