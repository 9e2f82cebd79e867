"""Weight selection for GPT-2: Conv1D [in, out] weights, whole heads in the fused c_attn, tied lm_head, old
checkpoints' mask buffers, tokenizer, generate, layer options, importance scores, refused shapes."""

import copy
import math
import re

import datasets
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_regtools.adapters import UnsupportedModelError
from hf_regtools.cli import main as cli
from hf_regtools.testing.tiny_models import byte_level_tokenizer, transformers_gpt2
from hf_regtools.weight_selection import (IndexPlan, WeightSelectionError, importance_scores, initialize_student,
                                          select_weights, top_indices, uniform_indices)

WIDTH, HEADS, HEAD_DIM = 32, 4, 8
ATOL = 1e-6


def _head_columns(heads, dims, head_dim=HEAD_DIM):
    return [head * head_dim + j for head in heads for j in dims]


def _qkv_columns(heads, dims, width=WIDTH):
    return torch.tensor([chunk * width + column for chunk in range(3) for column in _head_columns(heads, dims)])


def test_index_plan_composes_three_chunks_of_heads_by_head_dimension():
    plan = IndexPlan(teacher_sizes={"heads": 4, "head_dim": 8}, student_sizes={"heads": 2, "head_dim": 4})
    index = plan.axis("3*heads0*head_dim", 96, 24)
    assert index.tolist() == _qkv_columns([0, 2], [0, 2, 4, 6]).tolist()
    assert plan.axis("heads0*head_dim", 32, 8).tolist() == _head_columns([0, 2], [0, 2, 4, 6])  # same sets reused
    with pytest.raises(WeightSelectionError, match=r"factors \{'3': 3, 'heads1': 2, 'head_dim': 4\} give 24"):
        plan.axis("3*heads1*head_dim", 96, 30)


@pytest.mark.parametrize("width, heads", [(16, 2), (16, 4), (8, 2)])  # fewer heads, smaller head_dim, both
def test_c_attn_keeps_whole_heads_the_same_in_q_k_and_v(width, heads):
    torch.manual_seed(0)
    teacher = transformers_gpt2(n_embd=WIDTH, n_head=HEADS)
    student = transformers_gpt2(n_embd=width, n_head=heads, n_layer=2, n_inner=48)
    report = select_weights(teacher, student)
    hidden, mlp = uniform_indices(WIDTH, width), uniform_indices(4 * WIDTH, 48)
    kept_heads, dims = uniform_indices(HEADS, heads).tolist(), uniform_indices(HEAD_DIM, width // heads).tolist()
    assert report.index_sets["heads1"].tolist() == kept_heads and report.index_sets["head_dim"].tolist() == dims
    ids = torch.randint(0, 64, (2, 7))
    positions = torch.arange(7)
    with torch.no_grad():
        embedded = teacher.transformer.wte(ids) + teacher.transformer.wpe(positions)
        assert torch.equal(student.transformer.wte(ids) + student.transformer.wpe(positions), embedded[..., hidden])
    t, s = teacher.transformer.h[1], student.transformer.h[1]
    columns = _qkv_columns(kept_heads, dims)
    assert torch.equal(s.attn.c_attn.weight, t.attn.c_attn.weight[hidden][:, columns])
    assert torch.equal(s.attn.c_attn.bias, t.attn.c_attn.bias[columns])
    student_head_dim = width // heads
    for chunk in range(3):  # q, k, v: student head h is teacher head kept_heads[h], whole, in each
        for h, teacher_head in enumerate(kept_heads):
            start = chunk * width + h * student_head_dim
            teacher_start = chunk * WIDTH + teacher_head * HEAD_DIM
            assert torch.equal(s.attn.c_attn.weight[:, start:start + student_head_dim],
                               t.attn.c_attn.weight[hidden][:, teacher_start + torch.tensor(dims)])
    head_rows = torch.tensor(_head_columns(kept_heads, dims))
    assert torch.equal(s.attn.c_proj.weight, t.attn.c_proj.weight[head_rows][:, hidden])  # [in, out]
    assert torch.equal(s.attn.c_proj.bias, t.attn.c_proj.bias[hidden])
    assert torch.equal(s.mlp.c_fc.weight, t.mlp.c_fc.weight[hidden][:, mlp])
    assert torch.equal(s.mlp.c_proj.weight, t.mlp.c_proj.weight[mlp][:, hidden])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, hidden])
    assert student.lm_head.weight is student.transformer.wte.weight


