"""Every pruning recipe is valid; the CPU ones run end to end at one epoch (slow), the GPU-scale
ones ask for their local dataset instead of downloading it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import sobre
from sobre.core.errors import DataNotFoundError
from sobre.engine.recipes import load_yaml, normalize

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "prune").glob("*.yaml"))


def _is_cpu(path: Path) -> bool:
    return load_yaml(path)["data"].get("name") in {"mnist5k", "digits", "mnist1d"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_valid(path):
    recipe = normalize(load_yaml(path))
    assert recipe["meta"]["paper"] and recipe["meta"]["expected"]
    assert recipe["stages"], "a pruning recipe lists its fit stages"


@pytest.mark.parametrize(
    "path", [p for p in RECIPES if not _is_cpu(p)], ids=[p.stem for p in RECIPES if not _is_cpu(p)]
)
def test_gpu_recipes_ask_for_local_data(path, tmp_path, runs_dir):
    with pytest.raises(DataNotFoundError, match="download"):
        sobre.fit(path, overrides={"data.root": str(tmp_path / "missing")})


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", [p for p in RECIPES if _is_cpu(p)], ids=[p.stem for p in RECIPES if _is_cpu(p)]
)
def test_cpu_recipe_runs_end_to_end(path, runs_dir):
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"]["max_epochs"] = 1
    for stage in recipe["stages"]:
        if stage.get("max_epochs"):
            stage["max_epochs"] = 1
        stage["repeat"] = min(stage.get("repeat", 1), 2)
    result = sobre.fit(recipe)
    assert 0.0 <= result.metrics["test/acc"] <= 1.0
    assert list(result.metrics["stages"])[-1]
    assert (result.run_dir / "report.md").is_file()
