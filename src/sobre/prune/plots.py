"""Report figures of the pruning family, registered through the ``sobre.plots`` entry point.

They read what a run recorded (``metrics.json``'s per-stage transform reports); the generic
accuracy-vs-sparsity and accuracy-vs-depth curves are drawn by the engine's report itself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from sobre.core.registry import Registry

if TYPE_CHECKING:
    from sobre.engine.report import RunFiles


def layer_entropy(run: RunFiles) -> Figure | None:
    """Per-layer activation entropy H̄_l (bits) measured before each removal or pruning round."""
    rows: list[tuple[str, dict[str, float]]] = []
    for stage, record in run.metrics.get("stages", {}).items():
        for report in record.get("transforms", []):
            entropy = report.get("layer_entropy") or report.get("entropy")  # EASIER / EGP
            if isinstance(entropy, dict) and entropy:
                rows.append((stage, entropy))
    if not rows:
        return None
    sites = list(dict.fromkeys(site for _, ent in rows for site in ent))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(sites) + 2), 3.8), constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for i, (stage, ent) in enumerate(rows):
        ys = [ent.get(site, math.nan) for site in sites]  # removed sites leave a gap
        ax.plot(
            range(len(sites)), ys, "-o", ms=3, color=cmap(i / max(1, len(rows) - 1)), label=stage
        )
    ax.set_xticks(range(len(sites)), sites, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("layer entropy H̄ (bits)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("activation entropy per layer, before each stage's edit")
    ax.legend(fontsize=7, ncol=2)
    return fig


def register(plots: Registry[Any]) -> None:
    """Entry point: add this family's plots to the report's registry."""
    if "prune_layer_entropy" not in plots:
        plots.register("prune_layer_entropy")(layer_entropy)
