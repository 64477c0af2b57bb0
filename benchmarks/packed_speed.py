"""Packed-Ensembles speed: single vs Deep Ensemble vs sobre's and torch-uncertainty's PE (CPU).

Model: the CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool, 10 classes), batch 64 of 32x32, fp32.
sobre's is torchvision's ``resnet18`` from ``sobre.models.create`` with ``conv1`` replaced by a
3x3 stride-1 conv and ``maxpool`` by ``Identity`` (built here); torch-uncertainty's is
``packed_resnet(arch=18, style="cifar")``. Variants:

- ``single``: the CIFAR ResNet-18; ``de4_sequential`` / ``de4_vmap``: a ``DeepEnsemble`` of 4 of
  them (seeds 0..3) run member by member / with ``torch.func.vmap``;
- ``tu_pe_2_4_g``: torch-uncertainty's packed ResNet-18, alpha=2, 4 estimators, gamma=g, as
  shipped (NCHW; its convs keep gamma=1 in each block's first conv and lower gamma while a group
  would have < 64 input channels);
- ``sobre_pe_2_4_1``: ``packify(resnet, num_members=4, alpha=2, gamma=1)``, the reference grouped
  convs as built (NCHW): the same architecture and parameter count as torch-uncertainty's;
- ``sobre_pe_2_4_2``: ``packify(..., gamma=1)`` with gamma=2 put back in exactly the convs where
  torch-uncertainty's PE(2,4,2) has it (fresh ``PackedConv2d(gamma=2)``), so that both have the
  same parameters and MACs (plain ``packify(gamma=2)`` puts gamma in every inner conv: its
  counts are reported as ``sobre_packify_gamma2_all_inner``, untimed);
- ``*_fast`` (inference): ``optimize_for_inference`` (BatchNorm folded into the convs, weights in
  ``channels_last``); ``*_cl`` (both tasks): the model in ``channels_last`` only.
  torch-uncertainty's model cannot be traced by ``torch.fx`` (einops), so it gets ``_cl`` only;
- ``*_halves`` (inference): the batch run as two halves of 32, logits put back member-major
  (the same logits in eval mode). At batch 64 a PE's first-stage activations are
  64·128·32·32·4 B = 32 MiB, above glibc's largest mmap threshold, so every such tensor is a
  fresh mmap whose pages fault on first touch (a single model's are 16 MiB); halves are not.

Tasks: ``inference`` (eval, no grad, one forward) and ``train_step`` (train mode, forward +
member-major cross-entropy + backward + SGD step). Per task the variants run interleaved
round-robin (the first one rotates every round) after warm-up rounds; medians and minima (the
fastest round, least disturbed by other jobs on a shared CPU) are reported, and ratios against
``single`` and the goal ratios (speed-ups of sobre's fastest PE over torch-uncertainty's and over
sequential DE-4) are computed from the same run. Memory on CPU: the bytes autograd saves for
backward in one training forward (``saved_activation_bytes``). MACs = FLOPs/2 of one image
(``sobre.core.measure.flops``). Fast variants are checked equal to their reference (max |diff|
of the logits, BN statistics calibrated on random batches first). The load average is recorded.
Writes benchmarks/results/packed_speed.json (``--quick``: a short run, nothing written unless
``--out`` is given).

Usage: python benchmarks/packed_speed.py [--rounds 16] [--train-rounds 5] [--warmup 1]
    [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch_uncertainty
from common import interleaved, machine_name, write_result  # sibling scripts, on sys.path
from ensemble_speed import fixed
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch_uncertainty.models.classification import packed_resnet

from sobre.core.measure import count_params, flops, saved_activation_bytes
from sobre.models import create
from sobre.uncertainty.ensemble import DeepEnsemble, EnsembleLoss
from sobre.uncertainty.packed import PackedConv2d, optimize_for_inference
from sobre.uncertainty.packify import PackedEnsemble, packify

RESULTS = Path(__file__).resolve().parent / "results" / "packed_speed.json"
MEMBERS, ALPHA, BATCH, CLASSES, SIDE = 4, 2, 64, 10, 32
GAMMAS = (1, 2)


def cifar_resnet18() -> nn.Module:
    """torchvision resnet18 (sobre's ``create``) with the CIFAR stem: 3x3 stride-1, no max-pool."""
    model = create("resnet18", num_classes=CLASSES, in_channels=3)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def tu_pe(gamma: int) -> nn.Module:
    return packed_resnet(
        in_channels=3,
        num_classes=CLASSES,
        arch=18,
        num_estimators=MEMBERS,
        alpha=ALPHA,
        gamma=gamma,
        style="cifar",
    )


def sobre_pe(gamma: int, tu: nn.Module) -> PackedEnsemble:
    """``packify(gamma=1)``, then gamma put in the convs where torch-uncertainty's ``tu`` has it."""
    model = packify(cifar_resnet18(), num_members=MEMBERS, alpha=ALPHA, gamma=1)
    if gamma == 1:
        return model
    for name, conv in tu.named_modules():  # tu's PackedConv2d wraps an nn.Conv2d named "conv"
        if isinstance(conv, nn.Conv2d) and conv.groups > MEMBERS:
            target = name.removesuffix(".conv").replace("shortcut", "downsample")
            old = model.get_submodule(target)
            parent, _, leaf = target.rpartition(".")
            new = PackedConv2d(
                old.in_channels // ALPHA,
                old.out_channels // ALPHA,
                old.kernel_size,
                alpha=ALPHA,
                num_members=MEMBERS,
                gamma=conv.groups // MEMBERS,
                stride=old.stride,
                padding=old.padding,
                bias=old.bias is not None,
            )
            setattr(model.get_submodule(parent), leaf, new)
    return model


def calibrate(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics from 2 train-mode batches."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
        model.train()
        for _ in range(2):
            model(torch.randn(16, 3, SIDE, SIDE, generator=gen))
    return model.eval()


def channels_last(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


class Halves(nn.Module):
    """``model`` run on each half of the batch, logits put back member-major (same in eval)."""

    def __init__(self, model: nn.Module, members: int) -> None:
        super().__init__()
        self.model, self.members = model, members

    def forward(self, x: Tensor) -> Tensor:
        outs = [self.model(half).unflatten(0, (self.members, -1)) for half in x.chunk(2)]
        return torch.cat(outs, 1).flatten(0, 1)


def max_diff(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def summarise(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {
        k: {
            "median_ms": round(med[k], 2),
            "min_ms": round(low[k], 2),
            "ratio_vs_single": round(med[k] / med[base], 4),
            "ratio_vs_single_min": round(low[k] / low[base], 4),
        }
        for k in times
    }


def speedups(rows: dict[str, dict[str, float]], pairs: dict[str, tuple[str, str]]) -> dict:
    """``slow / fast`` time ratios (throughput gains), from medians and from minima."""
    return {
        name: {
            "median": round(rows[slow]["median_ms"] / rows[fast]["median_ms"], 3),
            "min": round(rows[slow]["min_ms"] / rows[fast]["min_ms"], 3),
        }
        for name, (slow, fast) in pairs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16, help="timed inference rounds (16)")
    parser.add_argument("--train-rounds", type=int, default=5, help="timed training rounds (5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per task (1)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="2+1 rounds, no JSON unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS})")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.train_rounds, args.warmup = 2, 1, 1
    out = args.out or (None if args.quick else RESULTS)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIDE, SIDE, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    torch.manual_seed(0)
    single = calibrate(cifar_resnet18(), 1)
    de4 = DeepEnsemble.from_factory(
        lambda: calibrate(cifar_resnet18(), 2), MEMBERS, seed=0, mode="sequential"
    )
    models: dict[str, nn.Module] = {"single": single, "de4_sequential": de4}
    models["de4_vmap"] = fixed(de4, "vmap")
    for g in GAMMAS:
        torch.manual_seed(g)
        tu = calibrate(tu_pe(g), 3)
        models[f"tu_pe_2_4_{g}"] = tu
        models[f"sobre_pe_2_4_{g}"] = calibrate(sobre_pe(g, tu), 4)

    fast = {
        "single_fast": optimize_for_inference(single),
        **{
            f"sobre_pe_2_4_{g}_fast": optimize_for_inference(models[f"sobre_pe_2_4_{g}"])
            for g in GAMMAS
        },
    }
    exact = {
        "single_fast": max_diff(single, fast["single_fast"], x),
        "de4_vmap": max_diff(de4, models["de4_vmap"], x),
        **{
            f"sobre_pe_2_4_{g}_fast": max_diff(
                models[f"sobre_pe_2_4_{g}"], fast[f"sobre_pe_2_4_{g}_fast"], x
            )
            for g in GAMMAS
        },
    }
    infer_models = {
        "single": single,
        "single_fast": fast["single_fast"],
        "de4_sequential": de4,
        "de4_vmap": models["de4_vmap"],
        "tu_pe_2_4_1": models["tu_pe_2_4_1"],
        "tu_pe_2_4_1_cl": channels_last(models["tu_pe_2_4_1"]),
        "tu_pe_2_4_1_halves": Halves(models["tu_pe_2_4_1"], MEMBERS),
        "tu_pe_2_4_2": models["tu_pe_2_4_2"],
        **{
            k: m
            for g in GAMMAS
            for k, m in (
                (f"sobre_pe_2_4_{g}", models[f"sobre_pe_2_4_{g}"]),
                (f"sobre_pe_2_4_{g}_fast", fast[f"sobre_pe_2_4_{g}_fast"]),
            )
        },
        "sobre_pe_2_4_1_fast_halves": Halves(fast["sobre_pe_2_4_1_fast"], MEMBERS),
    }
    exact["sobre_pe_2_4_1_fast_halves"] = max_diff(
        models["sobre_pe_2_4_1"], infer_models["sobre_pe_2_4_1_fast_halves"], x
    )
    train_models = {
        "single": single,
        "single_cl": channels_last(single),
        "de4_sequential": de4,
        "de4_vmap": models["de4_vmap"],
        "tu_pe_2_4_1": models["tu_pe_2_4_1"],
        "tu_pe_2_4_1_cl": channels_last(models["tu_pe_2_4_1"]),
        "tu_pe_2_4_2": models["tu_pe_2_4_2"],
        **{
            k: m
            for g in GAMMAS
            for k, m in (
                (f"sobre_pe_2_4_{g}", models[f"sobre_pe_2_4_{g}"]),
                (f"sobre_pe_2_4_{g}_cl", channels_last(models[f"sobre_pe_2_4_{g}"])),
            )
        },
    }
    train_models = {k: copy.deepcopy(m) for k, m in train_models.items()}  # SGD steps edit them

    base_info = {}  # memory format and BN folding change neither MACs nor saved bytes
    for name, model in models.items():
        saved = saved_activation_bytes(copy.deepcopy(model), x)
        base_info[name] = {
            "mmacs_per_image": round(flops(de4 if name == "de4_vmap" else model, x[:1]) / 2e6, 2),
            "saved_activation_mib": round(saved.activations / 2**20, 1),
        }
    info = {}
    for name, model in {**infer_models, **train_models}.items():
        base = base_info[name.removesuffix("_halves").removesuffix("_fast").removesuffix("_cl")]
        info[name] = {"params": count_params(model)[0], **base}
        if "_fast" in name:  # inference only: folded BNs cannot train
            del info[name]["saved_activation_mib"]
    plain_g2 = packify(cifar_resnet18(), num_members=MEMBERS, alpha=ALPHA, gamma=2)
    info_plain_g2 = {
        "params": count_params(plain_g2)[0],
        "mmacs_per_image": round(flops(plain_g2, x[:1]) / 2e6, 2),
    }

    setup_seconds = round(time.perf_counter() - start, 1)
    print(f"setup (models, MACs, saved bytes, exactness checks): {setup_seconds} s")

    def inference(model: nn.Module) -> Callable[[], object]:
        model.eval()

        def step() -> Tensor:
            with torch.no_grad():
                return model(x)

        return step

    def train_step(name: str, model: nn.Module) -> Callable[[], object]:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = EnsembleLoss(num_members=1 if name.startswith("single") else MEMBERS)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return step

    print(f"load average before: {[round(v, 2) for v in load_before]}")
    tasks: dict[str, dict] = {}
    for task, steps, rounds in (
        ("inference", {k: inference(m) for k, m in infer_models.items()}, args.rounds),
        ("train_step", {k: train_step(k, m) for k, m in train_models.items()}, args.train_rounds),
    ):
        t0 = time.perf_counter()
        rows = summarise(interleaved(steps, rounds, args.warmup), "single")
        tasks[task] = {"rounds": rounds, "seconds": round(time.perf_counter() - t0, 1)}
        tasks[task]["variants"] = {k: {**info[k], **row} for k, row in rows.items()}
        print(f"\n{task}, batch {BATCH}, {rounds} rounds: ms, ratio to single, params, memory")
        print(
            f"{'variant':<22} {'median':>8} {'min':>8} {'x single':>9} {'(min)':>7} "
            f"{'params':>10} {'MMAC/img':>9} {'saved MiB':>10}"
        )
        for k, row in tasks[task]["variants"].items():
            print(
                f"{k:<22} {row['median_ms']:>8.1f} {row['min_ms']:>8.1f} "
                f"{row['ratio_vs_single']:>9.3f} {row['ratio_vs_single_min']:>7.3f} "
                f"{row['params']:>10} {row['mmacs_per_image']:>9.1f} "
                f"{row.get('saved_activation_mib', float('nan')):>10.1f}"
            )
    inf, trn = tasks["inference"]["variants"], tasks["train_step"]["variants"]
    goals = {"inference": {}, "train_step": {}}
    for g in GAMMAS:
        pe = f"sobre_pe_2_4_{g}"
        goals["inference"].update(
            speedups(
                inf,
                {
                    f"{pe}_fast_over_tu": (f"tu_pe_2_4_{g}", f"{pe}_fast"),
                    f"{pe}_fast_over_de4_sequential": ("de4_sequential", f"{pe}_fast"),
                    f"{pe}_reference_over_tu": (f"tu_pe_2_4_{g}", pe),
                },
            )
        )
        goals["train_step"].update(
            speedups(
                trn,
                {
                    f"{pe}_cl_over_tu": (f"tu_pe_2_4_{g}", f"{pe}_cl"),
                    f"{pe}_cl_over_de4_sequential": ("de4_sequential", f"{pe}_cl"),
                    f"{pe}_reference_over_tu": (f"tu_pe_2_4_{g}", pe),
                },
            )
        )
    for task, rows, best in (("inference", inf, "_fast"), ("train_step", trn, "_cl")):
        goals[task].update(
            speedups(
                rows,
                {
                    "tu_pe_2_4_1_cl_over_tu": ("tu_pe_2_4_1", "tu_pe_2_4_1_cl"),
                    f"sobre_pe_2_4_1{best}_over_tu_cl": ("tu_pe_2_4_1_cl", f"sobre_pe_2_4_1{best}"),
                    "tu_pe_2_4_1_over_de4_sequential": ("de4_sequential", "tu_pe_2_4_1"),
                    "de4_sequential_over_vmap": ("de4_vmap", "de4_sequential"),
                },
            )
        )
    goals["inference"].update(
        speedups(
            inf,
            {
                "tu_pe_2_4_1_halves_over_tu": ("tu_pe_2_4_1", "tu_pe_2_4_1_halves"),
                "sobre_pe_2_4_1_fast_halves_over_tu": ("tu_pe_2_4_1", "sobre_pe_2_4_1_fast_halves"),
                "sobre_pe_2_4_1_fast_halves_over_tu_halves": (
                    "tu_pe_2_4_1_halves",
                    "sobre_pe_2_4_1_fast_halves",
                ),
            },
        )
    )
    load_after = os.getloadavg()
    print("\ngoal ratios (slower time / faster time; targets: PE over torch-uncertainty >= 1.2, ")
    print("PE over sequential DE-4 >= 2.5)")
    for task, ratios in goals.items():
        for name, r in ratios.items():
            print(f"{task:<11} {name:<48} median {r['median']:>6.3f}  min {r['min']:>6.3f}")
    print(f"max |diff| of the logits vs the reference (de4_vmap: vs sequential): {exact}")
    print(f"load average after: {[round(v, 2) for v in load_after]}")
    if out is not None:
        write_result(
            out,
            "Packed-Ensembles: single vs DE-4 vs sobre and torch-uncertainty PE (CPU)",
            start,
            torch_uncertainty=torch_uncertainty.__version__,
            threads=args.threads,
            model="CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool), 10 classes",
            input_shape=list(x.shape),
            dtype="float32",
            members=MEMBERS,
            alpha=ALPHA,
            warmup=args.warmup,
            machine=machine_name(),
            load_average_before=[round(v, 2) for v in load_before],
            load_average_after=[round(v, 2) for v in load_after],
            setup_seconds=setup_seconds,
            fast_vs_reference_max_abs_diff=exact,
            sobre_packify_gamma2_all_inner=info_plain_g2,
            tasks=tasks,
            goal_ratios=goals,
        )


if __name__ == "__main__":
    main()
