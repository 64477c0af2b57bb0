"""Report figures of the efficient family, drawn from logged per-epoch rows (fake run files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from sobre.efficient import plots
from sobre.engine.report import COMPARE_PLOTS, PLOTS, RunFiles, _load_plot_plugins


def _run(tmp_path: Path, rows: list[dict[str, float]], metrics: dict | None = None, name="r"):
    return RunFiles(tmp_path / name / "t", history={"train": rows}, metrics=metrics or {})


def test_plots_are_registered_through_the_entry_points():
    _load_plot_plugins()
    assert {"efficient_trainable", "efficient_cost", "efficient_velocity"} <= set(PLOTS.names())
    assert {"efficient_budget", "efficient_memory"} <= set(COMPARE_PLOTS.names())


def test_runs_without_efficient_logs_draw_nothing(tmp_path):
    run = _run(tmp_path, [{"epoch": 0.0, "train/acc": 0.5}])
    assert plots.trainable_map(run) is None
    assert plots.cost(run) is None
    assert plots.velocity(run) is None
    assert plots.budget_curve([run]) is None


def test_each_figure_shows_the_logged_series(tmp_path):
    rows = [
        {
            "epoch": float(e),
            "efficient/trainable/conv1": 1 - 0.1 * e,
            "efficient/trainable/conv2": 1.0,
            "efficient/backward_saving": 0.05 * e,
            "efficient/step_ms": 10.0 - e,
            "velocity/mean": 0.1 / (e + 1),
            "lr": 0.1 if e < 2 else 0.01,
        }
        for e in range(4)
    ]
    run = _run(tmp_path, rows)
    fig = plots.trainable_map(run)
    (image,) = fig.axes[0].get_images()
    assert image.get_array().shape == (2, 4)
    assert image.get_array()[0, 3] == pytest.approx(0.7)
    fig = plots.cost(run)
    assert len(fig.axes) == 2  # saved bytes were not logged: no empty panel
    fig = plots.velocity(run)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [3]
    plt.close("all")


def test_budget_curve_has_one_line_per_recipe_sorted_by_budget(tmp_path):
    runs = [
        _run(tmp_path, [], {"test/acc": acc, "stages": {"ft": {"efficient/budget": b}}}, name)
        for name, b, acc in (("velocity", 0.1, 0.9), ("velocity", 0.05, 0.8), ("random", 0.1, 0.85))
    ]
    fig = plots.budget_curve(runs)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert set(lines) == {"velocity", "random"}
    assert list(lines["velocity"].get_xdata()) == pytest.approx([5.0, 10.0])
    assert list(lines["velocity"].get_ydata()) == pytest.approx([0.8, 0.9])
    plt.close("all")


def test_memory_pareto_labels_each_run_with_its_method_and_step_time(tmp_path):
    config = (
        "stages:\n- {name: pretrain}\n- name: finetune\n  methods:\n"
        "  - class_path: sobre.efficient.callbacks.ActivationCompressionCallback\n"
        "    init_args: {method: %s}\n"
    )
    runs = []
    for method, saved, acc in (("none", 3.8, 0.94), ("hosvd", 0.13, 0.93), ("asi", 0.15, 0.91)):
        run = _run(tmp_path, [], {"test/acc": acc}, method)
        run.metrics["stages"] = {"finetune": {"efficient/saved_mb": saved, "efficient/step_ms": 50}}
        run.config = config % method
        runs.append(run)
    assert plots.memory_pareto([_run(tmp_path, [], {"test/acc": 0.5})]) is None
    ax = plots.memory_pareto(runs).axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.texts] == ["none (50 ms)", "hosvd (50 ms)", "asi (50 ms)"]
    assert [line.get_xdata()[0] for line in ax.lines] == [3.8, 0.13, 0.15]
    plt.close("all")
