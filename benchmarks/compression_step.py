"""Cost of one activation-compression step: the paper's SVD-based HOSVD_ε (#35), sobre's HOSVD_ε
(Gram-matrix eigenvectors, the same subspace) and one warm-started ASI step (#37) at HOSVD's ranks.

Inputs: the real inputs of ResNet-8's ``layer3`` convs (one input channel, trained 2 epochs on
MNIST-5k, batch of 100 training images: 100x32x14x14 and 100x64x7x7; BN folded as in the
fine-tuning protocol) and a synthetic ReLU'd 32x64x56x56 tensor. The three calls are interleaved
round-robin with a rotating first one; medians after warm-up. The spec (§7) expects ASI >= 5x
cheaper than HOSVD. Writes benchmarks/results/compression_step.json.

Usage: python benchmarks/compression_step.py [--rounds 20] [--warmup 5] [--threads 1]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from common import interleaved, timing_parser, write_result
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sobre.core.taps import FeatureTap
from sobre.data import mnist5k_datasets
from sobre.efficient.compress import ASIState, _unfold, hosvd
from sobre.efficient.sparse import fold_frozen_bn
from sobre.models import create

RESULTS = Path(__file__).resolve().parent / "results" / "compression_step.json"
CONVS = ["features.layer3.0.conv1", "features.layer3.0.conv2"]
EPS = 0.8


def svd_hosvd(a: Tensor) -> None:
    """The paper's HOSVD_ε: one ``torch.linalg.svd`` per mode unfolding (truncation is free)."""
    for n in range(a.ndim):
        torch.linalg.svd(_unfold(a, n), full_matrices=False)


def real_inputs() -> dict[str, Tensor]:
    """The ``layer3`` conv inputs of a briefly trained ResNet-8 on 100 training images."""
    torch.manual_seed(0)
    train, _, _ = mnist5k_datasets()
    model = create("resnet8", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y in DataLoader(train, batch_size=100, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model = fold_frozen_bn(model.eval())
    x = torch.stack([train[i][0] for i in range(100)])
    with torch.no_grad(), FeatureTap(model, CONVS, capture="input") as tap:
        model(x)
    return {name: tap.features[name].clone() for name in CONVS}


def main() -> None:
    parser = timing_parser(__doc__, RESULTS, rounds=20, warmup=5, threads=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    inputs = real_inputs()
    inputs["synthetic"] = torch.randn(32, 64, 56, 56, generator=torch.Generator().manual_seed(0))
    inputs["synthetic"] = inputs["synthetic"].relu()
    rows = []
    for name, a in inputs.items():
        ranks = [u.shape[1] for u in hosvd(a, EPS)[1]]
        state = ASIState(a.ndim)
        state.step(a, ranks)  # the warm start
        calls = {
            "svd_hosvd": lambda a=a: svd_hosvd(a),
            "hosvd": lambda a=a: hosvd(a, EPS),
            "asi": lambda a=a, s=state, r=ranks: s.step(a, r),
        }
        ms = {
            k: statistics.median(v) for k, v in interleaved(calls, args.rounds, args.warmup).items()
        }
        row = {
            "input": name,
            "shape": list(a.shape),
            "ranks": ranks,
            **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
            "svd_hosvd_over_asi": round(ms["svd_hosvd"] / ms["asi"], 2),
            "hosvd_over_asi": round(ms["hosvd"] / ms["asi"], 2),
        }
        rows.append(row)
        print(
            f"{name:24s} {tuple(a.shape)!s:18s} ranks {ranks}: SVD-HOSVD {ms['svd_hosvd']:8.2f} ms"
            f"  HOSVD {ms['hosvd']:7.2f} ms  ASI {ms['asi']:7.2f} ms  "
            f"(SVD-HOSVD/ASI {row['svd_hosvd_over_asi']}x, HOSVD/ASI {row['hosvd_over_asi']}x)"
        )
    write_result(
        args.out,
        "one compression step: SVD-based HOSVD, Gram-based HOSVD, ASI (CPU)",
        start,
        threads=args.threads,
        rounds=args.rounds,
        warmup=args.warmup,
        explained_var=EPS,
        rows=rows,
    )


if __name__ == "__main__":
    main()
