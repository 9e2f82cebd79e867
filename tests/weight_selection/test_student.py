import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from hf_regtools._compat import transformers_model_key
from hf_regtools.adapters import UnsupportedModelError, save_model
from hf_regtools.checkpoint import CheckpointError
from hf_regtools.testing.assertions import assert_same_weights
from hf_regtools.testing.tiny_models import (timm_convnext, timm_swin, timm_vit, transformers_convnext,
                                             transformers_swin, transformers_vit)
from hf_regtools.weight_selection import initialize_student, uniform_indices


def saved(model, folder):
    save_model(model, folder)
    return folder


def test_timm_preset_student_from_folder(tmp_path):
    torch.manual_seed(0)
    teacher = timm_vit(embed_dim=384, depth=2, num_heads=6, img_size=32, patch_size=16, num_classes=10)
    result = initialize_student(saved(teacher, tmp_path / "teacher"), "vit-tiny", depth=2)
    student = result.model
    assert (student.embed_dim, len(student.blocks), student.blocks[0].attn.num_heads) == (192, 2, 3)
    assert student.blocks[0].mlp.fc1.out_features == 768 and student.num_classes == 10
    assert torch.equal(student.blocks[1].attn.qkv.weight,
                       teacher.blocks[1].attn.qkv.weight[uniform_indices(1152, 576)][:, uniform_indices(384, 192)])
    assert result.student_source == "preset vit-tiny"

    out = result.save(tmp_path / "student")
    import timm

    assert_same_weights(timm.create_model(f"local-dir:{out}", pretrained=True), student)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["embed_dim"] == 192
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and {"hf-regtools", "weight-selection"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local teacher is not a Hub id
    assert "`per_chunk`" in card.text and "head.weight" in card.text


def test_convnext_preset_and_overrides_per_stage(tmp_path):
    torch.manual_seed(0)
    teacher = timm_convnext(dims=(96, 192, 384, 768), depths=(1, 1, 2, 1), num_classes=4)
    result = initialize_student(saved(teacher, tmp_path / "t"), "convnext-femto", depth=(1, 1, 1, 1), num_labels=7)
    student = result.model
    assert [s.blocks[0].conv_dw.out_channels for s in student.stages] == [48, 96, 192, 384]
    assert [len(s.blocks) for s in student.stages] == [1, 1, 1, 1] and student.num_classes == 7
    assert torch.equal(student.stem[0].weight, teacher.stem[0].weight[uniform_indices(96, 48)])


def test_transformers_overrides_keep_head_dim_and_mlp_ratio(tmp_path):
    torch.manual_seed(0)
    teacher = transformers_vit(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    folder = saved(teacher, tmp_path / "t")
    query = "vit.encoder.layer.{}.attention.attention.query.weight"  # the original key layout, as saved by 4.57 and 5.x
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert query.format(0) in f.keys()
    result = initialize_student(folder, hidden_size=16, depth=2, num_labels=5)
    config = result.model.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size, config.num_hidden_layers) == (16, 2, 64, 2)
    assert config.num_labels == 5
    idx = uniform_indices(32, 16)
    q = transformers_model_key(teacher, query.format(1))  # 5.x: vit.layers.1.attention.q_proj.weight
    assert torch.equal(result.model.state_dict()[q], teacher.state_dict()[q][idx][:, idx])
    out = result.save(tmp_path / "s")
    from transformers import ViTForImageClassification

    assert_same_weights(ViTForImageClassification.from_pretrained(out), result.model)


def test_sharded_teacher_and_student_given_as_config_folder(tmp_path):
    torch.manual_seed(0)
    teacher = transformers_convnext(hidden_sizes=(16, 32, 64, 128), depths=(2, 2, 2, 2))
    teacher.save_pretrained(tmp_path / "t", max_shard_size="50KB")
    assert (tmp_path / "t" / "model.safetensors.index.json").is_file()
    student_config = transformers_convnext(hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 2, 1), num_labels=3).config
    student_config.save_pretrained(tmp_path / "student_config")
    result = initialize_student(tmp_path / "t", tmp_path / "student_config")
    assert result.model.config.hidden_sizes == [8, 16, 32, 64]
    assert torch.equal(result.model.convnext.embeddings.patch_embeddings.weight,
                       teacher.convnext.embeddings.patch_embeddings.weight[uniform_indices(16, 8)])


def test_teacher_module_and_student_module():
    torch.manual_seed(0)
    teacher, student = timm_vit(), timm_vit(embed_dim=8, depth=2, num_heads=1)
    result = initialize_student(teacher, student, mode="consecutive")
    assert result.model is student and result.config.mode == "consecutive"
    assert torch.equal(student.norm.bias, teacher.norm.bias[:8])


def test_student_errors(tmp_path):
    torch.manual_seed(0)
    folder = saved(timm_vit(), tmp_path / "t")
    with pytest.raises(ValueError, match="unknown student preset 'vit-huge'"):
        initialize_student(folder, "vit-huge")
    with pytest.raises(UnsupportedModelError, match="Presets that fit"):
        initialize_student(folder, "convnext-femto")
    with pytest.raises(ValueError, match="no student given"):
        initialize_student(folder)
    transformers_config = tmp_path / "hf_config"
    transformers_vit(hidden_size=8, num_attention_heads=1, intermediate_size=16).config.save_pretrained(transformers_config)
    with pytest.raises(UnsupportedModelError, match="is a transformers model but the teacher a timm model"):
        initialize_student(folder, transformers_config)
    with pytest.raises(UnsupportedModelError, match="same family"):
        convnext_config = tmp_path / "cn"
        saved(timm_convnext(), convnext_config)
        initialize_student(folder, convnext_config)


@pytest.mark.parametrize("build", [timm_swin, transformers_swin])
def test_swin_teacher_raises_before_a_student_is_built(build, tmp_path):
    with pytest.raises(UnsupportedModelError, match="weight selection does not support the teacher's family"):
        initialize_student(saved(build(), tmp_path / "t"), hidden_size=8)


def test_missing_and_corrupt_checkpoints(tmp_path):
    torch.manual_seed(0)
    folder = saved(timm_vit(), tmp_path / "t")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(CheckpointError, match="cannot read checkpoint file"):
        initialize_student(folder, hidden_size=8)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        initialize_student(folder, hidden_size=8)


def test_output_is_atomic(tmp_path, monkeypatch):
    torch.manual_seed(0)
    result = initialize_student(timm_vit(), timm_vit(embed_dim=8, depth=2, num_heads=1))
    out = tmp_path / "out"
    import hf_regtools.adapters.timm as timm_adapter

    def failing_save(model, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(timm_adapter, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        result.save(out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    result.save(out)
    with pytest.raises(FileExistsError, match="already exists"):
        result.save(out)
    before = (out / "model.safetensors").read_bytes()
    result.save(out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
