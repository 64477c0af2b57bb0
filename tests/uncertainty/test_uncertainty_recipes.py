"""The CPU uncertainty recipes run end to end at one epoch (slow). Validity and the local-data
check of every recipe: tests/engine/test_recipe_files.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import sobre
from sobre.engine.recipes import load_yaml

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "uncertainty").glob("*.yaml"))
CPU = [p for p in RECIPES if load_yaml(p)["data"]["name"] == "mnist5k"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU, ids=[p.stem for p in CPU])
def test_cpu_recipe_runs_end_to_end(path, runs_dir):
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"]["max_epochs"] = 1
    result = sobre.fit(recipe)
    assert 0.0 <= result.metrics["test/ece15"] <= 1.0
    assert "ood/photo_crops/msp/auroc" in result.metrics
    assert (result.run_dir / "figures" / "uncertainty_reliability.png").is_file()
