"""Activation memory and step time of last-k-block fine-tuning: vanilla, checkpointing,
HOSVD_ε (#35), ASI (#37), LoRA and WASI (#46).

Per model (torchvision ``resnet18`` and ``mobilenet_v2``, ``weights=None``; timm
``vit_small_patch16_224``, ``pretrained=False``, built at the input size; 10 classes, random
init, BN statistics from 3 train-mode batches so that folding is meaningful), the last k blocks
(ResNet: BasicBlocks; MobileNetV2: ``features[1:]``; ViT: ``blocks``) and the head (ResNet
``fc``, MobileNetV2 ``classifier``, ViT ``norm``/``fc_norm``/``head``) train; every earlier
parameter is frozen. The arms are:

- ``vanilla``: the trained blocks train normally (BN in train mode, batch statistics);
- ``checkpoint``: the same, each trained block run under
  ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)``;
- ``hosvd``: every BN folded (:func:`~sobre.efficient.sparse.fold_frozen_bn`, so the trained
  blocks train their convs and the folded biases), every ``groups=1`` Conv2d and every Linear of the
  trained blocks compressed (:func:`~sobre.efficient.compress.compress_activations`,
  ``method="hosvd"``, ε = ``--explained-var``), then bit-mask ReLUs where they free memory
  (:func:`~sobre.efficient.sparse.mask_relus`, on 2 images). MobileNetV2's depthwise convs are
  grouped, which activation compression does not support: they stay **uncompressed but trained**
  (listed per model as ``uncompressed_trained_layers``);
- ``asi``: the same with ``method="asi"`` at ranks from
  :func:`~sobre.efficient.compress.select_ranks` under a byte budget: by default HOSVD's
  analytic factor bytes of one step (the compressed layers' ``saved_bytes``), or
  ``--asi-budget-fraction`` x vanilla's measured trained-block bytes;
- ``lora`` (ViT only): :func:`sobre.efficient.lora.add_lora` (r = 8, alpha = 16) on the Linear
  layers of the trained blocks (their base weights frozen; LayerNorms and the head train);
- ``wasi`` (ViT only): :func:`sobre.efficient.wasi.wasi` (``weight_var`` 0.8) on the same layers,
  activation budget as ASI's.

LoRA and WASI are imported lazily: an arm whose module is missing is skipped with a note.

Per arm: ``saved_bytes``, the activation bytes autograd keeps after one training forward of the
whole model (:func:`sobre.core.measure.saved_activation_bytes`: unique storages, parameters
excluded), and ``block_bytes``, the same for the trained blocks alone (run as a chain on the
frozen prefix's output). Non-reentrant checkpointing keeps each checkpointed block's input
with ``save_for_backward`` under the caller's saved-tensor hooks (and hides the block's own
saves behind its hooks), so these counts hold exactly what it keeps; on CUDA they agree with the
allocator (``forward_retained_bytes``). ``step_s`` is the median wall
time of a step (``zero_grad`` + forward + cross-entropy + backward + SGD step with momentum; CUDA
synchronised) after warm-up rounds, all arms of a model round-robin (first arm rotating).
On CUDA, one extra step per arm is read off the allocator (as
:func:`sobre.core.measure.peak_memory_bytes` does, but with the optimizer step):
``forward_retained_bytes``, what the forward left allocated (the autograd graph's saved tensors,
plus the logits), an allocator cross-check of ``saved_bytes``; ``peak_bytes``,
``torch.cuda.max_memory_allocated`` over the step (reset first), and ``step_peak_bytes``, that
peak minus what was allocated just before the step (every arm's model lives on the device during
the run, so this is the per-arm figure). The peak also holds the transient activations of the
frozen prefix and the compression's own workspace (SVDs), so it can be set outside the trained
blocks and move in either direction. Ratios are against vanilla of
the same run: bytes ``vanilla / arm`` (higher = fewer bytes), time ``arm / vanilla`` (the median
over rounds of the within-round ratio; higher = slower).
Writes benchmarks/results/activation_memory_<device>.json (``--out`` to change).

Usage: python benchmarks/activation_memory.py [--device cuda] [--models resnet18 ...]
       [--arms vanilla hosvd ...] [--blocks 2] [--batch 32] [--size 224] [--repeats N]
       [--warmup N] [--threads 1] [--asi-budget-fraction F] [--smoke] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from common import calibrate_bn, write_result
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from sobre.core.measure import saved_activation_bytes
from sobre.efficient.compress import (
    CompressedConv2d,
    CompressedLinear,
    compress_activations,
    select_ranks,
)
from sobre.efficient.sparse import fold_frozen_bn, mask_relus

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "mobilenet_v2", "vit_small")
ARMS = ("vanilla", "checkpoint", "hosvd", "asi", "lora", "wasi")
VIT_ONLY = frozenset({"lora", "wasi"})
LAZY = {"lora": "sobre.efficient.lora", "wasi": "sobre.efficient.wasi"}
CLASSES = 10


def build_model(key: str, size: int) -> tuple[nn.Module, list[str], list[str]]:
    """The model, its block names in forward order and its head's module names."""
    if key == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
        blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
        return model, blocks, ["fc"]
    if key == "mobilenet_v2":
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=CLASSES)
        return model, [f"features.{i}" for i in range(1, len(model.features))], ["classifier"]
    import timm  # only the ViT needs it

    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=CLASSES, img_size=size
    )
    return model, [f"blocks.{i}" for i in range(len(model.blocks))], ["norm", "fc_norm", "head"]


