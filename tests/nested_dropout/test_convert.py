"""convert_to_nested and the nested sites on the VGG-style net, timm ResNets and transformers ResNets."""

import pytest
import torch

from hf_regtools.adapters.nested_sites import NestedSite, nested_sites
from hf_regtools.nested_dropout import LinearVDO, NestedConv2d, convert_to_nested, nested_layers
from hf_regtools.testing import tiny_models

BUILDERS = {
    "vgg_classifier": tiny_models.vgg_classifier,
    "timm_resnet_classifier": tiny_models.timm_resnet_classifier,
    "timm_resnet_bottleneck": lambda: tiny_models.timm_resnet_classifier(channels=(16, 32, 64, 128),
                                                                         bottleneck=True),
    "transformers_resnet": tiny_models.transformers_resnet,
    "transformers_resnet_bottleneck": lambda: tiny_models.transformers_resnet(hidden_sizes=(16, 32, 64, 128),
                                                                              layer_type="bottleneck"),
}
IMAGE_SIZE = {"vgg_classifier": 16}

EXPECTED_NESTED = {
    "vgg_classifier": ["features.4", "features.8", "features.11"],
    "timm_resnet_classifier": [f"backbone.layer{i}.0.conv1" for i in range(1, 5)],
    "timm_resnet_bottleneck": [f"backbone.layer{i}.0.conv{j}" for i in range(1, 5) for j in (1, 2)],
    "transformers_resnet": [f"resnet.encoder.stages.{i}.layers.0.layer.0.convolution" for i in range(4)],
    "transformers_resnet_bottleneck": [f"resnet.encoder.stages.{i}.layers.0.layer.{j}.convolution"
                                       for i in range(4) for j in (0, 1)],
}
EXPECTED_VDO = {
    "vgg_classifier": ["classifier.0", "classifier.3"],
    "timm_resnet_classifier": ["backbone.fc"], "timm_resnet_bottleneck": ["backbone.fc"],
    "transformers_resnet": ["classifier.1"], "transformers_resnet_bottleneck": ["classifier.1"],
}


def build(name):
    torch.manual_seed(0)
    return BUILDERS[name]()


def test_sites_of_the_vgg_net():
    assert nested_sites(build("vgg_classifier")) == [
        NestedSite("features.0", "features.1", ("features.4",)),
        NestedSite("features.4", "features.5", ("features.8",)),
        NestedSite("features.8", "features.9", ("features.11",)),
        NestedSite("features.11", "features.12", ("classifier.0",)),
    ]


def test_sites_of_resnets_leave_residual_branches_alone():
    timm_sites = nested_sites(build("timm_resnet_bottleneck"))
    assert timm_sites[:2] == [
        NestedSite("backbone.layer1.0.conv1", "backbone.layer1.0.bn1", ("backbone.layer1.0.conv2",)),
        NestedSite("backbone.layer1.0.conv2", "backbone.layer1.0.bn2", ("backbone.layer1.0.conv3",))]
    transformers_sites = nested_sites(build("transformers_resnet"))
    prefix = "resnet.encoder.stages.0.layers.0.layer"
    assert transformers_sites[0] == NestedSite(f"{prefix}.0.convolution", f"{prefix}.0.normalization",
                                               (f"{prefix}.1.convolution",))
    for name in sorted(set(BUILDERS) - {"vgg_classifier"}):
        # the stem, the blocks' last convolutions and the shortcuts feed a residual sum: no sites
        assert [site.conv for site in nested_sites(build(name))] == EXPECTED_NESTED[name]


