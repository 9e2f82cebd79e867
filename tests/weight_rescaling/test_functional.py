"""Weight rescaling's functional core: the invariances of spec §7 (1-6), pair discovery (8), explicit pairs."""

import pytest
import torch
from timm.layers import ConvNormAct
from torch import nn

from hf_regtools.adapters.norm_pairs import name_map_pairs
from hf_regtools.testing.tiny_models import timm_resnet, timm_resnet_classifier, transformers_resnet
from hf_regtools.weight_rescaling import (ScaleInvariantPair, find_scale_invariant_pairs, rescale_weights_,
                                          wrs_param_groups)
from hf_regtools.weight_rescaling.functional import fx_pairs


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU (no BN) -> linear: only the first conv is scale-invariant."""

    def __init__(self, eps=1e-12, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(6, eps=eps)
        self.plain = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.plain(torch.relu(self.bn(self.conv(x)))))
        return self.head(x.mean((2, 3)))


class TorchvisionBasicBlock(nn.Module):
    """torchvision's `BasicBlock`, same names: conv1 -> bn1 -> relu -> conv2 -> bn2 (+ downsample) -> relu."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None if stride == 1 and inplanes == planes else nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


TorchvisionBasicBlock.__name__ = "BasicBlock"


class TorchvisionResNet(nn.Module):
    """A tiny torchvision-style `ResNet` (stem conv1 -> bn1, `layerN` stages, `fc`)."""

    def __init__(self, widths=(8, 16), num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(TorchvisionBasicBlock(widths[0], widths[0]))
        self.layer2 = nn.Sequential(TorchvisionBasicBlock(widths[0], widths[1], stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


TorchvisionResNet.__name__ = "ResNet"


class DDPLike(nn.Module):
    """A wrapper as DDP is one: the model at `.module`, a forward that fx cannot trace."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and args[0].sum() > 0:
            pass
        return self.module(*args, **kwargs)


def logits(model, x):
    out = model(x)
    return out["logits"] if isinstance(out, dict) else out


def bn_preceded_weights(model):
    """Ground truth by hook: layers whose output tensor is exactly what a BatchNorm receives."""
    outputs, inputs = {}, {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, o)) for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks += [m.register_forward_pre_hook(lambda m, i, n=n: inputs.setdefault(n, i[0])) for n, m in
              model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return {layer for layer, out in outputs.items() if any(out is x for x in inputs.values())}


MODELS = {
    "timm_resnet_classifier": lambda: timm_resnet_classifier(zero_init_last=False),
    "timm_bottleneck_deep_stem_avg_down": lambda: timm_resnet(bottleneck=True, stem_type="deep", avg_down=True,
                                                              zero_init_last=False),
    "torchvision_style": TorchvisionResNet,
    "transformers_resnet": transformers_resnet,
    "timm_conv_norm_act": lambda: nn.Sequential(ConvNormAct(3, 8, 3, stride=2), ConvNormAct(8, 8, 3),
                                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)),
}


@pytest.mark.parametrize("name", MODELS)
def test_fx_and_name_maps_find_exactly_the_batchnorm_preceded_weights(name):
    model = MODELS[name]()
    by_fx, _ = fx_pairs(model)
    assert sorted(by_fx) == sorted(name_map_pairs(model))
    managed = {pair.name for pair in find_scale_invariant_pairs(model, method="auto")}
    assert managed == {layer for layer, _ in by_fx} == bn_preceded_weights(model)
    classifier = {"transformers_resnet": "classifier.1", "timm_conv_norm_act": "4"}.get(name, "fc")
    assert not any(n.endswith(classifier) for n in managed)


def test_transformers_resnet_does_not_trace_in_one_piece_and_auto_uses_the_name_maps():
    model = transformers_resnet()
    _, untraced = fx_pairs(model)
    assert "" in untraced
    auto = find_scale_invariant_pairs(model)
    assert [p.name for p in auto] == [p.name for p in find_scale_invariant_pairs(model, method="names")]
    assert [p.name for p in auto] == [p.name for p in find_scale_invariant_pairs(model, method="fx")]


def test_a_conv_followed_by_relu_is_never_managed_and_names_are_the_wrappers():
    model = DDPLike(TinyNet())
    for method in ("auto", "fx"):
        pairs = find_scale_invariant_pairs(model, method=method)
        assert [(p.name, p.norm_name) for p in pairs] == [("module.conv", "module.bn")], method
    assert fx_pairs(model)[1] == [""]
    assert find_scale_invariant_pairs(model, method="names") == []  # the name maps do not know TinyNet
    resnet = DDPLike(TorchvisionResNet())
    assert [p.name for p in find_scale_invariant_pairs(resnet, method="names")][:2] == ["module.conv1",
                                                                                        "module.layer1.0.conv1"]


def test_layers_with_other_users_are_not_managed():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.shared, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), \
                nn.BatchNorm2d(4)
            self.linear, self.bn1d = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.conv(x)
            x = self.bn(y) + y                       # the conv output is used past the BN
            x = self.bn2(self.shared(self.shared(x)))  # the layer is called twice
            return self.bn1d(self.linear(x.mean((2, 3))))

    assert [(p.name, p.norm_name) for p in find_scale_invariant_pairs(Residual(), method="fx")] == [
        ("linear", "bn1d")]


@pytest.mark.parametrize("bias", [True, False])
def test_rescale_sets_every_filter_to_r_and_leaves_the_rest_bit_identical(bias):
    torch.manual_seed(0)
    model = TinyNet(bias=bias)
    model(torch.randn(8, 3, 6, 6))  # non-trivial running statistics
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        model.conv.weight.mul_(torch.linspace(0.3, 3.0, 6).view(-1, 1, 1, 1))
    scaled = model.conv.weight.detach().clone()
    norms = rescale_weights_(model, r=0.7)
    assert torch.allclose(norms["conv"], scaled.flatten(1).norm(dim=1))
    torch.testing.assert_close(model.conv.weight.flatten(1).norm(dim=1), torch.full((6,), 0.7), atol=1e-6, rtol=0)
    factor = norms["conv"] / 0.7
    torch.testing.assert_close(model.bn.running_mean, before["bn.running_mean"] / factor)
    torch.testing.assert_close(model.bn.running_var, before["bn.running_var"] / factor**2)
    if bias:
        torch.testing.assert_close(model.conv.bias, before["conv.bias"] / factor)
    changed = {"conv.weight", "conv.bias", "bn.running_mean", "bn.running_var"}
    for name, tensor in model.state_dict().items():
        if name not in changed:
            assert torch.equal(tensor, before[name]), name


def test_train_mode_outputs_and_loss_are_invariant():
    torch.manual_seed(0)
    model, x, y = TinyNet(eps=1e-12), torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    with torch.no_grad():
        model.conv.weight.mul_(torch.linspace(0.1, 10.0, 6).view(-1, 1, 1, 1))
        model.conv.bias.mul_(torch.linspace(0.1, 10.0, 6))
    torch.testing.assert_close(model(x), out, atol=1e-6, rtol=0)
    rescale_weights_(model)
    torch.testing.assert_close(model(x), out, atol=1e-6, rtol=0)
    torch.testing.assert_close(nn.functional.cross_entropy(model(x), y), loss, atol=1e-6, rtol=0)


def test_default_batchnorm_eps_breaks_exactness_by_about_1e_4():
    torch.manual_seed(0)
    model, x = TinyNet(eps=1e-5), torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        model.conv.weight.mul_(0.05)
    out = model(x)
    rescale_weights_(model)
    error = (model(x) - out).abs().max().item()
    assert 1e-6 < error < 1e-2


@pytest.mark.parametrize("rescale_running_stats", [True, False])
def test_eval_mode_invariance_needs_the_running_statistics_rescaled(rescale_running_stats):
    torch.manual_seed(0)
    model, x = TinyNet(eps=1e-12), torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        model.conv.weight.mul_(3.0)
    for _ in range(3):
        model(torch.randn(16, 3, 6, 6))
    model.eval()
    out = model(x)
    rescale_weights_(model, rescale_running_stats=rescale_running_stats)
    if rescale_running_stats:
        torch.testing.assert_close(model(x), out, atol=1e-6, rtol=1e-6)
    else:
        assert (model(x) - out).abs().max() > 1e-2


@pytest.mark.parametrize("name", MODELS)
def test_every_managed_weight_is_orthogonal_to_its_gradient(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    for module in model.modules():  # the identity is exact for eps -> 0 (the default 1e-5 leaves ~1e-4)
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-12
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(logits(model, x), y).backward()
    pairs = find_scale_invariant_pairs(model)
    assert pairs
    for pair in pairs:
        w, g = pair.weight.flatten(1), pair.weight.grad.flatten(1)
        assert g.abs().max() > 0, pair.name
        inner = (w * g).sum(1).abs()
        assert torch.all(inner <= 1e-5 * w.norm(dim=1) * g.norm(dim=1) + 1e-12), pair.name
    unmanaged_conv = [m for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    w, g = unmanaged_conv.weight, unmanaged_conv.weight.grad
    assert (w * g).sum().abs() > 1e-3 * w.norm() * g.norm()  # the check can fail: the classifier is not invariant


def test_plain_sgd_grows_each_filter_norm_by_lr_squared_gradient_squared():
    torch.manual_seed(0)
    model, lr = TinyNet(eps=1e-12), 0.5
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    weight = model.conv.weight
    before, grad = weight.detach().flatten(1).clone(), weight.grad.flatten(1).clone()
    torch.optim.SGD([weight], lr=lr).step()
    growth = weight.detach().flatten(1).square().sum(1) - before.square().sum(1)
    torch.testing.assert_close(growth, lr**2 * grad.square().sum(1), atol=1e-6, rtol=1e-4)
    assert torch.all(growth > 0)


def test_param_groups_take_weight_decay_off_managed_weights_only():
    model = TorchvisionResNet()
    no_decay, decay = wrs_param_groups(model, weight_decay=5e-4)
    managed = {id(p.weight) for p in find_scale_invariant_pairs(model)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4
    assert [p for p in decay["params"]] == [model.fc.weight]
    names = {id(p): n for n, p in model.named_parameters()}
    assert managed <= {id(p) for p in no_decay["params"]}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if n != "fc.weight"}
    explicit = wrs_param_groups(model, 0.1, pairs=[("conv1", "bn1")])
    assert sum(p is model.conv1.weight for p in explicit[0]["params"]) == 1
    assert any(p is model.layer1[0].conv1.weight for p in explicit[1]["params"])


def test_optimizer_state_is_rescaled_with_the_weights():
    torch.manual_seed(0)
    for optimizer_class, keys in ((lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), {"momentum_buffer": 1}),
                                  (lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True),
                                   {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2})):
        model = TinyNet()
        optimizer = optimizer_class(model.parameters())
        nn.functional.cross_entropy(model(torch.randn(8, 3, 6, 6)), torch.randint(0, 5, (8,))).backward()
        optimizer.step()
        state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
        factor = rescale_weights_(model, optimizer=optimizer)["conv"]
        for key, power in keys.items():
            expected = state[model.conv.weight][key] * factor.view(-1, 1, 1, 1) ** power
            torch.testing.assert_close(optimizer.state[model.conv.weight][key], expected)
            torch.testing.assert_close(optimizer.state[model.conv.bias][key],
                                       state[model.conv.bias][key] * factor**power)
            assert torch.equal(optimizer.state[model.head.weight][key], state[model.head.weight][key])


def test_unknown_optimizer_state_raises():
    model = TinyNet()
    optimizer = torch.optim.Adagrad(model.parameters())
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="unknown optimizer state 'sum' for conv.weight"):
        rescale_weights_(model, optimizer=optimizer)


def test_tensor_granularity_zero_channels_and_half_precision():
    model = TinyNet()
    norms = rescale_weights_(model, granularity="tensor", r=2.0)
    assert norms["conv"].shape == (1,)
    torch.testing.assert_close(model.conv.weight.norm(), torch.tensor(2.0))
    with torch.no_grad():
        model.conv.weight[2].zero_()
        model.conv.bias[2] = 0.5
    rescale_weights_(model)
    assert torch.equal(model.conv.weight[2], torch.zeros_like(model.conv.weight[2])) and model.conv.bias[2] == 0.5
    half = TinyNet().to(torch.bfloat16)
    rescale_weights_(half)
    assert half.conv.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half.conv.weight.float().flatten(1).norm(dim=1)[[0, 1, 3]], torch.ones(3), atol=1e-2,
                               rtol=0)


def test_explicit_pairs_are_checked_with_clear_errors():
    model = TorchvisionResNet()
    pairs = find_scale_invariant_pairs(model, pairs=[("layer1.0.conv1", "layer1.0.bn1")])
    assert pairs == [ScaleInvariantPair("layer1.0.conv1", model.layer1[0].conv1, "layer1.0.bn1", model.layer1[0].bn1)]
    errors = {
        ("layer1.0.conv9", "layer1.0.bn1"): r"no module named 'layer1.0.conv9'; did you mean \[.*'layer1.0.conv1'",
        ("layer1.0.bn1", "layer1.0.bn1"): "is a BatchNorm2d; weight rescaling manages",
        ("layer1.0.conv1", "relu"): "'relu' is a ReLU, not a BatchNorm",
        ("layer2.0.conv1", "layer1.0.bn1"): "normalizes 8 features but 'layer2.0.conv1' has 16 output channels",
    }
    for pair, message in errors.items():
        with pytest.raises(ValueError, match=message):
            find_scale_invariant_pairs(model, pairs=[pair])
    with pytest.raises(ValueError, match="listed twice"):
        find_scale_invariant_pairs(model, pairs=[("conv1", "bn1"), ("conv1", "bn1")])
    with pytest.raises(ValueError, match="pair of strings"):
        find_scale_invariant_pairs(model, pairs=["conv1"])
    with pytest.raises(ValueError, match="unknown method 'jit'"):
        find_scale_invariant_pairs(model, method="jit")
    with pytest.raises(ValueError, match="unknown granularity 'layer'"):
        rescale_weights_(model, granularity="layer")


def test_sharded_parameters_raise():
    model = TinyNet()
    model.conv.weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on its partitioned parameters
    with pytest.raises(ValueError, match="does not support sharded parameters"):
        rescale_weights_(model)
