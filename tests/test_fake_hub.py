"""Push → pull round trips through the real `huggingface_hub`, transformers and timm clients against `FakeHub`.

`conftest.py` points `HF_ENDPOINT` at the session's `FakeHub` before anything imports `huggingface_hub`; every test
uses its own `org/<random>` repository so that tests stay independent without resetting the shared server.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

from hf_regtools._compat import hub_uploads_need_global_endpoint
from hf_regtools.testing.assertions import assert_same_weights
from hf_regtools.testing.fake_hub import FakeHub

SHA = re.compile(r"[0-9a-f]{40}")


def _repo_id() -> str:
    return f"org/{uuid.uuid4().hex[:8]}"


def _pushed(folder) -> tuple[str, str]:
    """Creates a fresh repo and uploads `folder` to it; returns `(repo_id, commit sha)`."""
    repo_id = _repo_id()
    HfApi().create_repo(repo_id)
    return repo_id, HfApi().upload_folder(repo_id=repo_id, folder_path=folder).oid


def _write_folder(folder, *, weights=None, note="first") -> dict[str, bytes]:
    """Writes a README.md model card, config.json and model.safetensors; returns `{name: bytes}`."""
    os.makedirs(folder, exist_ok=True)
    data = ModelCardData(
        base_model="org/teacher", library_name="transformers", tags=["hf_regtools", "weight_selection"]
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n# Tiny student\n\nselection mode: `{note}`\n").save(
        os.path.join(folder, "README.md")
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"hidden_size": 4}, f)
    save_file(weights or {"weight": torch.arange(6.0).reshape(2, 3)}, os.path.join(folder, "model.safetensors"))
    return {path.name: path.read_bytes() for path in Path(folder).iterdir()}


def _request(url, method="GET", body=None):
    """Raw HTTP call: `(status, headers, body)`, also for error statuses."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_upload_folder_round_trip(fake_hub, tmp_path):
    unknown_before = len(fake_hub.unknown_routes)
    repo_id = _repo_id()
    uploaded = _write_folder(tmp_path / "push")
    api = HfApi()
    url = api.create_repo(repo_id)
    assert url == f"{fake_hub.url}/{repo_id}"
    commit = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "push")

    assert SHA.fullmatch(commit.oid)
    assert fake_hub.commits(repo_id) == [commit.oid]
    assert fake_hub.files(repo_id) == uploaded
    for name, content in uploaded.items():
        with open(hf_hub_download(repo_id, name), "rb") as f:
            assert f.read() == content
    snapshot = snapshot_download(repo_id)
    assert sorted(os.listdir(snapshot)) == sorted(uploaded)
    for name, content in uploaded.items():
        with open(os.path.join(snapshot, name), "rb") as f:
            assert f.read() == content
    assert api.model_info(repo_id).sha == commit.oid
    assert sorted(api.list_repo_files(repo_id)) == sorted(uploaded)

    card = ModelCard.load(repo_id)
    assert card.data.base_model == "org/teacher"
    assert card.data.library_name == "transformers"
    assert {"hf_regtools", "weight_selection"} <= set(card.data.tags)
    assert "selection mode: `first`" in card.text
    assert fake_hub.unknown_routes[unknown_before:] == []


def test_second_upload_creates_new_commit(fake_hub, tmp_path):
    first_files = _write_folder(tmp_path / "push")
    repo_id, first = _pushed(tmp_path / "push")
    api = HfApi()
    # Only the weights change: the client skips unchanged files (preupload reports their oid), the Hub keeps them.
    second_files = _write_folder(tmp_path / "push", weights={"weight": torch.zeros(2, 3)})
    second = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "push").oid

    assert SHA.fullmatch(second) and second != first
    # `create_repo` makes no initial commit: one commit per upload.
    assert fake_hub.commits(repo_id) == [first, second]
    assert api.model_info(repo_id).sha == second
    assert fake_hub.files(repo_id, first) == first_files
    assert fake_hub.files(repo_id) == second_files
    assert second_files["README.md"] == first_files["README.md"]
    assert second_files["model.safetensors"] != first_files["model.safetensors"]
    with open(hf_hub_download(repo_id, "model.safetensors"), "rb") as f:
        assert f.read() == second_files["model.safetensors"]
    with open(hf_hub_download(repo_id, "model.safetensors", revision=first), "rb") as f:
        assert f.read() == first_files["model.safetensors"]
    with open(os.path.join(constants.HF_HUB_CACHE, f"models--{repo_id.replace('/', '--')}", "refs", "main")) as f:
        assert f.read().strip() == second

    api.delete_file("config.json", repo_id=repo_id)
    assert len(fake_hub.commits(repo_id)) == 3
    assert sorted(fake_hub.files(repo_id)) == ["README.md", "model.safetensors"]


