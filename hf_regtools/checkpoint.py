"""Read a checkpoint tensor by tensor, without materializing it.

`CheckpointReader` is a read-only `Mapping[str, Tensor]` over the weight files of a model folder: one or several
safetensors files (a `*.safetensors.index.json` shard index is followed), or a PyTorch `.bin` file opened with
`torch.load(mmap=True)`. Each lookup reads that one tensor. safetensors files are memory-mapped, and mapped pages that
were read count as resident memory until the file is closed, so the reader closes and reopens a file after
`window_bytes` have been read through it: peak memory stays near one tensor plus that window, however large the
checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

SAFE_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors")
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "open_clip_pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or corrupt."""


class CheckpointReader(Mapping):
    """Lazy `Mapping[str, torch.Tensor]` over a model folder or a single weight file.

    Args:
        path (`str` or `os.PathLike`): a folder holding `model.safetensors`, a sharded
            `model.safetensors.index.json`, or `pytorch_model.bin`; or the path of one weight file.
        key_map (`dict[str, str]`, *optional*): maps the names this reader exposes to names in the file, e.g. to
            present an old-format transformers checkpoint under the current module names. Keys not in the map
            keep their own name.
        window_bytes (`int`, *optional*, defaults to 32 MiB): bytes read through one open file before it is reopened.

    Example:

    ```python
    reader = CheckpointReader("path/to/vit")
    reader.shape("blocks.0.attn.qkv.weight")  # read from the header only
    w = reader["blocks.0.attn.qkv.weight"]   # reads this one tensor
    ```
    """

    def __init__(self, path: str | os.PathLike, *, key_map: Mapping[str, str] | None = None,
                 window_bytes: int = 32 * 2**20):
        self.path = Path(path)
        self.window_bytes = window_bytes
        self._open: tuple[Path, Any] | None = None
        self._read_through_open = 0
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in _weight_files(self.path):
            if file.suffix == ".safetensors":
                self._index_safetensors(file)
            else:
                for key, tensor in _torch_load_mmap(file).items():
                    self._file_of[key] = file
                    self._shapes[key] = tuple(tensor.shape)
        self._expose(key_map or {})

    def _expose(self, key_map: Mapping[str, str]) -> None:
        renamed = set(key_map.values())
        self._exposed: dict[str, str] = {name: name for name in self._file_of if name not in renamed}
        self._exposed.update({exposed: stored for exposed, stored in key_map.items() if stored in self._file_of})

    def _index_safetensors(self, file: Path) -> None:
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    self._file_of[key] = file
                    self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read checkpoint file {file}: {error}. Re-download it or check the path.") from error

    def __getitem__(self, key: str) -> torch.Tensor:
        stored = self._exposed[key]
        file = self._file_of[stored]
        if file.suffix != ".safetensors":
            return _torch_load_mmap(file)[stored].clone()
        try:
            if self._open is None or self._open[0] != file or self._read_through_open >= self.window_bytes:
                self.close()
                self._open = (file, safe_open(file, framework="pt"))
            tensor = self._open[1].get_tensor(stored)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read tensor {stored!r} from {file}: {error}") from error
        self._read_through_open += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        """Unmap the open file (reading again reopens it)."""
        self._open, self._read_through_open = None, 0

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._exposed)

    def __len__(self) -> int:
        return len(self._exposed)

    def __contains__(self, key: object) -> bool:
        return key in self._exposed

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the file header."""
        return self._shapes[self._exposed[key]]

    def stored_keys(self) -> list[str]:
        """Tensor names as written in the files."""
        return list(self._file_of)

    def with_key_map(self, key_map: Mapping[str, str]) -> CheckpointReader:
        """A reader over the same files exposing tensors under `key_map` names (see the class docstring)."""
        clone = object.__new__(CheckpointReader)
        clone.path, clone._file_of, clone._shapes = self.path, self._file_of, self._shapes
        clone.window_bytes, clone._open, clone._read_through_open = self.window_bytes, None, 0
        clone._expose(key_map)
        return clone


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"corrupt shard index {index}: {error}") from error
        shards = sorted({path / name for name in weight_map.values()})
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"shard index {index} names missing files: {missing}")
        return shards
    for name in (*SAFE_WEIGHTS, *TORCH_WEIGHTS):
        if (path / name).is_file():
            return [path / name]
    raise CheckpointError(
        f"no weights in {path}: expected one of {[*SAFE_WEIGHTS, SAFE_INDEX, *TORCH_WEIGHTS]}"
    )


def _torch_load_mmap(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises several unrelated types for corrupt files
        raise CheckpointError(f"cannot read checkpoint file {file}: {error}") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state
