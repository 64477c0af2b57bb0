"""CPU latency of dense vs channel-pruned vs depth-reduced models (issue 4 item 5).

Two sections, both timed the same way (below): the trained trend models with their accuracy,
and random-init networks for speed only.

**Trend models** (``--sections trend``; mnist5k, seed 0, trained as the trend tests do, with
``tests/prune/prune_harness.py``'s loop, loaders and accuracy): ``mlp`` (EASIER's 8 x 256,
``test_easier_trend``), ``residual_mlp`` (EGP's, no BN, ``test_egp_trend``), ``residual_mlp_bn``
(LaCoOT's, BN and post-activation, lambda = 1, ``test_lacoot_trend``). Variants:

- ``dense``; ``dense_bnfold`` (BN models: every BN folded, nothing removed);
- ``a_masks`` / ``b_compact``: half of every channel group zeroed on the dense model
  (``compact_speed.zero_half``), fine-tuned with the masks, then ``compact``;
- ``c_identity`` (EASIER: 4 sites removed, 3 epochs of fine-tune after each), ``c_linearized``
  (EGP: rounds of 20 % until the block weights are 95 % sparse, zero-entropy sites linearised,
  3 epochs after each round; masks and gates as EGP leaves them), ``c_fold`` (the Linear pairs
  that meet at those sites folded by ``fold_linear``, which merges only where cheaper);
- ``d_blocks{2,4}``: LaCoOT's 2 / 4 blocks closest to the identity removed, then fine-tuned
  (``test_acc_no_finetune``: before, as LaCoOT reports it);
- ``e_sites_compact`` / ``e_blocks{k}_compact``: ``c_fold`` / ``d_blocks{k}`` (before its
  fine-tune), then ``b``'s zeroing, fine-tune and ``compact``; ``e_sites_compact_egp``:
  ``compact(c_fold)`` of EGP, nothing zeroed beyond EGP's masks;
- ``f_tp{50,62,75,88}``: Torch-Pruning on the dense model at that ratio, fine-tuned.

Fine-tuning: the depth method's own (EASIER 12 epochs, EGP 42, LaCoOT none), then
``CHANNEL_FT`` epochs after a channel edit or a LaCoOT removal; Torch-Pruning and
``b_compact`` get the same total as the ``e_*`` variants. Timed on test images at batch 1 and
256. ``goals``: goal 1, the fastest depth-reduced model (depth edits alone, and depth +
compact) within 1 pt of the dense accuracy, >= 1.5x; goal 2, each ``e_*`` variant vs the
fastest Torch-Pruning ratio at least as accurate (one test image of slack).

**Speed only** (``--sections speed``): random init, BN calibrated (``compact_speed.calibrate``:
random affine, 5 train-mode batches, then eval). Each network's variants are built once on a
small example input and timed at every input size listed for it (weights and structure do not
depend on the resolution; exactness and output shapes are checked again at each size):

- ``dense``; ``dense_bnfold`` (control: every BN folded into its conv/linear, nothing removed);
- ``a_masks``: half of every free DepGraph group's channels zeroed with core channel masks,
  lowest group L1 first, producers and their BN (``compact_speed.zero_half``);
- ``b_compact``: ``compact(a_masks)``;
- ``c_identity``: k activation sites turned into ``nn.Identity`` (``uniquify_activations`` then
  ``replace_activation``), nothing folded;
- ``c_fold``: ``c_identity`` plus, per removed site, the pair around it folded with
  ``fold_linear`` (the BN before the site into its conv/linear first), which merges only where
  the merged layer costs fewer MACs than the pair (a skipped pair stays unfolded, its BN too);
  built only when some pair folds;
- ``c_fold_all``: every pair that ``fold_linear(only_cheaper=False, allow_approximate=True)``
  merges, padded kxk∘kxk (inexact at the borders) included; built only when it differs from
  ``c_fold``;
- ``d_blocks``: k shape-preserving blocks removed (``remove_block``);
- ``e_sites_compact`` / ``e_blocks_compact``: ``c_fold`` (``c_identity`` where nothing folds) /
  ``d_blocks``, then ``a``'s zeroing (groups recomputed on the edited model) and ``compact``;
- ``f_tp``: Torch-Pruning 1.6 ``MagnitudePruner`` (= ``BasePruner`` + L1 importance) at
  ``pruning_ratio=0.5``, classifier ignored (:func:`compact_speed.tp_magnitude`).

Which sites and blocks (k), per network: resnet18: the mid-block ReLU of all 8 BasicBlocks
(``layerS.B.relu``) / the second block of each stage; mobilenet_v2: the depthwise ReLU6 of the
10 residual InvertedResiduals / the last residual block of each stage (3, 6, 10, 13, 16);
residual_mlp (LaCoOT's test bed: width 128, 8 blocks, BN, post-activation): the mid ReLU of
all 8 blocks / blocks 1, 3, 5, 7; mlp (EASIER's: 8 x 256): relu1, 3, 5, 7 / none (no
shape-preserving block). Sites and blocks remove the same number of activations, except mlp.

Timing: eval mode, no grad, one forward per variant per round, variants interleaved round-robin
(the first variant rotates every round) after warm-up rounds; ``speedup`` = dense median /
variant median from the same run; one thread by default (``--threads``). FLOPs
(``sobre.core.measure.flops``) are per batch (trend models: MACs per image), depth is
``sobre.core.measure.depth`` (non-linear sites on the longest path). Checks, stored in the
JSON: every variant runs with the dense output shape and finite outputs; exact edits match their
reference on a fresh input (``rel_err_vs``: max error / max |reference|); every edited
speed-only variant rebuilds from a fresh network by ``replay`` of its edit log + strict
``load_state_dict``. Writes benchmarks/results/prune_speed.json.

Usage: python benchmarks/prune_speed.py [--sections trend speed] [--rounds 300]
       [--rounds-large 60] [--threads 1] [--quick] [--networks resnet18 mlp ...]
       [--trend-models mlp ...] [--seed 0]   (--rounds-large 0 skips 224x224; --quick: 50
       rounds, 3 at 224x224, no replay check). About 7 min (--quick: 2.5 min) on a 2-core CPU,
       most of it training the trend models and timing the 224x224 networks.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import itertools
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from common import machine_name, write_result
from compact_speed import calibrate, tp_magnitude, zero_half  # sibling script, on sys.path
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

from sobre.core.compact import compact
from sobre.core.edits import edit_log, replay
from sobre.core.errors import ConfigError
from sobre.core.masks import bake
from sobre.core.measure import count_params, depth, flops
from sobre.models import create
from sobre.prune.easier import Easier
from sobre.prune.egp import EntropyGuidedPruner
from sobre.prune.lacoot import LaCoOT, auto_pairs, rank_blocks, remove_blocks
from sobre.prune.sites import uniquify_activations
from sobre.prune.surgery import (
    ChannelGate,
    fold_linear,
    get_module,
    remove_block,
    replace_activation,
)

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
_PASS = (nn.Identity, nn.Dropout, ChannelGate)


# --------------------------------------------------------------------------- edits


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps EGP's ChannelGate (a linearised site) as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ChannelGate) or super().is_leaf_module(m, module_qualified_name)


def _skip_back(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    while node.op == "call_module" and isinstance(modules[node.target], _PASS):
        node = node.args[0]  # type: ignore[assignment]
    return node


def _neighbours(model: nn.Module, site: str) -> tuple[list[str], str] | str:
    """``([conv/linear, (BN)], reader)`` around ``site``, or why there is no such pair."""
    try:
        graph = _Tracer().trace(model)
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


def fold_sites(model: nn.Module, sites: list[str], force: bool) -> tuple[nn.Module, dict[str, str]]:
    """Fold the linear pair around each (already linear) site; per site what happened.

    ``fold_linear`` merges only where the merged layer costs fewer MACs than the pair; ``force``
    merges every pair it can, zero-padded kxk∘kxk (approximate at the borders) included. A pair
    left apart keeps its BN unfolded too.
    """
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
            trial = fold_linear(
                trial,
                first=chain[0],
                second=reader,
                only_cheaper=not force,
                allow_approximate=force,
            )
        except ConfigError as err:
            log[site] = f"not folded: {str(err).split('. ')[0]}"
            continue
        record = edit_log(trial)[-1]["params"]
        pair, merged = record["macs"]
        cost = f"x{merged / pair:.2f} the pair's MACs"
        if not record["folded"]:
            log[site] = f"not folded: {chain[0]}+{reader} would cost {cost}"
            continue
        layer = get_module(trial, chain[0])
        kernel = getattr(layer, "kernel_size", None)
        shape = f" {kernel[0]}x{kernel[1]}" if kernel else ""
        log[site] = f"folded: {chain[0]}+{reader} -> {type(layer).__name__}{shape} ({cost})"
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
    folded, notes["folds"] = fold_sites(identity, sites, force=False)
    if _folded(notes["folds"]):
        models["c_fold"], refs["c_fold"] = folded, "c_identity"
    else:
        notes["skipped"]["c_fold"] = "no exact fold that is cheaper: same as c_identity"
    approx, notes["folds_all"] = fold_sites(identity, sites, force=True)
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
    models["f_tp"] = tp_magnitude(copy.deepcopy(dense), x, 0.5)
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


# --------------------------------------------------------------------------- trend models

HARNESS = Path(__file__).resolve().parents[1] / "tests" / "prune"
TREND_BATCHES = (1, 256)
TP_RATIOS = (0.5, 0.625, 0.75, 0.875)
#: Fine-tune epochs after a channel edit (half the groups zeroed, or Torch-Pruning), and after a
#: LaCoOT block removal; Torch-Pruning also gets the depth method's own fine-tune epochs.
CHANNEL_FT = 10
#: Accuracy loss allowed for "equal accuracy" (one of the 500 test images) and for goal 1.
SAME_ACC, GOAL_LOSS, GOAL_SPEEDUP = 0.002, 0.01, 1.5

Optim = Callable[[list[Tensor]], torch.optim.Optimizer]
Splits = tuple[TensorDataset, TensorDataset, TensorDataset]  # mnist5k train, val, test
_ADAM_FT: Optim = functools.partial(torch.optim.Adam, lr=3e-4)
_SGD: Optim = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)


def _harness() -> Any:
    """``tests/prune/prune_harness.py``: the trend tests' mnist5k, loader, train, accuracy."""
    if str(HARNESS) not in sys.path:
        sys.path.insert(0, str(HARNESS))
    return importlib.import_module("prune_harness")


