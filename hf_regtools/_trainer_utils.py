"""Helpers shared by Trainer adapters: RNG snapshots (torch CPU and CUDA, numpy, python), the optimizer inside
wrappers, the fp16 loss scale."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap_optimizer(optimizer):
    """The optimizer inside Accelerate's `AcceleratedOptimizer` (and any wrapper keeping it as `.optimizer`)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def current_loss_scale(trainer) -> float | None:
    """The scale of the loss (and so of the gradients before unscaling) under fp16 `GradScaler`; `None` without one."""
    scaler = getattr(trainer.accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None


def updates_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer updates per epoch as the Trainer counts them: `ceil(batches / accumulation)` (at least 1)."""
    import math

    return max(math.ceil(batches_per_epoch / gradient_accumulation_steps), 1)


def config_from_value(config_class, value, keyword: str):
    """`value` as a `config_class` dataclass: itself, or built from a dict of its fields (an unknown key is an error
    naming the allowed ones); `keyword` is the argument's name in messages (`"weissi"` for `weissi=`)."""
    from dataclasses import fields

    if isinstance(value, config_class):
        return value
    if isinstance(value, dict):
        known = {field.name for field in fields(config_class)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{keyword}: unknown settings {unknown}; allowed: {sorted(known)}")
        return config_class(**value)
    raise TypeError(f"{keyword}= takes a {config_class.__name__} or a dict of its settings, got "
                    f"{type(value).__name__}")