@pytest.mark.parametrize("layers, blocks", [("first", [0, 1]), ("last", [2, 3]), ("even", [0, 2]), ([1, 3], [1, 3]),
                                            ("0,3", [0, 3])])
def test_a_full_width_student_computes_the_teachers_function_on_the_chosen_layers(layers, blocks):
    torch.manual_seed(0)
    teacher, student = transformers_gpt2().eval(), transformers_gpt2(n_layer=2).eval()
    report = select_weights(teacher, student, layers=layers)
    assert report.layer_map == {"": blocks}
    unused_blocks = {int(found[1]) for key in report.teacher_unused if (found := re.search(r"\.h\.(\d+)\.", key))}
    assert unused_blocks == set(range(4)) - set(blocks)
    truncated = copy.deepcopy(teacher)
    truncated.transformer.h = torch.nn.ModuleList(truncated.transformer.h[i] for i in blocks)
    truncated.config.n_layer = 2
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(student(ids, use_cache=False).logits, truncated(ids, use_cache=False).logits,
                                   rtol=0, atol=0)


def test_tied_lm_head_stays_tied_through_save_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = transformers_gpt2()
    teacher.save_pretrained(tmp_path / "teacher")
    with safe_open(tmp_path / "teacher" / "model.safetensors", "pt") as stored:
        assert "lm_head.weight" not in stored.keys()
    result = initialize_student(tmp_path / "teacher", hidden_size=16, depth=2)
    student = result.model
    assert (student.config.n_embd, student.config.n_head, student.config.n_inner) == (16, 2, 64)
    assert student.lm_head.weight is student.transformer.wte.weight
    assert torch.equal(student.transformer.wte.weight, teacher.transformer.wte.weight[:, uniform_indices(32, 16)])
    result.save(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    assert all(torch.equal(value, student.state_dict()[key]) for key, value in reloaded.state_dict().items())


def test_old_checkpoints_prefixless_with_attention_mask_buffers(tmp_path):
    """GPT-2 checkpoints of the original release store `h.N...` keys and each layer's causal mask buffers."""
    torch.manual_seed(0)
    teacher = transformers_gpt2()
    teacher.save_pretrained(tmp_path / "new")
    positions = teacher.config.n_positions
    mask = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
    old = {key.removeprefix("transformer."): value.contiguous() for key, value in teacher.state_dict().items()
           if key != "lm_head.weight"}
    for layer in range(teacher.config.n_layer):
        old[f"h.{layer}.attn.bias"], old[f"h.{layer}.attn.masked_bias"] = mask.clone(), torch.tensor(-1e4)
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())

    from_old = initialize_student(tmp_path / "old", hidden_size=16, depth=2)
    from_new = initialize_student(tmp_path / "new", hidden_size=16, depth=2)
    assert not any(re.search(r"\.attn\.(bias|masked_bias)$", source) for source in from_old.report.sources.values())
    assert from_old.model.lm_head.weight is from_old.model.transformer.wte.weight
    new_state = from_new.model.state_dict()
    assert all(torch.equal(value, new_state[key]) for key, value in from_old.model.state_dict().items())

    # state dicts holding the buffers on both sides: they pass unchanged, the weights are selected as before
    student_state = {key.removeprefix("transformer."): value for key, value in transformers_gpt2(
        n_embd=16, n_head=2, n_layer=2).state_dict().items() if key != "lm_head.weight"}
    student_state.update({f"h.{layer}.attn.{name}": old[f"h.{layer}.attn.{name}"] * 0 for layer in range(2)
                          for name in ("bias", "masked_bias")})
    report = select_weights(old, student_state, teacher_config=teacher.config, student_config=from_new.model.config)
    assert torch.equal(student_state["h.1.attn.bias"], mask) and student_state["h.0.attn.masked_bias"] == -1e4
    assert torch.equal(student_state["h.1.attn.c_attn.weight"], new_state["transformer.h.1.attn.c_attn.weight"])
    assert report.axes["h.0.attn.bias"] == (None, None, None, None)


