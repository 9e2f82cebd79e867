"""Teachers for the generic harness's distillation cases (`"trainer_init_factory"` in `technique.py`)."""

from __future__ import annotations

import torch

from ..testing import tiny_models


def teacher_kwargs(case: dict, *, model: str | None = None, model_kwargs: dict | None = None, seed: int = 1,
                   distillation: dict | None = None, distillation_round: int | None = 2) -> dict:
    """`{"teacher", "distillation", "distillation_round"}` for a harness Trainer: a tiny teacher (the case's model, or
    `model` with `model_kwargs`, e.g. a wider one) initialized from `seed`, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        name = model or case["model"]
        kwargs = model_kwargs if model_kwargs is not None else (case.get("model_kwargs", {}) if model is None else {})
        teacher = getattr(tiny_models, name)(**kwargs)
    return {"teacher": teacher, "distillation": dict(distillation or {}), "distillation_round": distillation_round}
