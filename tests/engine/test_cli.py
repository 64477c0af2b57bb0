"""The ``sobre`` command: exit codes, one-line errors with the fix, and every subcommand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

import sobre
from sobre.engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_bad_input_exits_2_with_the_fix(tmp_path, tiny_recipe, capsys, runs_dir):
    assert main(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    recipe = _write(tmp_path, tiny_recipe)
    assert main(["fit", "--config", str(recipe), "--trainer.max_epoch", "1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'max_epochs'" in err and "Traceback" not in err
    tiny_recipe["data"] = {"name": "cifar10", "root": str(tmp_path / "no-cifar")}
    assert main(["fit", "--config", str(_write(tmp_path, tiny_recipe))]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "download" in err.lower()
    assert main(["fit"]) == 2 and "--config" in capsys.readouterr().err
    assert (
        main(["report", str(tmp_path)]) == 2 and "not a sobre run folder" in capsys.readouterr().err
    )
    assert not runs_dir.exists()


def test_fit_measure_report_recipes(tmp_path, tiny_recipe, capsys, runs_dir):
    recipe = _write(tmp_path, tiny_recipe)
    assert (
        main(
            [
                "fit",
                "--config",
                str(recipe),
                "--trainer.max_epochs",
                "1",
                "--evaluate.report",
                "false",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    run_dir = Path(out.split("run folder: ")[1].splitlines()[0])
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] >= 0
    assert not (run_dir / "report.md").exists()
    best = run_dir / "checkpoints/train/best.safetensors"
    assert main(["measure", "--checkpoint", str(best), "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    measured = json.loads((tmp_path / "m.json").read_text())
    assert "parameters" in table and measured["input_shape"] == [[2, 1, 8, 8]]
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file() and (run_dir / "figures/learning_curves.png").is_file()
    assert main(["recipes", str(ROOT / "recipes")]) == 0
    listing = capsys.readouterr().out
    assert "quickstart.yaml" in listing and "cpu time: " in listing
    assert "gpu time: " in listing  # GPU-scale recipes state their GPU time, not "?"
    assert "? min" not in listing and "not stated" not in listing  # every recipe says its time


def test_python_dash_m_is_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "sobre", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0
    assert all(cmd in proc.stdout for cmd in ("fit", "measure", "report", "recipes"))


def test_report_compares_several_runs(tmp_path, tiny_recipe, capsys, runs_dir):
    tiny_recipe["trainer"]["max_epochs"] = 1
    tiny_recipe["evaluate"] = {"report": False}
    tiny_recipe["stages"] = [{"name": "train"}, {"name": "again"}]
    first = sobre.fit(tiny_recipe).run_dir
    tiny_recipe["model"]["lr"] = 0.003
    second = sobre.fit(tiny_recipe).run_dir
    out = tmp_path / "cmp"
    assert main(["report", str(first), str(second), "--out", str(out)]) == 0
    table = (out / "compare.md").read_text()
    assert f"tiny/{first.name}" in table and f"tiny/{second.name}" in table
    assert (out / "compare.png").stat().st_size > 0
    assert main(["report", str(first), "--out", str(out)]) == 2
    assert "--out is for comparing" in capsys.readouterr().err
