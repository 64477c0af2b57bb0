"""Report figures of the fairness family, drawn from logged bias metrics (fake run files)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from sobre.engine.report import COMPARE_PLOTS, PLOTS, RunFiles, _load_plot_plugins
from sobre.fairness import plots


def _metrics(shift: float = 0.0) -> dict[str, float]:
    m = {
        f"test/group/y={y},b={b}": (1.0 if y == b else 0.2 + shift)
        for y in range(3)
        for b in (0, 1, 2)
    }
    del m["test/group/y=2,b=0"]  # an empty group stays blank
    m.update(
        {
            "test/acc": 0.9,
            "test/unbiased": 0.5 + shift,
            "test/aligned": 1.0,
            "test/conflicting": 0.2 + shift,
            "test/worst_group": 0.2,
            "test/biased_acc": 0.99,
        }
    )
    return m


def _run(tmp_path: Path, name: str, metrics: dict, rows: list | None = None) -> RunFiles:
    return RunFiles(tmp_path / name / "t", history={"train": rows or []}, metrics=metrics)


def test_registered_through_the_entry_points() -> None:
    _load_plot_plugins()
    assert {"fairness_groups", "fairness_summary"} <= set(PLOTS.names())
    assert "fairness_methods" in COMPARE_PLOTS.names()


def test_runs_without_bias_metrics_draw_nothing(tmp_path) -> None:
    run = _run(tmp_path, "r", {"test/acc": 0.9})
    assert plots.group_heatmap(run) is None
    assert plots.summary(run) is None
    assert plots.methods([run, run]) is None


def test_heatmap_holds_each_group_and_blanks_empty_ones(tmp_path) -> None:
    fig = plots.group_heatmap(_run(tmp_path, "r", _metrics()))
    grid = fig.axes[0].get_images()[0].get_array()
    assert grid.shape == (3, 3)
    assert grid[1, 1] == pytest.approx(1.0) and grid[0, 1] == pytest.approx(0.2)
    assert math.isnan(float(grid[2, 0]))
    assert "unbiased 50.0 %" in fig.axes[0].get_title()
    plt.close(fig)


def test_summary_and_comparison_bars(tmp_path) -> None:
    rows = [
        {"epoch": float(e), "val/unbiased": 0.1 * e, "val/conflicting": 0.05 * e} for e in range(3)
    ]
    fig = plots.summary(_run(tmp_path, "r", _metrics(), rows))
    bars, curves = fig.axes[:2]
    assert [round(p.get_height()) for p in bars.patches] == [90, 50, 100, 20, 20, 99]
    assert len(curves.get_lines()) == 2
    plt.close(fig)
    fig = plots.methods([_run(tmp_path, "a", _metrics()), _run(tmp_path, "b", _metrics(0.3))])
    assert len(fig.axes[0].patches) == 12
    plt.close(fig)
