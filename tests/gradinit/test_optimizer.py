"""RescaleAdam invariants and its update against a scalar re-implementation of the official step (spec §6.1)."""

import math

import pytest
import torch

from hf_regtools.gradinit import RescaleAdam


def official_scalar_steps(init_norms, grads_per_step, constraint_flags, *, lr, betas=(0.9, 0.999), eps=1e-8,
                          min_scale=0.0, grad_clip=0.0):
    """`gradinit_optimizers.RescaleAdam.step` of zhuchen03/gradinit rewritten on scalars: `grads_per_step[t][i]` is the
    scale gradient <dL/dW_i, W_i^0> of tensor i at step t (already the official `<grad, W> * ||W0|| / ||W||`)."""
    beta1, beta2 = betas
    state = [dict(alpha=1.0, step=0, cons_step=0, exp_avg=0.0, cons_exp_avg=0.0, exp_avg_sq=0.0) for _ in init_norms]
    for grads, is_constraint in zip(grads_per_step, constraint_flags):
        for s, grad, norm in zip(state, grads, init_norms):
            if norm == 0:
                continue
            if grad_clip > 0:
                grad = max(min(grad, grad_clip), -grad_clip)
            if is_constraint:
                s["cons_step"] += 1
                s["cons_exp_avg"] = s["cons_exp_avg"] * beta1 + grad * (1 - beta1)
                steps, exp_avg = s["cons_step"], s["cons_exp_avg"]
            else:
                s["step"] += 1
                s["exp_avg"] = s["exp_avg"] * beta1 + grad * (1 - beta1)
                steps, exp_avg = s["step"], s["exp_avg"]
            s["exp_avg_sq"] = s["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
            denom = math.sqrt(s["exp_avg_sq"] / (1 - beta2 ** (s["cons_step"] + s["step"]))) + eps
            s["alpha"] = max(s["alpha"] - lr / (1 - beta1 ** steps) * exp_avg / denom, min_scale)
    return [s["alpha"] for s in state]


def toy(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(5, generator=generator, dtype=torch.float64)),
            torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]


def run_steps(params, optimizer, flags, seed=1):
    generator = torch.Generator().manual_seed(seed)
    initial = [p.detach().clone() for p in params]
    scalar_grads = []
    for flag in flags:
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        scalar_grads.append([(p.grad * w0).sum().item() for p, w0 in zip(params, initial)])
        optimizer.step(is_constraint=flag)
    return initial, scalar_grads


FLAGS = [False, True, True, False, True, False, False]


def test_update_matches_the_official_scalar_step_on_a_three_tensor_toy():
    params = toy()
    optimizer = RescaleAdam(params, lr=0.05, grad_clip=1.0, min_scale=0.01)
    initial, scalar_grads = run_steps(params, optimizer, FLAGS)
    expected = official_scalar_steps([w.norm().item() for w in initial], scalar_grads, FLAGS, lr=0.05,
                                     grad_clip=1.0, min_scale=0.01)
    assert [optimizer.scale(p) for p in params] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected[0] != 1.0 and expected[1] != 1.0


def test_direction_norm_and_zero_tensors():
    params = toy()
    optimizer = RescaleAdam(params, lr=0.1, min_scale=0.2)
    initial, _ = run_steps(params, optimizer, FLAGS)
    for p, w0 in zip(params[:2], initial[:2]):
        scale = optimizer.scale(p)
        assert torch.nn.functional.cosine_similarity(p.detach().flatten(), w0.flatten(), dim=0).item() == \
            pytest.approx(1.0, abs=1e-12)
        assert p.detach().norm().item() == pytest.approx(scale * w0.norm().item(), rel=1e-12)
        assert scale >= 0.2
    assert torch.equal(params[2].detach(), torch.zeros(3, dtype=torch.float64))
    assert optimizer.scale(params[2]) == 1.0


def test_min_and_max_scale_bound_the_scales():
    up, down = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = RescaleAdam([up, down], lr=0.5, min_scale=0.3, max_scale=1.6)
    for _ in range(20):
        up.grad, down.grad = -torch.ones(3), torch.ones(3)
        optimizer.step()
    assert optimizer.scale(up) == 1.6 and optimizer.scale(down) == 0.3
    assert up.detach().norm().item() == pytest.approx(1.6 * math.sqrt(3), rel=1e-6)


def test_per_scalar_clipping():
    clipped, reference = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    clipped_opt = RescaleAdam([clipped], lr=0.1, grad_clip=0.5)
    reference_opt = RescaleAdam([reference], lr=0.1)
    for grad in (100.0, 3.0, -50.0):
        clipped.grad = torch.full((4,), grad)
        reference.grad = torch.full((4,), 0.5 * math.copysign(1, grad) / 4)  # scalar grad of exactly +-0.5
        clipped_opt.step()
        reference_opt.step()
    assert clipped_opt.scale(clipped) == pytest.approx(reference_opt.scale(reference), rel=1e-12)


def test_constraint_and_objective_first_moments_are_separate():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer = RescaleAdam([p], lr=0.1)
    p.grad = torch.full((2,), 0.25, dtype=torch.float64)
    optimizer.step(is_constraint=True)
    p.grad = torch.full((2,), -0.25, dtype=torch.float64)
    optimizer.step(is_constraint=False)
    state = optimizer.state[p]
    assert (state["cons_step"], state["step"]) == (1, 1)
    assert state["cons_exp_avg"] == pytest.approx(0.1 * 0.5 * math.sqrt(1))  # scalar grad <g, W0> = 0.5
    assert state["exp_avg"] < 0 < state["cons_exp_avg"]


def test_bad_settings_raise():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="min_scale"):
        RescaleAdam(p, min_scale=2.0, max_scale=1.0)
    with pytest.raises(ValueError, match="betas"):
        RescaleAdam(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="grad_clip"):
        RescaleAdam(p, grad_clip=-1)
