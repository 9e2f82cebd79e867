"""Named axes (one index set per factor name) and layer selection (first / last / even / explicit)."""

import pytest
import torch

from hf_regtools.testing.tiny_models import timm_convnext, timm_vit
from hf_regtools.weight_selection import (WeightSelectionError, layer_map, rotary_pair_indices, select_weights,
                                          top_indices, uniform_indices)
from hf_regtools.weight_selection.axes import IndexPlan


def test_a_factor_gets_one_index_set_and_products_compose_outermost_first():
    plan = IndexPlan(student_sizes={"heads": 2}, teacher_sizes={"heads": 4})
    index = plan.axis("heads*head_dim", 4 * 6, 2 * 3)
    heads, head_dim = uniform_indices(4, 2), uniform_indices(6, 3)
    assert index.tolist() == [h * 6 + j for h in heads.tolist() for j in head_dim.tolist()]
    assert plan.sets["heads"].tolist() == heads.tolist() and plan.sets["head_dim"].tolist() == head_dim.tolist()
    assert plan.axis("3*hidden", 3 * 8, 3 * 4).tolist() == [c * 8 + j for c in range(3) for j in [0, 2, 4, 6]]


def test_per_block_factors_take_the_length_of_their_base_name():
    plan = IndexPlan(teacher_sizes={"heads": 4}, student_sizes={"heads": 2})
    plan.axis("heads3*head_dim", 24, 6)
    assert plan.sets["heads3"].tolist() == [0, 2] and plan.sets["head_dim"].tolist() == [0, 2, 4]


def test_same_lengths_under_different_names_get_their_own_sets_and_a_name_keeps_its_lengths():
    plan = IndexPlan("random", seed=0)
    first, second = plan.factor("hidden", 64, 16), plan.factor("kv_heads*head_dim".split("*")[1], 64, 16)
    assert not torch.equal(first, second)
    assert plan.factor("hidden", 64, 16) is first
    with pytest.raises(WeightSelectionError, match=r"axis 'hidden' has length 32 -> 16 here but 64 -> 16"):
        plan.factor("hidden", 32, 16)


def test_factor_lengths_must_fit_the_tensor():
    plan = IndexPlan(teacher_sizes={"heads": 4}, student_sizes={"heads": 2, "head_dim": 5})
    with pytest.raises(WeightSelectionError, match=r"student's axis 'heads\*head_dim' has length 6, but its factors"):
        plan.axis("heads*head_dim", 24, 6, key="q.weight")
    with pytest.raises(WeightSelectionError, match="not a multiple of 4"):
        IndexPlan(teacher_sizes={"heads": 4}).axis("heads*head_dim", 22, 4)
    with pytest.raises(WeightSelectionError, match=r"lengths of \['heads', 'head_dim'\].*student_config="):
        IndexPlan().axis("heads*head_dim", 24, 6)


def test_rotary_pairs_stay_together():
    index = rotary_pair_indices(8, 4, uniform_indices)
    assert index.tolist() == [0, 2, 4, 6]
    assert rotary_pair_indices(12, 4, uniform_indices).tolist() == [0, 3, 6, 9]
    for j, k in zip(index[:2].tolist(), index[2:].tolist()):
        assert k - j == 4  # entry j of the first half and its partner j + D/2
    plan = IndexPlan("random", seed=3, paired=("head_dim",))
    chosen = plan.factor("head_dim", 16, 6)
    assert torch.equal(chosen[3:], chosen[:3] + 8)
    with pytest.raises(WeightSelectionError, match="must be even"):
        rotary_pair_indices(8, 3, uniform_indices)


def test_importance_keeps_the_top_scores_in_index_order():
    scores = torch.tensor([0.1, 5.0, 0.3, 5.0, 2.0, 0.0])
    assert top_indices(scores, 3).tolist() == [1, 3, 4]
    plan = IndexPlan("importance", scores={"hidden": scores})
    assert plan.factor("hidden", 6, 3).tolist() == [1, 3, 4]
    assert plan.factor("mlp0", 8, 4).tolist() == uniform_indices(8, 4).tolist()  # no scores: uniform
    with pytest.raises(WeightSelectionError, match="needs importance scores"):
        IndexPlan("importance")
    with pytest.raises(WeightSelectionError, match="scores of axis 'hidden' have 6 entries, the teacher's axis 8"):
        IndexPlan("importance", scores={"hidden": scores}).factor("hidden", 8, 4)


