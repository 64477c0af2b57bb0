"""Report figures of the efficient-training family (``sobre.plots`` and ``sobre.compare_plots``
entry points), drawn from what its callbacks log per epoch.

- ``efficient_trainable``: fraction of each masked layer's channels that trained, per epoch
  (a layers x epochs map; NEq's freezing spreads through it after the LR drop);
- ``efficient_cost``: counted backward-FLOP saving, measured step time and measured saved bytes
  per epoch, side by side;
- ``efficient_velocity``: mean neuron velocity per epoch (NEq per layer, NeVe for the model),
  log scale, with NeVe's LR decays and stop;
- comparison ``efficient_budget``: test accuracy against the update budget, one line per recipe,
  for runs of budgeted recipes at several budgets;
- comparison ``efficient_memory``: the Pareto view of memory-bounded fine-tuning, test accuracy
  against the measured saved activation bytes of a step (log scale), each run labelled with
  its method and measured step time (``ActivationCompressionCallback`` runs).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter

from sobre.core.registry import Registry

if TYPE_CHECKING:
    from sobre.engine.report import RunFiles

TRAINABLE = "efficient/trainable/"
VELOCITY = "velocity/"


def _rows(run: RunFiles) -> list[dict[str, float]]:
    return [r for rows in run.history.values() for r in rows]


def trainable_map(run: RunFiles) -> Figure | None:
    """Trainable fraction of every masked layer (rows) per epoch (columns)."""
    rows = _rows(run)
    layers = list(dict.fromkeys(k for r in rows for k in r if k.startswith(TRAINABLE)))
    if not layers:
        return None
    grid = np.array([[r.get(k, math.nan) for r in rows] for k in layers])
    fig, ax = plt.subplots(
        figsize=(min(12, 3 + 0.35 * len(rows)), min(14, 1.5 + 0.22 * len(layers))),
        constrained_layout=True,
    )
    image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="none")
    ax.set_yticks(range(len(layers)), [k.removeprefix(TRAINABLE) for k in layers], fontsize=6)
    ax.set_xticks(range(len(rows)), [str(i + 1) for i in range(len(rows))], fontsize=7)
    ax.set_xlabel("epoch (all stages)")
    ax.set_title("fraction of each layer's channels that trained")
    fig.colorbar(image, ax=ax, label="trainable fraction (1 - frozen)")
    return fig


def cost(run: RunFiles) -> Figure | None:
    """Counted saving, measured step time and measured bytes per epoch."""
    rows = _rows(run)
    panels = [
        ("efficient/backward_saving", "counted backward-FLOP saving", 100.0, "%"),
        ("efficient/step_ms", "measured step time", 1.0, "ms"),
        ("efficient/saved_mb", "measured saved activations", 1.0, "MB"),
    ]
    panels = [p for p in panels if any(p[0] in r for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels), 3.2), constrained_layout=True, squeeze=False
    )
    x = list(range(1, len(rows) + 1))
    for ax, (key, title, scale, unit) in zip(axes[0], panels, strict=True):
        ax.plot(x, [r.get(key, math.nan) * scale for r in rows], "-o", ms=3)
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    fig.suptitle("counted vs measured cost per epoch", fontsize=10)
    return fig


def velocity(run: RunFiles) -> Figure | None:
    """Mean |velocity| per epoch (log scale), with LR decays and the stop when logged."""
    rows = _rows(run)
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith(VELOCITY)))
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8), constrained_layout=True)
    x = list(range(1, len(rows) + 1))
    main = [k for k in keys if k == f"{VELOCITY}mean"]
    for key in main + [k for k in keys if k not in main]:
        ys = [abs(r.get(key, math.nan)) for r in rows]
        is_main = key in main
        ax.plot(
            x,
            ys,
            "-o" if is_main else "-",
            ms=3,
            lw=2 if is_main else 0.8,
            alpha=1 if is_main else 0.5,
            label=key.removeprefix(VELOCITY) if is_main or len(keys) <= 8 else None,
        )
    lrs = [r.get("lr", math.nan) for r in rows]
    for i in range(1, len(lrs)):
        if lrs[i] < lrs[i - 1]:
            ax.axvline(x[i], color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean |velocity|")
    ax.set_title("neuron velocity (dotted: LR decays)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _final(run: RunFiles, key: str) -> float | None:
    stages = run.metrics.get("stages", {})
    for record in reversed(list(stages.values())):
        if key in record:
            return float(record[key])
    return None


def budget_curve(runs: list[RunFiles]) -> Figure | None:
    """Test accuracy against the logged update budget, one line per recipe."""
    series: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        budget = _final(run, "efficient/budget")
        acc = run.metrics.get("test/acc")
        if budget is not None and acc is not None:
            series.setdefault(run.dir.parent.name, []).append((budget, float(acc)))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8), constrained_layout=True)
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([100 * b for b, _ in points], [a for _, a in points], "-o", ms=4, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("update budget (% of the full cost)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs budget")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def _method(run: RunFiles) -> str:
    """The memory-bounded fine-tuning method of ``run``'s last stage (from its config)."""
    config = yaml.safe_load(run.config or "{}") or {}
    for stage in reversed(config.get("stages") or []):
        for method in stage.get("methods") or []:
            args = method.get("init_args") or {}
            if "ActivationCompression" in str(method.get("class_path", "")):
                return str(args.get("method", "hosvd"))
    return run.dir.parent.name


def memory_pareto(runs: list[RunFiles]) -> Figure | None:
    """Test accuracy against measured saved activation MB per step (log x), one point per run,
    labelled with its method and median step time."""
    points = []
    for run in runs:
        saved, acc = _final(run, "efficient/saved_mb"), run.metrics.get("test/acc")
        if saved is not None and acc is not None:
            points.append((saved, float(acc), _method(run), _final(run, "efficient/step_ms")))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8), constrained_layout=True)
    for saved, acc, name, ms in points:
        ax.plot(saved, acc, "o", ms=6)
        label = name if ms is None else f"{name} ({ms:.0f} ms)"
        ax.annotate(label, (saved, acc), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("saved activations per step (MB, measured)")
    ax.set_ylabel("test accuracy")
    ax.set_title("memory-bounded fine-tuning: accuracy vs bytes (step time)")
    ax.grid(alpha=0.3, which="both")
    return fig


def register(plots: Registry[Any]) -> None:
    """Entry point: add this family's per-run plots to the report's registry."""
    for name, fn in (
        ("efficient_trainable", trainable_map),
        ("efficient_cost", cost),
        ("efficient_velocity", velocity),
    ):
        if name not in plots:
            plots.register(name)(fn)


def register_comparisons(plots: Registry[Any]) -> None:
    """Entry point: add this family's figures of several runs."""
    for name, fn in (("efficient_budget", budget_curve), ("efficient_memory", memory_pareto)):
        if name not in plots:
            plots.register(name)(fn)
