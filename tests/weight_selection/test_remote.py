"""Students cut from a teacher on the (fake) Hub by byte ranges, without downloading the teacher (issue 12).

Every case pushes a tiny teacher to the loopback fake Hub and cuts the same student from the repo and from the local
folder. Tiny teachers are smaller than the reader's default `max_gap` (1 MiB, which would read the whole file in one
request), so the byte-accounting tests set `max_gap` to 0: then the Hub sends exactly the selected tensors plus what
the metadata reads fetch (the config files, the shard index, the first 100,001 bytes of each safetensors file read
by `HfApi.get_safetensors_metadata`).
"""

import logging
import re
import uuid
from fnmatch import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from huggingface_hub import ModelCard

from hf_regtools._compat import transformers_checkpoint_key_map
from hf_regtools.adapters import save_model
from hf_regtools.checkpoint import SAFE_INDEX, CheckpointReader
from hf_regtools.hub import CONFIG_PATTERNS, PREPROCESSING_FILES, HubError, push_folder
from hf_regtools.remote import RemoteCheckpointReader
from hf_regtools.testing.tiny_models import timm_vit, transformers_llama, transformers_vit
from hf_regtools.weight_selection import initialize_student, select_weights

from .test_llama import VOCAB, _tokenizer

_HEADER_READ = 100_001  # bytes=0-100000: the first read of `HfApi.get_safetensors_metadata` per file


@dataclass(frozen=True)
class Case:
    """A teacher family on the Hub: how to build and save the teacher, and the student's shape overrides."""

    build: Callable[[], torch.nn.Module]
    save: Callable[[torch.nn.Module, Path], None] = save_model
    student: dict = field(default_factory=dict)
    tokenizer: bool = False  # the teacher has tokenizer files, which the student folder receives unchanged


def _sharded(max_shard_size):
    return lambda model, folder: model.save_pretrained(folder, max_shard_size=max_shard_size)


def _sharded_with_tokenizer(max_shard_size):
    def save(model, folder):
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        _tokenizer(folder)

    return save


CASES = {
    "timm-vit": Case(lambda: timm_vit(embed_dim=64, depth=8, num_heads=4), student=dict(hidden_size=32, depth=4)),
    "transformers-vit-sharded": Case(lambda: transformers_vit(hidden_size=64, num_hidden_layers=8,
                                                              num_attention_heads=4, intermediate_size=128),
                                     save=_sharded("500KB"), student=dict(hidden_size=32, depth=4)),
    "transformers-llama-sharded": Case(lambda: transformers_llama(hidden_size=64, num_hidden_layers=8,
                                                                  num_attention_heads=4, num_key_value_heads=2,
                                                                  intermediate_size=128, vocab_size=VOCAB),
                                       save=_sharded_with_tokenizer("500KB"),
                                       student=dict(hidden_size=32, depth=4, num_heads=2, num_key_value_heads=1),
                                       tokenizer=True),
}


def _repo(name="teacher"):
    return f"org/{name}-{uuid.uuid4().hex[:8]}"


def _pushed(case: Case, folder: Path, *, private=None) -> str:
    torch.manual_seed(0)
    case.save(case.build(), folder)
    repo_id = _repo()
    push_folder(folder, repo_id, private=private)
    return repo_id


def _cut(teacher, case: Case, **kwargs):
    torch.manual_seed(1)  # the same initialization of what selection skips (the classifier)
    return initialize_student(teacher, **case.student, **kwargs)


def _assert_same_student(result, expected):
    actual, wanted = result.model.state_dict(), expected.model.state_dict()
    assert actual.keys() == wanted.keys()
    for key in wanted:
        assert torch.equal(actual[key], wanted[key]), key


def _selected_bytes(result, folder: Path) -> tuple[int, int]:
    """(bytes of the teacher tensors the student maps to, bytes of all tensors), from the local files' headers."""
    local = CheckpointReader(folder)
    key_map = transformers_checkpoint_key_map(result.model, local.keys()) if result.library == "transformers" else {}
    stored = {key_map.get(key, key) for key in result.report.sources.values()}
    sizes = {key: entry.end - entry.start for key, entry in local._entries.items()}
    return sum(sizes[key] for key in stored), sum(sizes.values())


def _metadata_bytes(folder: Path) -> int:
    """What resolving the teacher and reading its headers transfer: the config, preprocessing (tokenizer) files and
    shard index in full, and the first read of each safetensors file."""
    patterns = (*CONFIG_PATTERNS, SAFE_INDEX, "*.safetensors")
    files = [path for path in folder.iterdir() if any(fnmatch(path.name, pattern) for pattern in patterns)]
    return sum(min(_HEADER_READ, p.stat().st_size) if p.suffix == ".safetensors" else p.stat().st_size for p in files)