def test_sites_in_a_sequential_model_with_flatten():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    assert nested_sites(model) == [NestedSite("0", None, ("2",)), NestedSite("2", None, ("5",))]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_conversion_keeps_parameters_and_eval_outputs(name):
    model = build(name).eval()
    side = IMAGE_SIZE.get(name, 32)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        before = model(pixel_values=x)["logits"]
    parameters = dict(model.named_parameters())
    assert convert_to_nested(model, num_div=4, freeze=1) is model
    assert [n for n, _ in nested_layers(model)] == EXPECTED_NESTED[name]
    assert [n for n, m in model.named_modules() if isinstance(m, LinearVDO)] == EXPECTED_VDO[name]
    after = dict(model.named_parameters())
    for key, parameter in parameters.items():
        assert after[key] is parameter, key
    new = set(after) - set(parameters)
    assert new == {f"{n}.{p}" for n in EXPECTED_NESTED[name] for p in ("log_alpha", "beta_r")} | \
        {f"{n}.log_alpha" for n in EXPECTED_VDO[name]}
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x)["logits"], before, rtol=0, atol=0)
        for module in model.modules():
            if isinstance(module, (NestedConv2d, LinearVDO)):
                module.log_alpha.fill_(-30.0)
        torch.testing.assert_close(model(pixel_values=x)["logits"], before, rtol=0, atol=0)


def test_converted_model_trains_and_state_dict_round_trips():
    model = convert_to_nested(build("timm_resnet_classifier"), num_div=8, freeze=2, prior_pi=0.95)
    out = model(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 0]))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    fresh = convert_to_nested(build("timm_resnet_classifier"), num_div=8, freeze=2, prior_pi=0.95)
    fresh.load_state_dict(model.state_dict())
    layer = nested_layers(fresh)[0][1]
    assert (layer.num_div, layer.freeze, layer.prior_pi) == (8, 2, 0.95)


def test_first_conv_include_exclude_and_linear():
    model = convert_to_nested(build("vgg_classifier"), num_div=4, freeze=1, keep_first_conv=False,
                              linear_vdo=False)
    assert [n for n, _ in nested_layers(model)] == ["features.0", "features.4", "features.8", "features.11"]
    assert not any(isinstance(m, LinearVDO) for m in model.modules())
    model = convert_to_nested(build("vgg_classifier"), include=[r"^features\.(4|8)$", "classifier.3"], num_div=4)
    assert [n for n, _ in nested_layers(model)] == ["features.4", "features.8"]
    assert isinstance(model.classifier[3], LinearVDO) and not isinstance(model.classifier[0], LinearVDO)
    model = convert_to_nested(build("vgg_classifier"), exclude=r"^features\.8$", num_div=4, threshold=2.0)
    assert [n for n, _ in nested_layers(model)] == ["features.4", "features.11"]
    assert model.classifier[0].threshold == 2.0 and model.features[4].threshold == 2.0


def test_errors_name_the_layer_and_the_fix():
    with pytest.raises(ValueError, match=r"'features\.4' has 16 output channels.*num_div=16 divides every"):
        convert_to_nested(build("vgg_classifier"))
    with pytest.raises(ValueError, match=r"'backbone.layer1.0.conv1' has 8 .* num_div=8 divides every"):
        convert_to_nested(build("timm_resnet_classifier"), num_div=16, freeze=2)
    with pytest.raises(TypeError, match="unknown NestedConv2d options"):
        convert_to_nested(build("vgg_classifier"), num_groups=4)
    with pytest.raises(ValueError, match="matches none"):
        convert_to_nested(build("vgg_classifier"), include="nothing", num_div=4)
    with pytest.raises(ValueError, match="stays ordinary unless keep_first_conv=False"):
        convert_to_nested(build("vgg_classifier"), include=r"features\.0$", num_div=4)
    with pytest.raises(ValueError, match="no convolution whose output channels"):
        convert_to_nested(tiny_models.mlp_classifier())
    biased = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"convolution '1' has a bias"):
        convert_to_nested(biased, num_div=4)
    model = build("vgg_classifier")
    with pytest.raises(ValueError, match="not divisible"):
        convert_to_nested(model, num_div=32)
    assert not nested_layers(model) and not isinstance(model.classifier[0], LinearVDO), \
        "validation runs before any layer is replaced"


@pytest.mark.parametrize("name", ["vgg_classifier", "timm_resnet_bottleneck", "transformers_resnet"])
def test_sites_are_the_same_after_conversion(name):
    before = nested_sites(build(name))
    assert nested_sites(convert_to_nested(build(name), num_div=4, freeze=1)) == before
