"""EASIER's trend on mnist5k (spec compression §3.5), averaged over 3 seeds.

Setting: MLP 8 x 256 ReLU, no BN, Kaiming-normal init (``kaiming_normal_``, zero biases; the
model's default is PyTorch's ``kaiming_uniform_(a=sqrt(5))``, a third of He's variance), Adam 1e-3
30 epochs, batch 128, one thread. Seven EASIER iterations: ``Easier().apply`` ranks the remaining
sites on the training split (eval mode, ``batch_mean``) and removes the lowest-entropy one, then a
3-epoch fine-tune (Adam 3e-4). Test accuracy (500 images) right after each removal, for EASIER's
choice and, on a copy, for the max-entropy site of the same ranking (the counterfactual).

Measured here (seeds 0/1/2/3; dense; removals 1-4 before the fine-tune, EASIER vs the
max-entropy site, and the mean gain; after the fine-tune at 4 of 8 removed):
  seed 0: 96.2; 95.0/92.2/95.0/95.2 vs 90.2/66.6/78.6/83.8 (+14.5 pt); 95.6 (-0.6 pt)
  seed 1: 95.6; 94.2/95.4/95.6/94.0 vs 87.6/87.2/85.2/83.0 (+9.0 pt); 95.4 (-0.2 pt)
  seed 2: 95.8; 96.2/95.0/95.6/95.0 vs 93.4/90.4/93.4/92.8 (+2.9 pt); 94.8 (-1.0 pt)
  seed 3: 95.6; 96.2/96.0/95.0/95.4 vs 85.4/89.0/67.8/89.8 (+12.7 pt); 94.4 (-1.2 pt)
Mean over the tested seeds 0-2: +8.8 pt and -0.6 pt. The spec's run: dense 95.6, +7.1 pt mean gain
on removals 1-4, 94.7 (-0.9 pt) at 4/8. A single seed can miss the 3 pt margin (seed 2), hence
the average. EASIER removes the sites from the last one backwards (relu8, relu7, ...); its 7th
removal (relu1 or relu2) costs 9-28 pt before the fine-tune, often more than the max-entropy
choice (not asserted).
"""

from __future__ import annotations

import pytest
import torch
from prune_harness import accuracy, loader, mnist5k, train
from torch import nn

from sobre.models import create
from sobre.prune.easier import Easier

SEEDS = (0, 1, 2)
ITERATIONS = 7


def _run(seed: int) -> dict:
    """Dense accuracy, and per removal: EASIER's and the max-entropy choice's accuracy before
    the fine-tune, and EASIER's after it."""
    torch.manual_seed(seed)
    tr, _, te = mnist5k()
    net = create("mlp", num_classes=10, in_channels=1, hidden=(256,) * 8)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    train(net, loader(tr, seed=seed), 30, lambda p: torch.optim.Adam(p, lr=1e-3))
    out: dict = {"dense": accuracy(net, te), "easier": [], "max_entropy": [], "finetuned": []}
    easier, ranking_data = Easier(), loader(tr, shuffle=False)
    for k in range(ITERATIONS):
        before, net = net, easier.apply(net, ranking_data)
        report = easier.report()
        out["easier"].append(accuracy(net, te))
        out["max_entropy"].append(accuracy(easier.remove(before, report["ranking"][-1][0]), te))
        train(net, loader(tr, seed=1000 * seed + k), 3, lambda p: torch.optim.Adam(p, lr=3e-4))
        out["finetuned"].append(accuracy(net, te))
    out["removed"] = report["removed_so_far"]
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return [_run(seed) for seed in SEEDS]


@pytest.mark.slow
def test_easier_beats_max_entropy_before_fine_tune(runs):
    gains = [
        sum(e - m for e, m in zip(r["easier"][:4], r["max_entropy"][:4], strict=True)) / 4
        for r in runs
    ]
    assert sum(gains) / len(gains) >= 0.03
    assert all(len(set(r["removed"])) == ITERATIONS for r in runs)


@pytest.mark.slow
def test_four_of_eight_removed_cost_little_after_fine_tune(runs):
    losses = [r["dense"] - r["finetuned"][3] for r in runs]
    assert sum(losses) / len(losses) <= 0.015
