"""Test environment: isolated HF home, loopback fake Hub, network guard.

`huggingface_hub` reads its environment at import time, so everything here runs before the first
import of `huggingface_hub`, `transformers` or `timm` (see `../shared/specs/hub_testing.md`).
"""

import os
import socket
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

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "localhost", "::1"):
        raise OSError(f"network guard: tests may only connect to loopback, not {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only_connect


@pytest.fixture
def fake_hub():
    """The session's loopback fake Hub (the one `HF_ENDPOINT` points to), with faults cleared."""
    _FAKE_HUB.clear_faults()
    yield _FAKE_HUB
    _FAKE_HUB.clear_faults()


@pytest.fixture
def hub_env():
    """Environment for subprocesses that must talk to the session's fake Hub."""
    env = dict(os.environ)
    env["HF_ENDPOINT"] = _FAKE_HUB.url
    return env


def pytest_sessionfinish(session, exitstatus):
    _FAKE_HUB.stop()