@pytest.mark.parametrize("name", sorted(CASES))
def test_remote_student_equals_the_local_one_and_reads_only_the_selected_tensors(name, tmp_path, fake_hub,
                                                                                 monkeypatch):
    case = CASES[name]
    repo_id = _pushed(case, tmp_path / "teacher")
    if name.endswith("sharded"):
        assert (tmp_path / "teacher" / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "teacher").glob("*.safetensors"))) >= 2
    monkeypatch.setattr(RemoteCheckpointReader, "max_gap", 0)
    local = _cut(tmp_path / "teacher", case)
    fake_hub.bytes_sent, start = 0, len(fake_hub.requests)
    remote = _cut(repo_id, case)

    _assert_same_student(remote, local)
    assert remote.read_remotely and remote.weights_source == "remote" and not local.read_remotely
    selected, tensors = _selected_bytes(remote, tmp_path / "teacher")
    assert remote.bytes_read == selected
    assert fake_hub.bytes_sent == selected + _metadata_bytes(tmp_path / "teacher")
    assert selected < 0.6 * tensors
    weight_files = sum(p.stat().st_size for p in (tmp_path / "teacher").glob("*.safetensors"))
    assert remote.teacher_size == weight_files
    assert local.bytes_read == 0 and local.weights_source == "local"
    weight_reads = [path for _, path in fake_hub.requests[start:] if path.endswith(".safetensors")]
    assert weight_reads and all(f"/resolve/{remote.teacher_revision}/" in path for path in weight_reads)
    again = _cut(repo_id, case)  # the metadata read cached the config and the shard index, not the weights
    assert again.weights_source == "remote" and again.bytes_read == selected
    if case.tokenizer:
        student = remote.save(tmp_path / "student")
        names = [name for name in PREPROCESSING_FILES["tokenizer"] if (tmp_path / "teacher" / name).is_file()]
        assert "tokenizer.json" in names
        for name in names:
            assert (student / name).read_bytes() == (tmp_path / "teacher" / name).read_bytes(), name


def test_plan_coalesces_ranges_within_the_gap_and_request_limits(tmp_path, fake_hub):
    case = CASES["timm-vit"]
    repo_id = _pushed(case, tmp_path / "teacher")
    max_gap, max_request = 4096, 64 * 1024
    reader = RemoteCheckpointReader(repo_id, max_gap=max_gap, max_request=max_request)
    torch.manual_seed(1)
    student = timm_vit(embed_dim=32, depth=4, num_heads=2)
    expected = timm_vit(embed_dim=32, depth=4, num_heads=2)
    expected.load_state_dict(student.state_dict())
    planned = []
    original = reader.plan_reads
    reader.plan_reads = lambda keys: planned.extend(original(keys)) or planned
    report = select_weights(reader, student)
    select_weights(CheckpointReader(tmp_path / "teacher"), expected)
    for key, tensor in expected.state_dict().items():
        assert torch.equal(student.state_dict()[key], tensor), key

    ranges = [byte_range for group in planned for byte_range in group]
    assert sorted(key for r in ranges for key in r.keys) == sorted(set(report.sources.values()))
    for byte_range in ranges:
        entries = sorted((reader._entries[key] for key in byte_range.keys), key=lambda e: e.start)
        assert byte_range.start == entries[0].start and byte_range.end == entries[-1].end
        assert byte_range.end - byte_range.start <= max_request or len(entries) == 1
        assert all(b.start - a.end <= max_gap for a, b in zip(entries, entries[1:]))
    for group in planned:  # what one group holds in memory at once
        assert max(r.end for r in group) - min(r.start for r in group) <= max_request or len(
            [k for r in group for k in r.keys]) == 1
    assert reader.requests == len(ranges) > 1
    assert reader.bytes_read == sum(r.end - r.start for r in ranges)


