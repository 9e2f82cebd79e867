"""Sub-network extraction: a smaller network equal to the masked one; BatchNorm recalibration; save, load, push."""

import copy
import re
import uuid

import pytest
import torch
from huggingface_hub import ModelCard

from hf_regtools.hub import HubError
from hf_regtools.nested_dropout import (LinearVDO, NestedConv2d, SampledConv2d, SampledLinear, convert_to_nested,
                                        extract_subnet, load_subnet, masked_width, push_subnet, recalibrate_bn,
                                        save_subnet)
from hf_regtools.nested_dropout.calibration import logits_of_output
from hf_regtools.testing import tiny_models

BUILDERS = {"vgg_classifier": 16, "timm_resnet_classifier": 32, "transformers_resnet": 32}


def nested(builder="vgg_classifier", seed=0, **options):
    """A converted tiny model with random BatchNorm statistics and affine parameters, betas and log alphas (some
    above the threshold), in evaluation mode."""
    torch.manual_seed(seed)
    model = convert_to_nested(getattr(tiny_models, builder)(), num_div=4, freeze=1, **options)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
            if isinstance(module, NestedConv2d):
                module.beta_r.normal_()
            if isinstance(module, (NestedConv2d, LinearVDO)):
                module.log_alpha.uniform_(-2.0, 4.0)
    return model.eval()


def images(builder="vgg_classifier", n=4, seed=1):
    size = BUILDERS[builder]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return logits_of_output(model(x))


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_subnet_equals_the_masked_network(builder):
    model, x = nested(builder), images(builder)
    for rho in (0.0, 0.4, 0.7, 1.0):
        for scale_by_keep_prob in (True, False):
            for fold_bn in (True, False):
                with masked_width(model, rho, scale_by_keep_prob=scale_by_keep_prob, fold_bn=fold_bn):
                    expected = logits(model, x)
                subnet = extract_subnet(model, rho, scale_by_keep_prob=scale_by_keep_prob, fold_bn=fold_bn)
                torch.testing.assert_close(logits(subnet, x), expected, atol=1e-5, rtol=1e-5)
                info, modules = subnet.nested_subnet_info, dict(subnet.named_modules())
                for name, (kept, total) in info.channels.items():
                    assert type(modules[name]) is torch.nn.Conv2d
                    assert modules[name].out_channels == (total if name in info.uncut else kept)
                assert not any(isinstance(m, (NestedConv2d, LinearVDO)) for m in subnet.modules())
                assert fold_bn or info.uncut == tuple(n for n, (k, t) in info.channels.items() if k < t)


def test_dropped_channels_are_exact_zeros_after_the_batchnorm():
    model, x = nested(), images()
    norms = {"features.5": "features.4", "features.9": "features.8", "features.12": "features.11"}
    outputs = {}
    for fold_bn in (True, False):
        with masked_width(model, 0.4, fold_bn=fold_bn):  # record after the masking hooks, before the in-place ReLU
            hooks = [model.get_submodule(norm).register_forward_hook(
                lambda module, args, output, norm=norm: outputs.__setitem__(norm, output.clone())) for norm in norms]
            logits(model, x)
            for hook in hooks:
                hook.remove()
        for norm, conv in norms.items():
            kept = model.get_submodule(conv).kept_channels(0.4)
            dropped = outputs[norm][:, kept:]
            if fold_bn:
                assert torch.equal(dropped, torch.zeros_like(dropped))
                assert (outputs[norm][:, :kept] != 0).any()
            else:  # the official mask before the BatchNorm leaves its constant beta - gamma * mean / sqrt(var + eps)
                module = model.get_submodule(norm)
                constant = module.bias - module.weight * module.running_mean / torch.sqrt(module.running_var
                                                                                         + module.eps)
                torch.testing.assert_close(dropped, constant[kept:].view(1, -1, 1, 1).expand_as(dropped))
    subnet = extract_subnet(model, 0.4)
    assert subnet.features[5].num_features == subnet.features[4].out_channels == model.features[4].kept_channels(0.4)
    assert subnet.features[8].in_channels == subnet.features[4].out_channels


def test_parameters_decrease_with_the_width():
    model = nested()
    counts = [extract_subnet(model, rho).nested_subnet_info.parameters for rho in (1.0, 2 / 3, 1 / 3, 0.0)]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4
    full = extract_subnet(model, 1.0)
    assert full.nested_subnet_info.parameters == full.nested_subnet_info.full_parameters == sum(
        p.numel() for p in full.parameters())
    assert extract_subnet(model, 0.0, fold_bn=False).nested_subnet_info.parameters == counts[0]


