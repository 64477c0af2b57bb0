"""CPU latency of dense vs channel-pruned vs depth-reduced models (issue 4 item 5), speed only.

Random init, BN calibrated (``compact_speed.calibrate``: random affine, 5 train-mode batches,
then eval). Each network's variants are built once on a small example input and timed at every
input size listed for it (weights and structure do not depend on the resolution; exactness and
output shapes are checked again at each size). Variants, lettered as in the issue:

- ``dense``; ``dense_bnfold`` (control: every BN folded into its conv/linear, nothing removed);
- ``a_masks``: half of every free DepGraph group's channels zeroed with core channel masks,
  lowest group L1 first, producers and their BN (``compact_speed.zero_half``);
- ``b_compact``: ``compact(a_masks)``;
- ``c_identity``: k activation sites turned into ``nn.Identity`` (``uniquify_activations`` then
  ``replace_activation``), nothing folded;
- ``c_fold``: ``c_identity`` plus, per removed site, the pair around it folded with
  ``fold_linear`` (the BN before the site into its conv/linear first) when the merge is exact and
  the merged layer's FLOPs do not exceed the pair's (a refused pair stays unfolded, its BN too);
  built only when some pair folds;
- ``c_fold_all``: every pair that ``fold_linear(allow_approximate=True)`` merges, whatever its
  FLOPs, padded kxk∘kxk (inexact at the borders) included; built only when it differs from
  ``c_fold``;
- ``d_blocks``: k shape-preserving blocks removed (``remove_block``);
- ``e_sites_compact`` / ``e_blocks_compact``: ``c_fold`` (``c_identity`` where nothing folds) /
  ``d_blocks``, then ``a``'s zeroing (groups recomputed on the edited model) and ``compact``;
- ``f_tp``: Torch-Pruning 1.6 ``MagnitudePruner`` (= ``BasePruner`` + L1 importance) at
  ``pruning_ratio=0.5``, classifier ignored (``compact_speed.tp_magnitude``).

Which sites and blocks (k), per network: resnet18: the mid-block ReLU of all 8 BasicBlocks
(``layerS.B.relu``) / the second block of each stage; mobilenet_v2: the depthwise ReLU6 of the
10 residual InvertedResiduals / the last residual block of each stage (3, 6, 10, 13, 16);
residual_mlp (LaCoOT's test bed: width 128, 8 blocks, BN, post-activation): the mid ReLU of
all 8 blocks / blocks 1, 3, 5, 7; mlp (EASIER's: 8 x 256): relu1, 3, 5, 7 / none (no
shape-preserving block). Sites and blocks remove the same number of activations, except mlp.

Eval mode, no grad, one forward per variant per round, variants interleaved round-robin (the
first variant rotates every round) after warm-up rounds; ``speedup`` = dense median / variant
median from the same run. FLOPs (``sobre.core.measure.flops``) are per batch, depth is
``sobre.core.measure.depth`` (non-linear sites on the longest path). Checks, stored in the
JSON: every variant runs with the dense output shape and finite outputs; exact edits match their
reference on a fresh input (``rel_err_vs``: max error / max |reference|); every edited variant
rebuilds from a fresh network by ``replay`` of its edit log + strict ``load_state_dict``.
Writes benchmarks/results/prune_speed.json.

Usage: python benchmarks/prune_speed.py [--rounds 300] [--rounds-large 30] [--threads 2]
       [--quick] [--networks resnet18 mlp ...]   (--rounds-large 0 skips 224x224; --quick:
       50 rounds, 3 at 224x224, no replay check). About 1.5 min (--quick: 0.5 min) on an idle
       2-core CPU; several times longer when the CPU is shared.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from compact_speed import calibrate, tp_magnitude, zero_half  # sibling script, on sys.path
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sobre.core.edits import edit_log, replay
from sobre.core.errors import ConfigError
from sobre.core.measure import count_params, depth, flops
from sobre.models import create
from sobre.prune.compact import compact
from sobre.prune.sites import uniquify_activations
from sobre.prune.surgery import fold_linear, get_module, remove_block, replace_activation

RESULTS = Path(__file__).resolve().parent / "results" / "prune_speed.json"
_RES_SITES = [f"layer{s}.{b}.relu" for s in range(1, 5) for b in (0, 1)]
_MBV2_RESIDUAL = [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
NETWORKS: dict[str, dict[str, Any]] = {
    "resnet18": dict(
        kw=dict(in_channels=3),
        sizes=[(32, 8, "small"), (224, 8, "large")],
        sites=_RES_SITES,
        blocks=[f"layer{s}.1" for s in range(1, 5)],
    ),
    "mobilenet_v2": dict(
        kw=dict(in_channels=3),
        sizes=[(32, 8, "small"), (224, 8, "large")],
        sites=[f"features.{i}.conv.1.2" for i in _MBV2_RESIDUAL],
        blocks=[f"features.{i}" for i in (3, 6, 10, 13, 16)],
    ),
    "residual_mlp": dict(
        kw=dict(in_channels=1, width=128, blocks=8, batch_norm=True, post_activation=True),
        sizes=[(28, 128, "small")],
        sites=[f"blocks.{i}.relu" for i in range(8)],
        blocks=[f"blocks.{i}" for i in (1, 3, 5, 7)],
    ),
    "mlp": dict(
        kw=dict(in_channels=1, hidden=(256,) * 8),
        sizes=[(28, 128, "small")],
        sites=[f"features.relu{i}" for i in (1, 3, 5, 7)],
        blocks=[],
    ),
}
_PASS = (nn.Identity, nn.Dropout)


# --------------------------------------------------------------------------- edits


def _skip_back(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    while node.op == "call_module" and isinstance(modules[node.target], _PASS):
        node = node.args[0]  # type: ignore[assignment]
    return node


def _neighbours(model: nn.Module, site: str) -> tuple[list[str], str] | str:
    """``([conv/linear, (BN)], reader)`` around ``site``, or why there is no such pair."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # report, do not stop the benchmark
        return f"torch.fx cannot trace the model ({type(err).__name__}: {err})"
    modules = dict(model.named_modules())
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == site), None)
    if node is None:
        return f"site {site} not called"
    before = _skip_back(node.args[0], modules)  # type: ignore[arg-type]
    chain: list[str] = []
    if before.op == "call_module" and isinstance(modules[before.target], _BatchNorm):
        chain.append(str(before.target))
        before = _skip_back(before.args[0], modules)  # type: ignore[arg-type]
    if before.op != "call_module" or not isinstance(modules[before.target], (nn.Conv2d, nn.Linear)):
        return f"{site} does not read a conv/linear ({before.format_node()})"
    chain.insert(0, str(before.target))
    after = node
    while len(after.users) == 1:
        after = next(iter(after.users))
        if not (after.op == "call_module" and isinstance(modules[after.target], _PASS)):
            break
    if after.op != "call_module" or not isinstance(modules[after.target], (nn.Conv2d, nn.Linear)):
        return f"{site} is not read by one conv/linear only ({after.format_node()})"
    return chain, str(after.target)