def test_create_repo_exist_ok(fake_hub):
    repo_id = _repo_id()
    api = HfApi()
    url = api.create_repo(repo_id)
    assert api.create_repo(repo_id, exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(repo_id)
    assert excinfo.value.response.status_code == 409
    assert fake_hub.commits(repo_id) == []


def test_transformers_from_pretrained_round_trip(fake_hub, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    unknown_before = len(fake_hub.unknown_routes)

    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )
    model = ViTForImageClassification(config)
    model.save_pretrained(tmp_path / "vit")
    assert (tmp_path / "vit" / "model.safetensors").exists()
    repo_id, _ = _pushed(tmp_path / "vit")

    reloaded = ViTForImageClassification.from_pretrained(repo_id)
    assert_same_weights(model, reloaded)
    assert reloaded.config.num_labels == 3
    assert fake_hub.unknown_routes[unknown_before:] == []


def test_timm_hf_hub_round_trip(fake_hub, tmp_path):
    import timm

    unknown_before = len(fake_hub.unknown_routes)

    model_args = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    model = timm.create_model("vit_tiny_patch16_224", **model_args)
    timm.models.save_for_hf(model, tmp_path / "timm", safe_serialization=True, model_args=model_args)
    repo_id, _ = _pushed(tmp_path / "timm")

    config = json.loads(fake_hub.files(repo_id)["config.json"])
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_classes"] == 3
    assert config["model_args"]["embed_dim"] == 16
    reloaded = timm.create_model("hf-hub:" + repo_id, pretrained=True)
    assert_same_weights(model, reloaded)
    assert fake_hub.unknown_routes[unknown_before:] == []


def test_missing_file_repo_and_revision(fake_hub, tmp_path):
    unknown_before = len(fake_hub.unknown_routes)
    _write_folder(tmp_path / "push")
    repo_id, _ = _pushed(tmp_path / "push")

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.bin")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(_repo_id(), "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(_repo_id())
    with pytest.raises(RepositoryNotFoundError):
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=_repo_id())
    assert fake_hub.unknown_routes[unknown_before:] == []


def test_injected_faults(fake_hub, tmp_path):
    api = HfApi()
    repo_id = _repo_id()
    fake_hub.add_fault("POST", r"/api/repos/create", 401)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(repo_id)
    assert excinfo.value.response.status_code == 401
    assert "injected fault" in str(excinfo.value)
    fake_hub.clear_faults()
    api.create_repo(repo_id)

    # The commit POST of `create_commit` is not retried (preupload is, with 1 s, 2 s, ... back-off on 5xx).
    _write_folder(tmp_path / "push")
    fake_hub.add_fault("post", r"/commit/", 500, message="disk full")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "push")
    assert excinfo.value.response.status_code == 500
    assert "disk full" in str(excinfo.value)
    assert fake_hub.commits(repo_id) == []

    fake_hub.clear_faults()
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "push")
    assert len(fake_hub.commits(repo_id)) == 1

    fake_hub.add_fault("*", rf"^/{repo_id}/resolve/", 403, error_code="GatedRepo", times=1)
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "config.json")
    assert hf_hub_download(repo_id, "config.json")


