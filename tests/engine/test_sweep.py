"""``sobre sweep``: recipes x grid x seeds in one mean ± std table that states the selection
rule; an interrupted sweep continues without re-running finished combinations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sobre.core.errors import ConfigError
from sobre.engine import cli
from sobre.engine.sweep import parse_grid, selection_rule, sweep, tabulate


@pytest.fixture
def two_recipes(tiny_recipe, tmp_path):
    paths = []
    for name, extra in (("plain", {}), ("lastw", {"evaluate": {"checkpoint": "final"}})):
        recipe = {**tiny_recipe, "name": name, **extra}
        recipe["trainer"] = {**recipe["trainer"], "max_epochs": 1}
        recipe.setdefault("evaluate", {}).update(measure=False, report=False)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        paths.append(path)
    return paths


def test_sweep_runs_every_combination_and_resumes(two_recipes, tmp_path, runs_dir) -> None:
    out = tmp_path / "sweep"
    grid = {"model.lr": [0.01, 0.02]}
    result = sweep(two_recipes[:1], out_dir=out, grid=grid, seeds=[0, 1])
    assert len(result.runs) == 4
    assert {(r["setting"]["model.lr"], r["seed"]) for r in result.runs} == {
        (0.01, 0),
        (0.01, 1),
        (0.02, 0),
        (0.02, 1),
    }
    seeds = {
        yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())["data"]["init_args"][
            "seed"
        ]
        for r in result.runs
    }
    assert seeds == {0, 1}  # the seed reaches the data too (order, seeded generation)
    table = (out / "sweep.md").read_text()
    assert "best val/acc (max) of the last stage" in table and "(n=2)" in table
    assert "test/acc" in table
    stamp = (out / "sweep.json").stat().st_mtime_ns
    again = sweep(two_recipes[:1], out_dir=out, grid=grid, seeds=[0, 1])
    assert len(again.runs) == 4 and (out / "sweep.json").stat().st_mtime_ns == stamp
    more = sweep(two_recipes, out_dir=out, grid=grid, seeds=[0, 1])
    assert len(more.runs) == 8
    assert "last epoch (final weights)" in more.table
    assert len(json.loads((out / "sweep.json").read_text())) == 8


def test_tabulate_mean_and_std() -> None:
    runs = [
        {"recipe": "a", "setting": {}, "seed": s, "selection": "x", "metrics": {"test/acc": v}}
        for s, v in ((0, 0.5), (1, 0.7))
    ]
    runs[0]["metrics"]["test/group/y=0,b=0"] = 1.0
    table = tabulate(runs)
    assert "60.0 ± 14.1 (n=2)" in table and "group" not in table


def test_bad_input_is_named(two_recipes, tmp_path) -> None:
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid(["data.rho"])
    with pytest.raises(ConfigError, match="seed"):
        sweep(two_recipes, out_dir=tmp_path / "o", seeds=[])
    with pytest.raises(ConfigError, match="no value"):
        sweep(two_recipes, out_dir=tmp_path / "o", grid={"model.lr": []})
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        sweep(two_recipes, out_dir=tmp_path / "o", grid={"model.lrr": [0.1]})
    assert not (tmp_path / "o" / "sweep.json").exists()
    assert selection_rule({"evaluate": {"monitor": "val/loss"}}).startswith("best val/loss (min)")


def test_cli_sweep(two_recipes, tmp_path, runs_dir, capsys) -> None:
    code = cli.main(
        [
            "sweep",
            str(two_recipes[0]),
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "c"),
            "--trainer.max_epochs",
            "1",
        ]
    )
    assert code == 0
    assert "| plain | - | best val/acc" in capsys.readouterr().out