def test_full_width_without_scaling_or_noise_is_the_plain_network():
    torch.manual_seed(0)
    plain = tiny_models.vgg_classifier().eval()
    model = convert_to_nested(copy.deepcopy(plain), num_div=4, freeze=1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (NestedConv2d, LinearVDO)):
                module.log_alpha.fill_(-50.0)
    subnet = extract_subnet(model.eval(), 1.0, scale_by_keep_prob=False)
    x = images()
    torch.testing.assert_close(logits(subnet, x), logits(plain, x), atol=1e-6, rtol=1e-6)
    assert {type(m) for m in subnet.modules() if isinstance(m, torch.nn.Conv2d)} == {torch.nn.Conv2d}


def test_the_input_model_is_untouched_and_deterministic_weights_are_clipped():
    model = nested()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    subnet = extract_subnet(model, 0.5, loader=[images(n=8)])
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert isinstance(model.features[4], NestedConv2d) and model.features[5].num_features == 16
    layer, conv = model.features[8], subnet.features[8]
    kept = layer.kept_channels(0.5)
    scale = layer.channel_scale(0.5).view(-1, 1, 1, 1)
    pruned = layer.log_alpha[:kept, :conv.in_channels] >= layer.threshold
    assert pruned.any() and (conv.weight[pruned] == 0).all()
    torch.testing.assert_close(conv.weight, (layer.weight[:kept, :conv.in_channels] * scale).where(
        ~pruned, torch.zeros(())))


def test_sampled_weights_draw_from_the_posterior():
    model, x = nested(), images()
    subnet = extract_subnet(model, 0.5, weight_mode="sampled")
    assert isinstance(subnet.features[8], SampledConv2d) and isinstance(subnet.classifier[0], SampledLinear)
    assert not torch.equal(logits(subnet, x), logits(subnet, x))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (NestedConv2d, LinearVDO)):
                module.log_alpha.fill_(-40.0)
    quiet = extract_subnet(model, 0.5, weight_mode="sampled")
    torch.testing.assert_close(logits(quiet, x), logits(extract_subnet(model, 0.5), x), atol=2e-3, rtol=0)
    conv = quiet.features[8]
    with torch.no_grad():
        conv.log_alpha.fill_(0.0)
        features = torch.randn(2, conv.in_channels, 4, 4)
        torch.manual_seed(3)
        sampled = conv(features)
        torch.manual_seed(3)
        noise = torch.randn_like(sampled)
        mean = torch.nn.functional.conv2d(features, conv.weight, padding=1)
        std = torch.sqrt(torch.nn.functional.conv2d(features ** 2, conv.weight ** 2, padding=1) + 1e-8)
    torch.testing.assert_close(sampled, mean + std * noise)


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(4, momentum=0.3)
        self.drop = torch.nn.Dropout(0.5)
        self.seen = []

    def forward(self, pixel_values):
        self.seen.append((self.bn.training, self.drop.training, self.conv.training))
        return self.drop(self.bn(self.conv(pixel_values)))


