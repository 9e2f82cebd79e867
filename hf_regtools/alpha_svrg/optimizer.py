"""`AlphaSVRG`: an optimizer wrapper that applies the alpha-SVRG correction, then steps the base optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class AlphaSVRG(torch.optim.Optimizer):
    """Wrap any torch optimizer: `p.grad += alpha * (mu_p - acc_p)`, optionally clip, then `base.step()`.

    `mu` is the full gradient at the snapshot, `acc` the snapshot's gradient on the current mini-batch (accumulated
    over micro-batches; `reduce`, if set, averages it across processes once per step, as DDP does for `p.grad`),
    `alpha` the current coefficient. The Trainer mixin (`AlphaSVRGTrainerMixin`) provides them; a custom loop calls
    `set_full_gradient`, `accumulate_snapshot_gradient` and sets `alpha`. With `alpha = 0` this is exactly the base
    optimizer. SVRG tensors are kept in fp32 and out of `base.state`; `param_groups` *is*
    `base.param_groups`, so LR schedulers act on the base.

    Args:
        params_or_base (`torch.optim.Optimizer` or parameters): a base optimizer instance, or parameters / param
            groups to build `base` from (the form `Trainer(optimizer_cls_and_kwargs=(AlphaSVRG, {...}))` uses).
        base (`type`, *optional*, defaults to `torch.optim.AdamW`): base optimizer class, with `params`.
        clip_norm (`float`, *optional*): clip the *corrected* gradient to this global norm (the Trainer clips before
            the correction; set `max_grad_norm=0` there to clip here instead).
        **base_kwargs: arguments of the base optimizer class.
    """

    def __init__(self, params_or_base, *, base: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 clip_norm: float | None = None, **base_kwargs):
        if isinstance(params_or_base, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(f"base optimizer arguments {sorted(base_kwargs)} given with a built base optimizer")
            self.base = params_or_base
        else:
            self.base = base(params_or_base, **base_kwargs)
        if isinstance(self.base, AlphaSVRG):
            raise ValueError("the base optimizer is already an AlphaSVRG")
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups, self.state = self.base.param_groups, self.base.state
        self.clip_norm, self.alpha = clip_norm, 0.0
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.full_gradient: list[torch.Tensor] | None = None
        self.snapshot_gradient = [torch.zeros_like(p, dtype=torch.float32) for p in self.parameters()]
        self.snapshot_parameters: list[torch.Tensor] | None = None
        self._snapshot_gradient_reduced = False

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def set_full_gradient(self, gradients: Iterable[torch.Tensor]) -> None:
        """Set `mu`, the full gradient at the snapshot (one tensor per parameter, in `parameters()` order)."""
        self.full_gradient = [g.detach().to(torch.float32).clone() for g in gradients]

    def accumulate_snapshot_gradient(self, gradients: Iterable[torch.Tensor | None], *, reduced: bool = False) -> None:
        """Add the snapshot's gradient on a micro-batch to `acc` (`reduced=True`: already averaged across processes)."""
        for acc, g in zip(self.snapshot_gradient, gradients):
            if g is not None:
                acc.add_(g.detach().to(torch.float32))
        self._snapshot_gradient_reduced = reduced

    def reset_snapshot_gradient(self) -> None:
        for acc in self.snapshot_gradient:
            acc.zero_()
        self._snapshot_gradient_reduced = False

    def reduce_snapshot_gradient(self) -> None:
        """Average `acc` across processes with `reduce`, once per step (one collective for all parameters)."""
        if self.reduce is None or self._snapshot_gradient_reduced:
            return
        flat = self.reduce(torch.cat([acc.reshape(-1) for acc in self.snapshot_gradient]))
        for acc, part in zip(self.snapshot_gradient, flat.split([a.numel() for a in self.snapshot_gradient])):
            acc.copy_(part.view_as(acc))
        self._snapshot_gradient_reduced = True

    def corrected_gradients(self) -> None:
        """Apply `p.grad += alpha * (mu - acc)` in place (no-op with `alpha == 0`)."""
        if self.alpha == 0.0:
            return
        if self.full_gradient is None:
            raise RuntimeError("AlphaSVRG has no full gradient: call set_full_gradient (the mixin does at each refresh)")
        self.reduce_snapshot_gradient()
        for p, mu, acc in zip(self.parameters(), self.full_gradient, self.snapshot_gradient):
            if p.grad is not None:
                p.grad.add_((mu - acc).mul_(self.alpha).to(p.grad.dtype))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AlphaSVRG does not support closures (the Trainer never passes one)")
        self.corrected_gradients()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip_norm)
        return self.base.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        svrg = {"alpha": self.alpha, "snapshot_gradient": [t.clone() for t in self.snapshot_gradient],
                "full_gradient": None if self.full_gradient is None else [t.clone() for t in self.full_gradient],
                "snapshot_parameters": None if self.snapshot_parameters is None
                else [t.detach().clone() for t in self.snapshot_parameters]}
        return {"base": self.base.state_dict(), "svrg": svrg}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict["base"])
        # torch's load_state_dict gives the base new group and state objects (Accelerate round-trips every optimizer
        # it prepares): share them again, or LR schedulers would update groups the base no longer uses.
        self.param_groups, self.state = self.base.param_groups, self.base.state
        svrg = state_dict["svrg"]
        self.alpha = svrg["alpha"]
        for target, source in zip(self.snapshot_gradient, svrg["snapshot_gradient"]):
            target.copy_(source)
        self.full_gradient = None if svrg["full_gradient"] is None else [t.clone() for t in svrg["full_gradient"]]
        if svrg["snapshot_parameters"] is not None and self.snapshot_parameters is not None:
            with torch.no_grad():
                for target, source in zip(self.snapshot_parameters, svrg["snapshot_parameters"]):
                    target.copy_(source)

    def __repr__(self) -> str:
        return f"AlphaSVRG(alpha={self.alpha}, base={self.base!r})"