def test_a_dropped_connection_is_retried(tmp_path, fake_hub, monkeypatch):
    case = CASES["timm-vit"]
    repo_id = _pushed(case, tmp_path / "teacher")
    local = _cut(tmp_path / "teacher", case)
    monkeypatch.setattr(RemoteCheckpointReader, "backoff", 0.01)
    dropped_after = 300_000
    weights = rf"^/{repo_id}/resolve/[0-9a-f]{{40}}/model\.safetensors$"
    fake_hub.add_fault("GET", weights, None, after_bytes=dropped_after, times=1, skip=1)  # skip the header read
    fake_hub.bytes_sent = 0
    remote = _cut(repo_id, case)
    _assert_same_student(remote, local)
    # resumed from the byte where the read stopped: at most the last chunk received (requests) is sent again
    selected_and_headers = remote.bytes_read + _metadata_bytes(tmp_path / "teacher")
    assert selected_and_headers <= fake_hub.bytes_sent < selected_and_headers + dropped_after

    fake_hub.add_fault("GET", weights, None, after_bytes=dropped_after, skip=1)
    with pytest.raises(HubError, match=r"cannot read bytes \d+-\d+ of 'model.safetensors' in .*: the connection "
                                       r"failed 4 times .*check the network"):
        _cut(repo_id, case)


