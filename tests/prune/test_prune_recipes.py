"""Every pruning recipe lists its fit stages; the CPU ones run end to end at one epoch (slow).
Validity and the local-data check of every recipe: tests/engine/test_recipe_files.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import sobre
from sobre.engine.recipes import load_yaml, normalize

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "prune").glob("*.yaml"))


def _is_cpu(path: Path) -> bool:
    return load_yaml(path)["data"].get("name") in {"mnist5k", "digits", "mnist1d"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_lists_its_stages(path):
    assert normalize(load_yaml(path))["stages"], "a pruning recipe lists its fit stages"


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
