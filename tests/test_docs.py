"""The Python examples of the docs pages run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = [
    pytest.param(code, id=f"{page.name}-{i}")
    for page in sorted(DOCS.glob("*.md"))
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_docs_example_runs(code, capsys, runs_dir):
    namespace: dict = {}
    exec(compile(code, "docs", "exec"), namespace)  # our own docs
    assert capsys.readouterr().out.strip(), "a docs example should show something"
