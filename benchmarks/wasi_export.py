"""Inference speed of WASI's exported model (#46): each Linear replaced by two (``R`` then ``L``,
rank k keeping ``weight_var`` of the weight's energy) against the dense model.

The weights must be trained for their spectrum to decay (random-init weights keep most ranks,
so the export would be slower): ``vit_tiny28`` (dim 64, depth 2) is trained ``--epochs`` on
MNIST-5k first, then copied, swapped (:func:`sobre.efficient.wasi.wasi`), trained
``--finetune`` epochs as WASI (the rank-k forward adapts) and exported
(:func:`~sobre.efficient.wasi.export_wasi`). Reported: test accuracy of both, forward FLOPs
(:func:`sobre.core.measure.flops`) and the median forward time of a batch, the two models
interleaved round-robin after warm-up. Writes benchmarks/results/wasi_export.json.

Usage: python benchmarks/wasi_export.py [--weight-var 0.8] [--batch 256] [--rounds 30]
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from common import interleaved, timing_parser, write_result
from torch import nn
from torch.utils.data import DataLoader

from sobre.core.measure import flops
from sobre.data import mnist5k_datasets
from sobre.efficient.wasi import export_wasi, wasi
from sobre.models import create

RESULTS = Path(__file__).resolve().parent / "results" / "wasi_export.json"


def accuracy(model: nn.Module, data: object) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, 500))
    return hits / len(data)  # type: ignore[arg-type]


def fit(model: nn.Module, data: object, epochs: int, lr: float) -> None:
    """AdamW (weight decay 0.05), batch 50, shuffled, seeded by the caller."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=50, shuffle=True):  # type: ignore[arg-type]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def main() -> None:
    parser = timing_parser(__doc__, RESULTS, rounds=30, warmup=5, threads=1)
    parser.add_argument("--weight-var", type=float, default=0.8, help="WASI weight ε (0.8)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--finetune", type=int, default=3, help="WASI epochs (default 3)")
    parser.add_argument("--batch", type=int, default=256, help="timed batch size (default 256)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(0)
    train, _, test = mnist5k_datasets()
    dense = create("vit_tiny28", num_classes=10, in_channels=1, dim=64, depth=2, heads=4)
    fit(dense, train, args.epochs, 3e-3)
    low_rank = wasi(copy.deepcopy(dense), args.weight_var, activation_ranks=10**6)
    fit(low_rank, train, args.finetune, 1e-3)  # WASI training: the rank-k forward adapts
    exported = export_wasi(low_rank)
    dense.eval()
    exported.eval()
    x = torch.stack([test[i % len(test)][0] for i in range(args.batch)])

    def forward(model: nn.Module) -> object:
        with torch.no_grad():
            return model(x)

    times = interleaved(
        {"dense": lambda: forward(dense), "exported": lambda: forward(exported)},
        args.rounds,
        args.warmup,
    )
    ms = {k: statistics.median(v) for k, v in times.items()}
    rows = {
        name: {
            "test_acc": round(accuracy(model, test), 4),
            "forward_flops": flops(model, x[:1]),
            "forward_ms": round(ms[name], 3),
        }
        for name, model in (("dense", dense), ("exported", exported))
    }
    ranks = [
        m[0].out_features
        for m in exported.modules()
        if isinstance(m, nn.Sequential) and all(isinstance(c, nn.Linear) for c in m)
    ]
    for name, row in rows.items():
        print(
            f"{name:9s} acc {row['test_acc']:.4f}  {row['forward_flops'] / 1e6:7.2f} MFLOP/image"
            f"  {row['forward_ms']:7.2f} ms / batch {args.batch}"
        )
    ratio = rows["exported"]["forward_ms"] / rows["dense"]["forward_ms"]
    print(f"exported / dense forward time: {ratio:.2f}; weight ranks {ranks}")
    write_result(
        args.out,
        "WASI export: two-Linear inference model vs dense (CPU)",
        start,
        threads=args.threads,
        weight_var=args.weight_var,
        epochs=args.epochs,
        finetune_epochs=args.finetune,
        batch=args.batch,
        rounds=args.rounds,
        warmup=args.warmup,
        ranks=ranks,
        time_ratio=round(ratio, 3),
        models=rows,
    )


if __name__ == "__main__":
    main()