@dataclass
class Trend:
    """One trend model after its depth method: variants, their notes, the fine-tuning used."""

    dense: nn.Module
    variants: dict[str, nn.Module]
    notes: dict[str, Any]
    finetune: Optim
    depth_epochs: int  # the depth method's own fine-tune epochs (Torch-Pruning gets them too)
    compact_of: dict[str, str] = field(default_factory=dict)  # e_* variant -> depth variant


def easier_mlp(h: Any, data: Splits, seed: int, k: int = 4) -> Trend:
    """``test_easier_trend``: MLP 8 x 256, Kaiming-normal init, Adam 1e-3 30 epochs; EASIER
    removes ``k`` sites, 3 epochs of Adam 3e-4 after each; then the Linear pairs that meet are
    folded where cheaper (``c_fold``)."""
    tr = data[0]
    torch.manual_seed(seed)
    net = create("mlp", num_classes=10, in_channels=1, hidden=(256,) * 8)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    h.train(net, h.loader(tr, seed=seed), 30, functools.partial(torch.optim.Adam, lr=1e-3))
    dense, easier, ranking = copy.deepcopy(net), Easier(), h.loader(tr, shuffle=False)
    for i in range(k):
        net = easier.apply(net, ranking)
        h.train(net, h.loader(tr, seed=1000 * seed + i), 3, _ADAM_FT)
    sites = easier.report()["removed_so_far"]
    folded, folds = fold_sites(net, sites, force=False)
    return Trend(
        dense,
        {"c_identity": net, "c_fold": folded},
        {"method": f"EASIER, {k} sites", "sites": sites, "folds": folds},
        _ADAM_FT,
        3 * k,
        {"e_sites_compact": "c_fold"},
    )


