import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_regtools import _registry
from hf_regtools._registry import TechniqueInfo, get_technique, list_techniques, register

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = list_techniques()


def test_importing_the_package_is_light():
    code = ("import sys, hf_regtools; hf_regtools.list_techniques(); "
            "print(*('torch' in sys.modules, 'transformers' in sys.modules, 'timm' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_every_technique_registers_from_its_own_folder():
    folders = _registry.technique_folders()
    assert set(folders) == set(_registry.TECHNIQUES), "each technique.py registers the technique named as its folder"
    with_metadata = {path.parent.name for path in (ROOT / "hf_regtools").glob("*/metadata.json")}
    assert with_metadata == set(folders), "a folder with metadata.json lacks technique.py (or the other way round)"
    for folder in folders:
        source = (ROOT / "hf_regtools" / folder / "technique.py").read_text()
        assert not re.search(r"^\s*(import|from)\s+(torch|transformers|timm|numpy)\b", source, re.M), folder


@pytest.mark.parametrize("info", TECHNIQUES, ids=lambda info: info.name)
def test_every_technique_is_complete(info):
    folder = ROOT / "hf_regtools" / info.name
    card = (folder / "README.md").read_text()
    for section in ("## How to use", "## Suggested hyperparameters", "## Technical details", "## Faithfulness",
                    "## Unverified", "## Attribution"):
        assert section in card, f"{info.name} method card lacks {section!r}"
    metadata = info.metadata()
    assert metadata["name"] == info.title and info.arxiv in metadata["link"]
    for kind in info.entry_points:
        assert callable(info.load(kind))
    assert info.has_trainer_component == (info.harness is not None)


@pytest.mark.parametrize("info", TECHNIQUES, ids=lambda info: info.name)
def test_docs_and_cli_enumerate_every_technique(info):
    assert f"`{info.name}`" in (ROOT / "docs" / "techniques.md").read_text()
    out = subprocess.run([sys.executable, "-m", "hf_regtools.cli", "list"], capture_output=True, text=True, check=True).stdout
    assert re.search(rf"^{info.name}\s", out, re.M)


def test_registration_rules():
    with pytest.raises(ValueError, match="already registered"):
        register(get_technique("weight_selection"))
    with pytest.raises(ValueError, match="no harness settings"):
        register(TechniqueInfo(name="x", title="x", paper="x", arxiv="0", code_repo="", functional="m:f",
                               callback="m:C"))
    assert "x" not in _registry.TECHNIQUES
    with pytest.raises(KeyError, match="registered: "):
        get_technique("nope")
