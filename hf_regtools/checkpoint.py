"""Read a checkpoint tensor by tensor, without materializing it.

`CheckpointReader` is a read-only `Mapping[str, Tensor]` over the weight files of a model folder: one or several
safetensors files (a `*.safetensors.index.json` shard index is followed), or a PyTorch `.bin` file opened with
`torch.load(mmap=True)`.

safetensors files are memory-mapped once. `reader[key]` returns an independent copy of one tensor;
`reader.borrowed(key)` lends a zero-copy view and, when the block ends, tells the kernel to drop the pages it
touched (`madvise(MADV_DONTNEED)`), so peak memory stays near one tensor however large the checkpoint, and no time
is spent copying or re-mapping. The mapping is advised `MADV_RANDOM`: without fault-around, selecting every fifth row
maps only those rows' pages. Releases run on a background thread (through libc, which drops the GIL), off the
critical path; each pending release holds a reference to its mapping, so memory is never released after unmapping. The file layout (8-byte header length, JSON header with dtypes, shapes and byte
offsets) is the one documented by safetensors; the safetensors library itself offers no way to release pages.
"""

from __future__ import annotations

import copy
import json
import mmap
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

SAFE_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors")
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "open_clip_pytorch_model.bin")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PAGE = mmap.PAGESIZE
_RELEASE_AT_LEAST = 64 * 2**10  # smaller tensors (biases, norms) are not worth a system call


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or corrupt."""


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    start: int = 0
    end: int = 0
    count: int = 0
    aligned: bool = True


class CheckpointReader(Mapping):
    """Lazy `Mapping[str, torch.Tensor]` over a model folder or a single weight file.

    Args:
        path (`str` or `os.PathLike`): a folder holding `model.safetensors`, a sharded
            `model.safetensors.index.json`, or `pytorch_model.bin`; or the path of one weight file.
        key_map (`dict[str, str]`, *optional*): maps the names this reader exposes to names in the file, e.g. to
            present an old-format transformers checkpoint under the current module names. Keys not in the map
            keep their own name.

    Example:

    ```python
    reader = CheckpointReader("path/to/vit")
    reader.shape("blocks.0.attn.qkv.weight")   # from the header only
    w = reader["blocks.0.attn.qkv.weight"]     # an independent copy of this one tensor
    with reader.borrowed("blocks.0.attn.qkv.weight") as view:
        rows = view[::2].clone()               # zero-copy; pages released after the block
    ```
    """

    def __init__(self, path: str | os.PathLike, *, key_map: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._entries: dict[str, _Entry] = {}
        for file in _weight_files(self.path):
            if file.suffix == ".safetensors":
                self._entries.update(_safetensors_entries(file))
            else:
                self._entries.update({key: _Entry(file, tuple(t.shape)) for key, t in _torch_load_mmap(file).items()})
        self._maps: dict[Path, mmap.mmap] = {}
        self._expose(key_map or {})

    def _expose(self, key_map: Mapping[str, str]) -> None:
        renamed = set(key_map.values())
        self._exposed: dict[str, str] = {name: name for name in self._entries if name not in renamed}
        self._exposed.update({exposed: stored for exposed, stored in key_map.items() if stored in self._entries})

    def __getitem__(self, key: str) -> torch.Tensor:
        with self.borrowed(key) as view:
            return view.clone()

    @contextmanager
    def borrowed(self, key: str) -> Iterator[torch.Tensor]:
        """Lend a zero-copy view of a tensor, valid inside the block; its pages are released afterwards.

        The view lives in a private copy-on-write mapping: writing to it never changes the file. Copy what you need
        before the block ends (indexing with `index_select` does).
        """
        entry = self._entries[self._exposed[key]]
        if entry.dtype is None:
            yield _torch_load_mmap(entry.file)[self._exposed[key]]
            return
        if entry.count == 0 or not entry.aligned or not hasattr(mmap, "MADV_DONTNEED"):
            yield self._copy(entry)
            return
        mapped = self._mapped(entry.file)
        try:
            yield torch.frombuffer(mapped, dtype=entry.dtype, count=entry.count, offset=entry.start).view(entry.shape)
        finally:
            if entry.end - entry.start >= _RELEASE_AT_LEAST:
                first = entry.start // _PAGE * _PAGE
                mapped.madvise(mmap.MADV_DONTNEED, first, entry.end - first)

    def _mapped(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as handle:
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    @staticmethod
    def _copy(entry: _Entry) -> torch.Tensor:
        with open(entry.file, "rb") as handle:
            handle.seek(entry.start)
            data = bytearray(handle.read(entry.end - entry.start))
        if not data:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return torch.frombuffer(data, dtype=entry.dtype).view(entry.shape).clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._exposed)

    def __len__(self) -> int:
        return len(self._exposed)

    def __contains__(self, key: object) -> bool:
        return key in self._exposed

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the file header."""
        return self._entries[self._exposed[key]].shape

    def stored_keys(self) -> list[str]:
        """Tensor names as written in the files."""
        return list(self._entries)

    def with_key_map(self, key_map: Mapping[str, str]) -> CheckpointReader:
        """A reader over the same files exposing tensors under `key_map` names (see the class docstring)."""
        clone = copy.copy(self)
        clone._expose(key_map)
        return clone

    def close(self) -> None:
        """Forget the file mappings (they are unmapped once no borrowed view uses them)."""
        self._maps.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _safetensors_entries(file: Path) -> dict[str, _Entry]:
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > size - 8:
                raise ValueError(f"header length {header_size} exceeds the file size {size}")
            header = json.loads(handle.read(header_size))
        header.pop("__metadata__", None)
        data_start, entries = 8 + header_size, {}
        for key, info in header.items():
            start, end = (data_start + offset for offset in info["data_offsets"])
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']!r}")
            if end > size or start > end:
                raise ValueError(f"tensor {key!r} lies outside the file (truncated download?)")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            itemsize = dtype.itemsize
            entries[key] = _Entry(file, tuple(info["shape"]), dtype, start, end, (end - start) // itemsize,
                                  start % itemsize == 0)
        return entries
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint file {file}: {error}. Re-download it or check the path.") from error


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
