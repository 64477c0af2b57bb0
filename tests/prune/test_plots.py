"""The pruning family's report figures reach `sobre report` through the entry point."""

from __future__ import annotations

import json

import sobre
from sobre.engine.report import PLOTS, read_run
from sobre.prune.plots import layer_entropy


def _run_folder(tmp_path, stages: dict) -> object:
    (tmp_path / "config.yaml").write_text("name: t\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"test/acc": 0.9, "stages": stages}))
    return tmp_path


def test_layer_entropy_figure_in_the_report(tmp_path):
    stages = {
        "train": {"val/acc": 0.95},
        "remove_1": {
            "val/acc": 0.94,
            "transforms": [
                {"transform": "Easier", "layer_entropy": {"relu1": 0.9, "relu2": 0.1, "relu3": 0.6}}
            ],
        },
        "remove_2": {
            "val/acc": 0.93,
            "transforms": [{"transform": "Easier", "layer_entropy": {"relu1": 0.8, "relu3": 0.5}}],
        },
    }
    run_dir = _run_folder(tmp_path, stages)
    report = sobre.report(run_dir).read_text()
    assert "prune_layer_entropy" in PLOTS
    assert (run_dir / "figures/prune_layer_entropy.png").stat().st_size > 1000
    assert "figures/prune_layer_entropy.png" in report


def test_no_entropy_no_figure(tmp_path):
    run = read_run(_run_folder(tmp_path, {"train": {"val/acc": 0.9}}))
    assert layer_entropy(run) is None