def test_importance_selection_of_a_vit_uses_the_scores_everywhere():
    torch.manual_seed(0)
    teacher, student = timm_vit(embed_dim=16, depth=2), timm_vit(embed_dim=8, depth=2, num_heads=1)
    scores = {"hidden": torch.arange(16.0).flip(0), "mlp1": torch.arange(64.0)}
    report = select_weights(teacher, student, mode="importance", scores=scores)
    hidden, mlp1 = torch.arange(8), torch.arange(32, 64)
    t = teacher.state_dict()
    assert torch.equal(student.norm.weight, t["norm.weight"][hidden])
    assert torch.equal(student.blocks[1].mlp.fc1.weight, t["blocks.1.mlp.fc1.weight"][mlp1][:, hidden])
    assert torch.equal(student.blocks[0].mlp.fc1.weight,
                       t["blocks.0.mlp.fc1.weight"][uniform_indices(64, 32)][:, hidden])
    assert report.settings["mode"] == "importance"


@pytest.mark.parametrize("layers, expected", [("first", [0, 1]), ("last", [2, 3]), ("even", [0, 2]),
                                              ([1, 3], [1, 3])])
def test_layer_selection_schemes_isotropic(layers, expected):
    torch.manual_seed(0)
    teacher, student = timm_vit(depth=4), timm_vit(embed_dim=8, depth=2, num_heads=1)
    report = select_weights(teacher, student, layers=layers)
    assert report.layer_map == {"": expected}
    idx = uniform_indices(16, 8)
    t = teacher.state_dict()
    for i, j in enumerate(expected):
        assert torch.equal(student.blocks[i].attn.proj.weight, t[f"blocks.{j}.attn.proj.weight"][idx][:, idx])
        assert report.sources[f"blocks.{i}.norm1.weight"] == f"blocks.{j}.norm1.weight"
    assert report.settings["layers"] == layers
    unused = {key.split(".")[1] for key in report.teacher_unused if key.startswith("blocks.")}
    assert unused == {str(j) for j in range(4)} - {str(j) for j in expected}


def test_layer_selection_per_stage_and_mlp_sets_follow_the_teacher_block():
    torch.manual_seed(0)
    teacher = timm_convnext(dims=(8, 16, 32, 64), depths=(3, 3, 9, 3))
    student = timm_convnext(dims=(4, 8, 16, 32), depths=(2, 2, 6, 2))
    report = select_weights(teacher, student, layers="last")
    assert report.layer_map == {"0": [1, 2], "1": [1, 2], "2": [3, 4, 5, 6, 7, 8], "3": [1, 2]}
    assert "mlp2.8" in report.index_sets and "mlp2.0" not in report.index_sets
    t = teacher.state_dict()
    c2 = report.index_sets["c2"]
    assert torch.equal(student.stages[2].blocks[5].conv_dw.weight, t["stages.2.blocks.8.conv_dw.weight"][c2])
    explicit = [[0, 2], [1, 2], [0, 1, 2, 3, 4, 8], [0, 1]]
    assert select_weights(teacher, timm_convnext(dims=(4, 8, 16, 32), depths=(2, 2, 6, 2)),
                          layers=explicit).layer_map == dict(zip("0123", explicit))


def test_layer_selection_as_text_from_the_command_line():
    assert layer_map("1,3", {"": 4}, {"": 2}) == {"": [1, 3]}
    assert layer_map("0,1;2", {"0": 2, "1": 3}, {"0": 2, "1": 1}) == {"0": [0, 1], "1": [2]}


def test_layer_selection_errors_name_the_fix():
    depths = {"": 4}
    with pytest.raises(WeightSelectionError, match="unknown layer selection 'middle'"):
        layer_map("middle", depths, {"": 2})
    with pytest.raises(WeightSelectionError, match=r"layers \[2, 1\]: need 2 distinct increasing"):
        layer_map([2, 1], depths, {"": 2})
    with pytest.raises(WeightSelectionError, match=r"layers \[0, 4\]: need 2 .* in 0\.\.3"):
        layer_map([0, 4], depths, {"": 2})
    with pytest.raises(WeightSelectionError, match=r"layers \[0\]: need 2"):
        layer_map([0], depths, {"": 2})
    staged = {"0": 3, "1": 3}
    with pytest.raises(WeightSelectionError, match="the model has 2 stages: give one list of teacher blocks per stage"):
        layer_map([0, 1], staged, {"0": 2, "1": 2})
    with pytest.raises(WeightSelectionError, match=r"one list of teacher blocks per stage is needed \(2 stages\)"):
        layer_map([[0, 1]], staged, {"0": 2, "1": 2})
    with pytest.raises(WeightSelectionError, match="the student has 4 blocks in stage 1, the teacher 3"):
        layer_map("first", staged, {"0": 2, "1": 4})
    with pytest.raises(WeightSelectionError, match=r"stages \['2'\] the teacher does not have"):
        layer_map("first", staged, {"0": 2, "2": 1})
