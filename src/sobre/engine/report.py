"""``report(run_dir)``: ``report.md`` with the metrics, the measurement table and PNG figures.

Everything is read back from the run folder's files (``logs/<stage>/metrics.csv``,
``metrics.json``, ``measure.json``, ``config.yaml``, ``env.json``): JSON first, figures from JSON.
Families add figures through the ``sobre.plots`` entry-point group: a function that receives
``PLOTS`` and registers ``fn(run: RunFiles) -> Figure | None`` plots in it; and figures of
several runs (``sobre report RUN RUN --out DIR``) through ``sobre.compare_plots``: a function that
receives ``COMPARE_PLOTS`` and registers ``fn(runs: list[RunFiles]) -> Figure | None`` in it.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from sobre.core.errors import ConfigError
from sobre.core.measure import Measurement
from sobre.core.registry import Registry
from sobre.core.serialization import atomic_write_text

DPI = 120


@dataclass
class RunFiles:
    """The parsed files of a run folder."""

    dir: Path
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # stage -> epoch rows
    metrics: dict[str, Any] = field(default_factory=dict)
    measure: dict[str, Any] | None = None
    config: str = ""
    env: dict[str, Any] = field(default_factory=dict)


PLOTS: Registry[Callable[[RunFiles], Figure | None]] = Registry("plot")
PLOT_PLUGINS = "sobre.plots"  # entry-point group: ``fn(PLOTS)`` registers a family's plots
COMPARE_PLOTS: Registry[Callable[[list[RunFiles]], Figure | None]] = Registry("comparison plot")
COMPARE_PLUGINS = "sobre.compare_plots"  # ``fn(COMPARE_PLOTS)``: a family's multi-run figures


@functools.cache
def _load_plot_plugins() -> None:
    """Let every installed family register its plots (entry points, so the engine names none)."""
    for group, registry in ((PLOT_PLUGINS, PLOTS), (COMPARE_PLUGINS, COMPARE_PLOTS)):
        for entry in importlib.metadata.entry_points(group=group):
            entry.load()(registry)


def _epoch_rows(path: Path) -> list[dict[str, float]]:
    """One row per fit epoch from a Lightning CSVLogger file (last value of each column)."""
    by_epoch: dict[int, dict[str, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            slot = by_epoch.setdefault(epoch, {"epoch": float(epoch)})
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    slot[key.removesuffix("_epoch")] = float(value)
    fit_rows = (by_epoch[e] for e in sorted(by_epoch))  # trainer.test adds a row of its own
    return [r for r in fit_rows if any(k.startswith(("train/", "val/")) for k in r)]


def read_run(run_dir: str | Path) -> RunFiles:
    """Parse a run folder; a folder that is not a run raises :class:`ConfigError`."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{str(run_dir)!r} is not a sobre run folder (no config.yaml); pass a "
            "folder under runs/, e.g. runs/quickstart/<time>"
        )
    run = RunFiles(run_dir, config=(run_dir / "config.yaml").read_text())
    for name, target in (
        ("metrics.json", "metrics"),
        ("measure.json", "measure"),
        ("env.json", "env"),
    ):
        if (run_dir / name).is_file():
            setattr(run, target, json.loads((run_dir / name).read_text()))
    state = run_dir / "run.json"
    order = json.loads(state.read_text()).get("stages_done", []) if state.is_file() else []
    logs: dict[str, list[Path]] = {}  # stage -> its CSV files, resumed fits last
    for path in sorted(
        (run_dir / "logs").glob("*/metrics.csv"), key=lambda p: (len(p.parent.name), p.parent.name)
    ):
        logs.setdefault(path.parent.name.split(".resume")[0], []).append(path)
    for stage in [*order, *sorted(set(logs) - set(order))]:
        rows: dict[float, dict[str, float]] = {}
        for path in logs.get(stage, []):
            for row in _epoch_rows(path):
                rows.setdefault(row["epoch"], {}).update(row)
        if rows:
            run.history[stage] = [rows[e] for e in sorted(rows)]
    return run


@PLOTS.register("learning_curves")
def learning_curves(run: RunFiles) -> Figure | None:
    """Loss and accuracy per epoch for train and val, stages side by side."""
    rows = [(stage, r) for stage, rs in run.history.items() for r in rs]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    x = list(range(1, len(rows) + 1))
    for ax, metric, unit in (
        (axes[0], "loss", "cross-entropy (nats)"),
        (axes[1], "acc", "accuracy"),
    ):
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [r.get(f"{split}/{metric}", math.nan) for _, r in rows]
            if any(not math.isnan(y) for y in ys):
                ax.plot(x, ys, style, ms=3, label=split)
        start = 0
        for stage, rs in run.history.items():
            if len(run.history) > 1:
                ax.axvline(start + 0.5, color="grey", ls=":", lw=1)
                ax.text(
                    start + 0.6,
                    1.0,
                    stage,
                    transform=ax.get_xaxis_transform(),
                    va="top",
                    fontsize=8,
                    color="grey",
                )
            start += len(rs)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    return fig


@dataclass
class StagePoints:
    """Validation accuracy, sparsity and depth after each measured fit stage of a run."""

    names: list[str]
    acc: list[float]
    sparsity: list[float]
    depth: list[float]


def stage_points(run: RunFiles) -> StagePoints:
    """The per-stage points of ``metrics.json`` (stages without a measurement are skipped)."""
    stages = {
        k: v for k, v in run.metrics.get("stages", {}).items() if "measure" in v and "val/acc" in v
    }
    meas = [v["measure"] for v in stages.values()]
    return StagePoints(
        list(stages),
        [v["val/acc"] for v in stages.values()],
        [1.0 - m["nonzero_params"] / m["params"] for m in meas],
        [m["depth"] for m in meas],
    )


