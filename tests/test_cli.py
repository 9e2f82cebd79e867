"""`hf-regtools`: a fast parser, checks before the work, clear errors, clean interrupts."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from hf_regtools import __version__, cli
from hf_regtools._registry import list_techniques
from hf_regtools.adapters import PRESETS, save_model
from hf_regtools.hub import push_folder
from hf_regtools.testing.tiny_models import timm_vit

OUTPUT_FILES = ["README.md", "config.json", "model.safetensors"]

# Runs the CLI in a guarded process whose student save writes the whole weights file, says so and then hangs, so
# that a signal arrives during the write.
SLOW_SAVE_BOOTSTRAP = """
import sys, time
from pathlib import Path
from hf_regtools.testing.network import install_network_guard
install_network_guard()
import hf_regtools.adapters.timm as timm_adapter
real_save = timm_adapter.save
def slow_save(model, folder):
    real_save(model, folder)
    Path(sys.argv[1]).write_text(str(folder))
    time.sleep(300)
timm_adapter.save = slow_save
from hf_regtools.cli import main
sys.exit(main(sys.argv[2:]))
"""

# Runs the CLI with every rename failing as it does into a busy mount point.
BUSY_RENAME_BOOTSTRAP = """
import errno, os, sys
def busy(*args, **kwargs):
    raise OSError(errno.EBUSY, "Device or resource busy")
os.replace = os.rename = busy
from hf_regtools.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher") / "vit"
    save_model(timm_vit(embed_dim=16, depth=3), folder)
    return folder


def repo(name="student"):
    return f"org/{name}-{uuid.uuid4().hex[:8]}"


def select(teacher, output, *extra):
    return ["select", str(teacher), "--hidden-size", "8", "--depth", "2", "--output", str(output), *extra]


def test_parser_and_list_import_neither_torch_nor_model_libraries():
    heavy = "print('HEAVY', [m for m in ('torch', 'transformers', 'timm', 'huggingface_hub') if m in sys.modules])"
    code = f"import sys\nfrom hf_regtools.cli import _parser, main\n_parser().format_help()\nmain(['list'])\n{heavy}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "HEAVY []"
    for argv in (["--help"], ["select", "--help"], ["--version"]):
        code = f"import sys\nfrom hf_regtools.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        code += heavy
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.splitlines()[-1] == "HEAVY []"


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                assert subparser.description, f"`{name}` has no description"
                yield from _actions(subparser)
        else:
            yield parser.prog, action


def test_help_describes_every_option_and_preset(capsys):
    parser = cli._parser()
    undescribed = [(prog, action.dest) for prog, action in _actions(parser) if not action.help]
    assert undescribed == []
    student = next(action for prog, action in _actions(parser) if action.dest == "student" and "select" in prog)
    assert all(preset in student.help for preset in PRESETS)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"hf-regtools {__version__}"


