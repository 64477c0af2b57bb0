"""Every fairness recipe is valid; the GPU-scale ones ask for their local dataset; the CPU ones
run end to end, shortened to 2 epochs (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import sobre
from sobre.core.errors import DataNotFoundError
from sobre.engine.recipes import load_yaml, normalize

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "fairness").glob("*.yaml"))
CPU = [p for p in RECIPES if "cpu_minutes" in load_yaml(p).get("meta", {})]
GPU = [p for p in RECIPES if p not in CPU]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_valid(path):
    recipe = normalize(load_yaml(path))
    meta = recipe["meta"]
    assert meta["description"] and meta["paper"] and meta["expected"]
    assert "cpu_minutes" in meta or "gpu_minutes" in meta


@pytest.mark.parametrize("path", GPU, ids=[p.stem for p in GPU])
def test_gpu_recipes_ask_for_local_data(path, tmp_path, runs_dir):
    with pytest.raises(DataNotFoundError):
        sobre.fit(path, overrides={"data.root": str(tmp_path / "missing")})


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
