"""Weight selection for BERT-style encoders (BERT, RoBERTa): whole heads, embeddings, masked-LM heads, the tokenizer,
sequence classification, layer and importance selection, and bad students."""

import datasets
import pytest
import torch
from transformers import (AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForMaskedLM, RobertaConfig, RobertaForMaskedLM)

from hf_regtools.cli import main as cli
from hf_regtools.testing.tiny_models import TEXT_LENGTH, transformers_bert, transformers_roberta
from hf_regtools.weight_selection import initialize_student, select_weights, top_indices, uniform_indices

ENCODERS = {"bert": transformers_bert, "roberta": transformers_roberta}
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "the sun is warm today",
             "rain fell on the old roof", "children play by the river"]
TEACHER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)


def _rows(heads, head_dim):
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)])


def _encoder(model):
    return model.bert if hasattr(model, "bert") else model.roberta


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_query_key_value_and_attention_output_keep_the_same_whole_heads(name):
    torch.manual_seed(0)
    teacher = ENCODERS[name](**TEACHER).eval()
    student = ENCODERS[name](hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32).eval()
    report = select_weights(teacher, student)
    hidden, heads, mlp = uniform_indices(32, 16), uniform_indices(4, 2), uniform_indices(64, 32)
    assert report.index_sets["heads1"].tolist() == heads.tolist()
    assert report.index_sets["hidden"].tolist() == hidden.tolist()
    rows = _rows(heads.tolist(), 8)
    for layer in range(2):
        t, s = _encoder(teacher).encoder.layer[layer], _encoder(student).encoder.layer[layer]
        for part in ("query", "key", "value"):
            t_linear, s_linear = getattr(t.attention.self, part), getattr(s.attention.self, part)
            assert torch.equal(s_linear.weight, t_linear.weight[rows][:, hidden])
            assert torch.equal(s_linear.bias, t_linear.bias[rows])
        assert torch.equal(s.attention.output.dense.weight, t.attention.output.dense.weight[hidden][:, rows])
        assert torch.equal(s.intermediate.dense.weight, t.intermediate.dense.weight[mlp][:, hidden])
        assert torch.equal(s.output.dense.weight, t.output.dense.weight[hidden][:, mlp])
        assert torch.equal(s.output.LayerNorm.weight, t.output.LayerNorm.weight[hidden])
        # exact on activations: a teacher input that is zero off the kept channels gives the kept heads' queries
        x = torch.zeros(2, 5, 32)
        x[..., hidden] = torch.randn(2, 5, 16)
        with torch.no_grad():
            assert torch.allclose(s.attention.self.query(x[..., hidden]), t.attention.self.query(x)[..., rows],
                                  atol=1e-6)
    ids = torch.randint(0, 64, (2, TEXT_LENGTH))
    types = torch.randint(0, 2, (2, TEXT_LENGTH))
    positions = torch.arange(2, 2 + TEXT_LENGTH).expand(2, -1)

    def summed_embeddings(model):  # before the LayerNorm, which normalizes over the (fewer) student channels
        embeddings = _encoder(model).embeddings
        return (embeddings.word_embeddings(ids) + embeddings.position_embeddings(positions)
                + embeddings.token_type_embeddings(types))

    assert torch.equal(summed_embeddings(student), summed_embeddings(teacher)[..., hidden])
    assert torch.equal(_encoder(student).embeddings.LayerNorm.bias, _encoder(teacher).embeddings.LayerNorm.bias[hidden])
    head = {"bert": ("bert.pooler.dense.weight", "classifier.weight"),
            "roberta": ("classifier.dense.weight", "classifier.out_proj.weight")}[name]
    assert set(head) <= set(report.skipped)
    labels = torch.tensor([0, 2])
    output = student(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert output.logits.shape == (2, 3) and torch.isfinite(output.loss)


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_keep_classifier_selects_the_pooler_and_head(name):
    torch.manual_seed(0)
    teacher = ENCODERS[name](**TEACHER)
    student = ENCODERS[name](hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    report = select_weights(teacher, student, keep_classifier=True)
    assert not report.skipped
    hidden = uniform_indices(32, 16)
    if name == "bert":
        assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight[hidden][:, hidden])
        assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, hidden])
    else:
        assert torch.equal(student.classifier.dense.bias, teacher.classifier.dense.bias[hidden])
        assert torch.equal(student.classifier.out_proj.weight, teacher.classifier.out_proj.weight[:, hidden])


