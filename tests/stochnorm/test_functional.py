"""Surgery on transformers, timm and plain models (spec §7, tests 3, 4, 5 and 7): eval outputs, p plumbing,
Parameter identity, state-dict keys, timm `BatchNormAct2d`, export, and the clear errors."""

import copy

import pytest
import torch
from torch import nn

from hf_regtools.stochnorm import (StochNorm1d, StochNorm2d, StochNorm3d, StochNormAct2d, apply_stochnorm,
                                   remove_stochnorm, set_stochnorm_p, stochnorm_layers)
from hf_regtools.testing.tiny_models import (timm_convnext, timm_resnet, timm_resnet_classifier, transformers_resnet,
                                             transformers_vit)

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def timm_efficientnet():
    import timm

    return timm.create_model("test_efficientnet", num_classes=3)  # BatchNormAct2d after every convolution


def mlp_1d():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def conv_3d():
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 4 * 4, 3))


MODELS = {  # builder, input shape
    "transformers_resnet": (transformers_resnet, (4, 3, 32, 32)),
    "timm_resnet": (timm_resnet, (4, 3, 32, 32)),
    "timm_resnet_classifier": (timm_resnet_classifier, (4, 3, 32, 32)),
    "timm_efficientnet": (timm_efficientnet, (4, 3, 32, 32)),
    "mlp_1d": (mlp_1d, (6, 6)),
    "conv_3d": (conv_3d, (3, 2, 3, 4, 4)),
}


def logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out


def pretrained(name, seed=0):
    """The model after a few training-mode forwards, so its moving statistics are not the initial ones."""
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            logits(model.train(), torch.randn(shape, generator=generator) * 2 + 1)
    return model, torch.randn(shape, generator=generator)


def batch_norm_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, BATCH_NORMS)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_outputs_equal_the_original_model_and_back(name):
    model, x = pretrained(name)
    original = copy.deepcopy(model).eval()
    expected = logits(original, x)
    names = apply_stochnorm(model, p=0.5)
    assert names == batch_norm_names(original) and stochnorm_layers(model).keys() == set(names)
    assert torch.equal(logits(model.eval(), x), expected)
    assert remove_stochnorm(model) == names
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert torch.equal(logits(model.eval(), x), expected)


def test_timm_batchnormact2d_keeps_its_activation_and_dropout():
    from timm.layers import BatchNormAct2d

    bn = BatchNormAct2d(6, act_layer=nn.PReLU, drop_layer=nn.Dropout)  # PReLU: an activation with a parameter
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 5, 5))
    bn.drop.p = 0.0  # the train-mode comparison below needs the same output; the module itself must be kept
    act, drop, keys = bn.act, bn.drop, list(model.state_dict())
    x = torch.randn(4, 3, 5, 5)
    expected_eval = model.eval()(x)
    torch.manual_seed(0)
    expected_train = copy.deepcopy(model).train()(x)
    names = apply_stochnorm(model, p=1.0)
    layer = model[1]
    assert names == ["1"] and type(layer) is StochNormAct2d and layer.act is act and layer.drop is drop
    assert list(model.state_dict()) == keys and "1.act.weight" in keys
    assert torch.equal(model.eval()(x), expected_eval)
    torch.manual_seed(0)
    torch.testing.assert_close(model.train()(x), expected_train)  # p = 1: BatchNormAct2d in training mode
    expected_eval = model.eval()(x)
    remove_stochnorm(model)
    assert type(model[1]) is BatchNormAct2d and model[1].act is act and model[1].drop is drop
    assert torch.equal(model.eval()(x), expected_eval)