def freeze(model: nn.Module, trained: Sequence[str]) -> None:
    """Freeze every parameter outside the ``trained`` modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trained:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


class Checkpointed(nn.Module):
    """Runs ``block`` under non-reentrant activation checkpointing while grad is enabled."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.block(x)
        return checkpoint(self.block, x, use_reentrant=False)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def compressible(model: nn.Module, blocks: Sequence[str]) -> tuple[list[str], list[str]]:
    """Names of the ``groups=1`` Conv2d / Linear layers in ``blocks``, and of the grouped convs
    left uncompressed."""
    names, grouped = [], []
    for block in blocks:
        for name, m in model.get_submodule(block).named_modules():
            full = f"{block}.{name}" if name else block
            if isinstance(m, nn.Conv2d):
                (names if m.groups == 1 else grouped).append(full)
            elif isinstance(m, nn.Linear):
                names.append(full)
    return names, grouped


def folded_bn(model: nn.Module) -> nn.Module:
    """``fold_frozen_bn(model)`` where the model has BatchNorm, else the model."""
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        return fold_frozen_bn(model)
    return model


def has_relu(model: nn.Module) -> bool:
    return any(type(m) in (nn.ReLU, nn.ReLU6) for m in model.modules())


def hosvd_factor_bytes(model: nn.Module, x: Tensor) -> int:
    """Analytic bytes (core + factors) the compressed layers saved in one training forward."""
    with torch.enable_grad():
        model.train()
        model(x)
    compressed = (CompressedConv2d, CompressedLinear)
    return sum(m.saved_bytes for m in model.modules() if isinstance(m, compressed))


def block_input(model: nn.Module, first: str, x: Tensor) -> Tensor:
    """The input of module ``first`` in a no-grad forward of ``model``."""
    seen: list[Tensor] = []
    handle = model.get_submodule(first).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0])
    )
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        handle.remove()
    return seen[0].detach()


def measured_bytes(model: nn.Module, blocks: Sequence[str], x: Tensor) -> tuple[int, int]:
    """Saved-activation bytes of a training forward: the whole model and the trained blocks."""
    feats = block_input(model, blocks[0], x)
    chain = nn.Sequential(*(model.get_submodule(b) for b in blocks))
    return (
        saved_activation_bytes(model, x).activations,
        saved_activation_bytes(chain, feats).activations,
    )