def egp_residual_mlp(h: Any, data: Splits, seed: int, target: float = 0.95) -> Trend:
    """``test_egp_trend``: residual MLP 784->128, 8 blocks, no BN, Adam 1e-3 20 epochs; EGP
    rounds (20 %, tau 0.05, stem and classifier excluded, 3 epochs of Adam 3e-4 each) until the
    block weights are ``target`` sparse. ``c_linearized`` is that model (masks, gates);
    ``c_fold`` bakes the masks and folds fc1∘fc2 of the linearised blocks (where cheaper);
    ``e_sites_compact_egp`` compacts it as it is (what EGP's masks left removable)."""
    tr = data[0]
    torch.manual_seed(seed)
    net = create("residual_mlp", num_classes=10, in_channels=1, width=128, blocks=8)
    h.train(net, h.loader(tr, seed=seed), 20, functools.partial(torch.optim.Adam, lr=1e-3))
    dense = copy.deepcopy(net)
    pruner = EntropyGuidedPruner(tau=0.05, exclude=("stem", "classifier"))
    entropy_data, rounds = h.loader(tr, batch_size=500, shuffle=False), 0
    while True:
        rounds += 1
        net, report = pruner.step(net, entropy_data)
        h.train(net, h.loader(tr, seed=seed * 100 + rounds), 3, _ADAM_FT)
        if report.sparsity >= target:
            break
    sites = report.linearized_total
    folded, folds = fold_sites(bake(copy.deepcopy(net)), sites, force=False)
    notes = {
        "method": f"EGP, {rounds} rounds",
        "sparsity": round(report.sparsity, 4),
        "sites": sites,
        "folds": folds,
    }
    variants = {"c_linearized": net, "c_fold": folded}
    variants["e_sites_compact_egp"] = compact(folded, example_inputs=tr.tensors[0][:8])
    return Trend(dense, variants, notes, _ADAM_FT, 3 * rounds, {"e_sites_compact": "c_fold"})


