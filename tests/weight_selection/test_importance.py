"""Importance-based selection: scores against hand computations, top-k selection, consistency, depth ranking, the
Python and command-line paths, and their errors."""

import json

import datasets
import pytest
import torch
from huggingface_hub import ModelCard

from hf_regtools import adapters, cli
from hf_regtools.adapters import ModelFamily, save_model
from hf_regtools.testing.tiny_models import STUDENTS, TEACHERS, timm_convnext, timm_vit
from hf_regtools.weight_selection import (ImportanceScores, IndexPlan, WeightSelectionError, importance_scores,
                                          initialize_student, select_weights, top_indices)

ATOL = 1e-6


def images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def image_dataset(count: int = 5, size: int = 16) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"pixel_values": images(count, size).numpy(), "label": [0] * count})


def mean_abs(x: torch.Tensor, feature_axis: int = -1) -> torch.Tensor:
    return x.abs().movedim(feature_axis, -1).reshape(-1, x.shape[feature_axis]).mean(0)


def influence(before: torch.Tensor, after: torch.Tensor, feature_axis: int = -1) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(before, after, dim=feature_axis).mean()


def vit_by_hand(model, x):
    """The mean |input| of every Linear of a timm ViT, by factor, and every block's influence."""
    hidden = torch.zeros(model.embed_dim)
    mlp, influences = {}, []
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for layer, block in enumerate(model.blocks):
        before = x
        h = block.norm1(x)
        B, N, C = h.shape
        q, k, v = block.attn.qkv(h).reshape(B, N, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        context = ((q @ k.transpose(-2, -1)) * block.attn.scale).softmax(-1) @ v
        context = context.transpose(1, 2).reshape(B, N, C)
        x = x + block.attn.proj(context)
        h2 = block.norm2(x)
        activation = block.mlp.act(block.mlp.fc1(h2))
        x = x + block.mlp.fc2(activation)
        hidden += mean_abs(h) + mean_abs(context) + mean_abs(h2)
        mlp[f"mlp{layer}"] = mean_abs(activation)
        influences.append(influence(before, x))
    pooled = model.norm(x)[:, 0]
    hidden += mean_abs(pooled)
    return {"hidden": hidden, **mlp}, torch.stack(influences)


def test_timm_vit_scores_equal_a_hand_computation():
    torch.manual_seed(0)
    teacher = timm_vit(embed_dim=16, depth=2, num_heads=2)
    teacher.train()
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    scores = importance_scores(teacher, image_dataset(5), batch_size=2)  # batches of 2, 2 and 1
    assert teacher.training and all(torch.equal(before[key], value) for key, value in teacher.state_dict().items())

    teacher.eval()
    with torch.no_grad():
        axes, block_influence = vit_by_hand(teacher, images(5, 16))
    assert scores.axes.keys() == axes.keys() and scores.samples == 5
    for name, expected in axes.items():
        torch.testing.assert_close(scores.axes[name], expected, rtol=1e-5, atol=ATOL)
    assert list(scores.block_influence) == [""]
    torch.testing.assert_close(scores.block_influence[""], block_influence, rtol=1e-5, atol=ATOL)


def test_importance_selects_the_top_entries_and_keeps_consistency():
    torch.manual_seed(0)
    teacher, student = timm_vit(embed_dim=16, depth=4), timm_vit(embed_dim=8, depth=2, num_heads=1)
    scores = importance_scores(teacher, image_dataset(4))
    report = select_weights(teacher, student, mode="importance", scores=scores)
    hidden = report.index_sets["hidden"]
    assert torch.equal(hidden, top_indices(scores.axes["hidden"], 8))
    assert torch.equal(report.index_sets["mlp1"], top_indices(scores.axes["mlp1"], 32))
    assert not torch.equal(hidden, torch.arange(0, 16, 2))  # not the uniform set
    x = images(2, 16)
    with torch.no_grad():
        assert torch.equal(student.patch_embed(x), teacher.patch_embed(x)[..., hidden])
    assert torch.equal(student.blocks[1].mlp.fc2.weight,
                       teacher.blocks[1].mlp.fc2.weight[hidden][:, report.index_sets["mlp1"]])


def test_timm_convnext_scores_equal_a_hand_computation_and_select_consistently():
    torch.manual_seed(0)
    teacher = timm_convnext(dims=(8, 16, 32, 64), depths=(2, 1, 1, 1)).eval()
    x = images(3, 32)
    scores = importance_scores(teacher, datasets.Dataset.from_dict({"pixel_values": x.numpy()}), batch_size=2)
    with torch.no_grad():
        features = teacher.stem(x)
        channels, influences = torch.zeros(8), []
        for layer, block in enumerate(teacher.stages[0].blocks):
            normalized = block.norm(block.conv_dw(features).permute(0, 2, 3, 1))
            activation = block.mlp.act(block.mlp.fc1(normalized))
            torch.testing.assert_close(scores.axes[f"mlp0.{layer}"], mean_abs(activation), rtol=1e-5, atol=ATOL)
            channels += mean_abs(normalized)
            after = block(features)
            influences.append(influence(features, after, feature_axis=1))
            features = after
        channels += mean_abs(teacher.stages[1].downsample[0](features), feature_axis=1)
    torch.testing.assert_close(scores.axes["c0"], channels, rtol=1e-5, atol=ATOL)
    torch.testing.assert_close(scores.block_influence["0"], torch.stack(influences), rtol=1e-5, atol=ATOL)
    assert list(scores.block_influence) == ["0", "1", "2", "3"]

    student = timm_convnext(dims=(4, 8, 16, 32), depths=(1, 1, 1, 1))
    report = select_weights(teacher, student, mode="importance", scores=scores, layers="importance")
    assert report.layer_map["0"] == [int(scores.block_influence["0"].argmax())]
    c0 = report.index_sets["c0"]
    assert torch.equal(c0, top_indices(scores.axes["c0"], 4))
    with torch.no_grad():
        assert torch.equal(student.stem[0](x), teacher.stem[0](x)[:, c0])  # the stem convolution, before its norm


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_transformers_models_score_every_named_factor(family):
    torch.manual_seed(0)
    teacher, student = TEACHERS["transformers", family](), STUDENTS["transformers", family]()
    size = 16 if family == "vit" else 32
    scores = importance_scores(teacher, image_dataset(3, size))
    expected = ({"hidden", *(f"mlp{i}" for i in range(4))} if family == "vit" else
                {*(f"c{s}" for s in range(4)), *(f"mlp{s}.{i}" for s, d in enumerate((2, 2, 3, 2)) for i in range(d))})
    assert scores.axes.keys() == expected and all((score > 0).all() for score in scores.axes.values())
    report = select_weights(teacher, student, mode="importance", scores=scores, layers="importance")
    for name, chosen in report.index_sets.items():
        if name in scores.axes:
            assert torch.equal(chosen, top_indices(scores.axes[name], len(chosen)))
    assert report.layer_map == {stage: top_indices(bi, len(report.layer_map[stage])).tolist()
                                for stage, bi in scores.block_influence.items()}


class TinyTextModel(torch.nn.Module):
    """A pre-norm text encoder of two blocks (embedding, LayerNorm, MLP), of a family defined only for this test."""

    main_input_name = "input_ids"

    def __init__(self, vocab: int = 11, width: int = 6, mlp: int = 10):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(TinyTextBlock(width, mlp) for _ in range(2))
        self.config = None

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return x


class TinyTextBlock(torch.nn.Module):
    def __init__(self, width: int, mlp: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up, self.down = torch.nn.Linear(width, mlp), torch.nn.Linear(mlp, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


TEXT_FAMILY = ModelFamily(
    library="transformers", name="tiny-text", layout="tiny-text", signature=(r"^embed\.weight$",), classifier=(),
    axes=((r"^embed\.weight$", (None, "hidden")),
          *adapters._linear(r"^blocks\.(?P<layer>\d+)\.up", "mlp{layer}", "hidden"),
          *adapters._linear(r"^blocks\.(?P<layer>\d+)\.down", "hidden", "mlp{layer}"),
          (r"", ("hidden",))),
    layers=r"^blocks\.(?P<layer>\d+)\.")


def test_text_inputs_leave_padding_out(monkeypatch):
    """Generic over families: `input_ids` and `attention_mask` columns, padded tokens left out of every mean."""
    monkeypatch.setattr(adapters, "FAMILIES", (*adapters.FAMILIES, TEXT_FAMILY))
    torch.manual_seed(0)
    model = TinyTextModel()
    input_ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]])
    mask = (input_ids != 0).long()
    data = datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": mask.tolist(),
                                       "text": ["a", "b", "c"]})
    scores = importance_scores(model, data, batch_size=2)
    kept = mask.bool()
    with torch.no_grad():
        x, hidden, cosines = model.embed(input_ids), 0, []
        for layer, block in enumerate(model.blocks):
            normalized = block.norm(x)
            activation = torch.relu(block.up(normalized))
            hidden = hidden + normalized[kept].abs().mean(0)
            torch.testing.assert_close(scores.axes[f"mlp{layer}"], activation[kept].abs().mean(0), atol=ATOL,
                                       rtol=1e-5)
            after = block(x)
            cosines.append(1 - torch.nn.functional.cosine_similarity(x, after, dim=-1)[kept].mean())
            x = after
    torch.testing.assert_close(scores.axes["hidden"], hidden, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(scores.block_influence[""], torch.stack(cosines), atol=ATOL, rtol=1e-5)

    batches = [{"input_ids": input_ids[:2], "attention_mask": mask[:2]}, {"input_ids": input_ids[2:],
                                                                          "attention_mask": mask[2:]}]
    from_loader = importance_scores(model, batches)
    assert all(torch.allclose(from_loader.axes[name], score) for name, score in scores.axes.items())
    with pytest.raises(WeightSelectionError, match=r"columns \['text'\].*takes `input_ids` \(and optionally "
                                                   r"`attention_mask`\)"):
        importance_scores(model, data.select_columns(["text"]))


def test_rotary_pairs_fold_their_scores():
    scores = torch.tensor([5.0, 0, 0, 1, 0, 0, 4, 1])  # pair sums 5, 0, 4, 2
    plan = IndexPlan("importance", scores={"head_dim": scores}, paired=("head_dim",))
    assert plan.factor("head_dim", 8, 4).tolist() == [0, 2, 4, 6]
    with pytest.raises(WeightSelectionError, match="'head_dim' have 6 entries, the teacher's axis 8"):
        IndexPlan("importance", scores={"head_dim": scores[:6]}, paired=("head_dim",)).factor("head_dim", 8, 4)


def test_depth_ranking_keeps_the_most_influential_blocks_in_order():
    scores = ImportanceScores(block_influence={"": torch.tensor([0.1, 0.5, 0.2, 0.4])})
    assert scores.layers(2) == [1, 3] and scores.layers({"": 3}) == [1, 2, 3]
    staged = ImportanceScores(block_influence={"0": torch.tensor([0.3, 0.1]), "1": torch.tensor([0.0, 0.2, 0.1])})
    assert staged.layers((1, 2)) == [[0], [1, 2]]
    with pytest.raises(WeightSelectionError, match="one depth per stage"):
        staged.layers(1)
    with pytest.raises(WeightSelectionError, match="cannot keep 3 of the teacher's 2 blocks in stage 0"):
        staged.layers((3, 1))


def test_errors_name_the_fix():
    teacher, student = timm_vit(depth=2), timm_vit(embed_dim=8, depth=1, num_heads=1)
    with pytest.raises(WeightSelectionError, match="columns \\['image'\\].*takes `pixel_values`"):
        importance_scores(teacher, datasets.Dataset.from_dict({"image": [[0.0]]}))
    with pytest.raises(WeightSelectionError, match="empty"):
        importance_scores(teacher, [])
    with pytest.raises(WeightSelectionError, match="iterable of batches"):
        importance_scores(teacher, images(2, 16))
    with pytest.raises(WeightSelectionError, match='layers="importance" needs the block influence'):
        select_weights(teacher, student, layers="importance", scores={"hidden": torch.ones(16)})
    with pytest.raises(WeightSelectionError, match="no calibration data|calibration data, but none was given"):
        initialize_student(teacher, hidden_size=8, depth=1, num_heads=1, mode="importance")
    with pytest.raises(WeightSelectionError, match="calibration data was given, but mode is 'uniform'"):
        initialize_student(teacher, hidden_size=8, depth=1, num_heads=1, calibration_data=image_dataset(2))


def test_initialize_student_and_command_line(tmp_path):
    torch.manual_seed(0)
    teacher = timm_vit(embed_dim=16, depth=3)
    save_model(teacher, tmp_path / "teacher")
    image_dataset(6).save_to_disk(str(tmp_path / "calibration"))

    result = initialize_student(teacher, hidden_size=8, depth=2, num_heads=1, mode="importance", layers="importance",
                                calibration_data=image_dataset(6))
    scores = importance_scores(teacher, image_dataset(6))
    assert result.report.layer_map[""] == scores.layers(2)
    assert torch.equal(result.report.index_sets["hidden"], top_indices(scores.axes["hidden"], 8))

    argv = ["select", str(tmp_path / "teacher"), "--hidden-size", "8", "--depth", "2", "--num-heads", "1",
            "--selection", "importance", "--layers", "importance", "--calibration-data", str(tmp_path / "calibration"),
            "--calibration-samples", "4", "--output", str(tmp_path / "student")]
    assert cli.main(argv) == 0
    from_four = importance_scores(teacher, image_dataset(6), num_samples=4)
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["model_args"]["depth"] == 2
    import timm

    student = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True)
    hidden = top_indices(from_four.axes["hidden"], 8)
    assert torch.equal(student.patch_embed.proj.weight, teacher.patch_embed.proj.weight[hidden])
    block = from_four.layers(2)[1]
    assert torch.equal(student.blocks[1].norm1.weight, teacher.blocks[block].norm1.weight[hidden])
    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert "| `mode` | `importance` |" in card.text and "| `layers` | `importance` |" in card.text
    assert "(saved Dataset), 4 examples" in card.text and "Block Influence" in card.text

    assert cli.main([*argv[:-1], str(tmp_path / "other"), "--calibration-data", str(tmp_path / "none")]) == 2
    uniform = cli.main(["select", str(tmp_path / "teacher"), "--hidden-size", "8", "--depth", "2", "--num-heads", "1",
                        "--output", str(tmp_path / "uniform")])
    assert uniform == 0 and "calibration" not in (tmp_path / "uniform" / "README.md").read_text()


