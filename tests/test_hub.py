"""Hub pull and push without network: a hand-filled offline cache and the loopback fake Hub (hub_testing.md)."""

import json
import os
import re
import uuid
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download

from hf_regtools._compat import transformers_model_key
from hf_regtools.adapters import UnsupportedModelError, save_model
from hf_regtools.hub import HubError, build_model_card, load_model, push_folder, resolve_model
from hf_regtools.testing.assertions import assert_same_weights
from hf_regtools.testing.offline_cache import add_to_cache, hub_offline
from hf_regtools.testing.tiny_models import timm_vit, transformers_vit
from hf_regtools.weight_selection import initialize_student, uniform_indices


def repo(name="tiny"):
    return f"org/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def teachers(tmp_path):
    torch.manual_seed(0)
    models = {"timm": timm_vit(embed_dim=16, depth=3), "transformers": transformers_vit(hidden_size=16, num_hidden_layers=3)}
    folders = {}
    for library, model in models.items():
        folders[library] = tmp_path / f"teacher_{library}"
        save_model(model, folders[library])
    return models, folders


def test_offline_cache_pull_with_cli(tmp_path, teachers, cli):
    models, folders = teachers
    cache = tmp_path / "cache"
    repos = {library: repo(f"teacher-{library}") for library in folders}
    shas = {library: add_to_cache(cache, repos[library], folder) for library, folder in folders.items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"}
    calls = [
        ["select", f"hf-hub:{repos['timm']}", "--hidden-size", "8", "--depth", "2", "--output", str(tmp_path / "s_timm")],
        ["select", repos["transformers"], "--hidden-size", "8", "--depth", "2", "--num-labels", "4",
         "--output", str(tmp_path / "s_hf")],
        ["select", "org/not-in-cache", "--student", "vit-tiny", "--output", str(tmp_path / "missing")],
    ]
    codes, out, err = cli(calls, env, allow_loopback=False)
    assert codes == [0, 0, 2], err
    assert "not in the local cache" in err and "network guard" not in err + out
    assert not (tmp_path / "missing").exists()

    import timm
    from transformers import ViTForImageClassification

    student = timm.create_model(f"local-dir:{tmp_path / 's_timm'}", pretrained=True)
    idx = uniform_indices(16, 8)
    assert torch.equal(student.blocks[1].attn.qkv.weight, models["timm"].blocks[1].attn.qkv.weight[
        torch.cat([uniform_indices(16, 8) + i * 16 for i in range(3)])][:, idx])
    hf_student = ViTForImageClassification.from_pretrained(tmp_path / "s_hf")
    assert hf_student.config.num_labels == 4
    fc2 = "vit.encoder.layer.1.output.dense.weight"  # as saved; transformers 5 names it vit.layers.1.mlp.fc2.weight
    teacher_fc2 = models["transformers"].state_dict()[transformers_model_key(models["transformers"], fc2)]
    assert torch.equal(hf_student.state_dict()[transformers_model_key(hf_student, fc2)],
                       teacher_fc2[idx][:, uniform_indices(32, 16)])
    for library in ("timm", "transformers"):
        card = ModelCard.load(tmp_path / ("s_timm" if library == "timm" else "s_hf") / "README.md")
        assert card.data.base_model == repos[library] and card.data.library_name == library
        assert shas[library] in card.text


def test_offline_missing_file_raises_clear_error(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "t"
    save_model(timm_vit(), folder)
    (folder / "model.safetensors").unlink()
    cache = tmp_path / "cache"
    repo_id = repo()
    add_to_cache(cache, repo_id, folder)
    with hub_offline():
        from transformers.utils.hub import is_offline_mode

        assert is_offline_mode()
        with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
            hf_hub_download(repo_id, "model.safetensors", cache_dir=cache)
        with pytest.raises(HubError, match="not in the local cache and HF_HUB_OFFLINE=1 is set"):
            resolve_model("org/absent", revision=None)
    assert not is_offline_mode()


def test_push_then_pull_round_trip(tmp_path, teachers, fake_hub):
    models, folders = teachers
    for library in ("timm", "transformers"):
        teacher_repo, student_repo = repo("teacher"), repo("student")
        push_folder(folders[library], teacher_repo)
        result = initialize_student(teacher_repo, hidden_size=8, depth=2)
        assert result.teacher == teacher_repo and result.teacher_revision == fake_hub.commits(teacher_repo)[-1]
        out = result.save(tmp_path / f"student_{library}")
        sha = push_folder(out, student_repo)
        assert len(sha) == 40 and fake_hub.commits(student_repo) == [sha]

        for path in sorted(p.name for p in out.iterdir()):
            assert Path(hf_hub_download(student_repo, path)).read_bytes() == (out / path).read_bytes()
        snapshot = Path(snapshot_download(student_repo))
        assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in out.iterdir())
        assert snapshot.parent.parent.joinpath("refs", "main").read_text() == sha

        card = ModelCard.load(student_repo)
        assert card.data.base_model == teacher_repo and card.data.library_name == library
        assert {"hf-regtools", "weight-selection"} <= set(card.data.tags)
        assert "`uniform`" in card.text and "per_chunk" in card.text

        if library == "timm":
            import timm

            reloaded = timm.create_model(f"hf-hub:{student_repo}", pretrained=True)
        else:
            from transformers import AutoModelForImageClassification

            reloaded = AutoModelForImageClassification.from_pretrained(student_repo)
        assert_same_weights(reloaded, result.model)
        assert_same_weights(load_model(student_repo), result.model)

        (out / "extra.txt").write_text("second push")
        second = push_folder(out, student_repo)
        assert second != sha and fake_hub.commits(student_repo) == [sha, second]
        assert fake_hub.files(student_repo)["model.safetensors"] == (out / "model.safetensors").read_bytes()
        assert "extra.txt" in fake_hub.files(student_repo) and "extra.txt" not in fake_hub.files(student_repo, sha)
    assert HfApi().create_repo(student_repo, exist_ok=True).repo_id == student_repo


def test_cli_push_and_hub_errors(tmp_path, teachers, fake_hub, hub_env, cli):
    _, folders = teachers
    teacher_repo, student_repo = repo("teacher"), repo("student")
    push_folder(folders["timm"], teacher_repo)
    secret = "hf_SECRETtoken" + uuid.uuid4().hex
    env = {**hub_env, "HF_TOKEN": secret}
    base = ["select", teacher_repo, "--hidden-size", "8", "--depth", "2"]
    codes, out, err = cli([[*base, "--output", str(tmp_path / "ok"), "--push-to-hub", student_repo],
                           ["select", "org/does-not-exist", "--hidden-size", "8", "--output", str(tmp_path / "nf")]], env)
    assert codes == [0, 2], err
    assert f"pushed to {student_repo}" in out and "repository not found" in err
    assert fake_hub.files(student_repo).keys() == {"README.md", "config.json", "model.safetensors"}

    fake_hub.add_fault("POST", r"/api/repos/create", 401)
    codes, out, err = cli([[*base, "--output", str(tmp_path / "unauth"), "--push-to-hub", repo()]], env)
    fake_hub.clear_faults()
    fake_hub.add_fault("POST", r"/commit/", 500)
    codes2, out2, err2 = cli([[*base, "--output", str(tmp_path / "down"), "--push-to-hub", repo()]], env)
    fake_hub.clear_faults()
    assert codes == [2] and "not authorized (HTTP 401)" in err and "intact" in err
    assert codes2 == [2] and "server error (HTTP 500)" in err2
    for name in ("unauth", "down"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["README.md", "config.json", "model.safetensors"]

    everything = out + err + out2 + err2 + "".join(
        p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file() and p.suffix in ("", ".md", ".json"))
    assert secret not in everything


def test_model_card_template():
    card = build_model_card("weight_selection", card_data=dict(base_model="org/teacher", library_name="timm",
                                                              tags=["weight-selection"]),
                            teacher="org/teacher", teacher_revision="a" * 40, library="timm", family="timm vit",
                            student_source="preset vit-tiny", architecture="vit", parameters="5.7M",
                            settings={"mode": "uniform"}, loaded=10, skipped={"head.weight": "classifier"},
                            paper="P", arxiv="2311.18823", code_repo="OscarXZQ/weight-selection")
    assert card.data.tags == ["hf-regtools", "weight-selection"] and card.data.base_model == "org/teacher"
    assert "`head.weight`: classifier" in card.text and "hf-hub:" in card.text


def test_pull_errors_and_student_config_from_the_hub(tmp_path, teachers, fake_hub):
    _, folders = teachers
    teacher_repo, student_config_repo = repo("teacher"), repo("student-config")
    push_folder(folders["transformers"], teacher_repo)
    (tmp_path / "cfg").mkdir()
    transformers_vit(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16,
                     num_labels=2).config.save_pretrained(tmp_path / "cfg")
    push_folder(tmp_path / "cfg", student_config_repo)
    result = initialize_student(teacher_repo, student_config_repo)
    assert result.student_source == f"config {student_config_repo}" and result.model.config.num_hidden_layers == 1

    other = repo("teacher")
    push_folder(folders["timm"], other)
    for status, message in ((401, "not authorized (HTTP 401)"), (500, "server error (HTTP 500)")):
        fake_hub.add_fault("GET", rf"/api/models/{other}/revision", status)
        with pytest.raises(HubError, match=re.escape(message)) as raised:
            resolve_model(other)
        assert "write access" not in str(raised.value)
        fake_hub.clear_faults()


def test_push_errors_without_http_status(tmp_path, teachers, fake_hub, monkeypatch):
    from hf_regtools._compat import hub_client_errors
    from hf_regtools.hub import hub_errors, push_target

    _, folders = teachers
    with hub_offline():
        for push in (lambda: push_target(repo()), lambda: push_folder(folders["timm"], repo())):
            with pytest.raises(HubError, match=re.escape("offline mode is on (HF_HUB_OFFLINE=1)")):
                push()
    with monkeypatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
        for push in (lambda: push_target(repo()), lambda: push_folder(folders["timm"], repo())):
            with pytest.raises(HubError, match=re.escape("cannot reach the Hub at http://127.0.0.1:9 (Connection "
                                                         "refused)")):
                push()
    _, _, timeouts = hub_client_errors()
    for timeout in {timeouts[0], TimeoutError}:
        with pytest.raises(HubError, match=r"cannot push to 'org/x': the Hub at .* did not answer in time \(timed out"):
            with hub_errors("cannot push to", "org/x", write=True):
                raise timeout("timed out")
    fake_hub.add_fault("POST", r"/api/repos/create", None)
    with pytest.raises(HubError, match="cannot reach the Hub"):
        push_folder(folders["timm"], repo())
    fake_hub.clear_faults()


def test_push_target_checks_the_token_and_resolves_the_namespace(fake_hub, monkeypatch):
    from hf_regtools.hub import push_target

    assert push_target("org/name") == "org/name"
    assert push_target("name") == f"{fake_hub.user}/name"
    fake_hub.add_fault("GET", r"^/api/whoami-v2$", 401, message="Invalid credentials in Authorization header")
    with pytest.raises(HubError, match=re.escape("not authorized (HTTP 401)") + ".*write access"):
        push_target("org/name")
    fake_hub.clear_faults()
    monkeypatch.setattr(fake_hub, "token_role", "read")
    with pytest.raises(HubError, match="is read-only"):
        push_target("org/name")
    monkeypatch.undo()
    with pytest.raises(HubError, match="not a valid repo id"):
        push_target("org/x/y")


def test_mistyped_local_paths_say_no_such_folder(tmp_path, monkeypatch, fake_hub):
    """Issue 7: a mistyped path was reported as "repository not found ... log in"."""
    torch.manual_seed(0)
    save_model(timm_vit(), tmp_path / "teacher")
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    requests_before = len(fake_hub.requests)
    for reference in ("./teachr", "teachr/", str(tmp_path / "nope"), "~/models/x", "../nope/a/b"):
        with pytest.raises(HubError, match=r"no folder .* exists") as raised:
            resolve_model(reference)
        assert "repository not found" not in str(raised.value) and "log in" not in str(raised.value)
    assert "Did you mean 'teacher'?" in str(pytest.raises(HubError, resolve_model, "./teachr").value)
    assert len(fake_hub.requests) == requests_before  # paths that cannot be repo ids never reach the Hub
    with pytest.raises(HubError, match=r"'models/vit' is neither a local folder \(no .*models/vit\) nor a Hub repo: "
                                       r"cannot fetch 'models/vit': repository not found"):
        resolve_model("models/vit")
    assert resolve_model("~/teacher").folder == tmp_path / "teacher"


def _teacher_weight_downloads(fake_hub, repo_id, start):
    return [path for method, path in fake_hub.requests[start:] if repo_id in path and path.endswith(".safetensors")]


def test_bad_student_is_reported_before_teacher_weights_are_fetched(tmp_path, teachers, fake_hub):
    """Issue 7: the teacher's weights were fetched first, and a bad student id did not say it was the student."""
    _, folders = teachers
    teacher_repo = repo("teacher")
    push_folder(folders["timm"], teacher_repo)
    (tmp_path / "no_config").mkdir()
    bad = [("vit-hugee", ValueError, "unknown student preset 'vit-hugee'"),
           ("org/no-such-student", HubError, "the student 'org/no-such-student': .*repository not found"),
           (str(tmp_path / "no_config"), HubError, "the student .*no_config.* has no config.json"),
           ("convnext-femto", UnsupportedModelError, "preset 'convnext-femto' is a hierarchical model")]
    for student, error, message in bad:
        start = len(fake_hub.requests)
        with pytest.raises(error, match=message):
            initialize_student(teacher_repo, student)
        assert _teacher_weight_downloads(fake_hub, teacher_repo, start) == []
    start = len(fake_hub.requests)
    initialize_student(teacher_repo, hidden_size=8, depth=1)
    assert _teacher_weight_downloads(fake_hub, teacher_repo, start)


def _config_only_teachers(tmp_path):
    """A timm MobileNetV3 and a transformers DistilBERT, as configs only: the family is known before any weight is
    read."""
    from transformers import DistilBertConfig

    (tmp_path / "mobilenet").mkdir()
    (tmp_path / "mobilenet" / "config.json").write_text(json.dumps(
        {"architecture": "mobilenetv3_small_050", "num_classes": 2, "pretrained_cfg": {"num_classes": 2}}))
    DistilBertConfig(dim=8, n_layers=1, n_heads=1, hidden_dim=8).save_pretrained(tmp_path / "distilbert")
    return {"timm mobilenetv3_small_050": tmp_path / "mobilenet", "transformers distilbert": tmp_path / "distilbert"}


def test_unsupported_families_are_named(tmp_path):
    """Issue 7: unsupported teachers were described by their state-dict keys."""
    for name, folder in _config_only_teachers(tmp_path).items():
        message = f"the teacher ({name}) is not of a supported family for weight selection. Supported: timm vit, "
        with pytest.raises(UnsupportedModelError, match=re.escape(message)):
            initialize_student(folder, hidden_size=8)


def test_cli_reports_mistyped_paths_unsupported_families_and_bad_students(tmp_path, cli, hub_env):
    teachers = _config_only_teachers(tmp_path)
    save_model(timm_vit(), tmp_path / "teacher")
    out = ["--output", str(tmp_path / "out")]
    codes, _, err = cli([["select", str(tmp_path / "teachr"), "--student", "vit-tiny", *out],
                         ["select", str(teachers["timm mobilenetv3_small_050"]), "--hidden-size", "8", *out],
                         ["select", str(teachers["transformers distilbert"]), "--hidden-size", "8", *out],
                         ["select", str(tmp_path / "teacher"), "--student", "org/no-such-student", *out]], hub_env)
    assert codes == [2, 2, 2, 2], err
    assert f"no folder '{tmp_path / 'teachr'}' exists" in err and "Did you mean" in err
    assert "(timm mobilenetv3_small_050) is not of a supported family for weight selection" in err
    assert "(transformers distilbert) is not of a supported family for weight selection" in err
    assert "the student 'org/no-such-student'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
