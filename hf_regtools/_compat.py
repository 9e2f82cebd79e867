"""Version-dependent details of the libraries we build on, isolated in one place (tested per pinned version)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch


def transformers_checkpoint_key_map(model: torch.nn.Module, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """Map `model`'s state-dict names to the names of a checkpoint it would load with `from_pretrained`.

    transformers 5 renames old checkpoint keys on load (e.g. ViT's `encoder.layer.N.attention.attention.query`
    becomes `layers.N.attention.q_proj`) and adds or strips the base-model prefix; 4.57 only handles the prefix
    and `gamma`/`beta`. Keys that only a weight *converter* (merge/split of tensors) could load are left out,
    so a tensor-by-tensor reader reports them as missing instead of guessing.
    """
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return _key_map_v4(model, checkpoint_keys, expected, prefix)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    mapping = {}
    for key in checkpoint_keys:
        renamed, converted_by = rename_source_key(key, renamings, converters, prefix, expected)
        if converted_by is None and renamed in expected:
            mapping[renamed] = key
    return mapping


def _key_map_v4(model, checkpoint_keys, expected, prefix) -> dict[str, str]:
    fix = getattr(model, "_fix_state_dict_key_on_load", lambda key: (key, False))
    mapping = {}
    for key in checkpoint_keys:
        renamed = fix(key)[0]
        if prefix and renamed not in expected:
            if f"{prefix}.{renamed}" in expected:
                renamed = f"{prefix}.{renamed}"
            elif renamed.startswith(prefix + "."):
                renamed = re.sub(rf"^{re.escape(prefix)}\.", "", renamed, count=1)
        if renamed in expected:
            mapping[renamed] = key
    return mapping
