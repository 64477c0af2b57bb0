"""SCoTTi trend (spec §2; the learned threshold is our reconstruction): NEq's task (ResNet-8 w16,
MNIST-5k, 15 epochs, LR x0.1 at epoch 10, 10 probe images per class), SCoTTi with its defaults
against NEq at ε ∈ {1e-3, 3e-3, 1e-2}.

Checks: with no hand-set ε, SCoTTi's accuracy is within 1 pt of full training, and its frozen
fraction and counted backward-FLOP saving (means over all epochs) are at least those of NEq's
best ε (the largest saving among the grid runs within 1 pt of the baseline); its per-layer
thresholds τ_l settle (relative change over the last 3 epochs).
"""

from __future__ import annotations

import logging
import statistics

import pytest
import torch
from efficient_harness import fit, mnist5k_split, resnet8
from test_neq_trend import DROP, EPOCHS, MaskedRun, masked_run
from torch.utils.data import DataLoader

from sobre.efficient.neq import NEq, SCoTTi
from sobre.efficient.probe import probe_inputs

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)  # measured figures: pytest --log-cli-level=INFO

GRID = (1e-3, 3e-3, 1e-2)


@pytest.fixture(scope="module")
def runs() -> dict:
    torch.set_num_threads(1)
    train, test = mnist5k_split()
    probe = probe_inputs(DataLoader(train, batch_size=500), per_class=10)
    baseline = fit(resnet8(seed=0), train, test, epochs=EPOCHS, drop_at=(DROP,)).final
    grid = {eps: masked_run(lambda m, e=eps: NEq(m, probe, eps=e), train, test) for eps in GRID}
    scotti = masked_run(lambda m: SCoTTi(m, probe), train, test)
    for name, run in [*((f"NEq eps={e}", r) for e, r in grid.items()), ("SCoTTi", scotti)]:
        log.info(
            "%s: acc %.3f (baseline %.3f), mean frozen %.3f, final frozen %.3f, counted saving "
            "%.3f",
            name,
            run.acc,
            baseline,
            statistics.mean(run.frozen),
            run.frozen[-1],
            run.saving,
        )
    return {"baseline": baseline, "grid": grid, "scotti": scotti}


def test_scotti_saves_at_least_the_best_neq_epsilon(runs):
    baseline, scotti = runs["baseline"], runs["scotti"]
    eligible = [run for run in runs["grid"].values() if run.acc >= baseline - 0.01]
    best: MaskedRun = max(eligible, key=lambda run: run.saving)
    assert scotti.acc >= baseline - 0.01
    assert scotti.saving >= best.saving
    assert statistics.mean(scotti.frozen) >= statistics.mean(best.frozen)


def test_scotti_thresholds_settle(runs):
    history = runs["scotti"].method.tau_history[-3:]
    change = {
        name: (max(t[name] for t in history) - min(t[name] for t in history))
        / max(t[name] for t in history)
        for name in history[0]
    }
    log.info("SCoTTi tau over the last 3 epochs: %s; relative change %s", history, change)
    assert max(change.values()) < 0.05
