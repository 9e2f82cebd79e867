import json
import uuid

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
    # the registered architecture of the student's width: only what differs from its defaults is in model_args
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["depth"] == 2
    assert not {"embed_dim", "num_heads", "mlp_ratio"} & config["model_args"].keys()
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


def test_preset_with_overrides_keeps_the_preset_head_dim_and_mlp_ratio(tmp_path):
    """Issue 7: `vit-tiny` at width 128 has 2 heads of 64 and an MLP of 512 (it had 3 heads and MLP ratio 8)."""
    torch.manual_seed(0)
    folder = saved(transformers_vit(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=512), tmp_path / "t")
    config = initialize_student(folder, "vit-tiny", hidden_size=128, depth=1).model.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (128, 2, 512)
    config = initialize_student(folder, "vit-tiny", hidden_size=96, num_heads=3, depth=1).model.config
    assert (config.num_attention_heads, config.intermediate_size) == (3, 384)
    config = initialize_student(folder, "vit-tiny", hidden_size=128, mlp_dim=200, depth=1).model.config
    assert (config.num_attention_heads, config.intermediate_size) == (2, 200)
    with pytest.raises(ValueError, match=r"hidden_size 96 is not a multiple of the student's head dimension 64.*"
                                         r"--num-heads"):
        initialize_student(folder, "vit-tiny", hidden_size=96, depth=1)


def test_vit_dims_rule():
    from hf_regtools.adapters import PRESETS, StudentShape, vit_dims

    teacher = dict(teacher_width=768, teacher_heads=12, teacher_mlp=3072)
    preset = PRESETS["vit-tiny"][1]
    assert vit_dims(preset, **teacher) == (192, 3, 768)
    assert vit_dims(preset.merged(StudentShape(hidden_size=128)), **teacher) == (128, 2, 512)
    assert vit_dims(preset.merged(StudentShape(num_heads=6)), **teacher) == (192, 6, 768)
    assert vit_dims(StudentShape(hidden_size=320), teacher_width=768, teacher_heads=12,
                    teacher_mlp=2304) == (320, 5, 960)  # no preset: the teacher's head dimension and MLP ratio
    with pytest.raises(ValueError, match="not a multiple of the teacher's head dimension 64.*--num-heads"):
        vit_dims(StudentShape(hidden_size=100), **teacher)


def _timm_config(folder):
    return json.loads((folder / "config.json").read_text())


def test_timm_student_config_names_the_student_architecture(tmp_path, fake_hub):
    """Issue 7: the config named the teacher's architecture and pretrained tag with the student's width."""
    import timm

    from hf_regtools.hub import push_folder

    torch.manual_seed(0)
    teacher = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=5)
    teacher_folder = saved(teacher, tmp_path / "teacher")
    teacher_cfg = _timm_config(teacher_folder)["pretrained_cfg"]
    assert teacher_cfg["tag"] and teacher_cfg["license"]

    result = initialize_student(teacher_folder, "vit-tiny", depth=1)
    out = result.save(tmp_path / "student")
    config = _timm_config(out)
    assert config["architecture"] == "vit_tiny_patch16_224" and config["pretrained_cfg"].get("tag") is None
    assert not {"embed_dim", "num_heads", "mlp_ratio"} & config["model_args"].keys()
    assert "hf_hub_id" not in config["pretrained_cfg"] and "url" not in config["pretrained_cfg"]
    for key in ("mean", "std", "interpolation", "crop_pct", "license"):  # the teacher's preprocessing and license
        assert config["pretrained_cfg"][key] == teacher_cfg[key]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]

    repo_id = f"org/ws-{uuid.uuid4().hex[:8]}"
    push_folder(out, repo_id)
    for reference in (f"hf-hub:{repo_id}", f"local-dir:{out}"):
        reloaded = timm.create_model(reference, pretrained=True)
        assert type(reloaded) is type(result.model) and reloaded.embed_dim == 192
        assert_same_weights(reloaded, result.model)

    # no registered architecture of width 128: built from the teacher's, with the shape in model_args
    other = initialize_student(teacher_folder, "vit-tiny", hidden_size=128, depth=1).save(tmp_path / "s128")
    config = _timm_config(other)
    assert config["architecture"] == "vit_small_patch16_224" and config["pretrained_cfg"].get("tag") is None
    assert (config["model_args"]["embed_dim"], config["model_args"]["num_heads"]) == (128, 2)
    assert "no registered timm architecture has this shape" in (other / "README.md").read_text()
    assert_same_weights(timm.create_model(f"local-dir:{other}", pretrained=True),
                        timm.create_model(f"local-dir:{other}", pretrained=True))


def test_timm_convnext_student_is_the_registered_femto_with_a_linear_mlp(tmp_path):
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model("convnext_tiny", pretrained=False, depths=(1, 1, 1, 1), num_classes=3)
    result = initialize_student(saved(teacher, tmp_path / "t"), "convnext-femto", depth=(1, 1, 1, 1))
    config = _timm_config(result.save(tmp_path / "s"))
    assert config["architecture"] == "convnext_femto" and config["model_args"]["conv_mlp"] is False
    assert_same_weights(timm.create_model(f"local-dir:{tmp_path / 's'}", pretrained=True), result.model)


