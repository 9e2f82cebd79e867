"""Read a teacher's tensors from the Hub by byte ranges, without downloading its weight files.

`RemoteCheckpointReader` is the `CheckpointReader` of a Hub repo with safetensors weights: the headers come from
`HfApi.get_safetensors_metadata` (one small ranged read per file, the shard index followed) and the file sizes from
one tree listing; then `plan_reads(keys)` groups the tensors a selection needs, in the order it reads them, and
coalesces each group into few ranged `GET`s, streamed through huggingface_hub's own HTTP client with the user's
token and the revision pinned to a commit sha, and resumed from the byte where a dropped read stopped. Tensors are decoded from the bytes one
group at a time, so memory stays near the largest group (at most `max_request` bytes, or one larger tensor) plus the
student. `open_teacher_weights` picks the remote reader, the local files or a download for a resolved teacher.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from . import hub
from .checkpoint import SAFE_INDEX, SAFE_WEIGHTS, SAFETENSORS_DTYPES, CheckpointError, CheckpointReader
from .checkpoint import _Entry, _weight_files

logger = logging.getLogger(__name__)

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)


@dataclass
class _Range:
    """Bytes `[start, end)` of one file, holding the tensors `keys`."""

    file: str
    start: int
    end: int
    keys: list[str] = field(default_factory=list)


@dataclass
class _Transfer:
    """Read state shared by a reader and its `with_key_map` clones."""

    groups: dict[str, list[_Range]] = field(default_factory=dict)  # stored key -> the ranges of its group
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)  # the tensors of the group read last
    bytes_read: int = 0
    requests: int = 0
    bar: object = None


class RemoteCheckpointReader(CheckpointReader):
    """Lazy `Mapping[str, torch.Tensor]` over the safetensors weights of a Hub repo, read by byte ranges.

    Same interface as `CheckpointReader` (`shape()` from the headers, `borrowed(key)`, `with_key_map`,
    `stored_keys()`), plus `plan_reads(keys)` (called by `select_weights` before reading), `bytes_read` and
    `requests`. Nothing is written to disk.

    Args:
        repo_id (`str`): the model repo, e.g. `"google/vit-base-patch16-224"`.
        revision (`str`, *optional*): branch, tag or commit; resolved once to its commit sha, which every read uses.
        token (`str`, *optional*): Hub token; defaults to the usual environment / `hf auth login`. Never printed.
        endpoint (`str`, *optional*): Hub endpoint; defaults to `HF_ENDPOINT` (`huggingface_hub.constants.ENDPOINT`).
        key_map (`dict[str, str]`, *optional*): see `CheckpointReader`.
        progress (`bool`, *optional*): show a progress bar over the bytes to read (tqdm on stderr). By default it
            shows as huggingface_hub's download bars do (its tqdm: on unless `HF_HUB_DISABLE_PROGRESS_BARS=1` or
            `huggingface_hub.utils.disable_progress_bars()`, terminal or not); `True` or `False` force it.
        max_gap (`int`, *optional*): two needed tensors of a group at most this many bytes apart are read in one
            request, the bytes between them included (class default: 1 MiB).
        max_request (`int`, *optional*): most bytes one request (and one group of tensors held in memory) spans,
            unless a single tensor is larger (class default: 256 MiB).
        attempts (`int`, *optional*): tries of a request whose connection drops or times out, with exponential
            backoff (class default: 4).
        backoff (`float`, *optional*): seconds before the first retry, doubled at each further one (class default:
            0.5).

    Raises:
        `huggingface_hub.errors.NotASafetensorsRepoError`: the repo has no `model.safetensors` or
            `model.safetensors.index.json` (download its weights instead, see `open_teacher_weights`).
        `HubError`: the repo, revision or a file cannot be read (the message says why and what to do).
        `CheckpointError`: a header is corrupt or uses an unsupported dtype.

    Example:

    ```python
    reader = RemoteCheckpointReader("google/vit-base-patch16-224")
    reader.shape("vit.embeddings.cls_token")            # from the header, nothing else read
    reader.plan_reads(["vit.embeddings.cls_token"])
    cls_token = reader["vit.embeddings.cls_token"]      # one ranged request
    ```
    """

    max_gap: int = 2**20
    max_request: int = 256 * 2**20
    attempts: int = 4
    backoff: float = 0.5

    def __init__(self, repo_id: str, *, revision: str | None = None, token: str | None = None,
                 endpoint: str | None = None, key_map: Mapping[str, str] | None = None, progress: bool | None = None,
                 max_gap: int | None = None, max_request: int | None = None, attempts: int | None = None,
                 backoff: float | None = None):
        from huggingface_hub import HfApi, constants

        self.repo_id, self.token = repo_id, token
        self.endpoint = endpoint or constants.ENDPOINT
        self.path = None
        for name, value in dict(max_gap=max_gap, max_request=max_request, attempts=attempts, backoff=backoff).items():
            if value is not None:
                setattr(self, name, value)
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        self._progress = progress
        api = HfApi(endpoint=self.endpoint, token=token)
        with hub.hub_errors("cannot read the weights of", repo_id):
            if revision is None or not _COMMIT_SHA.fullmatch(revision):
                revision = api.model_info(repo_id, revision=revision).sha
            self.revision = revision
            metadata = api.get_safetensors_metadata(repo_id, revision=revision)
            self.file_sizes = _file_sizes(api, repo_id, revision, sorted(metadata.files_metadata))
        self._entries: dict[str, _Entry] = {}
        for filename, file_metadata in sorted(metadata.files_metadata.items()):
            self._entries.update(_remote_entries(filename, file_metadata, self.file_sizes[filename], repo_id))
        self._maps = {}
        self._transfer = _Transfer()
        self._expose(key_map or {})

    @property
    def bytes_read(self) -> int:
        """Bytes of tensor data received so far (headers not included)."""
        return self._transfer.bytes_read

    @property
    def requests(self) -> int:
        """Ranged requests that returned data so far (retries not counted)."""
        return self._transfer.requests

    @property
    def size(self) -> int:
        """Total size of the repo's safetensors weight files, in bytes."""
        return sum(self.file_sizes.values())

    def plan_reads(self, keys: Sequence[str]) -> list[list[_Range]]:
        """Plan the requests that read the tensors `keys` (exposed names) in this order; returns the groups.

        Consecutive keys of one file form a group while its span stays within `max_request`; a group is read as the
        fewest ranges whose holes are at most `max_gap` bytes, when its first tensor is needed, and kept until a
        tensor of another group is. Keys outside the plan are still readable, one request each.
        """
        transfer = self._transfer
        stored = list(dict.fromkeys(self._exposed[key] for key in keys if key in self._exposed))
        groups, group = [], []
        for key in stored:
            entry = self._entries[key]
            if group and (entry.file != self._entries[group[0]].file
                          or _span([self._entries[k] for k in (*group, key)]) > self.max_request):
                groups.append(group)
                group = []
            group.append(key)
        groups += [group] if group else []
        transfer.groups = {}
        planned = []
        for keys_of_group in groups:
            ranges = self._coalesce(keys_of_group)
            planned.append(ranges)
            transfer.groups.update({key: ranges for key in keys_of_group})
        self.close()
        if self._progress is not False:
            import sys

            import tqdm as forced
            from huggingface_hub.utils import tqdm

            bar = forced.tqdm if self._progress else tqdm
            total = sum(r.end - r.start for ranges in planned for r in ranges)
            transfer.bar = bar(total=total, desc=f"reading {self.repo_id}", unit="B", unit_scale=True,
                                unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)
        return planned

    def _coalesce(self, keys: list[str]) -> list[_Range]:
        ranges: list[_Range] = []
        for key in sorted(keys, key=lambda k: self._entries[k].start):
            entry = self._entries[key]
            last = ranges[-1] if ranges else None
            if last is not None and entry.start - last.end <= self.max_gap and entry.end - last.start <= self.max_request:
                last.end = max(last.end, entry.end)
                last.keys.append(key)
            else:
                ranges.append(_Range(str(entry.file), entry.start, entry.end, [key]))
        return ranges

    @contextmanager
    def borrowed(self, key: str) -> Iterator[torch.Tensor]:
        """Lend the tensor, decoded from the bytes of its group (read now if not yet in memory)."""
        stored = self._exposed[key]
        transfer = self._transfer
        if stored not in transfer.loaded:
            ranges = transfer.groups.get(stored)
            if ranges is None:
                entry = self._entries[stored]
                yield self._read([_Range(str(entry.file), entry.start, entry.end, [stored])])[stored]
                return
            transfer.loaded = {}  # free the previous group before reading the next one
            transfer.loaded = self._read(ranges)
        yield transfer.loaded[stored]

    def _read(self, ranges: list[_Range]) -> dict[str, torch.Tensor]:
        tensors = {}
        for byte_range in ranges:
            data = self._fetch(byte_range)
            for key in byte_range.keys:
                tensors[key] = _decode(data, self._entries[key], byte_range.start)
            bar = self._transfer.bar
            if bar is not None and bar.n >= bar.total:
                bar.close()
        return tensors

    def _fetch(self, byte_range: _Range) -> bytearray:
        """The bytes of `byte_range`. A request whose connection drops or times out, or that is answered with a
        transient status (429, 5xx), is retried with exponential backoff from the first byte not yet received."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        from ._compat import hub_client_errors, hub_stream_get

        file, start, end = byte_range.file, byte_range.start, byte_range.end
        url = hf_hub_url(self.repo_id, file, revision=self.revision, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token)
        _, connection, timeout = hub_client_errors()
        where = f"bytes {start}-{end - 1} of {file!r} in {self.repo_id!r} @ {self.revision}"
        data, bar = bytearray(), self._transfer.bar
        with hub.hub_errors(f"cannot read bytes {start}-{end - 1} of {file!r} from", self.repo_id):
            for attempt in range(1, self.attempts + 1):
                offset = start + len(data)
                try:
                    with hub_stream_get(url, headers={**headers, "Range": f"bytes={offset}-{end - 1}"},
                                        timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as (response, chunks):
                        status = response.status_code
                        if status in _TRANSIENT_STATUSES and attempt < self.attempts:
                            reason = f"the Hub answered {status}"
                        else:
                            if status >= 400:
                                getattr(response, "read", lambda: None)()  # httpx: load the error body
                                hf_raise_for_status(response)
                            skip = offset if status == 200 else 0  # a server ignoring `Range` sends the whole file
                            for chunk in chunks:
                                if skip:
                                    dropped = min(skip, len(chunk))
                                    chunk, skip = chunk[dropped:], skip - dropped
                                chunk = chunk[:end - start - len(data)]
                                data += chunk
                                if bar is not None:
                                    bar.update(len(chunk))
                                if len(data) == end - start:
                                    break
                            if len(data) == end - start:
                                break
                            reason = f"the answer ended after {len(data)} of {end - start} bytes"
                except (*connection, *timeout) as error:
                    if attempt == self.attempts:
                        raise hub.HubError(
                            f"cannot read {where}: the connection failed {self.attempts} times "
                            f"({hub._network_reason(error)}); check the network and try again") from error
                    reason = hub._network_reason(error)
                if attempt == self.attempts:
                    raise hub.HubError(f"cannot read {where}: {reason} ({self.attempts} attempts); try again")
                wait = self.backoff * 2 ** (attempt - 1)
                logger.warning("reading %s: %s; retrying from byte %d in %.1fs [retry %d/%d]", where, reason,
                               start + len(data), wait, attempt, self.attempts - 1)
                time.sleep(wait)
        self._transfer.bytes_read += len(data)
        self._transfer.requests += 1
        return data

    def close(self) -> None:
        """Drop the tensors held in memory and close the progress bar."""
        transfer = self._transfer
        transfer.loaded = {}
        if transfer.bar is not None:
            transfer.bar.close()
            transfer.bar = None


def _span(entries: list[_Entry]) -> int:
    return max(e.end for e in entries) - min(e.start for e in entries)


def _decode(data: bytearray, entry: _Entry, data_start: int) -> torch.Tensor:
    if entry.count == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    offset = entry.start - data_start
    if offset % entry.dtype.itemsize:
        data, offset = data[offset:offset + entry.end - entry.start], 0
    return torch.frombuffer(data, dtype=entry.dtype, count=entry.count, offset=offset).view(entry.shape)


def _file_sizes(api, repo_id: str, revision: str, files: list[str]) -> dict[str, int]:
    """Sizes of the weight files, from one tree listing per folder that holds some."""
    sizes = {}
    for folder in sorted({str(PurePosixPath(name).parent) for name in files}):
        listing = api.list_repo_tree(repo_id, path_in_repo=None if folder == "." else folder, revision=revision)
        sizes.update({item.path: item.size for item in listing if item.path in files})
    missing = [name for name in files if name not in sizes]
    if missing:
        raise hub.HubError(f"cannot read the weights of {repo_id!r} @ {revision}: the shard index names files the repo "
                           f"does not list ({missing})")
    return sizes


def _remote_entries(filename: str, metadata, file_size: int, repo_id: str) -> dict[str, _Entry]:
    """Entries with absolute byte offsets: the data section is the end of the file (the safetensors layout), so it
    starts at the file size minus its length."""
    tensors = metadata.tensors
    data_size = max((info.data_offsets[1] for info in tensors.values()), default=0)
    data_start = file_size - data_size
    if data_start < 8:
        raise CheckpointError(f"cannot read {filename!r} of {repo_id!r}: its header describes {data_size} bytes of "
                              f"tensors but the file has {file_size}. The upload may be corrupt.")
    entries = {}
    for key, info in tensors.items():
        if info.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"cannot read {filename!r} of {repo_id!r}: tensor {key!r} has unsupported dtype "
                                  f"{info.dtype!r}")
        dtype = SAFETENSORS_DTYPES[info.dtype]
        start, end = (data_start + offset for offset in info.data_offsets)
        entries[key] = _Entry(Path(filename), tuple(info.shape), dtype, start, end, (end - start) // dtype.itemsize,
                              start % dtype.itemsize == 0)
    return entries


@dataclass(frozen=True)
class TeacherWeights:
    """How a resolved teacher's weights are read.

    Attributes:
        tensors (`CheckpointReader`): the reader (a `RemoteCheckpointReader` when read from the Hub by ranges).
        source (`str`): `"remote"` (byte ranges from the Hub), `"download"` (the weight files were downloaded),
            `"local"` (a local folder) or `"cache"` (the local Hugging Face cache).
        note (`str`, *optional*): why the weights were downloaded instead of read by ranges.
        size (`int`): total size of the teacher's weight files, in bytes.
    """

    tensors: CheckpointReader
    source: str
    size: int
    note: str | None = None

    @property
    def bytes_read(self) -> int:
        """Bytes of weights transferred from the Hub: the ranges read, or the downloaded files' size; 0 when read
        from a local folder or the cache."""
        if isinstance(self.tensors, RemoteCheckpointReader):
            return self.tensors.bytes_read
        return self.size if self.source == "download" else 0


def open_teacher_weights(resolved: hub.ResolvedModel, *, progress: bool | None = None) -> TeacherWeights:
    """Open the weights of a teacher resolved by `hub.resolve_model(..., weights=False)`.

    A local folder, a teacher whose weights are already in the cache, and every teacher under `HF_HUB_OFFLINE=1` are
    read from local files, as `CheckpointReader`. A Hub repo with safetensors weights is read by byte ranges
    (`RemoteCheckpointReader`): only the tensors the student maps to are transferred. A repo with only PyTorch
    weights (`.bin`) is downloaded (`hub.fetch_weights`), and the note saying so is logged and returned.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import NotASafetensorsRepoError

    if resolved.repo_id is None or constants.HF_HUB_OFFLINE or _has_weights(resolved.folder):
        folder = hub.fetch_weights(resolved).folder
        return TeacherWeights(CheckpointReader(folder), "local" if resolved.repo_id is None else "cache",
                              _files_size(folder))
    try:
        reader = RemoteCheckpointReader(resolved.repo_id, revision=resolved.revision, progress=progress)
    except NotASafetensorsRepoError:
        note = (f"{resolved.repo_id!r} has no safetensors weights ({SAFE_WEIGHTS[0]} or {SAFE_INDEX}): downloading "
                "its PyTorch weights instead of reading only the tensors the student needs")
        logger.warning(note)
        folder = hub.fetch_weights(resolved).folder
        return TeacherWeights(CheckpointReader(folder), "download", _files_size(folder), note)
    return TeacherWeights(reader, "remote", reader.size)


def _has_weights(folder: Path) -> bool:
    """Whether a cache snapshot holds complete weights (a shard index alone, cached by the metadata read, does not)."""
    try:
        _weight_files(folder)
    except CheckpointError:
        return False
    return True


def _files_size(folder: Path) -> int:
    return sum(os.path.getsize(file) for file in _weight_files(folder))


__all__ = ["RemoteCheckpointReader", "TeacherWeights", "open_teacher_weights"]