def test_recalibrate_bn_averages_batch_statistics_in_bn_train_mode_only():
    model = Recorder().eval()
    batches = [torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert recalibrate_bn(model, [{"pixel_values": b, "labels": None} for b in batches]) == 3
    with torch.no_grad():
        features = [model.conv(b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, mean)
    torch.testing.assert_close(model.bn.running_var, var)
    assert model.seen == [(True, False, False)] * 3
    assert not model.training and not model.bn.training and model.bn.momentum == 0.3
    assert recalibrate_bn(model, [(b, None) for b in batches], n_batches=1) == 1
    torch.testing.assert_close(model.bn.running_mean, features[0].mean((0, 2, 3)))
    before = model.bn.running_mean.clone()
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_bn(model, [])
    assert torch.equal(model.bn.running_mean, before)
    with pytest.raises(ValueError, match="n_batches"):
        recalibrate_bn(model, batches, n_batches=0)
    with pytest.raises(TypeError, match="cannot feed a batch of type str"):
        recalibrate_bn(model, ["x"])


def test_extraction_with_a_loader_recalibrates_the_subnet():
    model = nested()
    subnet = extract_subnet(model, 0.4, loader=[images(n=8, seed=s) for s in range(4)], n_batches=2)
    assert subnet.nested_subnet_info.recalibration_batches == 2
    assert not torch.allclose(subnet.features[5].running_mean, model.features[5].running_mean[:8])
    assert not subnet.training


def test_bad_arguments_are_named():
    model = nested()
    with pytest.raises(ValueError, match=r"rho .* must be a number in \[0, 1\], got 1.5"):
        extract_subnet(model, 1.5)
    with pytest.raises(ValueError, match="weight_mode must be one of"):
        extract_subnet(model, 0.5, weight_mode="mean")
    with pytest.raises(ValueError, match="no NestedConv2d layer.*convert_to_nested"):
        extract_subnet(tiny_models.vgg_classifier(), 0.5)
    stray = torch.nn.Sequential(NestedConv2d(3, 4, 3, num_div=4, freeze=1), torch.nn.Flatten())
    with pytest.raises(ValueError, match=r"\['0'\] are not nested sites"):
        extract_subnet(stray, 0.5)
    with pytest.raises(ValueError, match="was not made by extract_subnet"):
        save_subnet(tiny_models.vgg_classifier(), "unused")


def test_save_and_load_round_trip_with_a_card(tmp_path):
    model, x = nested(), images()
    subnet = extract_subnet(model, 0.4)
    folder = save_subnet(subnet, tmp_path / "half", base_model="org/vgg-nested", metrics={"accuracy": 0.5})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.safetensors", "nested_subnet.json"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/vgg-nested" and "nested-dropout" in card.data.tags
    info = subnet.nested_subnet_info
    for text in ("width `rho` | 0.4", f"parameters | {info.parameters} ", f"of the {info.full_parameters} at full",
                 "| `features.8` | 16 / 32 |", "accuracy: 0.5", "| `rho` | `0.4` |"):
        assert text in card.text, text
    loaded = load_subnet(folder, tiny_models.vgg_classifier())
    torch.testing.assert_close(logits(loaded, x), logits(subnet, x), atol=0, rtol=0)
    assert loaded.nested_subnet_info == info
    with pytest.raises(FileExistsError):
        save_subnet(subnet, folder)
    resnet = extract_subnet(nested("transformers_resnet"), 0.0, weight_mode="sampled")
    save_subnet(resnet, tmp_path / "resnet")
    rebuilt = load_subnet(tmp_path / "resnet")
    assert type(rebuilt).__name__ == "ResNetForImageClassification"
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in resnet.named_parameters()}
    with pytest.raises(ValueError, match="no transformers config"):
        load_subnet(folder)


def test_push_to_the_hub_and_a_failing_push(tmp_path, fake_hub):
    subnet, x = extract_subnet(nested(), 0.7), images()
    repo_id = f"org/subnet-{uuid.uuid4().hex[:8]}"
    sha = push_subnet(subnet, repo_id, base_model="org/vgg-nested", metrics={"ece": 0.1})
    assert fake_hub.commits(repo_id) == [sha]
    assert sorted(fake_hub.files(repo_id)) == ["README.md", "model.safetensors", "nested_subnet.json"]
    card = fake_hub.files(repo_id)["README.md"].decode()
    assert "base_model: org/vgg-nested" in card and repo_id in card and "<this repo>" not in card
    loaded = load_subnet(repo_id, tiny_models.vgg_classifier())
    torch.testing.assert_close(logits(loaded, x), logits(subnet, x), atol=0, rtol=0)

    other = f"org/subnet-{uuid.uuid4().hex[:8]}"
    fake_hub.add_fault("POST", r"/commit/", 500)
    with pytest.raises(HubError) as raised:
        push_subnet(subnet, other, folder=tmp_path / "kept")
    message = str(raised.value)
    assert "\n" not in message and re.search(r"server error \(HTTP 500\).*local output in .*kept is complete", message)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["README.md", "model.safetensors",
                                                                     "nested_subnet.json"]
    assert fake_hub.commits(other) == []
    fake_hub.clear_faults()


def test_sampled_parity_network_keeps_dropped_channels_at_exactly_zero():
    model, x = nested(), images()
    subnet = extract_subnet(model, 0.4, weight_mode="sampled", fold_bn=False)
    outputs = []
    hook = subnet.features[8].register_forward_hook(lambda module, args, output: outputs.append(output))
    logits(subnet, x)
    hook.remove()
    kept = model.features[8].kept_channels(0.4)
    assert subnet.features[8].out_channels == 32 and torch.equal(outputs[0][:, kept:], torch.zeros_like(
        outputs[0][:, kept:]))
    assert (outputs[0][:, :kept] != 0).all()
