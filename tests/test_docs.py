"""Execute the ```python blocks of the README and the method cards (```py blocks need the Hub and are not run)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "hf_regtools").glob("*/README.md"))]
BLOCKS = [
    pytest.param(block, id=f"{path.relative_to(ROOT)}:{number}")
    for path in DOCUMENTS
    for number, block in enumerate(re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_markdown_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<markdown>", "exec"), {"__name__": "__markdown__"})


def test_there_are_examples():
    assert len(BLOCKS) >= 2