def _with_image_processor(folder, size):
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.1, 0.2, 0.3]).save_pretrained(folder)
    return folder


def test_transformers_student_gets_the_teacher_image_processor(tmp_path, fake_hub):
    """Issue 7: `AutoImageProcessor.from_pretrained(student)` failed: the teacher's preprocessing was not copied."""
    from transformers import AutoImageProcessor

    from hf_regtools.hub import push_folder

    torch.manual_seed(0)
    folder = _with_image_processor(saved(transformers_vit(hidden_size=16, num_hidden_layers=2), tmp_path / "t"), 16)
    teacher_repo = f"org/teacher-{uuid.uuid4().hex[:8]}"
    push_folder(folder, teacher_repo)
    result = initialize_student(teacher_repo, hidden_size=8, depth=1)
    out = result.save(tmp_path / "s", repo_id="org/my-student")
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.to_dict() == AutoImageProcessor.from_pretrained(folder).to_dict()
    assert list(processor.image_mean) == [0.1, 0.2, 0.3]
    card = (out / "README.md").read_text()
    assert "image processor: copied from the teacher (`preprocessor_config.json`)" in card
    assert 'AutoImageProcessor.from_pretrained("org/my-student")' in card
    assert f"[`{teacher_repo}`](https://huggingface.co/{teacher_repo})" in card


def test_student_with_other_inputs_does_not_get_the_teacher_preprocessing(tmp_path):
    import timm

    torch.manual_seed(0)
    teacher = transformers_convnext(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), image_size=64)
    folder = _with_image_processor(saved(teacher, tmp_path / "t"), 64)
    student_config = transformers_convnext(hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1), image_size=32).config
    student_config.save_pretrained(tmp_path / "student_config")
    result = initialize_student(folder, tmp_path / "student_config")
    out = result.save(tmp_path / "s")
    assert not (out / "preprocessor_config.json").exists() and result.preprocessing_files == ()
    assert ("not copied (`preprocessor_config.json`): the student does not keep the teacher's inputs (its image size "
            "is 32, the teacher's 64)") in (out / "README.md").read_text()

    timm_teacher = saved(timm_vit(embed_dim=16, depth=1, img_size=16), tmp_path / "timm_t")
    one_channel = saved(timm_vit(embed_dim=8, depth=1, num_heads=1, img_size=16, in_chans=1), tmp_path / "timm_s")
    timm_result = initialize_student(timm_teacher, one_channel)
    assert timm_result.preprocessing["timm data config"].startswith("not taken from the teacher")
    reloaded = timm.create_model(f"local-dir:{timm_result.save(tmp_path / 'timm_out')}", pretrained=True)
    assert reloaded.pretrained_cfg["input_size"][0] == 1


def _card_with_license(folder, license):
    ModelCard(f"---\nlicense: {license}\n---\n# Teacher\n").save(folder / "README.md")
    return folder


def test_card_license_and_usage_name_the_repo(tmp_path):
    torch.manual_seed(0)
    folder = _card_with_license(saved(transformers_vit(), tmp_path / "t"), "cc-by-nc-4.0")
    result = initialize_student(folder, hidden_size=8, depth=1)
    card = ModelCard.load(result.save(tmp_path / "s", repo_id="org/named").joinpath("README.md"))
    assert card.data.license == "cc-by-nc-4.0" and "from the teacher's model card" in card.text
    assert 'from_pretrained("org/named")' in card.text and "<this repo>" not in card.text

    unlicensed = initialize_student(saved(transformers_vit(), tmp_path / "t2"), hidden_size=8, depth=1)
    card = ModelCard.load(unlicensed.save(tmp_path / "s2").joinpath("README.md"))
    assert card.data.license is None and "none declared by the teacher" in card.text
    assert 'from_pretrained("<this repo>")' in card.text
    assert "image processor: none: the teacher has no `preprocessor_config.json`" in card.text

    timm_result = initialize_student(saved(timm_vit(), tmp_path / "timm_t"), hidden_size=8, depth=1)
    card = ModelCard.load(timm_result.save(tmp_path / "timm_s", repo_id="org/timm-named") / "README.md")
    assert 'timm.create_model("hf-hub:org/timm-named", pretrained=True)' in card.text


@pytest.mark.parametrize("build", [timm_vit, timm_convnext])
def test_timm_student_loads_in_transformers_timm_wrapper(build, tmp_path):
    """A timm student is fine-tuned by transformers' scripts through `AutoModelForImageClassification` (TimmWrapper);
    `num_classes` recorded twice in its config made that fail."""
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    save_model(build(), tmp_path / "teacher")
    student = initialize_student(tmp_path / "teacher", hidden_size=8 if build is timm_vit else (4, 8, 16, 32),
                                 depth=2 if build is timm_vit else (1, 1, 2, 1), num_labels=5)
    student.save(tmp_path / "student")
    wrapped = AutoModelForImageClassification.from_pretrained(tmp_path / "student").eval()
    assert wrapped.config.num_labels == 5
    side = 16 if build is timm_vit else 32
    pixels = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(pixel_values=pixels).logits, student.model.eval()(pixels))