def _stage_figure(
    curves: list[tuple[str, StagePoints]], title: str, annotate: bool
) -> Figure | None:
    """Accuracy against sparsity (and against depth when depth changes) for each curve.

    Sparsity is drawn as the fraction of parameters *remaining* on a log axis once a curve goes
    past 90 % (IMP's geometric rounds, double descent at 98-99.9 %), pruning to the right.
    """
    curves = [(label, p) for label, p in curves if len(p.names) >= 2]
    if not curves:
        return None
    log_scale = max(max(p.sparsity) for _, p in curves) > 0.9
    depth_moves = any(len(set(p.depth)) > 1 for _, p in curves)
    fig, axes = plt.subplots(
        1, 2 if depth_moves else 1, figsize=(10 if depth_moves else 5.5, 3.6), squeeze=False
    )
    fig.set_layout_engine("constrained")
    panels = [(axes[0][0], "sparsity")] + ([(axes[0][1], "depth")] if depth_moves else [])
    for ax, kind in panels:
        for label, p in curves:
            if kind == "depth":
                xs = p.depth
            else:
                xs = [max(1.0 - s, 1e-6) for s in p.sparsity] if log_scale else p.sparsity
            ax.plot(xs, p.acc, "-o", ms=3, label=label)
            if annotate:
                for x, y, name in zip(xs, p.acc, p.names, strict=True):
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3, which="both")
        if kind == "depth":
            ax.set_xlabel("depth (non-linear layers on the longest path)")
            ax.invert_xaxis()  # depth goes down as layers are removed
        elif log_scale:
            ax.set_xscale("log")
            ax.invert_xaxis()
            ax.set_xlabel("fraction of parameters remaining (log)")
        else:
            ax.set_xlabel("sparsity (fraction of zero parameters)")
        ax.set_title(f"{title}accuracy vs {kind}")
    if len(curves) > 1:
        axes[0][0].legend(fontsize=7)
    return fig


@PLOTS.register("stage_curves")
def stage_curves(run: RunFiles) -> Figure | None:
    """Validation accuracy after each fit stage against sparsity and against depth."""
    return _stage_figure([("", stage_points(run))], "", annotate=True)


def _metrics_table(metrics: dict[str, Any]) -> str:
    flat = {k: v for k, v in sorted(metrics.items()) if isinstance(v, int | float)}
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {v:.4f} |" for k, v in flat.items()]
    return "\n".join(lines)


def report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``figures/*.png`` for a run folder; returns the report path."""
    run = read_run(run_dir)
    figures_dir = run.dir / "figures"
    figures_dir.mkdir(exist_ok=True)
    parts = [
        f"# Run report: {run.dir.name}",
        "",
        f"Recipe `{run.dir.parent.name}`, sobre {run.env.get('sobre', '?')}, torch "
        f"{run.env.get('torch', '?')}, git `{run.env.get('git') or 'n/a'}`.",
        "",
        "## Metrics",
        "",
        _metrics_table(run.metrics) if run.metrics else "(no metrics yet)",
    ]
    if run.measure:
        parts += [
            "",
            "## Measurement (batch of 2 inputs)",
            "",
            "```",
            Measurement.from_dict(run.measure).table(),
            "```",
        ]
    parts += ["", "## Figures", ""]
    _load_plot_plugins()
    for name in PLOTS.names():
        fig = PLOTS.get(name)(run)
        if fig is None:
            continue
        fig.savefig(figures_dir / f"{name}.png", dpi=DPI)
        plt.close(fig)
        parts.append(f"![{name}](figures/{name}.png)")
    parts += ["", "## Recipe", "", "```yaml", run.config.rstrip(), "```", ""]
    path = run.dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def _label(run: RunFiles) -> str:
    return f"{run.dir.parent.name}/{run.dir.name}"


def compare(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Overlay several runs' accuracy-vs-sparsity and -depth curves (e.g. a weight-decay sweep
    of a double-descent recipe), draw the families' comparison figures (e.g. accuracy against
    the update budget) and tabulate the final metrics; returns ``compare.md``."""
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run folders")
    runs = [read_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "compare": _stage_figure(
            [(_label(r), stage_points(r)) for r in runs], "runs compared: ", False
        )
    }
    _load_plot_plugins()
    figures.update({name: COMPARE_PLOTS.get(name)(runs) for name in COMPARE_PLOTS.names()})
    drawn = [name for name, fig in figures.items() if fig is not None]
    if not drawn:
        raise ConfigError(
            "none of these runs has two measured stages or family results to compare; compare "
            "multi-stage runs (e.g. recipes/prune/*.yaml) or runs of one family (e.g. "
            "recipes/efficient/budget_*.yaml at several budgets)"
        )
    for name in drawn:
        figures[name].savefig(out / f"{name}.png", dpi=DPI)
        plt.close(figures[name])
    lines = [
        "# Runs compared",
        "",
        "| run | test/acc | val/acc | final sparsity | final depth |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        points = stage_points(run)
        last = f"{points.sparsity[-1]:.4f} | {points.depth[-1]:g}" if points.names else "- | -"
        metrics = run.metrics
        lines.append(
            f"| `{_label(run)}` | {metrics.get('test/acc', math.nan):.4f} | "
            f"{metrics.get('val/acc', math.nan):.4f} | {last} |"
        )
    lines += ["", *(f"![{name}]({name}.png)" for name in drawn), ""]
    path = out / "compare.md"
    atomic_write_text(path, "\n".join(lines))
    return path