@pytest.mark.parametrize("name", ["transformers_resnet", "timm_efficientnet"])
def test_p_reaches_every_layer(name):
    """The tllib bug: `convert_model` passed p positionally into `track_running_stats`, leaving p at 0.5."""
    model, _ = pretrained(name)
    count = len(batch_norm_names(model)) or sum(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    names = apply_stochnorm(model, p=0.3)
    layers = stochnorm_layers(model)
    assert len(names) == count > 0
    assert all(layer.p == 0.3 and layer.track_running_stats for layer in layers.values())
    assert set_stochnorm_p(model, 0.9) == count and all(layer.p == 0.9 for layer in layers.values())
    with pytest.raises(ValueError, match="p must be a probability"):
        set_stochnorm_p(model, 1.2)
    with pytest.raises(ValueError, match="p must be a probability"):
        apply_stochnorm(transformers_resnet(), p=-1)


@pytest.mark.parametrize("name", ["transformers_resnet", "timm_resnet_classifier"])
def test_parameters_and_buffers_are_kept_and_an_earlier_optimizer_still_trains_them(name):
    model, x = pretrained(name)
    parameters = dict(model.named_parameters())
    buffers = {key: value.data_ptr() for key, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    names = apply_stochnorm(model, p=0.5)
    assert {key: id(p) for key, p in model.named_parameters()} == {key: id(p) for key, p in parameters.items()}
    assert {key: value.data_ptr() for key, value in model.state_dict().items()} == buffers
    layer = model.get_submodule(names[0])
    before = layer.weight.detach().clone(), layer.running_mean.clone()
    optimizer.zero_grad()
    logits(model.train(), x).logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.equal(layer.weight, before[0]) and not torch.equal(layer.running_mean, before[1])
    assert any(layer.weight is p for group in optimizer.param_groups for p in group["params"])


def test_converted_transformers_resnet_saves_and_loads_as_the_original_architecture(tmp_path):
    """No `remove_stochnorm` needed for `save_pretrained`: the keys are BatchNorm's."""
    from transformers import ResNetForImageClassification

    model, x = pretrained("transformers_resnet")
    apply_stochnorm(model, p=0.5)
    logits(model.train(), x).sum().backward()  # moving statistics and num_batches_tracked move on
    model.save_pretrained(tmp_path)
    loaded, info = ResNetForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert not stochnorm_layers(loaded) and batch_norm_names(loaded)
    expected = model.state_dict()
    assert list(loaded.state_dict()) == list(expected)
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    assert torch.equal(logits(loaded.eval(), x), logits(model.eval(), x))
    apply_stochnorm(loaded, p=0.5)  # to resume fine-tuning: load, then convert
    assert torch.equal(logits(loaded.eval(), x), logits(model.eval(), x))


def test_layers_of_each_dimension():
    for name, cls in (("mlp_1d", StochNorm1d), ("conv_3d", StochNorm3d), ("timm_resnet", StochNorm2d)):
        model, x = pretrained(name)
        apply_stochnorm(model)
        assert {type(layer) for layer in stochnorm_layers(model).values()} == {cls}
        logits(model.train(), x).sum().backward()


def test_include_and_exclude_select_layers_by_name():
    model = timm_resnet()
    everything = batch_norm_names(model)
    assert apply_stochnorm(model, include=r"^layer1\.") == [n for n in everything if n.startswith("layer1.")]
    model = timm_resnet()
    kept = apply_stochnorm(model, exclude=[r"^bn1$", r"downsample"])
    assert kept == [n for n in everything if n != "bn1" and "downsample" not in n]
    assert type(model.bn1) is nn.BatchNorm2d
    with pytest.raises(ValueError, match=r"selected no BatchNorm layer of ResNet: include='nothing'"):
        apply_stochnorm(timm_resnet(), include="nothing")
    with pytest.raises(ValueError, match="include must be a regex or a list of regexes"):
        apply_stochnorm(timm_resnet(), include="(")


@pytest.mark.parametrize("build, label, found", [
    (transformers_vit, "ViTForImageClassification", "LayerNorm"),
    (timm_convnext, "ConvNeXt", "LayerNorm"),
])
def test_layernorm_models_are_refused_naming_the_model_and_why(build, label, found):
    with pytest.raises(ValueError, match=rf"{label} has no BatchNorm layer \(found \d+ {found}.*does not apply to "
                                         r"LayerNorm models such as ViT or ConvNeXt"):
        apply_stochnorm(build())


def test_refused_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"'1' is a SyncBatchNorm: StochNorm's mini-batch branch would silently use "
                                         r"per-process statistics\. Apply apply_stochnorm before"):
        apply_stochnorm(model)
    assert apply_stochnorm(model, exclude=r"^1$") == ["2"]

    class MyBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="'0' is a MyBatchNorm, a BatchNorm subclass StochNorm does not know"):
        apply_stochnorm(nn.Sequential(MyBatchNorm(4)))
    with pytest.raises(ValueError, match=r"'0' \(BatchNorm2d\) tracks no running statistics"):
        apply_stochnorm(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)))
    converted = timm_resnet()
    apply_stochnorm(converted)
    with pytest.raises(ValueError, match=r"ResNet has StochNorm layers and no BatchNorm left \(already converted\)"):
        apply_stochnorm(converted)
    with pytest.raises(ValueError, match="ConvNeXt has no StochNorm layer; convert it first"):
        set_stochnorm_p(timm_convnext(), 0.5)
    assert remove_stochnorm(timm_convnext()) == []
