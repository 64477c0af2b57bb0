"""Report figures of the uncertainty family (``sobre.plots`` entry point), from its JSON report.

- ``reliability``: accuracy against confidence per bin (the diagonal is perfect calibration),
  with the share of samples per bin.
- ``ood_scores``: histograms of the OOD scores on the ID test set and on each OOD set, one panel
  per criterion.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from sobre.core.registry import Registry
from sobre.uncertainty.evaluate import REPORT_FILE

if TYPE_CHECKING:
    from sobre.engine.report import RunFiles


def _report(run: RunFiles) -> dict[str, Any] | None:
    path = run.dir / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def reliability(run: RunFiles) -> Figure | None:
    """Reliability diagram of the ID test set."""
    report = _report(run)
    if report is None or not report.get("reliability"):
        return None
    bins = report["reliability"]
    lower, upper = bins["lower"], bins["upper"]
    total = sum(bins["count"]) or 1
    fig, ax = plt.subplots(figsize=(4.6, 4.2), constrained_layout=True)
    centers = [(a + b) / 2 for a, b in zip(lower, upper, strict=True)]
    widths = [b - a for a, b in zip(lower, upper, strict=True)]
    acc = [0.0 if math.isnan(a) else a for a in bins["accuracy"]]
    ax.bar(centers, acc, width=widths, edgecolor="black", alpha=0.7, label="accuracy")
    ax.bar(
        centers,
        [c / total for c in bins["count"]],
        width=widths,
        alpha=0.3,
        color="gray",
        label="share of samples",
    )
    ax.plot([0, 1], [0, 1], "--", color="red", label="perfect calibration")
    ece = next((v for k, v in report["id"].items() if k.startswith("ece")), math.nan)
    ax.set_title(f"reliability (M={report['num_members']}, ECE {100 * ece:.2f} %)")
    ax.set_xlabel("confidence (max of the mean probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def ood_scores(run: RunFiles) -> Figure | None:
    """ID vs OOD score histograms, one panel per criterion, with the AUROC in the legend."""
    report = _report(run)
    if report is None or len(report.get("scores", {})) < 2:
        return None
    scores = report["scores"]
    criteria = list(scores["id"])
    fig, axes = plt.subplots(
        1, len(criteria), figsize=(4.2 * len(criteria), 3.4), squeeze=False, layout="constrained"
    )
    for ax, criterion in zip(axes[0], criteria, strict=True):
        for name, by_criterion in scores.items():
            label = (
                name
                if name == "id"
                else (f"{name} (AUROC {report['ood'][name][criterion]['auroc']:.3f})")
            )
            ax.hist(by_criterion[criterion], bins=40, alpha=0.5, density=True, label=label)
        ax.set_title(f"OOD score: {criterion} (higher = more OOD)")
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    return fig


def register(plots: Registry[Any]) -> None:
    """Entry point: add this family's plots to the report's registry."""
    for name, fn in (("uncertainty_reliability", reliability), ("uncertainty_ood", ood_scores)):
        if name not in plots:
            plots.register(name)(fn)
