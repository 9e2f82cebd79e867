import pytest
import torch
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

from hf_regtools.adapters import (FAMILIES, UnsupportedModelError, detect_family, find_supported_model, library_of,
                                  supported_families)
from hf_regtools.adapters.sites import drop_path_blocks, drop_path_slots, dropout_sites, install_drop_path
from hf_regtools.dropout_schedules import DropRateController, EarlyDropoutCallback, LateStochasticDepthCallback
from hf_regtools.testing.tiny_models import (MODELS, TimmClassifier, timm_convnext, timm_convnext_classifier, timm_swin,
                                             timm_vit, timm_wrapped_vit, transformers_convnext, transformers_swin)
from hf_regtools.weight_selection import select_weights


def test_every_family_has_a_tiny_model():
    assert {" ".join(key) for key in MODELS} == set(supported_families())


@pytest.mark.parametrize("key", sorted(MODELS), ids="-".join)
def test_signatures_are_mutually_exclusive(key):
    keys = list(MODELS[key]().state_dict())
    assert [family.label for family in FAMILIES if family.matches(keys)] == [" ".join(key)]


def test_transformers_swin_is_detected_in_the_checkpoint_layout(tmp_path):
    transformers_swin().save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(key.endswith("attention.self.relative_position_bias_table") for key in keys)
    assert detect_family(keys).label == "transformers swin"


# The supported model inside the usual wrappers (issue 7: timm models reaching a Trainer).

def _user_module(**children):
    module = torch.nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def _ddp(model):
    """A real `DistributedDataParallel` wrapper in a 1-process gloo group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return torch.nn.parallel.DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()


WRAPPERS = {
    "TimmWrapperForImageClassification": (timm_wrapped_vit, "timm_model", "timm vit"),
    "user module": (timm_convnext_classifier, "backbone", "timm convnext"),
    "user module, two levels": (lambda: _user_module(net=_user_module(inner=timm_swin())), "net.inner", "timm swin"),
    "user module around transformers": (lambda: _user_module(net=transformers_convnext()), "net",
                                        "transformers convnext"),
    "DDP": (lambda: _ddp(timm_vit()), "module", "timm vit"),
    "torch.compile": (lambda: torch.compile(timm_convnext()), "_orig_mod", "timm convnext"),
    "DDP around TimmWrapper": (lambda: _ddp(timm_wrapped_vit()), "module.timm_model", "timm vit"),
    "unwrapped": (transformers_swin, "", "transformers swin"),
}


@pytest.mark.parametrize("build, prefix, label", WRAPPERS.values(), ids=list(WRAPPERS))
def test_the_supported_model_is_found_inside_wrappers(build, prefix, label):
    model = build()
    found = find_supported_model(model)
    assert (found.prefix, found.family.label) == (prefix, label)
    assert found.module is (model.get_submodule(prefix) if prefix else model)
    assert detect_family(model).label == label and library_of(model) == label.split()[0]


@pytest.mark.parametrize("build, prefix, label", WRAPPERS.values(), ids=list(WRAPPERS))
def test_sites_and_surgery_use_the_outer_models_names(build, prefix, label):
    model = build()
    parameters = dict(model.named_parameters())
    installed = install_drop_path(model)
    assert installed and all(name.startswith(prefix) for name in installed)
    assert all(hasattr(model.get_submodule(name), "drop_prob") for name in installed)
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in parameters.items()}
    slots = drop_path_slots(model)
    assert [model.get_submodule(name) for name, _ in slots] == [module for _, module in slots]
    for site in dropout_sites(model):
        assert model.get_submodule(site.name if site.attribute == "p" else site.name.rpartition(".")[0]) is site.module
    blocks = drop_path_blocks(model)
    DropRateController(model, target="drop_path").set(0.3)
    assert blocks[-1][0].get() == pytest.approx(0.3)


def test_trainer_callbacks_accept_timm_models_in_wrappers(tmp_path):
    for build, callback in ((timm_wrapped_vit, EarlyDropoutCallback(p=0.3, cutoff_steps=2)),
                            (timm_convnext_classifier, LateStochasticDepthCallback(p=0.5, cutoff_steps=1))):
        model = build()
        trainer = Trainer(model, TrainingArguments(tmp_path / build.__name__, max_steps=2, report_to="none",
                                                   use_cpu=True, per_device_train_batch_size=4),
                          train_dataset=_images(8, 32 if build is timm_convnext_classifier else 16),
                          callbacks=[callback])
        trainer.train()
        assert callback.controller.rate == (0.0 if callback.mode == "early" else 0.5)
    assert model.backbone.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.5)


def _images(size, side):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(size, 3, side, side, generator=generator)
    labels = torch.randint(0, 3, (size,), generator=generator)
    return [{"pixel_values": x, "labels": y} for x, y in zip(pixels, labels)]


def test_unsupported_models_are_described_by_name():
    import timm
    from transformers import DistilBertConfig, DistilBertModel

    mobilenet = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
    distilbert = DistilBertModel(DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=16))
    for model, name in ((mobilenet, "(timm mobilenetv3_small_050)"),
                        (TimmClassifier(mobilenet), "(timm mobilenetv3_small_050 in TimmClassifier)"),
                        (distilbert, "(transformers distilbert)"), (torch.nn.Linear(2, 2), "(Linear)")):
        with pytest.raises(UnsupportedModelError, match=r"the model \S.* is not of a supported family\. Supported: "
                                                        r"timm vit") as error:
            detect_family(model)
        assert name in str(error.value) and "keys" not in str(error.value)
    with pytest.raises(UnsupportedModelError, match=r"^the teacher \(org/mobilenet\) is not of a supported family"):
        detect_family(list(mobilenet.state_dict()), role="teacher", name="org/mobilenet")
    with pytest.raises(UnsupportedModelError, match=r"^the model is not of a supported family \(keys: conv_stem\."):
        detect_family(list(mobilenet.state_dict()))
    with pytest.raises(UnsupportedModelError, match=r"weight selection does not support the student's family, timm"):
        find_supported_model(_user_module(net=timm_swin()), role="student", technique="weight_selection")


def test_weight_selection_between_wrapped_timm_models():
    torch.manual_seed(0)
    teacher, student = timm_wrapped_vit(), timm_wrapped_vit(embed_dim=8, depth=2, num_heads=1)
    plain = timm_vit(embed_dim=8, depth=2, num_heads=1)
    report = select_weights(TimmClassifier(teacher.timm_model), student)
    assert report.family == "timm vit" and "head.weight" in report.skipped
    select_weights(teacher.timm_model.state_dict(), plain)
    for key, value in plain.state_dict().items():
        if key not in report.skipped:
            assert torch.equal(student.timm_model.state_dict()[key], value), key


def test_initialize_student_from_wrapped_timm_models(tmp_path):
    import timm

    from hf_regtools.weight_selection import initialize_student

    torch.manual_seed(0)
    teacher = timm_wrapped_vit()
    built = initialize_student(teacher, hidden_size=8, depth=2)
    given = timm_wrapped_vit(embed_dim=8, depth=2, num_heads=1)
    result = initialize_student(TimmClassifier(teacher), given)
    assert result.library == built.library == "timm" and result.model is given.timm_model
    for key, value in built.model.state_dict().items():
        if key not in built.report.skipped:
            assert torch.equal(result.model.state_dict()[key], value), key
    result.save(tmp_path / "student")
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True)
    assert torch.equal(reloaded.blocks[1].attn.qkv.weight, given.timm_model.blocks[1].attn.qkv.weight)