def lacoot_residual_mlp(h: Any, data: Splits, seed: int, ks: tuple[int, ...] = (2, 4)) -> Trend:
    """``test_lacoot_trend``: residual MLP with BN and post-activation, SGD 0.01 (momentum 0.9)
    20 epochs with LaCoOT (lambda 1); blocks ranked by MSWD on the validation split, the ``k``
    closest removed (``d_blocks{k}``), then ``CHANNEL_FT`` epochs of the same SGD."""
    tr, va, _ = data
    net = h.lacoot_net(seed)
    example = tr.tensors[0][:8]
    pairs = auto_pairs(net, example)
    h.train(net, h.loader(tr, seed=seed), 20, _SGD, [LaCoOT(pairs, lam=1.0)])
    ranked = [d.block for d in rank_blocks(net, h.loader(va, shuffle=False), pairs)]
    variants = {"dense_bnfold": fold_all_bn(net)}
    for k in ks:
        variants[f"d_blocks{k}"] = remove_blocks(net, ranked[:k], example_inputs=example)
    notes = {"method": "LaCoOT, lambda 1", "ranked_blocks": ranked}
    compact_of = {f"e_blocks{k}_compact": f"d_blocks{k}" for k in ks}
    return Trend(net, variants, notes, _SGD, 0, compact_of)


TRENDS: dict[str, tuple[str, Callable[[Any, Splits, int], Trend]]] = {
    "mlp": ("tests/prune/test_easier_trend.py", easier_mlp),
    "residual_mlp": ("tests/prune/test_egp_trend.py", egp_residual_mlp),
    "residual_mlp_bn": ("tests/prune/test_lacoot_trend.py", lacoot_residual_mlp),
}


