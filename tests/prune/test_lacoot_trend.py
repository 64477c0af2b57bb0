"""LaCoOT's trend on mnist5k (spec compression §4.5), averaged over 3 seeds.

Setting: residual MLP, 8 blocks relu(x + f(x)), width 128, BN, SGD (lr 0.01, momentum 0.9; the
spec gives no learning rate) 20 epochs, batch 128, one thread; blocks ranked by MSWD on the
validation split, removed closest first, test accuracy (500 images) without fine-tuning.

Measured here (seeds 0/1/2, dense -> 1 / 2 / 4 blocks removed; mean block distance):
  lambda=0: 96.2 -> 93.6/93.8/79.0 (1.27), 95.0 -> 93.6/93.8/90.4 (1.33),
            96.2 -> 95.8/94.0/90.4 (1.17)
  lambda=1: 95.2 -> 92.8/91.4/81.8 (0.73), 94.2 -> 91.2/90.6/83.0 (0.65),
            94.6 -> 93.2/90.4/86.8 (0.72)
The spec's run: lambda=0 95.1 -> 81.3/81.9/48.2, lambda=1 94.6 -> 94.2/94.0/91.4. The penalty
pulls every block towards the identity (distances fall, as in the spec), but on this model the
accuracy after removal is not better at lambda=1 (here it is worse): the spec's thresholds are
kept below as a strict xfail, so a change that makes them hold is noticed.
"""

from __future__ import annotations

import pytest
import torch
from prune_harness import accuracy, lacoot_net, loader, mnist5k, train

from sobre.prune.lacoot import LaCoOT, auto_pairs, rank_blocks, remove_blocks

SEEDS = (0, 1, 2)


def _run(lam: float, seed: int) -> dict:
    tr, va, te = mnist5k()
    net = lacoot_net(seed)
    example = tr.tensors[0][:8]
    pairs = auto_pairs(net, example)
    regs = [LaCoOT(pairs, lam=lam)] if lam > 0 else []
    train(net, loader(tr, seed=seed), 20, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), regs)
    ranked = rank_blocks(net, loader(va, shuffle=False), pairs)
    out = {"dense": accuracy(net, te), "distance": sum(d.distance for d in ranked) / len(ranked)}
    for k in (1, 2, 4):
        collapsed = remove_blocks(net, [d.block for d in ranked[:k]], example_inputs=example)
        out[k] = accuracy(collapsed, te)
    return out


@pytest.fixture(scope="module")
def runs() -> dict[float, dict]:
    """Per lambda, each measurement averaged over the seeds."""
    out = {}
    for lam in (0.0, 1.0):
        per_seed = [_run(lam, seed) for seed in SEEDS]
        out[lam] = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in per_seed[0]}
    return out


@pytest.mark.slow
def test_lacoot_pulls_blocks_towards_the_identity(runs):
    plain, ot = runs[0.0], runs[1.0]
    assert ot["distance"] < 0.75 * plain["distance"]
    assert ot["dense"] >= plain["dense"] - 0.02  # the penalty costs little before removal


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="spec thresholds not reproduced on this model (see the "
    "module docstring): removal accuracy is not reliably better at lambda=1",
)
def test_lacoot_spec_thresholds(runs):
    plain, ot = runs[0.0], runs[1.0]
    assert ot["dense"] - ot[2] <= 0.015
    assert ot["dense"] - ot[4] <= 0.05
    assert plain["dense"] - plain[2] >= 0.10