def _masked_lm(name, **overrides):
    config_class, model_class = {"bert": (BertConfig, BertForMaskedLM),
                                 "roberta": (RobertaConfig, RobertaForMaskedLM)}[name]
    kwargs = dict(TEACHER, vocab_size=64, max_position_embeddings=4 * TEXT_LENGTH + 2)
    return model_class(config_class(**{**kwargs, **overrides}))


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_masked_lm_teacher_gives_a_tied_masked_lm_or_with_labels_a_classifier(tmp_path, name):
    torch.manual_seed(0)
    teacher = _masked_lm(name)
    teacher.save_pretrained(tmp_path / "teacher")
    result = initialize_student(tmp_path / "teacher", hidden_size=16, depth=2, num_heads=2)
    student, hidden = result.model, uniform_indices(32, 16)
    decoder = student.get_output_embeddings()
    assert decoder.weight is student.get_input_embeddings().weight
    assert torch.equal(decoder.weight, teacher.get_input_embeddings().weight[:, hidden])
    assert torch.equal(decoder.bias, teacher.get_output_embeddings().bias)
    assert not result.report.skipped
    result.save(tmp_path / "mlm")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm")
    assert torch.equal(reloaded.get_output_embeddings().weight, decoder.weight)
    assert "pipeline_tag: fill-mask" in (tmp_path / "mlm" / "README.md").read_text()

    classifier = initialize_student(tmp_path / "teacher", hidden_size=16, depth=2, num_heads=2, num_labels=2)
    assert type(classifier.model).__name__.endswith("ForSequenceClassification")
    assert classifier.model.config.num_labels == 2
    assert torch.equal(classifier.model.get_input_embeddings().weight, decoder.weight)


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                      "[SEP]"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                      cls_token="[CLS]", sep_token="[SEP]")
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_cli_student_loads_with_its_tokenizer_and_classifies(tmp_path, name):
    torch.manual_seed(0)
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tokenizer = _tokenizer(teacher_dir)
    teacher = ENCODERS[name](**TEACHER, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    teacher.save_pretrained(teacher_dir)
    code = cli(["select", str(teacher_dir), "--hidden-size", "16", "--depth", "2", "--num-heads", "2",
                "--num-labels", "2", "--layers", "1,3", "--output", str(student_dir)])
    assert code == 0
    student_tokenizer = AutoTokenizer.from_pretrained(student_dir)
    batch = student_tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == tokenizer(SENTENCES[:3], padding=True)["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert type(model).__name__ == type(teacher).__name__
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_hidden_layers,
            model.config.num_labels) == (16, 2, 2, 2)
    output = model(**batch, labels=torch.tensor([0, 1, 1]))
    assert output.logits.shape == (3, 2) and torch.isfinite(output.loss)
    hidden, mlp = uniform_indices(32, 16), uniform_indices(64, 32)
    assert torch.equal(_encoder(model).encoder.layer[1].intermediate.dense.weight,
                       _encoder(teacher).encoder.layer[3].intermediate.dense.weight[mlp][:, hidden])
    card = (student_dir / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card
    assert "tokenizer: copied from the teacher" in card and "teacher blocks 1, 3" in card


def test_even_and_last_layers():
    torch.manual_seed(0)
    teacher = transformers_bert(**TEACHER)
    for layers, expected in (("even", [0, 2]), ("last", [2, 3]), ("first", [0, 1])):
        student = transformers_bert(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
        report = select_weights(teacher, student, layers=layers)
        assert report.layer_map == {"": expected}
        assert torch.equal(student.bert.encoder.layer[1].output.LayerNorm.weight,
                           teacher.bert.encoder.layer[expected[1]].output.LayerNorm.weight[uniform_indices(32, 16)])


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_importance_selection_on_text_calibration_data(tmp_path, name):
    torch.manual_seed(0)
    teacher = ENCODERS[name](**TEACHER)
    teacher.save_pretrained(tmp_path / "teacher")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 64, (6, TEXT_LENGTH), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[::2, TEXT_LENGTH // 2:] = 0
    data = datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": mask.tolist(),
                                       "label": [0] * 6})
    result = initialize_student(tmp_path / "teacher", hidden_size=16, depth=2, num_heads=2, mode="importance",
                                layers="importance", calibration_data=data)
    scores, report = result.scores, result.report
    assert {"hidden", "head_dim", *(f"heads{i}" for i in range(4)), *(f"mlp{i}" for i in range(4))} <= set(scores.axes)
    chosen = report.layer_map[""]
    assert chosen == top_indices(scores.block_influence[""], 2).tolist()
    for student_layer, teacher_layer in enumerate(chosen):
        heads = report.index_sets[f"heads{teacher_layer}"]
        assert torch.equal(heads, top_indices(scores.axes[f"heads{teacher_layer}"], 2))
        rows = _rows(heads.tolist(), 8)
        hidden = report.index_sets["hidden"]
        assert torch.equal(_encoder(result.model).encoder.layer[student_layer].attention.self.value.weight,
                           _encoder(teacher).encoder.layer[teacher_layer].attention.self.value.weight[rows][:, hidden])
    assert torch.equal(report.index_sets["hidden"], top_indices(scores.axes["hidden"], 16))


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=64, num_heads=8), "hidden size 64 is larger than the teacher's 32"),
    (dict(hidden_size=32, num_heads=8), "number of heads 8 is larger than the teacher's 4"),
    (dict(hidden_size=16, num_heads=1), r"head dimension 16 \(hidden size 16 / 1 heads\) is larger than the "
                                        "teacher's 8"),
    (dict(hidden_size=12), "hidden_size 12 is not a multiple of the teacher's head dimension 8"),
    (dict(hidden_size=16, num_heads=3), "hidden_size 16 is not divisible by num_heads 3"),
    (dict(depth=5), "depth 5 is larger than the teacher's 4"),
    (dict(hidden_size=16, mlp_dim=128), "MLP width 128 is larger than the teacher's 64"),
    (dict(hidden_size=16, num_key_value_heads=1), "num_key_value_heads applies to grouped-query-attention decoders"),
])
@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_bad_students_are_refused_before_any_weight_is_read(tmp_path, name, overrides, message):
    ENCODERS[name](**TEACHER).config.save_pretrained(tmp_path / "teacher")  # a config without weights
    with pytest.raises(ValueError, match=message):
        initialize_student(tmp_path / "teacher", **overrides)