def build_arms(
    key: str, arms: Sequence[str], args: argparse.Namespace, x: Tensor, notes: list[str]
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Every requested arm of one model (on ``x``'s device) and facts about the setup."""
    torch.manual_seed(0)
    base, all_blocks, head = build_model(key, args.size)
    if not 1 <= args.blocks <= len(all_blocks):
        raise SystemExit(f"--blocks must lie in [1, {len(all_blocks)}] for {key}")
    blocks = all_blocks[-args.blocks :]
    head = [h for h in head if hasattr(base, h)]
    base = base.to(x.device)
    calibrate_bn(base, x)
    freeze(base, [*blocks, *head])
    layers, grouped = compressible(base, blocks)
    linears = [n for n in layers if isinstance(base.get_submodule(n), nn.Linear)]
    info: dict[str, Any] = {
        "trained_blocks": blocks,
        "trained_head": head,
        "compressed_layers": layers,
        "uncompressed_trained_layers": grouped,
    }
    models: dict[str, nn.Module] = {}
    if "vanilla" in arms or args.asi_budget_fraction is not None:
        models["vanilla"] = copy.deepcopy(base)
    if "checkpoint" in arms:
        model = copy.deepcopy(base)
        for name in blocks:
            set_module(model, name, Checkpointed(model.get_submodule(name)))
        models["checkpoint"] = model
    budget: int | None = None
    if args.asi_budget_fraction is not None:
        vanilla_blocks = measured_bytes(models["vanilla"], blocks, x)[1]
        budget = int(args.asi_budget_fraction * vanilla_blocks)
        info["asi_budget_source"] = f"{args.asi_budget_fraction} x vanilla block bytes"
    if "hosvd" in arms or (budget is None and {"asi", "wasi"} & set(arms)):
        model = compress_activations(
            folded_bn(copy.deepcopy(base)), layers, "hosvd", args.explained_var
        )
        if budget is None:
            budget = hosvd_factor_bytes(model, x)
            info["asi_budget_source"] = "hosvd analytic factor bytes of one step"
        if has_relu(model):
            mask_relus(model, x[:2])
        if "hosvd" in arms:
            models["hosvd"] = model
    info["asi_budget_bytes"] = budget
    if "asi" in arms:
        assert budget is not None
        model = folded_bn(copy.deepcopy(base))
        ranks = select_ranks(model, x, budget, layers=layers)
        compress_activations(model, layers, "asi", args.explained_var, ranks=ranks)
        if has_relu(model):
            mask_relus(model, x[:2])
        info["asi_ranks"] = {name: list(r) for name, r in ranks.items()}
        models["asi"] = model
    for arm in ("lora", "wasi"):
        if arm not in arms:
            continue
        if not linears or key != "vit_small":
            continue
        try:
            module = importlib.import_module(LAZY[arm])
        except ImportError as err:
            notes.append(f"{key}/{arm} skipped: {LAZY[arm]} not importable ({err})")
            print(f"  note: {notes[-1]}", flush=True)
            continue
        model = copy.deepcopy(base)
        if arm == "lora":
            module.add_lora(model, rank=8, alpha=16, layers=linears)
        else:
            assert budget is not None
            module.wasi(
                model, weight_var=0.8, activation_budget_bytes=budget, batch=x, layers=linears
            )
        models[arm] = model.to(x.device)
    if "vanilla" not in arms:
        models.pop("vanilla", None)
    return {a: models[a] for a in arms if a in models}, info


class Step:
    """One training step of ``model``: ``zero_grad`` + forward + cross-entropy + backward + SGD
    (momentum 0.9) over its trainable parameters."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        return F.cross_entropy(self.model(x), y)

    def finish(self, loss: Tensor) -> None:
        loss.backward()
        self.opt.step()

    def __call__(self, x: Tensor, y: Tensor) -> None:
        self.finish(self.forward(x, y))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    steps: dict[str, Step],
    x: Tensor,
    y: Tensor,
    repeats: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Per arm, the step times of the timed rounds (arms round-robin, first arm rotating)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(x.device)
            start = time.perf_counter()
            steps[name](x, y)
            sync(x.device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        tag = "warm-up" if r < warmup else "timed"
        print(f"  round {r + 1}/{warmup + repeats} ({tag})", flush=True)
    return times


def peak(step: Step, x: Tensor, y: Tensor) -> dict[str, int]:
    """CUDA allocator figures of one step: the peak (absolute and above what was allocated
    before the step) and what the forward left allocated (the autograd graph's saved tensors)."""
    step.opt.zero_grad(set_to_none=True)
    sync(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    loss = step.forward(x, y)
    sync(x.device)
    retained = torch.cuda.memory_allocated(x.device) - before
    step.finish(loss)
    sync(x.device)
    top = torch.cuda.max_memory_allocated(x.device)
    return {"peak_bytes": top, "step_peak_bytes": top - before, "forward_retained_bytes": retained}


def bench(key: str, args: argparse.Namespace, device: torch.device, notes: list[str]) -> dict:
    arms = [a for a in args.arms if a not in VIT_ONLY or key == "vit_small"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (args.batch,), generator=gen).to(device)
    print(f"\n{key}: batch {args.batch}, {args.size}x{args.size}, building arms", flush=True)
    start = time.perf_counter()
    models, info = build_arms(key, arms, args, x, notes)
    for model in models.values():
        model.train()
    print(f"  built {list(models)} in {time.perf_counter() - start:.1f} s", flush=True)
    steps = {name: Step(model) for name, model in models.items()}
    times = timed(steps, x, y, args.repeats, args.warmup)
    rows = []
    for name, model in models.items():
        whole, block = measured_bytes(model, info["trained_blocks"], x)
        model.train()
        row: dict[str, Any] = {
            "arm": name,
            "saved_bytes": whole,
            "block_bytes": block,
            "step_s": round(statistics.median(times[name]), 5),
            "min_step_s": round(min(times[name]), 5),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        if device.type == "cuda":
            row.update(peak(steps[name], x, y))
        rows.append(row)
    ref = next((r for r in rows if r["arm"] == "vanilla"), None)
    for row in rows:
        if ref is None:
            break
        row["bytes_ratio"] = round(ref["saved_bytes"] / max(row["saved_bytes"], 1), 3)
        row["block_bytes_ratio"] = round(ref["block_bytes"] / max(row["block_bytes"], 1), 3)
        pairs = zip(times[row["arm"]], times["vanilla"], strict=True)
        row["time_ratio"] = round(statistics.median(t / r for t, r in pairs), 3)
        for field in ("step_peak_bytes", "forward_retained_bytes"):
            if field in row:
                ratio = field.replace("_bytes", "_ratio")
                row[ratio] = round(ref[field] / max(row[field], 1), 3)
    print_table(key, rows)
    return {"model": key, "input_shape": list(x.shape), **info, "results": rows}


def print_table(key: str, rows: list[dict]) -> None:
    cuda = "step_peak_bytes" in rows[0]
    head = f"{'arm':<11} {'saved MB':>9} {'block MB':>9} {'x fewer':>8} {'blk x':>7}"
    head += f" {'step ms':>9} {'t ratio':>8}"
    if cuda:
        head += f" {'peak MB':>9} {'peak x':>7} {'kept MB':>9} {'kept x':>7}"
    print(f"{key}\n{head}")
    for r in rows:
        line = (
            f"{r['arm']:<11} {r['saved_bytes'] / 1e6:>9.2f} {r['block_bytes'] / 1e6:>9.2f} "
            f"{r.get('bytes_ratio', float('nan')):>8.2f} "
            f"{r.get('block_bytes_ratio', float('nan')):>7.2f} {1e3 * r['step_s']:>9.1f} "
            f"{r.get('time_ratio', float('nan')):>8.2f}"
        )
        if cuda:
            line += (
                f" {r['step_peak_bytes'] / 1e6:>9.1f} {r.get('step_peak_ratio', 0.0):>7.2f}"
                f" {r['forward_retained_bytes'] / 1e6:>9.1f}"
                f" {r.get('forward_retained_ratio', 0.0):>7.2f}"
            )
        print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--blocks", type=int, default=2, help="trained last blocks k (default 2)")
    parser.add_argument("--batch", type=int, help="batch size (default 32; smoke 2)")
    parser.add_argument("--size", type=int, help="input side (default 224; smoke 32)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 20 cuda, 5 cpu)")
    parser.add_argument("--warmup", type=int, help="untimed rounds (default 3 cuda, 1 cpu)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--explained-var", type=float, default=0.8, help="HOSVD ε (0.8)")
    parser.add_argument(
        "--asi-budget-fraction",
        type=float,
        help="ASI/WASI budget as this fraction of vanilla's block bytes (default: HOSVD's bytes)",
    )
    parser.add_argument("--smoke", action="store_true", help="32x32, batch 2, 1 round, no warm-up")
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON result path (default results/activation_memory_<device>.json)",
    )
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.out = args.out or RESULTS / f"activation_memory_{args.device}.json"
    if args.smoke:
        defaults = dict(batch=2, size=32, repeats=1, warmup=0)
    else:
        defaults = dict(batch=32, size=224, repeats=20 if cuda else 5, warmup=3 if cuda else 1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    notes: list[str] = []
    load_before = os.getloadavg()
    start = time.perf_counter()
    runs = [bench(key, args, device, notes) for key in args.models]
    return write_result(
        args.out,
        "activation memory and step time of last-k-block fine-tuning",
        start,
        torchvision=torchvision.__version__,
        device=args.device,
        device_name=torch.cuda.get_device_name(device) if cuda else platform.processor(),
        threads=args.threads,
        size=args.size,
        batch=args.batch,
        blocks=args.blocks,
        repeats=args.repeats,
        warmup=args.warmup,
        explained_var=args.explained_var,
        smoke=args.smoke,
        notes=notes,
        load_average_before=[round(v, 2) for v in load_before],
        load_average_after=[round(v, 2) for v in os.getloadavg()],
        cpus=os.cpu_count(),
        models=runs,
    )


if __name__ == "__main__":
    main()
