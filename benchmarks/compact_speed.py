"""Inference latency of dense vs masked vs compacted models, with Torch-Pruning as the peer (CPU).

Per model (torchvision resnet18 at 32x32 batch 8, small_cnn at 28x28 batch 64, random init with
calibrated BN), the variants are:

- ``dense``: the model itself;
- ``masked``: half the channels of every DepGraph group (``sobre.core.compact.channel_groups``)
  zeroed with core channel masks, the lowest group L1 norm first (L1 of the producers' weight
  rows), on the producing convs *and* their BN layers (so every zeroed channel emits 0);
- ``compacted``: ``compact(masked)``, checked equal to ``masked`` on a fresh input;
- ``compacted_bn_alive``: the same zeroing on the convs only (BN shifts alive, so a channel read
  by a zero-padded 3x3 conv must stay), then ``compact``: what the calibration warns about;
- ``tp_magnitude``: Torch-Pruning's MagnitudePruner (``BasePruner`` + L1 ``MagnitudeImportance``)
  at ``pruning_ratio=0.5`` on the dense model, classifier ignored (changes the outputs).

Eval mode, no grad, one forward per variant per round, variants interleaved round-robin (the
first variant rotates every round) after warm-up rounds; a ratio is the variant's median over the
dense median of the same run.
Writes benchmarks/results/compact_speed.json.

Usage: python benchmarks/compact_speed.py [--rounds 200] [--warmup 10] [--threads N]
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
import torch_pruning as tp
from common import machine_name, timing_parser, write_result
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sobre.core.compact import channel_groups, compact
from sobre.core.masks import attach_mask
from sobre.core.measure import count_params, flops
from sobre.models import create

RESULTS = Path(__file__).resolve().parent / "results" / "compact_speed.json"
MODELS = {
    "resnet18": dict(name="resnet18", in_channels=3, side=32, batch=8),
    "small_cnn": dict(name="small_cnn", in_channels=1, side=28, batch=64),
}


def calibrate(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Random BN affine parameters, then BN statistics from 5 train-mode batches (mean 0.5)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.5, generator=gen)
        model.train()
        for _ in range(5):
            model(torch.randn(shape, generator=gen) * 2 + 0.5)
    return model.eval()


def zero_half(model: nn.Module, x: Tensor, norms: bool) -> nn.Module:
    """Mask the half of every free group's channels with the lowest producer L1 norm."""
    for group in channel_groups(model, x):
        if group.pinned:
            continue
        producers = group.producers()
        score = torch.zeros(group.size)
        for name, index in producers.items():
            rows = model.get_submodule(name).weight.detach().abs().flatten(1).sum(1)
            score += torch.stack([rows[list(i)].sum() for i in index])
        off = score.argsort()[: group.size // 2].tolist()
        for m in group.members:
            if m.role == "in" or (m.role == "norm" and not norms):
                continue
            mask = attach_mask(model.get_submodule(m.module), kind="channel")
            mask[[i for r in off for i in m.index[r]]] = 0
    return model


def tp_magnitude(model: nn.Module, x: Tensor, ratio: float = 0.5) -> nn.Module:
    """Torch-Pruning's ``MagnitudePruner`` (``BasePruner`` + L1 importance) at ``ratio`` of every
    group's channels, the classifier ignored."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    tp.pruner.BasePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[head],
    ).step()
    return model.eval()


def rel_err(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        ref = a(x)
        return float((b(x) - ref).abs().max() / ref.abs().max())


def bench(key: str, rounds: int, warmup: int) -> dict:
    spec = MODELS[key]
    torch.manual_seed(0)
    shape = (spec["batch"], spec["in_channels"], spec["side"], spec["side"])
    x = torch.randn(shape)
    dense = calibrate(create(spec["name"], num_classes=10, in_channels=spec["in_channels"]), shape)
    masked = zero_half(copy.deepcopy(dense), x, norms=True)
    variants = {
        "dense": dense,
        "masked": masked,
        "compacted": compact(masked, example_inputs=x[:2]),
        "compacted_bn_alive": compact(
            zero_half(copy.deepcopy(dense), x, norms=False), example_inputs=x[:2]
        ),
        "tp_magnitude": tp_magnitude(copy.deepcopy(dense), x[:2]),
    }
    fresh = torch.randn(shape) * 2 + 1
    exact = rel_err(masked, variants["compacted"], fresh)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.no_grad():
        for r in range(warmup + rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotating start
                start = time.perf_counter()
                variants[name](x)
                if r >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["dense"])
    rows = []
    for name, model in variants.items():
        median = statistics.median(times[name])
        total, nonzero = count_params(model)
        rows.append(
            {
                "variant": name,
                "median_ms": round(median, 3),
                "ratio_vs_dense": round(median / base, 4),
                "params": total,
                "nonzero_params": nonzero,
                "mflops": round(flops(model, x) / 1e6, 2),
            }
        )
    print(f"\n{key}: batch {shape[0]}, {shape[2]}x{shape[3]}; compacted vs masked {exact:.1e}")
    print(f"{'variant':<20} {'ms':>8} {'ratio':>7} {'params':>10} {'MFLOPs':>9}")
    for row in rows:
        print(
            f"{row['variant']:<20} {row['median_ms']:>8.2f} {row['ratio_vs_dense']:>7.3f} "
            f"{row['params']:>10} {row['mflops']:>9.1f}"
        )
    return {
        "model": key,
        "input_shape": list(shape),
        "compacted_vs_masked_rel_err": exact,
        "results": rows,
    }


def main() -> None:
    parser = timing_parser(__doc__, RESULTS, rounds=200, warmup=10, threads=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = [bench(key, args.rounds, args.warmup) for key in MODELS]
    write_result(
        args.out,
        "inference latency: dense vs masked vs compact vs Torch-Pruning (CPU)",
        start,
        torch_pruning=tp.__version__,
        threads=args.threads,
        rounds=args.rounds,
        warmup=args.warmup,
        machine=machine_name(),
        models=runs,
    )


if __name__ == "__main__":
    main()
