"""Overhead of feature taps and masks on a ResNet-18 SGD train step on the CPU.

Variants run interleaved (round-robin) on identical copies of one randomly initialised
torchvision ResNet-18 (num_classes=10, 32x32 inputs); each round times one train step
(forward + backward + SGD step) per variant, as wall-clock and as process CPU time (CPU time
is steadier on a shared machine; with several threads it also counts their spin-waits). A ratio
is a variant's median over the plain model's median from the same run.
Writes benchmarks/results/measure_overhead.json.

Usage: python benchmarks/measure_overhead.py [--rounds 15] [--batch 32] [--threads N]
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torchvision
from common import machine_name, timing_parser, write_result
from torch import Tensor, nn

from sobre.core.masks import attach_mask
from sobre.core.taps import FeatureTap

RESULTS = Path(__file__).resolve().parent / "results" / "measure_overhead.json"
LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def tap_stats(model: nn.Module) -> AbstractContextManager[object]:
    """Stats-mode tap on every ReLU module (the ReLU of each block runs twice per forward)."""
    return FeatureTap(model, nn.ReLU, mode="stats")


def tap_full(model: nn.Module) -> AbstractContextManager[object]:
    """Full-mode detached tap on the four stage outputs."""
    return FeatureTap(model, LAYERS, detach=True)


def no_tap(model: nn.Module) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


def channel_masks(model: nn.Module, keep: float) -> nn.Module:
    """Channel masks on every Conv2d: all ones (``keep=1``) or the first ``keep`` fraction on."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            mask = attach_mask(m, kind="channel")
            mask[round(keep * mask.numel()) :] = 0.0
    return model


class Variant:
    """One model + optimizer + tap factory, timed one train step at a time."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tap: Callable[[nn.Module], AbstractContextManager[object]],
    ) -> None:
        self.name = name
        self.model = model.train()
        self.tap = tap
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.wall_ms: list[float] = []
        self.cpu_ms: list[float] = []

    def step(self, x: Tensor, y: Tensor, record: bool) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        with self.tap(self.model):
            out = self.model(x)
        loss = nn.functional.cross_entropy(out, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if record:
            self.wall_ms.append(wall * 1e3)
            self.cpu_ms.append(cpu * 1e3)


def build_variants(base: nn.Module) -> list[Variant]:
    def masked(keep: float) -> nn.Module:
        return channel_masks(copy.deepcopy(base), keep)

    return [
        Variant("plain", copy.deepcopy(base), no_tap),
        Variant("tap_stats_relu", copy.deepcopy(base), tap_stats),
        Variant("tap_full_layers", copy.deepcopy(base), tap_full),
        Variant("masks_ones", masked(1.0), no_tap),
        Variant("masks_half", masked(0.5), no_tap),
        Variant("tap_stats+masks", masked(1.0), tap_stats),
        Variant("tap_full+masks", masked(1.0), tap_full),
    ]


def main() -> None:
    parser = timing_parser(__doc__, RESULTS, rounds=15, warmup=3, threads=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    variants = build_variants(base)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))

    for r in range(args.warmup + args.rounds):
        for v in variants:
            v.step(x, y, record=r >= args.warmup)

    plain_wall = statistics.median(variants[0].wall_ms)
    plain_cpu = statistics.median(variants[0].cpu_ms)
    rows = []
    for v in variants:
        wall, cpu = statistics.median(v.wall_ms), statistics.median(v.cpu_ms)
        rows.append(
            {
                "variant": v.name,
                "median_ms": round(wall, 2),
                "ratio": round(wall / plain_wall, 4),
                "median_cpu_ms": round(cpu, 2),
                "cpu_ratio": round(cpu / plain_cpu, 4),
            }
        )

    print(
        f"ResNet-18, batch {args.batch}, 32x32, CPU, {args.threads} threads, "
        f"{args.rounds} rounds (+{args.warmup} warm-up), torch {torch.__version__}"
    )
    print(f"{'variant':<18} {'wall ms':>9} {'ratio':>7} {'cpu ms':>9} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['variant']:<18} {row['median_ms']:>9.2f} {row['ratio']:>7.3f} "
            f"{row['median_cpu_ms']:>9.2f} {row['cpu_ratio']:>7.3f}"
        )

    write_result(
        args.out,
        "resnet18 train step overhead of FeatureTap and channel masks",
        None,
        torchvision=torchvision.__version__,
        threads=args.threads,
        batch=args.batch,
        rounds=args.rounds,
        warmup=args.warmup,
        machine=machine_name(),
        results=rows,
    )


if __name__ == "__main__":
    main()