def test_list_names_the_trainer_classes(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    dropout = {"DropScheduleCallback", "EarlyDropoutCallback", "LateDropoutCallback", "EarlyStochasticDepthCallback",
               "LateStochasticDepthCallback"}
    assert all(name in out for name in {*dropout, "AlphaSVRG", "AlphaSVRGTrainerMixin"})
    from importlib import import_module

    from transformers import TrainerCallback

    for info in list_techniques():
        for kind, targets in cli._trainer_classes(info).items():
            for target in targets:
                module, _, name = target.partition(":")
                loaded = getattr(import_module(module), name)
                assert name in out and isinstance(loaded, type)
                if kind == "callbacks":
                    assert issubclass(loaded, TrainerCallback)
    assert dropout == {target.partition(":")[2] for target in cli._trainer_classes(
        next(info for info in list_techniques() if info.name == "dropout_schedules"))["callbacks"]}


def test_checks_before_the_work(tmp_path, teacher, fake_hub, hub_env, cli):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    absent_teacher = repo("teacher")
    requests_before = len(fake_hub.requests)
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    unreachable = {**hub_env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    no_token = {**hub_env, "HF_TOKEN": ""}
    runs = [
        (hub_env, select(absent_teacher, full, "--push-to-hub", repo()), "pass --overwrite to replace its content"),
        (offline, select(absent_teacher, tmp_path / "off", "--push-to-hub", repo()),
         "offline mode is on (HF_HUB_OFFLINE=1)"),
        (unreachable, select(absent_teacher, tmp_path / "down", "--push-to-hub", repo()),
         "cannot reach the Hub at http://127.0.0.1:9 (Connection refused)"),
        (no_token, select(absent_teacher, tmp_path / "anon", "--push-to-hub", repo()), "not logged in"),
        (hub_env, select(absent_teacher, tmp_path / "bad", "--push-to-hub", "org/x/y"), "not a valid repo id"),
    ]
    for env, argv, message in runs:
        codes, out, err = cli([argv], env)
        assert codes == [2] and message in err and "Traceback" not in err, err
    assert (full / "notes.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert not any(absent_teacher in path for _, path in fake_hub.requests[requests_before:])


def test_push_to_own_namespace_and_failures_without_status(tmp_path, teacher, fake_hub, hub_env, cli):
    name = f"student-{uuid.uuid4().hex[:8]}"
    codes, out, err = cli([select(teacher, tmp_path / "own", "--push-to-hub", name)], hub_env)
    assert codes == [0], err
    assert f"pushed to {fake_hub.user}/{name}" in out
    assert sorted(fake_hub.files(f"{fake_hub.user}/{name}")) == OUTPUT_FILES

    fake_hub.add_fault("POST", r"/api/repos/create", None)
    codes, out, err = cli([select(teacher, tmp_path / "dropped", "--push-to-hub", repo())], hub_env)
    fake_hub.clear_faults()
    assert codes == [2] and "Traceback" not in err, err
    assert "cannot reach the Hub" in err and "is complete and intact" in err
    assert sorted(p.name for p in (tmp_path / "dropped").iterdir()) == OUTPUT_FILES


def test_card_names_the_pushed_repo(tmp_path, teacher, fake_hub, capsys):
    name = f"student-{uuid.uuid4().hex[:8]}"
    assert cli.main(select(teacher, tmp_path / "pushed", "--push-to-hub", name)) == 0
    assert cli.main(select(teacher, tmp_path / "local")) == 0
    assert f"pushed to {fake_hub.user}/{name}" in capsys.readouterr().out
    pushed_card = (tmp_path / "pushed" / "README.md").read_text()
    assert f"{fake_hub.user}/{name}" in pushed_card and "<this repo>" not in pushed_card
    assert "<this repo>" in (tmp_path / "local" / "README.md").read_text()


def _run_until_saved(tmp_path, argv, env):
    marker = tmp_path / f"saving-{uuid.uuid4().hex[:6]}"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE_BOOTSTRAP, str(marker), *argv], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the CLI never reached the write"
        time.sleep(0.1)
    staging = Path(marker.read_text())
    assert (staging / "model.safetensors").stat().st_size > 0
    return process, staging


@pytest.mark.parametrize("signum, code, message", [(signal.SIGTERM, 143, "terminated"),
                                                   (signal.SIGINT, 130, "interrupted")])
def test_signal_during_the_write_cleans_up(tmp_path, teacher, hub_env, signum, code, message):
    target = tmp_path / "out"
    process, staging = _run_until_saved(tmp_path, select(teacher, target), hub_env)
    assert staging.name.startswith(f".out.partial-{process.pid}-")
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.strip() == f"hf-regtools select: {message}"
    assert not staging.exists() and not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("saving-")] == []


def test_later_run_removes_the_partial_output_of_a_killed_run(tmp_path, teacher, hub_env, cli):
    target = tmp_path / "out"
    process, staging = _run_until_saved(tmp_path, select(teacher, target), hub_env)
    process.kill()
    process.communicate(timeout=60)
    assert staging.exists()
    codes, out, err = cli([select(teacher, target)], hub_env)
    assert codes == [0], err
    assert not staging.exists() and sorted(p.name for p in target.iterdir()) == OUTPUT_FILES
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("saving-")) == ["out"]


def test_output_errors_are_reported_without_traceback(tmp_path, teacher, hub_env):
    target = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", BUSY_RENAME_BOOTSTRAP, *select(teacher, target)], env=hub_env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("hf-regtools select: error: cannot move") and "Device or resource busy" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_select_into_existing_empty_folder_and_overwrite(tmp_path, teacher, cli, hub_env):
    target = tmp_path / "volume"
    target.mkdir()
    codes, out, err = cli([select(teacher, target), select(teacher, target), select(teacher, target, "--overwrite")],
                          hub_env)
    assert codes == [0, 2, 0], err
    assert "pass --overwrite" in err and sorted(p.name for p in target.iterdir()) == OUTPUT_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    assert json.loads((target / "config.json").read_text())["model_args"]["embed_dim"] == 8


def test_push_folder_resolves_a_bare_name(tmp_path, teacher, fake_hub):
    name = f"teacher-{uuid.uuid4().hex[:8]}"
    sha = push_folder(teacher, name)
    assert fake_hub.commits(f"{fake_hub.user}/{name}") == [sha]
    assert os.environ["HF_ENDPOINT"] == fake_hub.url
