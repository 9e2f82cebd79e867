"""Version-dependent details of the libraries we build on, isolated in one place (tested per pinned version)."""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Iterable
from contextlib import contextmanager

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


def transformers_model_key(model: torch.nn.Module, checkpoint_key: str) -> str:
    """The state-dict name under which `model` holds the tensor saved as `checkpoint_key`.

    Checkpoints keep the original layout in 4.57 and 5.x alike (`vit.encoder.layer.0.attention.attention.query.weight`),
    while the module names differ (5.x: `vit.layers.0.attention.q_proj.weight`); naming tensors by their checkpoint key
    works with both.
    """
    for key in transformers_checkpoint_key_map(model, [checkpoint_key]):
        return key
    raise KeyError(f"{type(model).__name__} has no tensor saved as {checkpoint_key!r}")


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


@contextmanager
def checkpoints_in_model_layout(model: torch.nn.Module):
    """Within the block, `model.save_pretrained` writes the model's own key layout instead of the original one.

    transformers 5 saves checkpoints in the original (pre-conversion) key layout, but `Trainer` resumes with a plain
    `load_state_dict`, which then restores nothing for models whose keys were renamed (ViT among them;
    huggingface/transformers#43701, open in 5.23). Checkpoints written in the model's layout resume correctly;
    4.57, which has no such conversion, needs nothing.
    """
    if not _saves_original_format(model):
        yield
        return
    model.save_pretrained = functools.partial(model.save_pretrained, save_original_format=False)
    try:
        yield
    finally:
        del model.save_pretrained


def _saves_original_format(model: torch.nn.Module) -> bool:
    """Whether `model.save_pretrained` writes the original (pre-conversion) key layout by default (transformers 5)."""
    save = getattr(model, "save_pretrained", None)
    return save is not None and "save_original_format" in inspect.signature(save).parameters


def checkpoint_layout_differs(model: torch.nn.Module) -> bool:
    """Whether the Trainer's checkpoints of `model` name its tensors differently from `model.state_dict()`.

    Then a resume that loads them with a plain `load_state_dict` (transformers 5, huggingface/transformers#43701)
    restores none of the renamed tensors, unless the checkpoints were written by `checkpoints_in_model_layout`. Only
    transformers 5 models with a key conversion are affected (ViT, DeiT, Swin; not ConvNeXt or the timm wrapper);
    4.57 and modules without `save_pretrained` (saved as their own state dict) are not.
    """
    if not _saves_original_format(model):
        return False
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return True
    state = model.state_dict()
    return set(revert_weight_conversion(model, dict(state))) != set(state)


def trainer_divides_loss_by_ga(trainer, num_items_in_batch) -> bool:
    """Whether `Trainer.training_step` divides this micro-batch's loss by the accumulation steps (4.57 and 5.x)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None)
    return not scaled


def gradient_accumulation_steps(trainer) -> int:
    return getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps


def set_hub_offline(offline: bool) -> None:
    """Switch the Hub clients of this process to offline mode (or back), as `HF_HUB_OFFLINE=1` at import would.

    huggingface_hub >= 1 reads `constants.HF_HUB_OFFLINE` at every request; 0.x reads it when it creates its HTTP
    sessions, which it caches (so they are reset here), and transformers 4.57 copies it at import
    (`transformers.utils.hub._is_offline_mode`).
    """
    from huggingface_hub import constants, utils

    constants.HF_HUB_OFFLINE = offline
    reset_sessions = getattr(utils, "reset_sessions", None)  # huggingface_hub 0.x
    if reset_sessions is not None:
        reset_sessions()
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_is_offline_mode"):  # transformers 4.57
        transformers_hub._is_offline_mode = offline


def hub_uploads_need_global_endpoint() -> bool:
    """Whether `HfApi(endpoint=...)` uploads only work when `HF_ENDPOINT` names that same endpoint.

    huggingface_hub 0.x parses the commit URL an upload returns against the global endpoint (`constants.ENDPOINT`,
    from `HF_ENDPOINT`), not the `HfApi`'s, and fails with "Unable to retrieve user and repo ID" otherwise; 1.x
    uses the `HfApi`'s endpoint.
    """
    from huggingface_hub.hf_api import CommitInfo

    return "_endpoint" not in CommitInfo.__dataclass_fields__


@functools.cache
def hub_client_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...],
                                 tuple[type[BaseException], ...]]:
    """`(http, connection, timeout)` error classes of the HTTP client `huggingface_hub` is built on.

    huggingface_hub 0.x uses `requests` (its `ConnectionError` and `Timeout`, raised unwrapped, and a plain
    `requests.HTTPError` from e.g. `whoami`); 1.x and later use httpx (`TransportError` subclasses). Connection and
    timeout errors include the built-in `ConnectionError` and `TimeoutError`, and a connection dropped in the middle
    of a body (requests' `ChunkedEncodingError`; httpx's `RemoteProtocolError` is a `TransportError`).
    """
    from huggingface_hub.errors import HfHubHTTPError

    http = next(base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError")
    client = sys.modules[http.__module__.partition(".")[0]]
    if hasattr(client, "TransportError"):  # httpx (huggingface_hub >= 1)
        connection, timeout = (client.TransportError,), (client.TimeoutException,)
    else:  # requests (huggingface_hub 0.x)
        connection = (client.exceptions.ConnectionError, client.exceptions.ChunkedEncodingError)
        timeout = (client.exceptions.Timeout,)
    return (http,), (*connection, ConnectionError), (*timeout, TimeoutError)


@contextmanager
def hub_stream_get(url: str, *, headers: dict[str, str], timeout: float | None):
    """`GET url` through huggingface_hub's HTTP client, streamed: yields `(response, chunks)`, the response (status
    and headers read) and an iterator over its body. huggingface_hub 0.x (`requests`) streams with
    `get_session().get(stream=True)` (when the connection drops, the bytes of the chunk being read are lost), 1.x and
    later (httpx) with `get_session().stream`. Errors of the connection, also in the middle of the body, are the
    client's (see `hub_client_errors`)."""
    from huggingface_hub.utils import get_session

    session = get_session()
    if callable(getattr(session, "stream", None)):  # httpx (a requests session has a `stream` flag)
        with session.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as response:
            yield response, response.iter_bytes()
    else:
        response = session.get(url, headers=headers, timeout=timeout, stream=True)
        try:
            yield response, response.iter_content(chunk_size=2**16)  # a dropped connection loses the last chunk
        finally:
            response.close()
