"""NestedConv2d, LinearVDO and the Downhill sampler against the spec's formulas (nested_dropout.md §2, §7.1-4)."""

import math

import pytest
import torch
from torch.nn import functional as F

from hf_regtools.nested_dropout import (LinearVDO, NestedConv2d, downhill_sample, keep_probabilities, nested_kl,
                                        nested_layers)
from hf_regtools.nested_dropout.layers import mean_keep_probability

BETA = torch.sigmoid(torch.tensor(3.0)).item()


def layer(**options):
    torch.manual_seed(0)
    return NestedConv2d(3, 64, 3, padding=1, **options)


def random_betas(layer, seed=1):
    with torch.no_grad():
        layer.beta_r.copy_(torch.randn(layer.num_groups, generator=torch.Generator().manual_seed(seed)) * 2 + 1)


def test_masks_are_monotone_with_frozen_groups_and_one_transition():
    conv = layer(num_div=8, freeze=2)
    random_betas(conv)
    torch.manual_seed(0)
    ks = set()
    for _ in range(300):
        mask = conv.sample_mask()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        groups = mask.view(conv.num_div, conv.group_size)
        assert (groups == groups[:, :1]).all(), "a group is kept or dropped whole"
        per_group = groups[:, 0]
        assert (per_group[:conv.freeze] == 1).all()
        steps = per_group[1:] - per_group[:-1]
        assert (steps <= 0).all() and (steps != 0).sum() <= 1
        ks.add(int(per_group.sum()) - conv.freeze)
    assert ks == set(range(conv.num_groups + 1)), "every k in 0..D is drawn"


def test_keep_probabilities_are_the_reverse_cumulative_sum_of_q():
    conv = layer()
    random_betas(conv)
    q = conv.ordering_probabilities().double()
    assert q.shape == (conv.num_groups + 1,) and (q >= 0).all()
    torch.testing.assert_close(q.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-6)
    reverse_cumsum = q.flip(0).cumsum(0).flip(0)[1:]
    torch.testing.assert_close(conv.keep_probabilities().double(), reverse_cumsum, rtol=1e-5, atol=1e-7)
    betas = torch.sigmoid(conv.beta_r.clamp(-5, 5))
    torch.testing.assert_close(conv.keep_probabilities(), torch.cumprod(betas, 0))
    assert torch.equal(keep_probabilities(conv), conv.keep_probabilities())


def test_betas_are_clipped_logits():
    conv = layer(num_div=4, freeze=1)
    with torch.no_grad():
        conv.beta_r.copy_(torch.tensor([-9.0, 0.0, 9.0]))
    torch.testing.assert_close(conv.betas(), torch.sigmoid(torch.tensor([-5.0, 0.0, 5.0])))


@pytest.mark.parametrize("sampler_logits, expected", [
    ("log", [BETA ** i for i in (1, 10, 20, 30)]),  # the paper: k ~ q
    ("prob", [0.967, 0.676, 0.356, 0.039]),  # the official code: k ~ softmax(q)
])
def test_monte_carlo_keep_frequencies(sampler_logits, expected):
    conv = layer(sampler_logits=sampler_logits)
    torch.manual_seed(0)
    draws = downhill_sample(conv.sampler_logits_tensor().detach().expand(100_000, -1), conv.tau)
    frequencies = draws.mean(0)[[0, 9, 19, 29]]
    torch.testing.assert_close(frequencies, torch.tensor(expected), rtol=0, atol=0.01)
    if sampler_logits == "prob":
        exact = torch.softmax(conv.ordering_probabilities().detach(), 0).flip(0).cumsum(0).flip(0)[1:]
        torch.testing.assert_close(exact[[0, 9, 19, 29]], torch.tensor(expected), rtol=0, atol=5e-4)


def test_the_layer_draws_its_mask_with_the_sampler_and_the_torch_rng():
    conv = layer(num_div=8, freeze=2)
    random_betas(conv)
    torch.manual_seed(3)
    mask = conv.sample_mask()
    torch.manual_seed(3)
    groups = downhill_sample(conv.sampler_logits_tensor(), conv.tau)
    expected = torch.cat([torch.ones(2), groups]).repeat_interleave(conv.group_size)
    assert torch.equal(mask, expected)


def test_ordering_kl_is_zero_at_the_prior_and_positive_elsewhere():
    conv = layer(prior_pi=0.95)
    with torch.no_grad():
        conv.beta_r.fill_(math.log(0.95 / 0.05))
    assert abs(conv.ordering_kl().item()) < 1e-6
    random_betas(conv)
    assert conv.ordering_kl().item() > 0.01


