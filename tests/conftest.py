"""Test environment: isolated HF home, loopback fake Hub, network guard.

`huggingface_hub` reads its environment at import time, so everything here runs before the first
import of `huggingface_hub`, `transformers` or `timm` (see `../shared/specs/hub_testing.md`).
"""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="hf_regtools_tests_home_")
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN_PATH"):
    os.environ.pop(_var, None)
os.environ.update(
    HF_HOME=_HF_HOME,
    HF_HUB_CACHE=os.path.join(_HF_HOME, "hub"),
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    HF_TOKEN="hf_fake",
    TOKENIZERS_PARALLELISM="false",
)

from hf_regtools.testing.fake_hub import FakeHub  # noqa: E402  (stdlib only)

_FAKE_HUB = FakeHub().start()
os.environ["HF_ENDPOINT"] = _FAKE_HUB.url

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from hf_regtools.testing.network import install_network_guard  # noqa: E402

install_network_guard()

CLI_BOOTSTRAP = """
import json, sys
from hf_regtools.testing.network import install_network_guard
install_network_guard(allow_loopback=sys.argv[1] == "loopback")
from hf_regtools.cli import main
print("EXIT_CODES", json.dumps([main(argv) for argv in json.loads(sys.argv[2])]))
"""


def run_cli(calls, env, *, allow_loopback=True):
    """Run `hf-regtools` calls (lists of arguments) in one fresh process; returns (exit codes, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-c", CLI_BOOTSTRAP, "loopback" if allow_loopback else "none", json.dumps(calls)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("EXIT_CODES")]
    assert lines, f"CLI process failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].split(" ", 1)[1]), proc.stdout, proc.stderr


@pytest.fixture
def fake_hub():
    """The session's loopback fake Hub (the one `HF_ENDPOINT` points to), with faults cleared."""
    _FAKE_HUB.clear_faults()
    yield _FAKE_HUB
    _FAKE_HUB.clear_faults()


@pytest.fixture(autouse=True)
def _mixed_precision_stays_in_its_test():
    """transformers 4.57's `TrainingArguments(bf16=True)` (or fp16) writes `ACCELERATE_MIXED_PRECISION` into
    `os.environ`, and every later `TrainingArguments` of the process, and every subprocess, takes it as its default:
    without this, the tests after a bf16 test would all train under bf16 autocast."""
    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    yield
    if before is None:
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    else:
        os.environ["ACCELERATE_MIXED_PRECISION"] = before


@pytest.fixture(autouse=True)
def _torch_threads_stay_in_their_test():
    """A test that sets `torch.set_num_threads` (the digits reproductions run on one thread) leaves the rest of the
    process as it was: tests comparing an in-process run with a subprocess (the CLI tests) need the same threads."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hub_env():
    """Environment for subprocesses that must talk to the session's fake Hub."""
    env = dict(os.environ)
    env["HF_ENDPOINT"] = _FAKE_HUB.url
    return env


def pytest_sessionfinish(session, exitstatus):
    _FAKE_HUB.stop()


@pytest.fixture
def cli():
    """`cli(calls, env, allow_loopback=True)`: run `hf-regtools` argument lists in one guarded subprocess."""
    return run_cli