def test_llama_scores_equal_a_hand_computation_and_selection_keeps_query_groups():
    torch.manual_seed(0)
    teacher = TEACHERS["transformers", "llama"](head_dim=16)  # 4 query heads of 16 in 2 groups of 2, hidden 32
    ids = torch.randint(0, teacher.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 7] * 3})
    seen = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0].detach()))
             for name, module in teacher.named_modules() if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        teacher(input_ids=ids)
    for hook in hooks:
        hook.remove()
    expected = {"hidden": sum(mean_abs(x) for name, x in seen.items()
                              if not name.endswith(("o_proj", "down_proj"))), "head_dim": torch.zeros(16)}
    for layer in range(4):
        per_head = mean_abs(seen[f"model.layers.{layer}.self_attn.o_proj"]).view(2, 2, 16)
        expected[f"kv_heads{layer}"] = per_head.sum((1, 2))
        expected[f"group{layer}"] = per_head.sum((0, 2))
        expected["head_dim"] += per_head.sum((0, 1))
        expected[f"mlp{layer}"] = mean_abs(seen[f"model.layers.{layer}.mlp.down_proj"])

    scores = importance_scores(teacher, data, block_influence=False)
    assert scores.axes.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(scores.axes[name], value, atol=ATOL, rtol=1e-5, msg=name)

    result = initialize_student(teacher, hidden_size=16, depth=2, num_heads=2, num_key_value_heads=1, head_dim=8,
                                mode="importance", calibration_data=data)
    student, chosen = result.model, result.report.index_sets
    half = top_indices(scores.axes["head_dim"][:8] + scores.axes["head_dim"][8:], 4)
    assert torch.equal(chosen["head_dim"], torch.cat([half, half + 8]))  # rotary pairs, scored together
    hidden = top_indices(scores.axes["hidden"], 16)
    for layer in range(2):
        kv, group = chosen[f"kv_heads{layer}"], chosen[f"group{layer}"]
        assert torch.equal(kv, top_indices(scores.axes[f"kv_heads{layer}"], 1))
        assert torch.equal(group, top_indices(scores.axes[f"group{layer}"], 2))
        teacher_attention = teacher.model.layers[layer].self_attn
        query_rows = ((kv[:, None, None] * 2 + group[None, :, None]) * 16 + chosen["head_dim"]).reshape(-1)
        key_rows = (kv[:, None] * 16 + chosen["head_dim"]).reshape(-1)
        attention = student.model.layers[layer].self_attn
        assert torch.equal(attention.q_proj.weight, teacher_attention.q_proj.weight[query_rows][:, hidden])
        assert torch.equal(attention.k_proj.weight, teacher_attention.k_proj.weight[key_rows][:, hidden])
    assert student.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 10)
