"""Module surgery that keeps the model's `Parameter` objects and buffers (never re-initializes weights)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def replace_modules(model: torch.nn.Module, replacements: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Put `replacements[name]` in place of the submodule `name`; returns `{name: old module}`.

    Every `Parameter` of a replaced module must appear, as the same object, in its replacement, so optimizers,
    DDP buckets and weight tying keep working.

    Raises:
        `ValueError`: a replacement drops or copies one of the old module's parameters.
    """
    replaced = {}
    for name, new in replacements.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attribute)
        kept = {id(p) for p in new.parameters()}
        lost = [n for n, p in old.named_parameters() if id(p) not in kept]
        if lost:
            raise ValueError(f"replacing {name!r} would drop or copy its parameters {lost}; reuse the Parameter objects")
        setattr(parent, attribute, new)
        replaced[name] = old
    return replaced
