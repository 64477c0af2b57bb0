"""Which way of "not updating" neurons saves anything in PyTorch (spec §0's table, re-measured).

Net (spec §0): conv3x3(64->64)-BN-ReLU twice, global average pool, linear head (64->10); input
32x64x32x32; half of what each mechanism can freeze is frozen. Per mechanism, against training
everything in the same run:

- ``zero_grad_rows``: half of each conv's output rows get a zero gradient after backward (NEq's
  code, SCoTTi): the full backward runs;
- ``conv_requires_grad_off``: both conv weights ``requires_grad_(False)``, BN and head trained;
- ``linear_requires_grad_off``: the head's weight frozen (addmm skips saving its input);
- ``frozen_prefix``: everything below the second conv frozen (the graph starts later);
- ``channel_sparse``: half of each conv's output channels frozen with sobre's channel-sparse
  layers (:func:`sobre.efficient.sparse.sparsify`);
- ``channel_sparse_memory``: BN folded, half of each conv's *input* channels trained through the
  channel-sparse layers, bit-mask ReLUs (the memory-bounded setting of TraDy).

Saved activations are measured with :func:`sobre.core.measure.saved_activation_bytes` (unique
storages, parameters excluded); step times (zero_grad + forward + loss + backward + SGD step) are
medians over rounds after warm-up, every variant timed once per round with a rotating first one
(``common.interleaved``); the saving is ``1 - t(variant) / t(full)`` of the medians.
Writes benchmarks/results/freezing_mechanisms.json.

Usage: python benchmarks/freezing_mechanisms.py [--rounds 30] [--warmup 3] [--threads 1]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import interleaved, timing_parser, write_result
from torch import Tensor, nn

from sobre.core.measure import saved_activation_bytes
from sobre.efficient.sparse import fold_frozen_bn, mask_relus, sparsify

RESULTS = Path(__file__).resolve().parent / "results" / "freezing_mechanisms.json"


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


HALF = torch.arange(64) % 2 == 0


def variants(x: Tensor) -> dict[str, tuple[nn.Module, list[tuple[Tensor, Tensor]]]]:
    """Mechanism -> (model, (weight, row mask) pairs to zero after backward)."""
    base = net().train()
    with torch.no_grad():  # BN statistics for a meaningful fold
        base(x)
    out: dict[str, tuple[nn.Module, list[tuple[Tensor, Tensor]]]] = {}
    out["full"] = (copy.deepcopy(base), [])
    m = copy.deepcopy(base)
    out["zero_grad_rows"] = (m, [(m[i].weight, HALF.view(-1, 1, 1, 1).float()) for i in (0, 3)])
    m = copy.deepcopy(base)
    for i in (0, 3):
        m[i].weight.requires_grad_(False)
    out["conv_requires_grad_off"] = (m, [])
    m = copy.deepcopy(base)
    m[8].weight.requires_grad_(False)
    out["linear_requires_grad_off"] = (m, [])
    m = copy.deepcopy(base)
    for p in list(m[0].parameters()) + list(m[1].parameters()):
        p.requires_grad_(False)
    out["frozen_prefix"] = (m, [])
    out["channel_sparse"] = (sparsify(copy.deepcopy(base), {"0": HALF, "3": HALF}), [])
    folded = fold_frozen_bn(copy.deepcopy(base).eval()).train()
    sparsify(folded, trainable_in={"0": HALF, "3": HALF})
    out["channel_sparse_memory"] = (mask_relus(folded, x[:2]), [])
    return out


def stepper(model: nn.Module, zero: list[tuple[Tensor, Tensor]], x: Tensor, y: Tensor) -> Callable:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for weight, keep in zero:
                weight.grad.mul_(keep)
        opt.step()

    return step


def main() -> None:
    parser = timing_parser(__doc__, RESULTS, rounds=30, warmup=3, threads=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.randn(32, 64, 32, 32), torch.randint(0, 10, (32,))
    models = variants(x)
    steps = {name: stepper(m, zero, x, y) for name, (m, zero) in models.items()}
    start = time.perf_counter()
    times = interleaved(steps, args.rounds, args.warmup)
    full_ms = statistics.median(times["full"])
    rows = []
    for name, (model, _) in models.items():
        saved = saved_activation_bytes(model, x).activations
        ms = statistics.median(times[name])
        rows.append(
            {
                "mechanism": name,
                "saved_activation_mb": round(saved / 1e6, 3),
                "step_ms": round(ms, 2),
                "time_saving": round(1 - ms / full_ms, 3),
            }
        )
        print(f"{name:26s} {saved / 1e6:8.2f} MB  {ms:8.1f} ms  saving {1 - ms / full_ms:+.1%}")
    write_result(
        args.out,
        "freezing mechanisms: saved activation bytes and step time (CPU)",
        start,
        threads=args.threads,
        rounds=args.rounds,
        warmup=args.warmup,
        rows=rows,
    )


if __name__ == "__main__":
    main()
