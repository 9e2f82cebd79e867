"""Weight selection for Llama-layout decoders: GQA heads, rotary pairs, tied embeddings, tokenizer, generate."""

from pathlib import Path

import pytest
import torch

from hf_regtools.cli import main as cli
from hf_regtools.testing.tiny_models import byte_level_tokenizer, transformers_llama
from hf_regtools.weight_selection import initialize_student, select_weights, uniform_indices

VOCAB = 300


def _rows(heads, head_dim, teacher_head_dim, dims):
    return torch.tensor([h * teacher_head_dim + j for h in heads for j in dims])


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("kv_heads, heads", [(2, 4), (1, 2)])
def test_whole_query_heads_stay_in_their_key_value_group(model_type, kv_heads, heads):
    torch.manual_seed(0)
    teacher = transformers_llama(model_type=model_type, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                                 head_dim=8, intermediate_size=96)
    student = transformers_llama(model_type=model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                                 num_key_value_heads=kv_heads, head_dim=8, intermediate_size=48)
    report = select_weights(teacher, student)
    hidden = uniform_indices(64, 32)
    ids = torch.randint(0, 64, (2, 7))
    assert torch.equal(student.model.embed_tokens(ids), teacher.model.embed_tokens(ids)[..., hidden])
    kv = uniform_indices(4, kv_heads)
    group = uniform_indices(2, heads // kv_heads)
    assert report.index_sets["kv_heads1"].tolist() == kv.tolist()
    teacher_query_heads = [k * 2 + g for k in kv.tolist() for g in group.tolist()]
    t, s = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    all_dims = list(range(8))
    assert torch.equal(s.q_proj.weight, t.q_proj.weight[_rows(teacher_query_heads, 8, 8, all_dims)][:, hidden])
    assert torch.equal(s.k_proj.weight, t.k_proj.weight[_rows(kv.tolist(), 8, 8, all_dims)][:, hidden])
    assert torch.equal(s.o_proj.weight, t.o_proj.weight[hidden][:, _rows(teacher_query_heads, 8, 8, all_dims)])
    for student_head, teacher_head in enumerate(teacher_query_heads):  # repeat_kv: head h reads kv head h // group
        assert teacher_head // 2 == kv[student_head // (heads // kv_heads)]
    if model_type == "qwen2":
        assert torch.equal(s.q_proj.bias, t.q_proj.bias[_rows(teacher_query_heads, 8, 8, all_dims)])
    if model_type == "qwen3":
        assert torch.equal(s.q_norm.weight, t.q_norm.weight)
    mlp = uniform_indices(96, 48)
    assert torch.equal(student.model.layers[0].mlp.down_proj.weight,
                       teacher.model.layers[0].mlp.down_proj.weight[hidden][:, mlp])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, hidden])


def test_a_student_group_larger_than_the_teachers_is_refused():
    teacher = transformers_llama(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    student = transformers_llama(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="axis 'group0' has 4 entries in the student but 2 in the teacher"):
        select_weights(teacher, student)


def test_a_smaller_head_dimension_keeps_rotary_pairs_and_their_frequencies():
    torch.manual_seed(0)
    teacher = transformers_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 model_type="qwen3")
    student = transformers_llama(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=8, model_type="qwen3")
    report = select_weights(teacher, student)
    dims = report.index_sets["head_dim"]
    assert dims.tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert torch.equal(dims[4:], dims[:4] + 8)  # entry j rotates with entry j + head_dim / 2, in both
    # the kept pair j of the teacher rotates at the frequency of the student's pair j (integer ratio, uniform rule)
    teacher_freq, student_freq = teacher.model.rotary_emb.inv_freq, student.model.rotary_emb.inv_freq
    assert torch.allclose(student_freq, teacher_freq[dims[:4]])
    assert torch.equal(student.model.layers[0].self_attn.k_norm.weight,
                       teacher.model.layers[0].self_attn.k_norm.weight[dims])