def test_cli_student_keeps_the_tokenizer_loads_generates_and_has_a_text_card(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    end = "<|endoftext|>"
    tokenizer = byte_level_tokenizer(unk_token=end, bos_token=end, eos_token=end)
    tokenizer.save_pretrained(teacher_dir)
    transformers_gpt2(vocab_size=len(tokenizer)).save_pretrained(teacher_dir)
    code = cli(["select", str(teacher_dir), "--hidden-size", "16", "--depth", "2", "--layers", "last",
                "--output", str(student_dir)])
    assert code == 0
    student_tokenizer = AutoTokenizer.from_pretrained(student_dir)
    text = "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)\n"
    assert student_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert student_tokenizer.decode(tokenizer(text)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (model.config.n_embd, model.config.n_layer, model.config.n_head, model.config.n_inner) == (16, 2, 2, 64)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    prompt = student_tokenizer("def ", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=student_tokenizer.eos_token_id)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 5
    card = (student_dir / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card
    assert "teacher blocks 2, 3" in card and "n_inner=64" in card
    assert "tokenizer: copied from the teacher" in card


def test_a_sequence_classification_student_of_a_language_model_teacher():
    torch.manual_seed(0)
    teacher, student = transformers_gpt2(), transformers_gpt2(n_embd=16, n_head=2, n_layer=2, classification=True)
    report = select_weights(teacher, student)
    assert set(report.skipped) == {"score.weight"}
    assert set(report.loaded) == set(student.state_dict()) - {"score.weight"}
    assert "lm_head.weight" in report.teacher_unused
    assert torch.equal(student.transformer.ln_f.bias, teacher.transformer.ln_f.bias[uniform_indices(32, 16)])


def _mean_abs(x):
    return x.abs().reshape(-1, x.shape[-1]).mean(0)


def _gpt2_by_hand(model, ids):
    """GPT-2's forward written out from its weights (Conv1D: `x @ weight + bias`), with the mean |input| of every
    projection by factor and every block's influence."""
    config = model.config
    heads, head_dim = config.n_head, config.n_embd // config.n_head
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))
    batch, tokens, width = x.shape
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    axes = {"hidden": torch.zeros(width), "head_dim": torch.zeros(head_dim)}
    influences = []
    for layer, block in enumerate(model.transformer.h):
        before = x
        h = block.ln_1(x)
        q, k, v = (h @ block.attn.c_attn.weight + block.attn.c_attn.bias).split(width, dim=-1)
        q, k, v = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(~causal, float("-inf")).softmax(-1)
        context = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + context @ block.attn.c_proj.weight + block.attn.c_proj.bias
        h2 = block.ln_2(x)
        activation = block.mlp.act(h2 @ block.mlp.c_fc.weight + block.mlp.c_fc.bias)
        x = x + activation @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
        per_head = _mean_abs(context).reshape(heads, head_dim)
        axes["hidden"] += _mean_abs(h) + _mean_abs(h2)
        axes[f"heads{layer}"], axes["head_dim"] = per_head.sum(1), axes["head_dim"] + per_head.sum(0)
        axes[f"mlp{layer}"] = _mean_abs(activation)
        influences.append(1 - torch.nn.functional.cosine_similarity(before, x, dim=-1).mean())
    final = model.transformer.ln_f(x)
    axes["hidden"] += _mean_abs(final)
    return axes, torch.stack(influences), final @ model.lm_head.weight.T


def test_importance_scores_read_conv1d_inputs_on_axis_0_as_a_hand_computation_does(tmp_path):
    torch.manual_seed(0)
    teacher = transformers_gpt2(n_embd=16, n_head=2, n_layer=3).eval()
    ids = torch.randint(0, 64, (5, 6), generator=torch.Generator().manual_seed(1))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    scores = importance_scores(teacher, data, batch_size=2)
    with torch.no_grad():
        axes, influence, logits = _gpt2_by_hand(teacher, ids)
        torch.testing.assert_close(logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)  # the hand forward is GPT-2's
    assert scores.axes.keys() == axes.keys() and scores.samples == 5
    for name, expected in axes.items():
        torch.testing.assert_close(scores.axes[name], expected, rtol=1e-5, atol=ATOL)
    torch.testing.assert_close(scores.block_influence[""], influence, rtol=1e-5, atol=ATOL)

    student = transformers_gpt2(n_embd=8, n_head=1, n_layer=2, n_inner=24)
    report = select_weights(teacher, student, mode="importance", scores=scores, layers="importance")
    assert report.layer_map[""] == top_indices(scores.block_influence[""], 2).tolist()
    for name, chosen in report.index_sets.items():
        assert torch.equal(chosen, top_indices(scores.axes[name], len(chosen))), name
    hidden = report.index_sets["hidden"]
    assert not torch.equal(hidden, uniform_indices(16, 8))
    with torch.no_grad():
        assert torch.equal(student.transformer.wte(ids), teacher.transformer.wte(ids)[..., hidden])

    teacher.save_pretrained(tmp_path / "teacher")
    result = initialize_student(tmp_path / "teacher", hidden_size=8, depth=2, mode="importance", calibration_data=data)
    assert torch.equal(result.report.index_sets["hidden"], hidden)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=64), "hidden size 64 is larger than the teacher's 32"),
    (dict(depth=5), "depth 5 is larger than the teacher's 4"),
    (dict(hidden_size=16, mlp_dim=256), "MLP width 256 is larger than the teacher's 128"),
    (dict(hidden_size=16, num_heads=8), "number of heads 8 is larger than the teacher's 4"),
    (dict(hidden_size=16, num_heads=1), "head dimension 16 is larger than the teacher's 8"),
    (dict(hidden_size=16, head_dim=16), "head dimension 16 is larger than the teacher's 8"),
    (dict(hidden_size=20), "hidden_size 20 is not a multiple of the teacher's head dimension 8"),
    (dict(hidden_size=16, num_heads=3), "hidden_size 16 is not divisible by num_heads 3"),
    (dict(hidden_size=16, num_heads=2, head_dim=4), "2 heads of 4 do not make the hidden size 16"),
    (dict(hidden_size=16, num_key_value_heads=1), "num_key_value_heads applies to grouped-query-attention"),
    (dict(depth=(1, 1)), "hidden_size and depth of a decoder are single integers"),
])
def test_bad_gpt2_students_are_refused_before_any_weight_is_read(tmp_path, overrides, message):
    transformers_gpt2().config.save_pretrained(tmp_path / "teacher")  # no weights: none may be needed
    with pytest.raises(ValueError, match=message):
        initialize_student(tmp_path / "teacher", **overrides)


def test_a_model_with_gpt2_key_names_but_linear_weights_is_refused(tmp_path):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    config.save_pretrained(tmp_path / "teacher")
    refused = "gpt_bigcode has GPT-2's key names but not its layout"
    with pytest.raises(UnsupportedModelError, match=refused):
        initialize_student(tmp_path / "teacher", hidden_size=16)
    student_config = GPTBigCodeConfig(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    with pytest.raises(UnsupportedModelError, match=refused):
        select_weights(GPTBigCodeForCausalLM(config), GPTBigCodeForCausalLM(student_config))
