"""`RescaleAdam`: Adam on one scale per parameter tensor, the tensor's direction fixed (Zhu et al., 2021)."""

from __future__ import annotations

import math

import torch


class RescaleAdam(torch.optim.Optimizer):
    """Adam on the scalars m_i of `W_i = m_i * W_i^0` (GradInit's optimizer; `gradinit_optimizers.py` of the official
    code).

    The scalar gradient is `<grad, W_cur> * ||W^0|| / ||W_cur||` (= `<dL/dW, W^0>`), clipped to `[-grad_clip,
    grad_clip]` when `grad_clip > 0`. Constraint and objective steps keep separate first moments, each bias-corrected
    with its own step count; the second moment is shared and bias-corrected with the total step count. After the
    update `m <- clamp(m - lr * m_hat / (sqrt(v_hat) + eps), min_scale, max_scale)` the tensor is rescaled in place to
    `m * W^0`. Tensors whose norm is zero (zero-initialised biases, BatchNorm shifts) are skipped forever.

    Args:
        params: parameters or parameter groups; groups may set `lr`, `min_scale`, `max_scale` and `grad_clip`.
        lr (`float`, *optional*, defaults to 1e-3): learning rate of the scales.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`): Adam's betas.
        eps (`float`, *optional*, defaults to 1e-8): added to the denominator.
        min_scale (`float`, *optional*, defaults to 0): lower bound of the scales.
        max_scale (`float`, *optional*, defaults to `math.inf`): upper bound of the scales (the fairseq copy's option).
        grad_clip (`float`, *optional*, defaults to 0): per-scalar gradient clip; 0 disables it.

    `step(is_constraint=True)` takes a constraint step. `scale(p)` returns a tensor's current scale.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 min_scale: float = 0.0, max_scale: float = math.inf, grad_clip: float = 0.0):
        if not lr >= 0:
            raise ValueError(f"RescaleAdam lr must be >= 0, got {lr!r}")
        if not eps >= 0:
            raise ValueError(f"RescaleAdam eps must be >= 0, got {eps!r}")
        if not (len(betas) == 2 and all(0 <= beta < 1 for beta in betas)):
            raise ValueError(f"RescaleAdam betas must be two numbers in [0, 1), got {betas!r}")
        if not (0 <= min_scale <= max_scale):
            raise ValueError(f"RescaleAdam needs 0 <= min_scale <= max_scale, got {min_scale!r} and {max_scale!r}")
        if not grad_clip >= 0:
            raise ValueError(f"RescaleAdam grad_clip must be >= 0 (0 disables clipping), got {grad_clip!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, min_scale=min_scale, max_scale=max_scale,
                        grad_clip=grad_clip)
        super().__init__(params, defaults)

    def scale(self, p: torch.Tensor) -> float:
        """The current scale of `p` (1 before its first step and for skipped zero-norm tensors)."""
        return self.state[p].get("scale", 1.0) if p in self.state else 1.0

    @torch.no_grad()
    def step(self, closure=None, *, is_constraint: bool = False):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(scale=1.0, init_norm=p.norm().item(), step=0, cons_step=0, exp_avg=0.0,
                                 cons_exp_avg=0.0, exp_avg_sq=0.0)
                current_norm = p.norm().item()
                if state["init_norm"] == 0 or current_norm == 0:
                    continue
                grad = torch.sum(p.grad * p).item() * state["init_norm"] / current_norm
                if group["grad_clip"] > 0:
                    grad = max(min(grad, group["grad_clip"]), -group["grad_clip"])
                if is_constraint:
                    state["cons_step"] += 1
                    state["cons_exp_avg"] = state["cons_exp_avg"] * beta1 + grad * (1 - beta1)
                    steps, exp_avg = state["cons_step"], state["cons_exp_avg"]
                else:
                    state["step"] += 1
                    state["exp_avg"] = state["exp_avg"] * beta1 + grad * (1 - beta1)
                    steps, exp_avg = state["step"], state["exp_avg"]
                state["exp_avg_sq"] = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
                bias_correction1 = 1 - beta1 ** steps
                bias_correction2 = 1 - beta2 ** (state["cons_step"] + state["step"])
                denom = math.sqrt(state["exp_avg_sq"] / bias_correction2) + group["eps"]
                scale = state["scale"] - group["lr"] / bias_correction1 * exp_avg / denom
                state["scale"] = min(max(scale, group["min_scale"]), group["max_scale"])
                p.mul_(state["scale"] * state["init_norm"] / current_norm)
        return loss