def test_cli_prints_the_bytes_read_and_leaves_no_output_when_reads_keep_failing(tmp_path, fake_hub, hub_env, cli):
    case = CASES["timm-vit"]
    good, bad = _pushed(case, tmp_path / "good"), _pushed(case, tmp_path / "bad")
    fake_hub.add_fault("GET", rf"^/{bad}/resolve/[0-9a-f]{{40}}/model\.safetensors$", None, after_bytes=10, skip=1)
    calls = [["select", good, "--hidden-size", "32", "--depth", "4", "--output", str(tmp_path / "out_good")],
             ["select", bad, "--hidden-size", "32", "--depth", "4", "--output", str(tmp_path / "out_bad")]]
    bars_enabled = {key: value for key, value in hub_env.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    codes, out, err = cli(calls, bars_enabled)
    assert codes == [0, 2], err
    assert "teacher weights: read from the Hub by byte ranges:" in out
    bar = re.search(rf"reading {good}: 100%\|.*\| ([\d.]+[kMG]?)/([\d.]+[kMG]?) \[.*B/s\]", err)
    assert bar and bar[1] == bar[2], err  # the progress bar over the bytes, complete
    (tmp_path / "quiet").mkdir()
    codes, _, quiet_err = cli([[*calls[0][:-1], str(tmp_path / "quiet")]],
                              {**bars_enabled, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    assert codes == [0] and "reading " not in quiet_err, quiet_err
    assert "connection failed 4 times" in err
    assert not (tmp_path / "out_bad").exists()
    card = ModelCard.load(tmp_path / "out_good" / "README.md")
    assert "Teacher weights: read from the Hub by byte ranges:" in card.text
    bytes_read = int(card.text.split("by byte ranges: ")[1].split(" bytes")[0].replace(",", ""))
    assert 0 < bytes_read < sum(p.stat().st_size for p in (tmp_path / "good").glob("*.safetensors"))
    assert hub_env["HF_TOKEN"] not in out + err + card.text


def test_bin_only_teacher_is_downloaded_with_a_note(tmp_path, fake_hub, caplog):
    case = CASES["timm-vit"]
    folder = tmp_path / "teacher"
    torch.manual_seed(0)
    case.save(case.build(), folder)
    state = CheckpointReader(folder)
    torch.save({key: state[key] for key in state}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    repo_id = _repo()
    push_folder(folder, repo_id)
    local = _cut(folder, case)
    with caplog.at_level(logging.WARNING, logger="hf_regtools.remote"):
        remote = _cut(repo_id, case)
    _assert_same_student(remote, local)
    assert remote.weights_source == "download" and not remote.read_remotely
    assert "has no safetensors weights" in remote.weights_note and remote.weights_note in caplog.text
    assert remote.bytes_read == (folder / "pytorch_model.bin").stat().st_size
    assert "downloaded" in remote.weights_summary and remote.weights_note in remote.weights_summary


def test_token_is_sent_but_never_shown(tmp_path, fake_hub, capsys, caplog):
    case = CASES["timm-vit"]
    repo_id = _pushed(case, tmp_path / "teacher", private=True)
    local = _cut(tmp_path / "teacher", case)
    with caplog.at_level(logging.DEBUG):
        remote = _cut(repo_id, case, progress=True)  # private: every request must carry the token
    _assert_same_student(remote, local)
    assert remote.read_remotely
    with pytest.raises(HubError, match="repository not found"):
        RemoteCheckpointReader(repo_id, token=False)
    secret = "hf_secret_for_this_test"
    fake_hub.add_fault("GET", rf"^/{repo_id}/resolve/", 500, message="storage down", skip=1)
    reader = RemoteCheckpointReader(repo_id, token=secret, backoff=0.01, attempts=2)
    with pytest.raises(HubError) as excinfo:
        reader.plan_reads(["cls_token"])
        reader["cls_token"]
    captured = capsys.readouterr()
    assert "reading " + repo_id in captured.err  # the progress bar over the bytes
    card = remote.save(tmp_path / "student").joinpath("README.md").read_text()
    shown = captured.out + captured.err + caplog.text + str(excinfo.value) + card
    assert secret not in shown and "hf_fake" not in shown


def test_revision_is_honoured(tmp_path, fake_hub):
    case = CASES["timm-vit"]
    repo_id = _pushed(case, tmp_path / "v1")
    first = fake_hub.commits(repo_id)[-1]
    torch.manual_seed(5)
    case.save(case.build(), tmp_path / "v2")
    push_folder(tmp_path / "v2", repo_id)
    expected = _cut(tmp_path / "v1", case)
    start = len(fake_hub.requests)
    for reference, revision in ((repo_id, first), (f"{repo_id}@{first}", None)):
        result = _cut(reference, case, revision=revision)
        _assert_same_student(result, expected)
        assert result.teacher_revision == first and result.read_remotely
    reads = [path for _, path in fake_hub.requests[start:] if "/resolve/" in path]
    assert reads and all(f"/resolve/{first}/" in path for path in reads)
    newest = _cut(repo_id, case)
    assert newest.teacher_revision == fake_hub.commits(repo_id)[-1] != first
    assert not torch.equal(newest.model.state_dict()["pos_embed"], expected.model.state_dict()["pos_embed"])


def test_cached_and_offline_teachers_read_local_files(tmp_path, fake_hub):
    from huggingface_hub import snapshot_download

    from hf_regtools.testing.offline_cache import hub_offline

    case = CASES["timm-vit"]
    repo_id = _pushed(case, tmp_path / "teacher")
    expected = _cut(tmp_path / "teacher", case)
    snapshot_download(repo_id)
    fake_hub.bytes_sent = 0
    cached = _cut(repo_id, case)
    assert cached.weights_source == "cache" and cached.bytes_read == 0
    assert fake_hub.bytes_sent == 0  # the config is cached too: only metadata requests
    start = len(fake_hub.requests)
    with hub_offline():
        offline = _cut(repo_id, case)
    assert fake_hub.requests[start:] == []
    for result in (cached, offline):
        _assert_same_student(result, expected)
        assert result.weights_source == "cache" and "local Hugging Face cache" in result.weights_summary


def test_fake_hub_serves_ranges(fake_hub, tmp_path):
    """The `resolve` contract of ranged reads: HEAD headers, 206 with Content-Range, 416 past the end."""
    from urllib.request import Request, urlopen
    from urllib.error import HTTPError

    (tmp_path / "up").mkdir()
    data = bytes(range(256)) * 4
    (tmp_path / "up" / "blob.bin").write_bytes(data)
    repo_id = _repo("blob")
    push_folder(tmp_path / "up", repo_id)
    url = f"{fake_hub.url}/{repo_id}/resolve/main/blob.bin"
    with urlopen(Request(url, method="HEAD")) as head:
        assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(data))
        assert head.headers["Accept-Ranges"] == "bytes" and head.headers["X-Repo-Commit"] == fake_hub.commits(repo_id)[-1]
        assert head.headers["X-Linked-Etag"] == head.headers["ETag"]
    fake_hub.bytes_sent = 0
    for header, body in (("bytes=10-19", data[10:20]), ("bytes=1000-", data[1000:]), ("bytes=-4", data[-4:]),
                         ("bytes=1020-5000", data[1020:])):
        with urlopen(Request(url, headers={"Range": header})) as response:
            assert response.status == 206 and response.read() == body
            start = len(data) - len(body) if header.startswith("bytes=-") else int(header[6:].split("-")[0])
            assert response.headers["Content-Range"] == f"bytes {start}-{start + len(body) - 1}/{len(data)}"
    assert fake_hub.bytes_sent == 10 + 24 + 4 + 4
    with pytest.raises(HTTPError) as excinfo:
        urlopen(Request(url, headers={"Range": f"bytes={len(data)}-"}))
    assert excinfo.value.code == 416 and excinfo.value.headers["Content-Range"] == f"bytes */{len(data)}"

    from huggingface_hub import HfFileSystem

    unknown = len(fake_hub.unknown_routes)
    fs = HfFileSystem(endpoint=fake_hub.url)
    assert fs.info(f"{repo_id}/blob.bin")["size"] == len(data)
    with fs.open(f"{repo_id}/blob.bin", "rb", cache_type="none") as handle:
        handle.seek(100)
        assert handle.read(50) == data[100:150]
    assert fake_hub.unknown_routes[unknown:] == []
