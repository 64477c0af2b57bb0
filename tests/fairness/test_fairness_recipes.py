"""The CPU fairness recipes run end to end, shortened to 2 epochs (slow). Validity and the
local-data check of every recipe: tests/engine/test_recipe_files.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import sobre
from sobre.engine.recipes import load_yaml

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "fairness").glob("*.yaml"))
CPU = [p for p in RECIPES if "cpu_minutes" in load_yaml(p).get("meta", {})]


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU, ids=[p.stem for p in CPU])
def test_cpu_recipe_runs_end_to_end(path, runs_dir):
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"]["max_epochs"] = 2
    for stage in recipe.get("stages", []):
        stage["max_epochs"] = min(2, stage.get("max_epochs", 2))  # a 0-epoch mask stage stays
    result = sobre.fit(recipe)
    assert 0.0 <= result.metrics["test/acc"] <= 1.0
    if "test/unbiased" in result.metrics:  # recipes with the BiasMetrics callback
        assert 0.0 <= result.metrics["test/unbiased"] <= 1.0
        assert 0.0 <= result.metrics["test/biased_acc"] <= 1.0