def test_tied_embeddings_stay_tied_and_a_checkpoint_without_lm_head_works(tmp_path):
    torch.manual_seed(0)
    teacher = transformers_llama(tie_word_embeddings=True)
    teacher.save_pretrained(tmp_path / "teacher")
    from safetensors import safe_open

    with safe_open(tmp_path / "teacher" / "model.safetensors", "pt") as stored:
        assert "lm_head.weight" not in stored.keys()
    result = initialize_student(tmp_path / "teacher", hidden_size=16, depth=2, num_heads=2)
    student = result.model
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, uniform_indices(32, 16)])
    result.save(tmp_path / "student")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(reloaded.model.embed_tokens.weight, student.model.embed_tokens.weight)


def _tokenizer(folder: Path):
    tokenizer = byte_level_tokenizer(vocab_size=VOCAB)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_student_keeps_the_tokenizer_loads_generates_and_has_a_text_card(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher"
    tokenizer = _tokenizer(teacher_dir)
    teacher = transformers_llama(vocab_size=len(tokenizer))
    teacher.generation_config.update(eos_token_id=tokenizer.eos_token_id, max_new_tokens=7, repetition_penalty=1.3)
    teacher.save_pretrained(teacher_dir)
    code = cli(["select", str(teacher_dir), "--hidden-size", "16", "--depth", "2", "--num-heads", "2",
                "--num-key-value-heads", "1", "--layers", "even", "--output", str(tmp_path / "student")])
    assert code == 0
    student_dir = tmp_path / "student"
    student_tokenizer = AutoTokenizer.from_pretrained(student_dir)
    text = "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)\n"
    assert student_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert student_tokenizer.decode(tokenizer(text)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 8)
    output = model.generate(**student_tokenizer("def ", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert output.shape[1] == len(student_tokenizer("def ")["input_ids"]) + 5
    card = (student_dir / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card
    assert "teacher blocks 0, 2" in card  # layers="even": 4 -> 2 blocks
    assert "tokenizer: copied from the teacher" in card
    assert (student_dir / "generation_config.json").read_text() == (teacher_dir / "generation_config.json").read_text()
    assert (model.generation_config.max_new_tokens, model.generation_config.repetition_penalty) == (7, 1.3)


def test_student_is_built_in_the_teachers_dtype(tmp_path):
    teacher = transformers_llama().to(torch.bfloat16)
    teacher.save_pretrained(tmp_path / "teacher")
    result = initialize_student(tmp_path / "teacher", hidden_size=16, depth=2, num_heads=2)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert torch.equal(result.model.model.norm.weight, teacher.model.norm.weight[uniform_indices(32, 16)])


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=16, num_heads=2, num_key_value_heads=4), "4 key/value heads, more than the teacher's 2"),
    (dict(hidden_size=24, num_heads=3, num_key_value_heads=2), "3 query heads do not divide into 2 key/value heads"),
    (dict(hidden_size=32, num_heads=4, num_key_value_heads=1), "4 query heads per key/value head, more than the "
                                                                "teacher's 2"),
    (dict(hidden_size=16, num_heads=2, head_dim=16), "head dimension 16: it must be even and at most the teacher's 8"),
    (dict(hidden_size=16, num_heads=2, head_dim=7), "head dimension 7: it must be even"),
    (dict(hidden_size=24, num_heads=3), "3 query heads do not make whole groups of the teacher's 2"),
    (dict(hidden_size=20), "hidden_size 20 is not a multiple of the head dimension 8"),
    (dict(hidden_size=64, num_key_value_heads=2), "hidden size 64 is larger than the teacher's 32"),
    (dict(depth=5), "depth 5 is larger than the teacher's 4"),
])
def test_bad_decoder_students_are_refused_before_any_weight_is_read(tmp_path, overrides, message):
    transformers_llama().save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=message):
        initialize_student(tmp_path / "teacher", **overrides)