def trend_variants(
    h: Any, data: Splits, trend: Trend, seed: int
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Every timed variant of a trend model, and per variant its fine-tune epochs (in total,
    from the dense model) and test accuracy before a fine-tune where the method has none.

    ``a_masks``/``b_compact``: half of every channel group zeroed (``compact_speed.zero_half``)
    on the dense model, fine-tuned with the masks, compacted; ``e_*``: the same on a
    depth-reduced variant; ``f_tp*``: Torch-Pruning at each ratio, fine-tuned. Channel edits get
    ``CHANNEL_FT`` epochs on top of the depth method's own, Torch-Pruning and ``b_compact`` the
    same total; LaCoOT's collapsed models get ``CHANNEL_FT`` epochs too (accuracy before kept).
    """
    tr, _, te = data
    x, loaders = tr.tensors[0][:8], itertools.count(7000 + 100 * seed)
    depth_ft = trend.depth_epochs

    def finetune(net: nn.Module, epochs: int) -> nn.Module:
        h.train(net, h.loader(tr, seed=next(loaders)), epochs, trend.finetune)
        return net.eval()

    built = {"dense": trend.dense, **trend.variants}
    models = dict(built)
    info: dict[str, dict[str, Any]] = {k: {"finetune_epochs": depth_ft} for k in models}
    info["dense"]["finetune_epochs"] = 0
    for name in [n for n in trend.variants if n.startswith("d_")]:
        info[name] = {"test_acc_no_finetune": round(h.accuracy(trend.variants[name], te), 4)}
        models[name] = finetune(copy.deepcopy(trend.variants[name]), CHANNEL_FT)
        info[name]["finetune_epochs"] = CHANNEL_FT
    zeroed = {"b_compact": ("dense", depth_ft + CHANNEL_FT)}
    zeroed |= {e: (d, CHANNEL_FT) for e, d in trend.compact_of.items()}
    for name, (base, epochs) in zeroed.items():
        masked = zero_half(copy.deepcopy(built[base]), x, norms=True)
        models[name] = compact(finetune(masked, epochs), example_inputs=x)
        info[name] = {"finetune_epochs": depth_ft + CHANNEL_FT, "from": base}
        if name == "b_compact":
            models["a_masks"], info["a_masks"] = masked, dict(info[name])
    for ratio in TP_RATIOS:
        name = f"f_tp{round(ratio * 100)}"
        models[name] = finetune(
            tp_magnitude(copy.deepcopy(trend.dense), x[:2], ratio), depth_ft + CHANNEL_FT
        )
        info[name] = {"finetune_epochs": depth_ft + CHANNEL_FT, "tp_ratio": ratio}
    return models, info


def _exact_refs(models: dict[str, nn.Module], x: Tensor) -> dict[str, dict[str, float]]:
    """Errors of the exact edits vs their reference (folds, BN folds, EGP's compact)."""
    refs = {
        "c_fold": ("c_identity", "c_linearized"),
        "dense_bnfold": ("dense",),
        "e_sites_compact_egp": ("c_fold",),
    }
    out = {}
    with torch.no_grad():
        for k, candidates in refs.items():
            ref = next((r for r in candidates if r in models), None)
            if k in models and ref is not None:
                out[k] = {ref: rel_err(models[ref](x), models[k](x))}
    return out


def _fastest_within(rows: list[dict[str, Any]], dense_acc: float, b: str) -> dict[str, Any]:
    """The fastest of ``rows`` at batch ``b`` losing at most ``GOAL_LOSS`` vs the dense model."""
    ok = [r for r in rows if dense_acc - r["test_acc"] <= GOAL_LOSS + 1e-6]
    best = max(ok, key=lambda r: r["latency"][b]["speedup"], default=None)
    if best is None:
        return {"best": None, "met": False}
    speedup = best["latency"][b]["speedup"]
    return {
        "best": best["variant"],
        "speedup": speedup,
        "loss_pt": round(100 * (dense_acc - best["test_acc"]), 1),
        "met": speedup >= GOAL_SPEEDUP,
    }


def _versus_tp(row: dict[str, Any], tp_rows: list[dict[str, Any]], b: str) -> dict[str, Any]:
    """``row`` vs the fastest Torch-Pruning model at least as accurate (``SAME_ACC`` slack)."""
    peers = [t for t in tp_rows if t["test_acc"] >= row["test_acc"] - SAME_ACC - 1e-6]
    peer = min(peers, key=lambda t: t["latency"][b]["median_ms"], default=None)
    if peer is None:
        return {"tp": None, "acc": row["test_acc"], "met": True}
    ratio = peer["latency"][b]["median_ms"] / row["latency"][b]["median_ms"]
    return {
        "tp": peer["variant"],
        "tp_acc": peer["test_acc"],
        "acc": row["test_acc"],
        "tp_ms_over_ms": round(ratio, 3),
        "met": ratio > 1,
    }


def goals(rows: list[dict[str, Any]], dense_acc: float) -> dict[str, Any]:
    """Goal 1 (>= ``GOAL_SPEEDUP`` at <= ``GOAL_LOSS``): the fastest such variant among depth
    edits alone (``c_*``, ``d_*``) and depth + compact (``e_*``), per batch size. Goal 2: every
    ``e_*`` variant vs the fastest Torch-Pruning ratio at least as accurate."""
    kinds = {"depth_only": ("c_", "d_"), "depth_compact": ("e_",)}
    depth = {k: [r for r in rows if r["variant"].startswith(p)] for k, p in kinds.items()}
    tp_rows = [r for r in rows if r["variant"].startswith("f_tp")]
    batches = [str(b) for b in TREND_BATCHES]
    return {
        "goal1": {
            k: {b: _fastest_within(v, dense_acc, b) for b in batches} for k, v in depth.items()
        },
        "goal2": {
            r["variant"]: {b: _versus_tp(r, tp_rows, b) for b in batches}
            for r in depth["depth_compact"]
        },
    }


def bench_trend(name: str, seed: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Train, edit and time one trend model; accuracy on the 500 mnist5k test images."""
    h = _harness()
    data = h.mnist5k()
    test_file, make = TRENDS[name]
    start = time.perf_counter()
    trend = make(h, data, seed)
    models, info = trend_variants(h, data, trend, seed)
    for m in models.values():
        m.eval()
    test = data[2]
    build_s = round(time.perf_counter() - start, 1)
    xs = {b: test.tensors[0][:b] for b in TREND_BATCHES}
    errors = _exact_refs(models, test.tensors[0])
    medians = {b: time_variants(models, x, rounds, warmup) for b, x in xs.items()}
    dense_acc = round(h.accuracy(trend.dense, test), 4)
    rows = []
    for k, m in models.items():
        total, nonzero = count_params(m)
        rows.append(
            {
                "variant": k,
                "test_acc": round(h.accuracy(m, test), 4),
                **info[k],
                "params": total,
                "nonzero_params": nonzero,
                "macs_per_image": flops(m, xs[1]) // 2,
                "depth": depth(m, xs[1]),
                "rel_err_vs": errors.get(k),
                "latency": {
                    str(b): {
                        "median_ms": round(medians[b][k], 4),
                        "speedup": round(medians[b]["dense"] / medians[b][k], 3),
                    }
                    for b in TREND_BATCHES
                },
            }
        )
    print(f"\n== trend model {name} ({trend.notes['method']}; {test_file}), seed {seed}")
    print(
        f"{'variant':<20} {'acc':>6} {'ft ep':>5} {'params':>8} {'kMACs':>7} {'depth':>5}", end=""
    )
    print("".join(f" {'ms@' + str(b):>9} {'x@' + str(b):>7}" for b in TREND_BATCHES))
    for r in rows:
        print(
            f"{r['variant']:<20} {100 * r['test_acc']:>6.1f} {r['finetune_epochs']:>5} "
            f"{r['params']:>8} {r['macs_per_image'] / 1e3:>7.1f} {r['depth']:>5}",
            end="",
        )
        lat = r["latency"]
        print(
            "".join(
                f" {lat[str(b)]['median_ms']:>9.3f} {lat[str(b)]['speedup']:>7.2f}"
                for b in TREND_BATCHES
            )
        )
    return {
        "model": name,
        "trend_test": test_file,
        "seed": seed,
        "dense_test_acc": dense_acc,
        "edits": trend.notes,
        "build_seconds": build_s,
        "rounds": rounds,
        "batches": list(TREND_BATCHES),
        "results": rows,
        "goals": goals(rows, dense_acc),
    }


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds, small inputs")
    parser.add_argument("--rounds-large", type=int, default=60, help="timed rounds at 224x224")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds (2 at 224x224)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="50 rounds, 3 at 224x224, no replay check"
    )
    parser.add_argument(
        "--sections", nargs="+", default=["trend", "speed"], choices=["trend", "speed"]
    )
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--trend-models", nargs="+", default=list(TRENDS), choices=list(TRENDS))
    parser.add_argument("--seed", type=int, default=0, help="trend models' seed (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON result path")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rounds_large, args.warmup = 50, 3, 2
    rounds = {"small": (args.rounds, args.warmup), "large": (args.rounds_large, 2)}
    torch.set_num_threads(args.threads)
    logging.getLogger("sobre.prune.surgery").setLevel(logging.ERROR)  # folds: printed per site
    load_start, start = _loadavg(), time.perf_counter()
    trends = [
        bench_trend(name, args.seed, args.rounds, args.warmup)
        for name in (args.trend_models if "trend" in args.sections else [])
    ]
    runs = [
        r
        for name in (args.networks if "speed" in args.sections else [])
        for r in bench(name, rounds, not args.quick)
    ]
    write_result(
        args.out,
        "CPU inference latency: channel pruning vs depth reduction (issue 4 item 5)",
        start,
        torch_pruning=tp.__version__,
        threads=args.threads,
        rounds={"small": args.rounds, "large_224": args.rounds_large},
        warmup={"small": args.warmup, "large_224": 2},
        machine=machine_name(cores=True),
        loadavg_start_end=[load_start, _loadavg()],
        trend_models=trends,
        runs=runs,
    )


if __name__ == "__main__":
    main()
