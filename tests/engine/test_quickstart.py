"""Slow acceptance runs: the quickstart recipe (the main job) and the README's Python example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import sobre

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_reaches_95_percent_on_mnist5k(runs_dir):
    result = sobre.fit(ROOT / "recipes/quickstart.yaml")
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.95
    for name in (
        "report.md",
        "measure.json",
        "figures/learning_curves.png",
        "checkpoints/train/best.safetensors",
    ):
        assert (result.run_dir / name).is_file()


@pytest.mark.slow
def test_readme_python_example_runs(runs_dir, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].metrics["test/acc"] > 0.9
    assert (namespace["result"].run_dir / "report.md").is_file()
