"""Report figures of the fairness family (``sobre.plots`` / ``sobre.compare_plots`` entry
points), drawn from what :class:`~sobre.fairness.lightning.BiasMetrics` logs.

- ``fairness_groups``: test accuracy of every (y, b) group as a heat-map (rows: class y,
  columns: bias value b); the diagonal of Biased-MNIST is the bias-aligned groups;
- ``fairness_summary``: accuracy, unbiased, aligned, conflicting, worst-group and biased-test
  accuracy side by side, and the validation curves of the bias metrics per epoch;
- comparison ``fairness_methods``: the same bars for several runs (one group of bars per run).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sobre.core.registry import Registry

if TYPE_CHECKING:
    from sobre.engine.report import RunFiles

GROUP = re.compile(r"^test/group/y=(-?\d+),b=(-?\d+)$")
SUMMARY = (
    ("test/acc", "accuracy"),
    ("test/unbiased", "unbiased"),
    ("test/aligned", "aligned"),
    ("test/conflicting", "conflicting"),
    ("test/worst_group", "worst group"),
    ("test/biased_acc", "biased test"),
)
CURVES = ("val/unbiased", "val/aligned", "val/conflicting", "val/worst_group")


def group_heatmap(run: RunFiles) -> Figure | None:
    """Test accuracy per (y, b) group; empty groups are left blank."""
    cells = {}
    for key, value in run.metrics.items():
        match = GROUP.match(key)
        if match:
            cells[int(match[1]), int(match[2])] = float(value)
    if not cells:
        return None
    ys = sorted({y for y, _ in cells})
    bs = sorted({b for _, b in cells})
    grid = np.full((len(ys), len(bs)), math.nan)
    for (y, b), acc in cells.items():
        grid[ys.index(y), bs.index(b)] = acc
    fig, ax = plt.subplots(
        figsize=(1.6 + 0.45 * len(bs), 1.2 + 0.4 * len(ys)), constrained_layout=True
    )
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", interpolation="none")
    ax.set_xticks(range(len(bs)), [str(b) for b in bs], fontsize=7)
    ax.set_yticks(range(len(ys)), [str(y) for y in ys], fontsize=7)
    ax.set_xlabel("bias value b")
    ax.set_ylabel("class y")
    unbiased = run.metrics.get("test/unbiased")
    title = "test accuracy per group"
    ax.set_title(title if unbiased is None else f"{title} (unbiased {100 * unbiased:.1f} %)")
    fig.colorbar(image, ax=ax, label="accuracy")
    return fig


def _bars(ax: Any, runs: list[tuple[str, dict[str, Any]]]) -> None:
    keys = [(k, label) for k, label in SUMMARY if any(k in m for _, m in runs)]
    width = 0.8 / len(runs)
    for i, (name, metrics) in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))]
        values = [100 * float(metrics.get(k, math.nan)) for k, _ in keys]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(keys)), [label for _, label in keys], fontsize=8, rotation=20)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.grid(alpha=0.3, axis="y")


def summary(run: RunFiles) -> Figure | None:
    """Bias-metric bars of the test and, when logged, their validation curves per epoch."""
    if "test/unbiased" not in run.metrics:
        return None
    rows = [r for rows in run.history.values() for r in rows]
    curves = [k for k in CURVES if any(k in r for r in rows)]
    fig, axes = plt.subplots(
        1,
        2 if curves else 1,
        figsize=(10 if curves else 5.5, 3.6),
        constrained_layout=True,
        squeeze=False,
    )
    _bars(axes[0][0], [(run.dir.parent.name, run.metrics)])
    axes[0][0].set_title("test: aligned vs conflicting")
    if curves:
        ax = axes[0][1]
        x = list(range(1, len(rows) + 1))
        for key in curves:
            ax.plot(x, [100 * r.get(key, math.nan) for r in rows], "-o", ms=3, label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (all stages)")
        ax.set_ylabel("%")
        ax.set_title("validation bias metrics")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def methods(runs: list[RunFiles]) -> Figure | None:
    """The summary bars of several runs, one colour per run."""
    named = [(f"{r.dir.parent.name}/{r.dir.name}", r.metrics) for r in runs]
    named = [(n, m) for n, m in named if "test/unbiased" in m]
    if len(named) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.8), constrained_layout=True)
    _bars(ax, named)
    ax.set_title("bias metrics by run")
    ax.legend(fontsize=7)
    return fig


def register(plots: Registry[Any]) -> None:
    """Entry point: add this family's per-run plots to the report's registry."""
    for name, fn in (("fairness_groups", group_heatmap), ("fairness_summary", summary)):
        if name not in plots:
            plots.register(name)(fn)


def register_comparisons(plots: Registry[Any]) -> None:
    """Entry point: add this family's figures of several runs."""
    if "fairness_methods" not in plots:
        plots.register("fairness_methods")(methods)