def _module_flops(model: nn.Module, names: list[str], x: Tensor) -> int:
    """Summed FLOPs of the named modules on the inputs they get in one forward of ``x``."""
    seen: dict[str, Tensor] = {}
    handles = [
        get_module(model, n).register_forward_pre_hook(
            lambda m, args, n=n: seen.setdefault(n, args[0])
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sum(flops(get_module(model, n), seen[n]) for n in names)


def fold_sites(
    model: nn.Module, sites: list[str], x: Tensor, approximate: bool
) -> tuple[nn.Module, dict[str, str]]:
    """Fold the linear pair around each (already Identity) site; per site what happened."""
    log: dict[str, str] = {}
    for site in sites:
        found = _neighbours(model, site)
        if isinstance(found, str):
            log[site] = f"not folded: {found}"
            continue
        chain, reader = found
        try:
            trial = model
            if len(chain) == 2:
                trial = fold_linear(trial, first=chain[0], second=chain[1])
            trial = fold_linear(trial, first=chain[0], second=reader, allow_approximate=approximate)
        except ConfigError as err:
            log[site] = f"not folded: {str(err).split('. ')[0]}"
            continue
        before = _module_flops(model, [chain[0], reader], x)
        after = _module_flops(trial, [chain[0]], x)
        merged = get_module(trial, chain[0])
        what = f"{chain[0]}+{reader} -> {type(merged).__name__}"
        if isinstance(merged, nn.Conv2d):
            what += f" {merged.kernel_size[0]}x{merged.kernel_size[1]}"
        if after > before and not approximate:
            log[site] = f"not folded: {what} would cost x{after / before:.2f} the pair's FLOPs"
            continue
        log[site] = f"folded: {what} (x{after / before:.2f} the pair's FLOPs)"
        model = trial
    return model, log


def fold_all_bn(model: nn.Module) -> nn.Module:
    """Every BN read straight from a conv/linear folded into it (the control variant)."""
    modules = dict(model.named_modules())
    graph = fx.symbolic_trace(model).graph
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _BatchNorm):
            src = node.args[0]
            if src.op == "call_module" and isinstance(modules[src.target], (nn.Conv2d, nn.Linear)):
                model = fold_linear(model, first=str(src.target), second=str(node.target))
    return model


def _folded(log: dict[str, str]) -> set[str]:
    return {site for site, what in log.items() if what.startswith("folded")}


def shrink(model: nn.Module, x: Tensor) -> tuple[nn.Module, nn.Module]:
    """(masked, compacted): ``a``'s zeroing then ``compact`` on ``model``."""
    masked = zero_half(copy.deepcopy(model), x, norms=True)
    return masked, compact(masked, example_inputs=x)


def build(name: str, spec: dict[str, Any], dense: nn.Module, x: Tensor) -> dict[str, Any]:
    """Every variant of one network, the references of the exact ones, and the edit notes."""
    sites, blocks = spec["sites"], spec["blocks"]
    models: dict[str, nn.Module] = {"dense": dense}
    refs: dict[str, str] = {}
    notes: dict[str, Any] = {"sites": sites, "blocks": blocks, "skipped": {}}
    if any(isinstance(m, _BatchNorm) for m in dense.modules()):
        models["dense_bnfold"], refs["dense_bnfold"] = fold_all_bn(dense), "dense"
    else:
        notes["skipped"]["dense_bnfold"] = "no BatchNorm"
    models["a_masks"], models["b_compact"] = shrink(dense, x)
    refs["b_compact"] = "a_masks"
    identity = uniquify_activations(dense)
    for site in sites:
        identity = replace_activation(identity, site=site, kind="identity")
    models["c_identity"] = identity
    folded, notes["folds"] = fold_sites(identity, sites, x, approximate=False)
    if _folded(notes["folds"]):
        models["c_fold"], refs["c_fold"] = folded, "c_identity"
    else:
        notes["skipped"]["c_fold"] = "no exact fold that does not add FLOPs: same as c_identity"
    approx, notes["folds_all"] = fold_sites(identity, sites, x, approximate=True)
    if _folded(notes["folds_all"]) != _folded(notes["folds"]):
        models["c_fold_all"], refs["c_fold_all"] = approx, "c_identity"
    else:
        notes["skipped"]["c_fold_all"] = "same folds as c_fold"
    if blocks:
        reduced = dense
        for block in blocks:
            reduced = remove_block(reduced, block=block, example_inputs=x)
        models["d_blocks"] = reduced
    else:
        notes["skipped"]["d_blocks"] = "no shape-preserving block"
    for key, base in (("e_sites_compact", folded), ("e_blocks_compact", models.get("d_blocks"))):
        if base is not None:
            models[f"{key}:masked"], models[key] = shrink(base, x)
            refs[key] = f"{key}:masked"
    models["f_tp"] = tp_magnitude(copy.deepcopy(dense), x)
    return {"models": models, "refs": refs, "notes": notes}


# --------------------------------------------------------------------------- checks and timing


def rel_err(ref: Tensor, out: Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def replay_err(name: str, spec: dict[str, Any], model: nn.Module, x: Tensor) -> float | str:
    """Rebuild ``model`` from a fresh network + its edit log, load its state strictly, compare."""
    try:
        fresh = replay(create(name, num_classes=10, **spec["kw"]), edit_log(model))
        fresh.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            return rel_err(model(x), fresh.eval()(x))
    except Exception as err:  # report, do not stop the benchmark
        return f"{type(err).__name__}: {err}"


def time_variants(
    models: dict[str, nn.Module], x: Tensor, rounds: int, warmup: int
) -> dict[str, float]:
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for r in range(warmup + rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:  # rotating start
                start = time.perf_counter()
                models[n](x)
                if r >= warmup:
                    times[n].append((time.perf_counter() - start) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def run_size(
    name: str,
    spec: dict[str, Any],
    built: dict[str, Any],
    shape: tuple[int, ...],
    rounds: int,
    warmup: int,
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen)
    fresh = torch.randn(shape, generator=gen) * 2 + 1
    models: dict[str, nn.Module] = built["models"]
    with torch.no_grad():
        outs = {k: m(fresh) for k, m in models.items()}
    for k, out in outs.items():  # every edited model runs, same output shape, finite
        if out.shape != outs["dense"].shape or not bool(torch.isfinite(out).all()):
            raise RuntimeError(f"{name} {k}: output {tuple(out.shape)} or non-finite values")
    errors = {k: rel_err(outs[ref], outs[k]) for k, ref in built["refs"].items()}
    timed = {k: m for k, m in models.items() if ":" not in k}
    medians = time_variants(timed, x, rounds, warmup)
    one = x[:1]
    rows = []
    for k, m in timed.items():
        total, nonzero = count_params(m)
        rows.append(
            {
                "variant": k,
                "median_ms": round(medians[k], 3),
                "speedup": round(medians["dense"] / medians[k], 3),
                "params": total,
                "nonzero_params": nonzero,
                "mflops": round(flops(m, one) * shape[0] / 1e6, 1),
                "depth": depth(m, one),
                "rel_err_vs": {built["refs"][k]: errors[k]} if k in errors else None,
            }
        )
    print(f"\n{name}: batch {shape[0]}, {'x'.join(map(str, shape[1:]))}; {rounds} rounds")
    print(f"{'variant':<18} {'ms':>8} {'dense/x':>8} {'params':>10} {'MFLOPs':>9} {'depth':>6}")
    for r in rows:
        print(
            f"{r['variant']:<18} {r['median_ms']:>8.2f} {r['speedup']:>8.2f} {r['params']:>10} "
            f"{r['mflops']:>9.1f} {r['depth']:>6}"
        )
    return {"network": name, "input_shape": list(shape), "rounds": rounds, "results": rows}


def bench(
    name: str, rounds: dict[str, tuple[int, int]], check_replay: bool
) -> list[dict[str, Any]]:
    spec = NETWORKS[name]
    side, batch, _ = spec["sizes"][0]
    shape = (batch, spec["kw"]["in_channels"], side, side)
    torch.manual_seed(0)
    dense = calibrate(create(name, num_classes=10, **spec["kw"]), shape)
    start = time.perf_counter()
    example = torch.randn(shape, generator=torch.Generator().manual_seed(3))[:2]
    built = build(name, spec, dense, example)
    notes = built["notes"]
    notes["build_seconds"] = round(time.perf_counter() - start, 1)
    if check_replay:
        notes["replay_rel_err"] = {
            k: replay_err(name, spec, m, example)
            for k, m in built["models"].items()
            if k not in ("dense", "a_masks", "f_tp") and ":" not in k
        }
    print(f"\n== {name}: built in {notes['build_seconds']} s; folds (c_fold):")
    for site, what in notes["folds"].items():
        print(f"   {site}: {what}")
    out = []
    for side, batch, size in spec["sizes"]:
        if rounds[size][0] == 0:
            continue
        shape = (batch, spec["kw"]["in_channels"], side, side)
        out.append(run_size(name, spec, built, shape, *rounds[size]) | {"edits": notes})
    return out


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds, small inputs")
    parser.add_argument("--rounds-large", type=int, default=30, help="timed rounds at 224x224")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds (2 at 224x224)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="50 rounds, 3 at 224x224, no replay check"
    )
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON result path")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rounds_large, args.warmup = 50, 3, 2
    rounds = {"small": (args.rounds, args.warmup), "large": (args.rounds_large, 2)}
    torch.set_num_threads(args.threads)
    load_start, start = _loadavg(), time.perf_counter()
    runs = [r for name in args.networks for r in bench(name, rounds, not args.quick)]
    result = {
        "benchmark": "CPU inference latency: channel pruning vs depth reduction (issue 4 item 5)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_pruning": tp.__version__,
        "threads": args.threads,
        "rounds": {"small": args.rounds, "large_224": args.rounds_large},
        "warmup": {"small": args.warmup, "large_224": 2},
        "machine": " ".join(
            filter(None, (platform.machine(), platform.processor(), f"{os.cpu_count()} cores"))
        ),
        "loadavg_start_end": [load_start, _loadavg()],
        "seconds": round(time.perf_counter() - start, 1),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
