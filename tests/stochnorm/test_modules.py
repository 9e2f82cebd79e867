"""StochNorm layers against BatchNorm and against the official two-branch formulation (spec §7, tests 1, 2 and 6)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_regtools.stochnorm import StochNorm1d, StochNorm2d, StochNorm3d

# (StochNorm class, BatchNorm class, input shape)
LAYERS = [
    pytest.param(StochNorm1d, nn.BatchNorm1d, (6, 5), id="1d-NC"),
    pytest.param(StochNorm1d, nn.BatchNorm1d, (4, 5, 7), id="1d-NCL"),
    pytest.param(StochNorm2d, nn.BatchNorm2d, (4, 5, 3, 3), id="2d"),
    pytest.param(StochNorm3d, nn.BatchNorm3d, (3, 5, 2, 3, 2), id="3d"),
]


def pretrained_batchnorm(cls, channels=5, momentum=0.1, seed=0):
    """A BatchNorm with non-trivial affine parameters and moving statistics, as in a pretrained model."""
    generator = torch.Generator().manual_seed(seed)
    bn = cls(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * torch.randn(channels, generator=generator))
        bn.bias.copy_(torch.randn(channels, generator=generator))
        bn.running_mean.copy_(torch.randn(channels, generator=generator))
        bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
        bn.num_batches_tracked.fill_(7)
    return bn


def inputs(shape, seed=1):
    x = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    return x.requires_grad_()


def forward_backward(layer, x, grad):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


def official(bn, x, use_batch, *, in_place_quirk=False):
    """The official formulation with a given mask: z0 (moving statistics, computed first), z1 (batch statistics,
    updates them), (1 - s) * z0 + s * z1. Returns the output, the input (for its gradient) and the BatchNorm.

    The official code hands the same buffers to both calls, so z1's in-place update of the moving statistics reaches
    z0's backward, which then uses the updated ones (`in_place_quirk=True`); by default z0 gets its own copy and the
    gradient is the exact derivative of the output."""
    bn = copy.deepcopy(bn)
    x = x.detach().clone().requires_grad_()
    moving = (bn.running_mean, bn.running_var) if in_place_quirk else (bn.running_mean.clone(), bn.running_var.clone())
    z0 = F.batch_norm(x, *moving, bn.weight, bn.bias, False, bn.momentum, bn.eps)
    z1 = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
    s = use_batch.float().view((1, -1) + (1,) * (x.dim() - 2))
    return (1 - s) * z0 + s * z1, x, bn


def branches(bn, x):
    """z0 (moving statistics, before the update) and z1 (batch statistics) of a BatchNorm, without changing it."""
    z0 = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    z1 = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return z0.detach(), z1.detach()


def chosen_branch(out, z0, z1):
    """Per channel: True if the channel equals the batch-statistics branch everywhere, False if the moving one."""
    dims = [0, *range(2, out.dim())]
    batch = torch.isclose(out, z1, rtol=1e-5, atol=1e-5).all(dim=dims) if out.dim() > 2 else \
        torch.isclose(out, z1, rtol=1e-5, atol=1e-5).all(dim=0)
    moving = torch.isclose(out, z0, rtol=1e-5, atol=1e-5).all(dim=dims) if out.dim() > 2 else \
        torch.isclose(out, z0, rtol=1e-5, atol=1e-5).all(dim=0)
    assert torch.all(batch ^ moving), "every channel equals exactly one branch over the whole batch and space"
    return batch


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("stoch_cls, bn_cls, shape", LAYERS)
def test_p1_is_batchnorm_train_and_p0_uses_moving_statistics(stoch_cls, bn_cls, shape, momentum):
    bn = pretrained_batchnorm(bn_cls, momentum=momentum)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    for p in (1.0, 0.0):
        reference = copy.deepcopy(bn).train()
        layer = stoch_cls.from_batchnorm(copy.deepcopy(bn), p=p).train()
        moving_mean, moving_var = bn.running_mean.clone(), bn.running_var.clone()
        for step in range(3):
            x = inputs(shape, seed=step)
            out, x_grad, w_grad, b_grad = forward_backward(layer, x, grad)
            if p == 1.0:
                expected = forward_backward(reference, x, grad)
            else:
                expected_bn = copy.deepcopy(reference)
                expected_bn.eval()
                expected = forward_backward(expected_bn, x, grad)
                torch.testing.assert_close(expected_bn.running_mean, moving_mean)  # eval leaves them alone
                with torch.no_grad():
                    reference(x)  # the moving statistics still follow BatchNorm's training forward
                moving_mean, moving_var = reference.running_mean.clone(), reference.running_var.clone()
            for ours, theirs in zip((out, x_grad), expected[:2]):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(w_grad, expected[2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b_grad, expected[3], rtol=1e-5, atol=1e-5)
            layer.weight.grad = layer.bias.grad = reference.weight.grad = reference.bias.grad = None
            # same kernel as BatchNorm: the running statistics are equal bit for bit, whatever p
            assert torch.equal(layer.running_mean, reference.running_mean)
            assert torch.equal(layer.running_var, reference.running_var)
            assert torch.equal(layer.num_batches_tracked, reference.num_batches_tracked)
        assert layer.num_batches_tracked.item() == 10


@pytest.mark.parametrize("p", [0.3, 0.7])
@pytest.mark.parametrize("stoch_cls, bn_cls, shape", LAYERS)
def test_each_channel_uses_one_branch_and_matches_the_official_formulation(stoch_cls, bn_cls, shape, p):
    bn = pretrained_batchnorm(bn_cls, channels=8)
    shape = (shape[0], 8, *shape[2:])
    layer = stoch_cls.from_batchnorm(copy.deepcopy(bn), p=p).train()
    torch.manual_seed(0)
    for step in range(4):
        x = inputs(shape, seed=step)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step))
        z0, z1 = branches(layer, x)
        reference = copy.deepcopy(layer)
        out, x_grad, w_grad, b_grad = forward_backward(layer, x, grad)
        use_batch = chosen_branch(out, z0, z1)
        bn_state = bn_cls(8, momentum=reference.momentum)
        bn_state.load_state_dict(reference.state_dict())
        expected, x_ref, bn_after = official(bn_state, x, use_batch)
        expected.backward(grad)
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w_grad, bn_after.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b_grad, bn_after.bias.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_mean, bn_after.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.running_var, bn_after.running_var, rtol=0, atol=1e-6)
        layer.weight.grad = layer.bias.grad = None


def test_official_code_differentiates_the_moving_branch_with_the_updated_statistics():
    """A deviation (method card): our gradient is the derivative of the output, the official one is not quite."""
    bn = pretrained_batchnorm(nn.BatchNorm2d, channels=4)
    x, grad = inputs((6, 4, 3, 3)), torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    use_batch = torch.zeros(4, dtype=torch.bool)
    quirk, x_quirk, after = official(bn, x, use_batch, in_place_quirk=True)
    quirk.backward(grad)
    layer = StochNorm2d.from_batchnorm(copy.deepcopy(bn), p=0.0)
    out, x_grad, _, _ = forward_backward(layer, x, grad)
    torch.testing.assert_close(out, quirk.detach())  # same output: z0 uses the statistics from before the update
    shape = (1, -1, 1, 1)
    before_update = grad * (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach().view(shape)
    after_update = grad * (bn.weight * torch.rsqrt(after.running_var + bn.eps)).detach().view(shape)
    torch.testing.assert_close(x_grad, before_update)
    torch.testing.assert_close(x_quirk.grad, after_update)
    assert not torch.allclose(x_quirk.grad, before_update, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_share_of_batch_statistics_channels_is_p_over_2000_draws(p):
    layer = StochNorm2d.from_batchnorm(pretrained_batchnorm(nn.BatchNorm2d, channels=8, momentum=0.0), p=p).train()
    x = inputs((2, 8, 2, 2)).detach()
    z0, z1 = branches(layer, x)
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([chosen_branch(layer(x), z0, z1) for _ in range(2000)])
    assert abs(draws.float().mean().item() - p) < 0.02
    assert 0 < draws.float().mean(0).min() and draws.float().mean(0).max() < 1  # every channel takes both branches


def test_eval_mode_is_batchnorm_eval_bit_for_bit():
    for stoch_cls, bn_cls, shape in [param.values for param in LAYERS]:
        bn = pretrained_batchnorm(bn_cls).eval()
        layer = stoch_cls.from_batchnorm(copy.deepcopy(bn), p=0.5)
        x = inputs(shape).detach()
        assert torch.equal(layer(x), bn(x))
        assert layer.num_batches_tracked.item() == 7 and torch.equal(layer.running_mean, bn.running_mean)


def test_masks_are_fresh_per_forward_and_follow_torch_manual_seed_without_numpy():
    layer = StochNorm2d(64, p=0.5)
    x = inputs((4, 64, 2, 2)).detach()

    def masks(seed):
        torch.manual_seed(seed)
        copy_ = copy.deepcopy(layer)
        result = []
        for _ in range(3):
            z0, z1 = branches(copy_, x)
            result.append(chosen_branch(copy_(x), z0, z1))
        return torch.stack(result)

    numpy_state = np.random.get_state()
    first, again, other = masks(0), masks(0), masks(1)
    after = np.random.get_state()
    assert numpy_state[0] == after[0] and np.array_equal(numpy_state[1], after[1]) and numpy_state[2:] == after[2:]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # a new mask every forward


def test_half_precision_inputs_normalize_in_float32():
    layer = StochNorm2d.from_batchnorm(pretrained_batchnorm(nn.BatchNorm2d), p=0.5)
    x = inputs((4, 5, 3, 3)).detach()
    torch.manual_seed(0)
    reference = copy.deepcopy(layer)
    expected = reference(x)
    torch.manual_seed(0)
    half = x.to(torch.bfloat16).requires_grad_()
    out = layer(half)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and half.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.05)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=0.01, atol=0.01)


def test_state_dict_keys_are_batchnorm_keys_and_load_both_ways():
    for stoch_cls, bn_cls, _ in [param.values for param in LAYERS]:
        bn = pretrained_batchnorm(bn_cls)
        layer = stoch_cls(5)
        layer.load_state_dict(bn.state_dict())
        assert list(layer.state_dict()) == list(bn.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), bn.state_dict().values()))
        bn_cls(5).load_state_dict(layer.state_dict())


def test_fresh_layer_defaults_affine_and_repr():
    layer = StochNorm2d(4)
    assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4))
    assert layer.p == 0.5 and layer.momentum == 0.1 and layer.eps == 1e-5
    assert repr(StochNorm2d(4, p=0.3)) == ("StochNorm2d(4, eps=1e-05, momentum=0.1, affine=True, "
                                           "track_running_stats=True, p=0.3)")
    plain = StochNorm2d(4, affine=False, p=1.0)
    assert plain.weight is None and plain.bias is None
    x = inputs((3, 4, 2, 2))
    torch.testing.assert_close(plain(x), F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5))
    assert "weight" not in plain.state_dict()


def test_bad_settings_and_inputs_raise_clearly():
    for p in (-0.1, 1.5, True, "0.5", None):
        with pytest.raises(ValueError, match="p must be a probability in"):
            StochNorm2d(4, p=p)
    layer = StochNorm2d(4)
    with pytest.raises(ValueError, match="p must be a probability"):
        layer.p = 2
    with pytest.raises(TypeError):
        StochNorm2d(4, 1e-5, 0.1, True, True, 0.3)  # p is keyword only (the tllib bug)
    with pytest.raises(ValueError, match="track_running_stats=False keeps none"):
        StochNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="StochNorm2d expects a 4D input, got 3D"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="StochNorm1d expects a 2D or 3D input"):
        StochNorm1d(4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1))
    layer.eval()(torch.randn(1, 4, 1, 1))  # eval mode needs no batch statistics
