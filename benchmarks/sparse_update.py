"""Training-step cost of freezing channels: gradient zeroing vs channel-sparse layers (CPU).

Per model (a CIFAR ResNet-18, i.e. torchvision's resnet18 with a 3x3 stride-1 stem and no
max-pool, and torchvision's mobilenet_v2; random init, batch 64 at 32x32, 10 classes) and per
fraction f of frozen channels (25/50/75/90 %), the variants are:

- ``full``: plain training, every parameter updated (the reference of every saving);
- ``zeroing``: f of the output channels of every conv frozen the way NEq's code does it: the full
  backward runs, then the frozen rows of each conv weight gradient are zeroed;
- ``sparse``: the same channels frozen with :func:`sobre.efficient.sparse.sparsify` (the weight
  gradient is computed for the trainable rows only);
- ``memory``: the memory-bounded setting of TraDy (spec §4): BN folded
  (:func:`~sobre.efficient.sparse.fold_frozen_bn`), f of the *input* channels of every conv
  frozen (output channels for grouped convs), bit-mask ReLUs where they free memory
  (:func:`~sobre.efficient.sparse.mask_relus`); its time reference is ``folded`` (BN folded,
  everything trained), which is also timed.

BN layers (where not folded) and the classifier stay dense and trained. A step is
``zero_grad`` + forward + cross-entropy + backward (+ zeroing) + SGD step (momentum 0.9, fused).
Every variant has its own copy of the model and optimizer; all variants of a model run
round-robin (one step each per round, the first variant rotating) after warm-up rounds. The
machine is shared and its load swings within seconds, so savings are medians over rounds of the
paired saving ``1 - t(variant) / t(reference)`` of the same round, for the wall-clock step
(``time_saving``) and for the process CPU time (``cpu_time_saving``). With one thread (the
default) the CPU time leaves out the time other jobs held the core, so load distorts it least;
with several threads a descheduled OpenMP thread stalls the others, and a loaded machine
inflates wall-clock steps many-fold. The savings of the fastest steps
(``min_time_saving``) and the load average are reported too. Counted FLOPs are analytic
(:func:`sobre.core.measure.backward_flops`: conv and linear only; for zeroing, ``counted`` is
what the papers report and ``computed``, what the kernels run, is the full backward);
saved-activation bytes are measured with :func:`sobre.core.measure.saved_activation_bytes`
(unique storages, parameters excluded). ``goal_met`` / ``goal_met_cpu_time``: wall-clock / CPU
time saving >= 0.9 x counted step-FLOP saving (forward + backward); ``within_budget``: measured
bytes <= (1 - f) x the bytes of full training.

Where the time goes (``op_profile``, one thread only): a few extra steps of ``full`` and of each
``sparse`` variant under a dispatch mode that adds up the thread CPU time of every aten op, in
three groups: ``counted`` (convolutions, their backward and the linear layer's matmuls: the ops
the FLOP count covers), ``sparse_overhead`` (the channel gathers and gradient scatters only the
channel-sparse layers run) and ``uncounted`` (BatchNorm, activations, loss, optimizer, additions,
copies; also the sparse layers' views and allocations, ops that full training runs too).
``uncounted_share`` of ``full`` bounds the step-time ratio when the counted ops' time follows
their FLOPs; ``counted_ops_ratio`` is the counted ops' measured time saving over the counted FLOP
saving (both of the counted ops alone), i.e. how well the kernels follow the FLOPs. The dispatch
mode itself slows small ops a little: the profile explains savings, the timed rounds measure them.
Writes benchmarks/results/sparse_update.json.

Usage: python benchmarks/sparse_update.py [--quick] [--rounds N] [--warmup 2] [--threads 1]
       [--profile-steps N] [--contiguous] [--models resnet18_cifar mobilenet_v2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from common import calibrate_bn, machine_name, write_result
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from sobre.core.measure import backward_flops, saved_activation_bytes
from sobre.efficient.sparse import fold_frozen_bn, mask_relus, sparsify, trainable_fractions

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_update.json"
FRACTIONS = (0.25, 0.5, 0.75, 0.9)
GOAL = 0.9


def cifar_resnet18() -> nn.Module:
    """torchvision resnet18 with a 3x3 stride-1 stem and no max-pool (CIFAR style)."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18_cifar": cifar_resnet18,
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}
#: Default timed rounds: a MobileNetV2 step is ~15x shorter, and noisier, than a ResNet-18 one.
ROUNDS = {"resnet18_cifar": 15, "mobilenet_v2": 40}
#: aten ops whose FLOPs the count covers (conv and linear, forward and backward).
COUNTED_OPS = frozenset({"convolution", "convolution_backward", "addmm", "mm"})
#: aten ops only the channel-sparse layers run (channel gathers, gradient scatters).
SPARSE_OPS = frozenset(
    {"index_select", "gather", "index_copy_", "index_put_", "new_empty_strided", "zero_"}
    | {"permute"}  # the channels-last (N*H*W, C) views the gathers work on
)
#: Default op-profiled steps per variant (one thread only).
PROFILE_STEPS = {"resnet18_cifar": 5, "mobilenet_v2": 15}


def convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def frozen_masks(n_channels: dict[str, int], frac: float, seed: int) -> dict[str, Tensor]:
    """Per layer, a bool mask with round(frac * n) random channels False (frozen)."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, n in n_channels.items():
        mask = torch.ones(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=gen)[: round(frac * n)]] = False
        masks[name] = mask
    return masks


def build(key: str, frac_list: tuple[float, ...], x: Tensor, fmt: torch.memory_format) -> dict:
    """Every variant of one model: model, optimizer, zeroing masks, frozen fraction, reference."""
    torch.manual_seed(0)
    base = calibrate_bn(MODELS[key](), x)
    folded = fold_frozen_bn(base)
    variants: dict[str, dict] = {
        "full": dict(model=copy.deepcopy(base), ref="full", frac=0.0),
        "folded": dict(model=copy.deepcopy(folded), ref="folded", frac=0.0),
    }
    for f in frac_list:
        masks = frozen_masks({n: c.out_channels for n, c in convs(base).items()}, f, 1)
        variants[f"zeroing@{f}"] = dict(model=copy.deepcopy(base), masks=masks, ref="full", frac=f)
        sparse = sparsify(copy.deepcopy(base), masks)
        variants[f"sparse@{f}"] = dict(model=sparse, ref="full", frac=f)
        mem = copy.deepcopy(folded)
        layers = convs(mem)
        grouped = {n: masks[n] for n, c in layers.items() if c.groups > 1}
        cols = {n: c.in_channels for n, c in layers.items() if c.groups == 1}
        sparsify(mem, grouped, frozen_masks(cols, f, 2))
        mask_relus(mem, x[:2])
        variants[f"memory@{f}"] = dict(model=mem, ref="folded", frac=f)
    for v in variants.values():
        v["model"] = v["model"].to(memory_format=fmt).train()
        params = [p for p in v["model"].parameters() if p.requires_grad]
        v["opt"] = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)
        layers = convs(v["model"])
        v["zero"] = [
            (layers[n].weight, m.view(-1, 1, 1, 1).float()) for n, m in v.get("masks", {}).items()
        ]
    return variants


def step(variant: dict, x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """One training step; (total, backward, process CPU) seconds."""
    model, opt = variant["model"], variant["opt"]
    start, cpu = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    forward = time.perf_counter()
    loss.backward()
    with torch.no_grad():  # NEq's code: the full gradient, then the frozen rows zeroed
        for weight, keep in variant["zero"]:
            weight.grad.mul_(keep)
    backward = time.perf_counter()
    opt.step()
    return time.perf_counter() - start, backward - forward, time.process_time() - cpu


class OpClock(TorchDispatchMode):
    """Adds up the thread CPU time of every aten op run under it, per group (see the doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = {"counted": 0.0, "sparse_overhead": 0.0, "uncounted": 0.0}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        group = "counted" if name in COUNTED_OPS else "uncounted"
        group = "sparse_overhead" if name in SPARSE_OPS else group
        self.seconds[group] += time.thread_time() - start
        return out


def timed(
    variants: dict, x: Tensor, y: Tensor, rounds: int, warmup: int
) -> tuple[dict, list[float]]:
    """Per variant, per round: the :func:`step` times, variants round-robin; and the 1-minute
    load average after each timed round."""
    names = list(variants)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    loads = []
    for r in range(warmup + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotating start
            measured = step(variants[name], x, y)
            if r >= warmup:
                times[name].append(measured)
        load = os.getloadavg()[0]
        if r >= warmup:
            loads.append(load)
        print(f"  round {r + 1}/{warmup + rounds}, load {load:.2f}", flush=True)
    return times, loads


def paired(times: tuple[float, ...], ref: tuple[float, ...]) -> float:
    """Median over rounds of the saving within a round (a round = one step of each variant)."""
    return statistics.median(1 - t / r for t, r in zip(times, ref, strict=True))


def ratio(saving: float, counted: float) -> float | None:
    return round(saving / counted, 3) if counted else None


def bench(
    key: str,
    frac_list: tuple[float, ...],
    rounds: int,
    warmup: int,
    fmt: torch.memory_format,
    profile_steps: int,
) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (64,), generator=gen)
    variants = build(key, frac_list, x, fmt)
    print(f"\n{key}: batch 64, 32x32, {len(variants)} variants, {rounds} rounds", flush=True)
    times, loads = timed(variants, x, y, rounds, warmup)
    full_bytes = saved_activation_bytes(variants["full"]["model"], x).activations
    rows = []
    for name, v in variants.items():
        model, frac, ref_name = v["model"], v["frac"], v["ref"]
        computed = backward_flops(model, x, trainable_fractions(model))
        # What the papers count for zeroing; the kernels compute everything (``computed``).
        counted = backward_flops(model, x, v["masks"]) if "masks" in v else computed
        ref = backward_flops(variants[ref_name]["model"], x)
        walls, backs, cpus = zip(*times[name], strict=True)
        ref_walls, ref_backs, ref_cpus = zip(*times[ref_name], strict=True)

        time_saving = paired(walls, ref_walls)
        cpu_saving = paired(cpus, ref_cpus)
        backward_saving = paired(backs, ref_backs)
        step_saving = 1 - counted.step / ref.step
        counted_backward = 1 - counted.backward / ref.backward
        saved = saved_activation_bytes(model, x).activations
        row = {
            "variant": name,
            "reference": ref_name,
            "frozen_fraction": frac,
            "median_s": round(statistics.median(walls), 4),
            "median_cpu_s": round(statistics.median(cpus), 4),
            "min_s": round(min(walls), 4),
            "time_saving": round(time_saving, 4),
            "min_time_saving": round(1 - min(walls) / min(ref_walls), 4),
            "cpu_time_saving": round(cpu_saving, 4),
            "backward_time_saving": round(backward_saving, 4),
            "counted_backward_saving": round(counted_backward, 4),
            "computed_backward_saving": round(1 - computed.backward / ref.backward, 4),
            "counted_step_saving": round(step_saving, 4),
            "ratio_time_to_counted_step": ratio(time_saving, step_saving) if frac else None,
            "ratio_cpu_time_to_counted_step": ratio(cpu_saving, step_saving) if frac else None,
            "ratio_backward_time_to_counted_backward": ratio(backward_saving, counted_backward)
            if frac
            else None,
            "step_gflops_counted": round(counted.step / 1e9, 2),
            "saved_activation_mb": round(saved / 1e6, 2),
        }
        if frac:
            row["goal_met"] = bool(time_saving >= GOAL * step_saving)
            row["goal_met_cpu_time"] = bool(cpu_saving >= GOAL * step_saving)
            row["within_budget"] = saved <= (1 - frac) * full_bytes
        rows.append(row)
    print(
        f"{'variant':<14} {'median s':>8} {'time sav':>8} {'cpu sav':>8} {'min sav':>8} "
        f"{'bwd sav':>8} {'cnt bwd':>8} {'cnt step':>8} {'ratio':>6} {'cpu r':>6} {'act MB':>8}"
    )
    for row in rows:
        ratios = [row["ratio_time_to_counted_step"], row["ratio_cpu_time_to_counted_step"]]
        r_wall, r_cpu = ("" if r is None else f"{r:.2f}" for r in ratios)
        print(
            f"{row['variant']:<14} {row['median_s']:>8.3f} {row['time_saving']:>8.3f} "
            f"{row['cpu_time_saving']:>8.3f} {row['min_time_saving']:>8.3f} "
            f"{row['backward_time_saving']:>8.3f} {row['counted_backward_saving']:>8.3f} "
            f"{row['counted_step_saving']:>8.3f} {r_wall:>6} {r_cpu:>6} "
            f"{row['saved_activation_mb']:>8.2f}"
        )
    result = {
        "model": key,
        "input_shape": list(x.shape),
        "load_1min_min_median_max": [round(f(loads), 2) for f in (min, statistics.median, max)],
        "results": rows,
    }
    if profile_steps and torch.get_num_threads() == 1:
        result["op_profile"] = profile(variants, rows, x, y, profile_steps)
    return result


def profile(variants: dict, rows: list[dict], x: Tensor, y: Tensor, steps: int) -> list[dict]:
    """The op-group profile of ``full`` and every ``sparse`` variant: median milliseconds per
    group over ``steps`` profiled steps each, round-robin (see the module doc)."""
    counted_saving = {r["variant"]: r["counted_step_saving"] for r in rows}
    names = ["full", *(n for n in variants if n.startswith("sparse@"))]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(steps):  # round-robin, as the timing
        for name in names:
            with OpClock() as clock:
                step(variants[name], x, y)
            runs[name].append(clock.seconds)
    groups = {
        name: {k: round(1e3 * statistics.median(r[k] for r in rs), 2) for k in rs[0]}
        for name, rs in runs.items()
    }
    full = groups["full"]
    out = []
    print(
        f"{'op profile':<14} {'counted':>8} {'overhd':>8} {'uncnt':>8} {'uncnt %':>8} {'kern r':>6}"
    )
    for name in names:
        ms = groups[name]
        total = sum(ms.values())
        saving = 1 - ms["counted"] / full["counted"]
        entry = {
            "variant": name,
            "ms": ms,
            "uncounted_share": round(ms["uncounted"] / total, 4),
            "sparse_overhead_share": round(ms["sparse_overhead"] / total, 4),
            "counted_ops_time_saving": round(saving, 4),
            "counted_ops_ratio": ratio(saving, counted_saving[name]) if name != "full" else None,
        }
        out.append(entry)
        kern = entry["counted_ops_ratio"]
        print(
            f"{name:<14} {ms['counted']:>8.1f} {ms['sparse_overhead']:>8.1f} "
            f"{ms['uncounted']:>8.1f} {100 * entry['uncounted_share']:>8.1f} "
            f"{'' if kern is None else f'{kern:.2f}':>6}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50/90 %% only, 3 rounds")
    parser.add_argument(
        "--rounds", type=int, help="timed rounds (default 15 for resnet, 40 for mobilenet; quick 3)"
    )
    parser.add_argument("--warmup", type=int, help="untimed rounds (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--profile-steps", type=int, help="op-profiled steps per variant (default 5 / 15; 0: none)"
    )
    parser.add_argument("--contiguous", action="store_true", help="NCHW, not channels-last")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON result path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fractions = (0.5, 0.9) if args.quick else FRACTIONS
    rounds = {k: args.rounds or (3 if args.quick else ROUNDS[k]) for k in args.models}
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = {
        k: PROFILE_STEPS[k] if args.profile_steps is None else args.profile_steps for k in rounds
    }
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    load_before = os.getloadavg()
    start = time.perf_counter()
    runs = [bench(key, fractions, rounds[key], warmup, fmt, steps[key]) for key in args.models]
    result = write_result(
        args.out,
        "training step with frozen channels: zeroing vs channel-sparse (CPU)",
        start,
        threads=args.threads,
        memory_format="contiguous" if args.contiguous else "channels_last",
        rounds=rounds,
        warmup=warmup,
        goal=f"time_saving (and cpu_time_saving) >= {GOAL} x counted_step_saving",
        load_average_before=[round(v, 2) for v in load_before],
        load_average_after=[round(v, 2) for v in os.getloadavg()],
        cpus=os.cpu_count(),
        machine=machine_name(),
        models=runs,
    )
    print(f"load average {result['load_average_before']} -> {result['load_average_after']}")


if __name__ == "__main__":
    main()