def test_a_loaded_teacher_gives_a_student_of_its_class():
    torch.manual_seed(0)
    teacher = _masked_lm("roberta")
    assert not teacher.config.architectures
    student = initialize_student(teacher, hidden_size=16, depth=1, num_heads=2).model
    assert type(student).__name__ == "RobertaForMaskedLM" and not teacher.config.architectures
    student = initialize_student(transformers_bert(**TEACHER), hidden_size=16, depth=1, num_heads=2).model
    assert type(student).__name__ == "BertForSequenceClassification"


def test_a_pretraining_checkpoint_with_legacy_layernorm_names_gives_a_classifier(tmp_path):
    """As `bert-base-uncased` stores it: `LayerNorm.gamma`/`beta`, a pooler and an NSP head, no decoder weight."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = _masked_lm("bert")
    teacher.config.architectures = ["BertForMaskedLM"]
    teacher.config.save_pretrained(tmp_path / "teacher")
    tensors = {key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
               value.clone() for key, value in teacher.state_dict().items() if key != "cls.predictions.decoder.weight"}
    tensors.update({"bert.pooler.dense.weight": torch.randn(32, 32), "cls.seq_relationship.weight": torch.randn(2, 32)})
    save_file(tensors, tmp_path / "teacher" / "model.safetensors", metadata={"format": "pt"})
    result = initialize_student(tmp_path / "teacher", hidden_size=16, num_heads=2, depth=2, num_labels=2)
    hidden = uniform_indices(32, 16)
    assert type(result.model).__name__ == "BertForSequenceClassification"
    assert torch.equal(result.model.bert.encoder.layer[1].output.LayerNorm.weight,
                       teacher.bert.encoder.layer[1].output.LayerNorm.weight[hidden])
    assert set(result.report.skipped) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                          "classifier.bias"}
    assert "cls.seq_relationship.weight" in result.report.teacher_unused
