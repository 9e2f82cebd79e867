"""The batch-statistics BatchNorm of GradInit's second-order passes against `F.batch_norm` and PyTorch's double
backward."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_regtools.gradinit import gradinit_
from hf_regtools.gradinit.batch_norm import _BatchNormTrain, batch_norm_double_backward_mode

SHAPES = [(10, 4), (6, 3, 7), (6, 3, 4, 5), (4, 2, 3, 3, 2)]


def first_and_second_order(batch_norm, x, weight, bias, cotangent):
    inputs = [t for t in (x, weight, bias) if t is not None]
    output = batch_norm(x, weight, bias)
    grads = torch.autograd.grad((torch.sin(output) * cotangent).sum(), inputs, create_graph=True)
    gnorm = sum((g * g).sum() * (k + 1) for k, g in enumerate(grads)).sqrt()
    return output.detach(), [g.detach() for g in grads], torch.autograd.grad(gnorm, inputs)


def reference(x, weight, bias):
    return F.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)


def ours(x, weight, bias):
    with batch_norm_double_backward_mode():
        return reference(x, weight, bias)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_and_gradients_are_exact_and_the_double_backward_matches_pytorch(shape, affine, dtype):
    generator = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=generator, dtype=dtype) * 2 + 3).requires_grad_()
    weight, bias = ((torch.randn(shape[1], generator=generator, dtype=dtype).requires_grad_() for _ in range(2))
                    if affine else (None, None))
    cotangent = torch.randn(shape, generator=generator, dtype=dtype)
    expected = first_and_second_order(reference, x, weight, bias, cotangent)
    actual = first_and_second_order(ours, x, weight, bias, cotangent)
    assert torch.equal(actual[0], expected[0])
    assert all(torch.equal(a, e) for a, e in zip(actual[1], expected[1]))
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    for a, e in zip(actual[2], expected[2]):
        assert ((a - e).abs().max() / e.abs().max()).item() < tolerance


def test_channels_last_input_and_gradgradcheck():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                         requires_grad=True)
    cotangent = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    expected = first_and_second_order(reference, x, weight, bias, cotangent)
    actual = first_and_second_order(ours, x, weight, bias, cotangent)
    for a, e in zip(actual[2], expected[2]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    small = x.detach()[:, :, :2, :2].contiguous().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda *t: _BatchNormTrain.apply(*t, 1e-5), (small, weight, bias))
    assert torch.autograd.gradgradcheck(lambda t: _BatchNormTrain.apply(t, None, None, 1e-5), (small,))


def test_other_batch_norm_calls_are_left_to_pytorch():
    x, mean, var = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
    with batch_norm_double_backward_mode():
        eval_output = F.batch_norm(x, mean, var, training=False)
        train_output = F.batch_norm(x, mean, var, training=True)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            F.batch_norm(torch.randn(1, 3), None, None, training=True)
    assert torch.equal(eval_output, F.batch_norm(x, torch.zeros(3), torch.ones(3), training=False))
    assert train_output.grad_fn is None and not torch.equal(mean, torch.zeros(3))


def bn_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).double()


def test_gradinit_on_a_batch_norm_network_matches_pytorchs_double_backward(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64),
                torch.randint(0, 3, (6,), generator=generator)) for _ in range(4)]
    settings = {"iterations": 6, "lr": 1e-2, "grad_clip": 0.0}
    gnorms = [entry["gnorm"] for entry in gradinit_(bn_net(), batches, gamma=math.inf, **settings).history]
    gamma = sorted(gnorms)[len(gnorms) // 2]
    with monkeypatch.context() as patch:
        patch.setattr("hf_regtools.gradinit.functional.batch_norm_double_backward_mode",
                      lambda enabled: batch_norm_double_backward_mode(False))
        pytorch_report = gradinit_(bn_net(), batches, gamma=gamma, **settings)
    calls, apply = [], _BatchNormTrain.apply
    monkeypatch.setattr(_BatchNormTrain, "apply", lambda *args: calls.append(args) or apply(*args))
    ours_report = gradinit_(bn_net(), batches, gamma=gamma, **settings)
    assert 0 < ours_report.constraint_steps < 6
    branches = [e["branch"] for e in ours_report.history]
    # two layers, on S when the gradient keeps its graph: guessed from the previous branch (constraint at first), and
    # again when the guess was wrong; S~ needs no double backward
    guesses = ["constraint", *branches[:-1]]
    graphs = sum(guess == "constraint" or branch == "constraint" for guess, branch in zip(guesses, branches))
    assert len(calls) == 2 * graphs
    assert [e["branch"] for e in ours_report.history] == [e["branch"] for e in pytorch_report.history]
    for name, scale in pytorch_report.scales.items():
        assert ours_report.scales[name] == pytest.approx(scale, rel=1e-12), name
