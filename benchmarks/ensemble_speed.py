"""Deep-Ensemble speed: sequential member loop vs ``torch.func.vmap`` over stacked members (CPU).

Per model (DE-4 of torchvision ``resnet18`` from ``sobre.models.create`` at 32x32, 10 classes,
and ``lenet5`` at 28x28), batch 64, two tasks:

- ``inference``: eval mode, no grad, one ensemble forward;
- ``train_step``: train mode, forward + ``EnsembleLoss`` + backward + SGD step.

For each task the two modes run on the same members (``DeepEnsemble`` copies with ``mode`` fixed),
interleaved round-robin (the first mode alternates every round) after warm-up rounds; a ratio
is the vmap median over the sequential median of the same run (> 1: vmap is slower); the ratio
of the fastest rounds is kept too, being less sensitive to other jobs on a shared CPU. The mode
``"auto"`` would pick for the inference input is recorded (one fresh ensemble per model).
Writes benchmarks/results/ensemble_speed.json.

Usage: python benchmarks/ensemble_speed.py [--rounds 20] [--warmup 3] [--threads 2]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import interleaved, machine_name, timing_parser, write_result
from torch import Tensor

from sobre.core.measure import count_params
from sobre.models import create
from sobre.uncertainty.ensemble import DeepEnsemble, EnsembleLoss

RESULTS = Path(__file__).resolve().parent / "results" / "ensemble_speed.json"
MEMBERS = 4
BATCH = 64
MODELS = {
    "resnet18": dict(name="resnet18", in_channels=3, side=32),
    "lenet5": dict(name="lenet5", in_channels=1, side=28),
}
MODES = ("sequential", "vmap")


def fixed(ensemble: DeepEnsemble, mode: str) -> DeepEnsemble:
    """A copy of ``ensemble`` that always runs ``mode``."""
    copied = copy.deepcopy(ensemble)
    copied.mode = copied.resolved_mode = mode  # type: ignore[assignment]
    return copied


def bench(key: str, rounds: int, warmup: int) -> dict:
    spec = MODELS[key]
    shape = (BATCH, spec["in_channels"], spec["side"], spec["side"])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(shape, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)

    def factory() -> torch.nn.Module:
        return create(
            spec["name"], num_classes=10, in_channels=spec["in_channels"], input_size=spec["side"]
        )

    base = DeepEnsemble.from_factory(factory, MEMBERS, seed=0, mode="sequential")
    loss_fn = EnsembleLoss(num_members=MEMBERS)

    infer = {mode: fixed(base, mode).eval() for mode in MODES}
    with torch.no_grad():
        max_diff = float((infer["sequential"](x) - infer["vmap"](x)).abs().max())

    def inference(model: DeepEnsemble) -> Callable[[], object]:
        def step() -> Tensor:
            with torch.no_grad():
                return model(x)

        return step

    def train_step(model: DeepEnsemble) -> Callable[[], object]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return step

    tasks = {
        "inference": {mode: inference(model) for mode, model in infer.items()},
        "train_step": {mode: train_step(fixed(base, mode).train()) for mode in MODES},
    }
    rows = []
    for task, steps in tasks.items():
        times = interleaved(steps, rounds, warmup)
        med = {mode: statistics.median(t) for mode, t in times.items()}
        low = {mode: min(t) for mode, t in times.items()}
        rows.append(
            {
                "task": task,
                "sequential_ms": round(med["sequential"], 3),
                "vmap_ms": round(med["vmap"], 3),
                "vmap_over_sequential": round(med["vmap"] / med["sequential"], 4),
                "sequential_min_ms": round(low["sequential"], 3),
                "vmap_min_ms": round(low["vmap"], 3),
                "vmap_over_sequential_min": round(low["vmap"] / low["sequential"], 4),
            }
        )
    auto = copy.deepcopy(base)
    auto.mode, auto.resolved_mode = "auto", None
    with torch.no_grad():
        auto.eval()(x)
    print(f"\n{key}: DE-{MEMBERS}, input {shape}; sequential vs vmap max |diff| {max_diff:.1e}")
    print(f"{'task':<12} {'seq ms':>9} {'vmap ms':>9} {'vmap/seq':>9} {'(min-based)':>12}")
    for row in rows:
        print(
            f"{row['task']:<12} {row['sequential_ms']:>9.2f} {row['vmap_ms']:>9.2f} "
            f"{row['vmap_over_sequential']:>9.3f} {row['vmap_over_sequential_min']:>12.3f}"
        )
    print(f"auto picks {auto.resolved_mode!r} (inference input)")
    return {
        "model": key,
        "members": MEMBERS,
        "input_shape": list(shape),
        "params_per_member": count_params(base.members[0])[0],
        "max_abs_diff_eval": max_diff,
        "auto_choice_inference": auto.resolved_mode,
        "results": rows,
    }


def main() -> None:
    parser = timing_parser(__doc__, RESULTS, rounds=20, warmup=3, threads=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = [bench(key, args.rounds, args.warmup) for key in MODELS]
    write_result(
        args.out,
        "Deep Ensemble: sequential member loop vs torch.func.vmap (CPU)",
        start,
        threads=args.threads,
        batch=BATCH,
        rounds=args.rounds,
        warmup=args.warmup,
        machine=machine_name(),
        models=runs,
    )


if __name__ == "__main__":
    main()