def test_download_cache_layout(fake_hub, tmp_path):
    uploaded = _write_folder(tmp_path / "push")
    repo_id, sha = _pushed(tmp_path / "push")
    snapshot_download(repo_id)

    repo_cache = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    with open(os.path.join(repo_cache, "refs", "main")) as f:
        assert f.read().strip() == sha
    snapshot = os.path.join(repo_cache, "snapshots", sha)
    assert sorted(os.listdir(snapshot)) == sorted(uploaded)
    with open(os.path.join(snapshot, "config.json"), "rb") as f:
        assert f.read() == uploaded["config.json"]


def test_server_contract_on_private_instance(monkeypatch):
    with FakeHub() as hub:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", hub.url)
        api = HfApi(endpoint=hub.url)
        repo_id = _repo_id()
        api.create_repo(repo_id, repo_type="dataset")
        with monkeypatch.context() as patch:
            if hub_uploads_need_global_endpoint():  # huggingface_hub 0.x: HF_ENDPOINT must name the HfApi's endpoint
                patch.setattr(constants, "ENDPOINT", hub.url)
            api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id=repo_id,
                            repo_type="dataset")
        path = hf_hub_download(repo_id, "data/train.csv", repo_type="dataset", endpoint=hub.url)
        with open(path, "rb") as f:
            assert f.read() == b"a,b\n1,2\n"
        assert hub.files(repo_id, repo_type="dataset") == {"data/train.csv": b"a,b\n1,2\n"}

        status, headers, body = _request(f"{hub.url}/api/models/org/none/commit/main", "POST", b"{}\n")
        assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
        sha = hub.commits(repo_id, repo_type="dataset")[0]
        status, headers, body = _request(f"{hub.url}/datasets/{repo_id}/resolve/{sha}/data%2Ftrain.csv", "HEAD")
        assert status == 200 and body == b""
        assert headers["X-Repo-Commit"] == sha and headers["Content-Length"] == "8" and headers["ETag"]
        assert "X-Xet-Hash" not in headers

        status, headers, body = _request(f"{hub.url}/api/brand-new-route")
        assert status == 404 and "brand-new-route" in json.loads(body)["error"]
        assert hub.unknown_routes == [("GET", "/api/brand-new-route")]

        hub.add_fault("GET", r"/api/models/", 503, error_code="Busy", message="later", times=2)
        for _ in range(2):
            status, headers, body = _request(f"{hub.url}/api/models/org/none")
            assert (status, headers["X-Error-Code"], json.loads(body)) == (503, "Busy", {"error": "later"})
        status, headers, _ = _request(f"{hub.url}/api/models/org/none")
        assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
        assert ("GET", "/api/models/org/none") in hub.requests

        hub.reset()
        assert hub.requests == [] and hub.unknown_routes == []
        with pytest.raises(KeyError):
            hub.commits(repo_id, repo_type="dataset")


def test_whoami_and_dropped_connections(fake_hub):
    from hf_regtools._compat import hub_client_errors

    assert HfApi().whoami()["name"] == fake_hub.user
    status, _, body = _request(f"{fake_hub.url}/api/whoami-v2")
    assert status == 401 and "Invalid credentials" in json.loads(body)["error"]
    fake_hub.add_fault("GET", r"^/api/whoami-v2$", None, times=1)
    _, connection, _ = hub_client_errors()
    with pytest.raises(connection):
        HfApi().whoami()
    assert HfApi().whoami()["auth"]["accessToken"]["role"] == "write"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_module_serves_until_stopped(signum, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "hf_regtools.testing.fake_hub", "--port", str(port),
                               "--user", "alice"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}"
        api = HfApi(endpoint=url, token="hf_fake")
        assert api.whoami()["name"] == "alice"
        repo_id = _repo_id()
        api.create_repo(repo_id)
        with monkeypatch.context() as patch:
            if hub_uploads_need_global_endpoint():
                patch.setattr(constants, "ENDPOINT", url)
            api.upload_file(path_or_fileobj=b"served", path_in_repo="a.txt", repo_id=repo_id)
        with open(hf_hub_download(repo_id, "a.txt", endpoint=url), "rb") as f:
            assert f.read() == b"served"
    finally:
        server.send_signal(signum)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in err, err
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/api/whoami-v2", timeout=5)