def test_kl_matches_the_formula_of_the_spec():
    conv = layer(num_div=8, freeze=2, prior_pi=0.9)
    random_betas(conv)
    with torch.no_grad():
        conv.log_alpha.copy_(torch.randn_like(conv.log_alpha) * 2 - 1)
    beta = torch.sigmoid(conv.beta_r.detach().clamp(-5, 5)).double()
    D = conv.num_groups
    q = torch.stack([torch.prod(beta[:k]) * (1 - beta[k]) for k in range(D)] + [torch.prod(beta)])
    p = torch.stack([torch.tensor(0.9, dtype=torch.float64) ** k * 0.1 for k in range(D)] +
                    [torch.tensor(0.9, dtype=torch.float64) ** D])
    kl_ordering = (q * torch.log(q / p)).sum()
    log_alpha = conv.log_alpha.detach().double()
    k1, k2, k3, k4 = 0.7294, -0.2041, 0.3492, 0.5387
    kl_w = 0.5 * torch.log(1 + 1 / log_alpha.exp()) - k1 * torch.exp(-math.exp(k4) * (k2 + k3 * log_alpha) ** 2)
    keep = torch.cat([torch.ones(conv.freeze, dtype=torch.float64), torch.cumprod(beta, 0)])
    kl_weights = (keep.repeat_interleave(conv.group_size) * kl_w.mean(dim=(1, 2, 3))).sum()
    assert conv.kl().dtype == torch.float32
    torch.testing.assert_close(conv.kl().double(), kl_ordering + kl_weights, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.ordering_kl().double(), kl_ordering, rtol=1e-4, atol=1e-6)


def test_straight_through_mask_and_gradients():
    for sampler_logits in ("log", "prob"):
        conv = layer(num_div=8, freeze=2, sampler_logits=sampler_logits)
        torch.manual_seed(0)
        mask = conv.sample_mask()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        x = torch.randn(2, 3, 5, 5)
        (conv(x) * torch.randn(2, 64, 5, 5)).sum().backward()
        assert conv.beta_r.grad is not None and conv.beta_r.grad.abs().sum() > 0
        assert conv.log_alpha.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0


def test_train_forward_is_local_reparameterisation_times_the_mask():
    conv = layer(num_div=8, freeze=2)
    random_betas(conv)
    with torch.no_grad():
        conv.log_alpha.copy_(torch.randn_like(conv.log_alpha))
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(5)
    out = conv(x)
    torch.manual_seed(5)
    mean = F.conv2d(x, conv.weight, padding=1)
    noise = torch.randn_like(mean)
    mask = conv.sample_mask()
    std = torch.sqrt(F.conv2d(x * x, conv.log_alpha.exp() * conv.weight ** 2, padding=1) + 1e-8)
    torch.testing.assert_close(out, (mean + std * noise) * mask.view(1, -1, 1, 1))


def test_eval_forward_is_the_deterministic_conv_without_mask():
    conv = layer(num_div=8, freeze=2).eval()
    with torch.no_grad():
        conv.log_alpha[:5].fill_(4.0)
    x = torch.randn(2, 3, 6, 6)
    weight = conv.weight.detach().clone()
    weight[:5] = 0
    assert torch.equal(conv.deterministic_weight(), weight)
    torch.testing.assert_close(conv(x), F.conv2d(x, weight, padding=1))


def test_sub_network_helpers():
    conv = layer(num_div=32, freeze=2)
    assert (conv.num_groups, conv.group_size) == (30, 2)
    assert conv.kept_channels(1.0) == 64 and conv.kept_channels(0.0) == 4
    assert conv.kept_channels(0.5) == 2 * (2 + 15) and conv.kept_channels(14 / 15) == 2 * (2 + 28)
    scale = conv.channel_scale(0.5)
    assert scale.shape == (34,) and torch.equal(scale[:4], torch.ones(4))
    torch.testing.assert_close(scale[4:6], torch.full((2,), BETA))
    torch.testing.assert_close(scale[-1], torch.tensor(BETA ** 15))
    assert torch.equal(conv.channel_scale(0.5, scale_by_keep_prob=False), torch.ones(34))
    with pytest.raises(ValueError, match="rho"):
        conv.kept_channels(1.5)


def test_state_dict_keys_and_frozen_prior():
    conv = layer(num_div=4, freeze=1)
    assert set(conv.state_dict()) == {"weight", "log_alpha", "beta_r", "pi", "pz"}
    assert {name for name, _ in conv.named_parameters()} == {"weight", "log_alpha", "beta_r"}
    torch.testing.assert_close(conv.pz, torch.tensor([0.1, 0.9 * 0.1, 0.81 * 0.1, 0.729]))
    torch.testing.assert_close(conv.log_alpha, torch.full_like(conv.weight, -1.0))


