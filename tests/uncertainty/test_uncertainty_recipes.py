"""Every uncertainty recipe is valid; the CPU ones run end to end at one epoch (slow), the
GPU-scale ones ask for their local dataset instead of downloading it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import sobre
from sobre.core.errors import DataNotFoundError
from sobre.engine.recipes import load_yaml, normalize

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "uncertainty").glob("*.yaml"))
CPU = [p for p in RECIPES if load_yaml(p)["data"]["name"] == "mnist5k"]
GPU = [p for p in RECIPES if p not in CPU]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_valid(path):
    recipe = normalize(load_yaml(path))
    assert recipe["meta"]["paper"] and recipe["meta"]["expected"]


@pytest.mark.parametrize("path", GPU, ids=[p.stem for p in GPU])
def test_gpu_recipes_ask_for_local_data(path, tmp_path, runs_dir):
    with pytest.raises(DataNotFoundError, match="download"):
        sobre.fit(path, overrides={"data.root": str(tmp_path / "missing")})


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU, ids=[p.stem for p in CPU])
def test_cpu_recipe_runs_end_to_end(path, runs_dir):
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"]["max_epochs"] = 1
    result = sobre.fit(recipe)
    assert 0.0 <= result.metrics["test/ece15"] <= 1.0
    assert "ood/photo_crops/msp/auroc" in result.metrics
    assert (result.run_dir / "figures" / "uncertainty_reliability.png").is_file()