@pytest.mark.parametrize("options, match", [
    ({"num_div": 5}, r"not divisible by num_div=5.*num_div=4 divides"),
    ({"num_div": 4, "freeze": 4}, "freeze must be in"),
    ({"sampler_logits": "logits"}, "sampler_logits must be one of"),
    ({"prior_pi": 1.0}, "prior_pi must be a probability"),
    ({"tau": 0}, "tau must be a positive"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        NestedConv2d(3, 8, 3, **{"num_div": 4, "freeze": 1, **options})


def test_from_conv_keeps_the_weight_and_rejects_a_bias():
    conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    nested = NestedConv2d.from_conv(conv, num_div=4, freeze=1)
    assert nested.weight is conv.weight and nested.stride == (2, 2) and nested.padding == (1, 1)
    torch.testing.assert_close(nested.log_alpha, torch.full_like(conv.weight, -1.0))
    with pytest.raises(ValueError, match="bias"):
        NestedConv2d.from_conv(torch.nn.Conv2d(3, 8, 3), num_div=4)


def test_linear_vdo_forward_and_kl():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    vdo = LinearVDO.from_linear(linear, log_alpha_init=-2.0)
    assert vdo.weight is linear.weight and vdo.bias is linear.bias
    x = torch.randn(3, 6)
    torch.testing.assert_close(vdo.eval()(x), linear(x))
    vdo.train()
    torch.manual_seed(1)
    out = vdo(x)
    torch.manual_seed(1)
    mean = x @ linear.weight.T
    std = torch.sqrt((x * x) @ (math.exp(-2.0) * linear.weight.T ** 2 + 1e-8))
    torch.testing.assert_close(out, mean + torch.randn_like(mean) * std + linear.bias)
    k1, k2, k3 = 0.792, -0.4826, 0.3451
    kl_w = 0.5 * math.log(1 + math.exp(2.0)) - k1 * math.exp(-(k2 - 2.0 * k3) ** 2)
    torch.testing.assert_close(vdo.kl(), torch.tensor(4 * kl_w))
    with torch.no_grad():
        vdo.log_alpha[0, 0] = 3.0
    assert vdo.deterministic_weight()[0, 0] == 0 and vdo.deterministic_weight()[0, 1] == linear.weight[0, 1]


def test_nested_kl_sums_the_layers():
    model = torch.nn.Sequential(NestedConv2d(3, 8, 3, num_div=4, freeze=1), torch.nn.Flatten(),
                                LinearVDO(8, 2))
    torch.testing.assert_close(nested_kl(model), model[0].kl() + model[2].kl())
    assert [name for name, _ in nested_layers(model)] == ["0"]
    torch.testing.assert_close(mean_keep_probability(model), model[0].channel_keep_probabilities().mean())
    assert nested_kl(torch.nn.Linear(2, 2)).item() == 0.0


def test_mixed_precision_forward_keeps_a_binary_mask_and_a_fp32_kl():
    conv = layer(num_div=8, freeze=2)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        kl = conv.kl()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert kl.dtype == torch.float32


def test_official_state_dict_keys_load():
    conv = layer(num_div=4, freeze=1)
    official = {"weight": torch.randn_like(conv.weight), "log_alp": torch.full_like(conv.weight, -2.0),
                "beta_r": torch.tensor([1.0, 2.0, 3.0]), "pi": torch.full((3,), 0.9), "ONE": torch.tensor([1.0]),
                "ZERO": torch.tensor([0.0]), "pz": conv.pz.clone()}
    conv.load_state_dict(official)
    assert torch.equal(conv.log_alpha, official["log_alp"]) and torch.equal(conv.beta_r, official["beta_r"])
    vdo = LinearVDO(3, 2)
    vdo.load_state_dict({"weight": torch.ones(2, 3), "bias": torch.zeros(2), "log_alp": torch.full((2, 3), -3.0)})
    assert torch.equal(vdo.log_alpha, torch.full((2, 3), -3.0))


def test_relaxed_downhill_masks_are_monotone_in_0_1():
    torch.manual_seed(0)
    logits = torch.randn(1000, 9)
    masks = downhill_sample(logits, 0.5, hard=False)
    assert masks.shape == (1000, 8) and (masks >= -1e-6).all() and (masks <= 1 + 1e-6).all()
    assert (masks[:, 1:] <= masks[:, :-1] + 1e-6).all() and not set(masks.unique().tolist()) <= {0.0, 1.0}
