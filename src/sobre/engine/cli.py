"""The ``sobre`` command: ``fit``, ``measure``, ``test``, ``report``, ``sweep`` and ``recipes``.

Exit status 0 on success, 2 on bad input (the message names the problem and the fix), 1 when a
run fails; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sobre.core.errors import SobreError

log = logging.getLogger("sobre")

EPILOG = """examples:
  sobre fit --config recipes/quickstart.yaml
  sobre fit --config recipes/quickstart.yaml --trainer.max_epochs 3 --model.lr 0.003
  sobre fit --resume runs/quickstart/20261125-101500
  sobre measure --checkpoint runs/quickstart/<time>/checkpoints/train/best.safetensors
  sobre test --checkpoint runs/<recipe>/<time>/checkpoints/train/best.safetensors --ood photo_crops
  sobre report runs/quickstart/<time>
  sobre report runs/imp_sdd_mnist5k_lenet/<time> runs/dsd2_mnist5k_lenet/<time> --out runs/cmp
  sobre sweep recipes/fairness/vanilla_biased_mnist.yaml recipes/fairness/fairkl_biased_mnist.yaml \
      --grid data.rho=0.95,0.98 --seeds 0 1 2 --out runs/sweep_bias
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sobre",
        allow_abbrev=False,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Frugal and trustworthy deep learning recipes.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser(
        "fit",
        allow_abbrev=False,
        help="train, test, measure and report a recipe",
        description="Train a recipe; extra --section.key value pairs override it.",
    )
    fit.add_argument("-c", "--config", help="recipe YAML file")
    fit.add_argument("--runs-dir", help="parent of run folders (default $SOBRE_RUNS_DIR or runs/)")
    fit.add_argument("--resume", help="continue this run folder from its last checkpoint")
    measure = sub.add_parser(
        "measure",
        allow_abbrev=False,
        help="params, FLOPs, latency, memory and depth of a checkpoint",
    )
    measure.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint of a run")
    measure.add_argument("--batch-size", type=int, default=2, help="inputs per forward (default 2)")
    measure.add_argument("--json", help="also write the result to this JSON file")
    test = sub.add_parser(
        "test",
        allow_abbrev=False,
        help="test a checkpoint again with its recipe's data and test-time callbacks",
        description="Test a checkpoint with the data and trainer callbacks of its recipe (e.g. "
        "the uncertainty table of UncertaintyEvaluation); --ood/--shift add offline OOD and "
        "shifted sets (see sobre.data.OOD_SETS); extra --section.key value pairs override "
        "the recipe.",
    )
    test.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint of a run")
    test.add_argument(
        "--ood",
        nargs="*",
        default=[],
        help="OOD set names, e.g. photo_crops (these replace "
        "the recipe's trainer.callbacks by one UncertaintyEvaluation)",
    )
    test.add_argument("--shift", nargs="*", default=[], help="shifted set names")
    test.add_argument("--json", help="also write the metrics to this JSON file")
    report = sub.add_parser(
        "report",
        help="write report.md and figures for a run folder, or compare several runs",
        description="One run folder: its report.md and figures. Several: compare.md and one "
        "figure overlaying their accuracy-vs-sparsity and -depth curves, written to --out.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="run_dir")
    report.add_argument("--out", help="folder of the comparison (default: runs/compare)")
    sweep = sub.add_parser(
        "sweep",
        allow_abbrev=False,
        help="run recipes x settings x seeds and tabulate mean ± std",
        description="Run every recipe for every combination of --grid values and every seed "
        "(one run folder each), then write sweep.md (mean ± std over seeds, with each recipe's "
        "model-selection rule) and sweep.json to --out; started again with the same --out it "
        "continues where it stopped. Extra --section.key value pairs set every run.",
    )
    sweep.add_argument("recipes", nargs="+", metavar="recipe", help="recipe YAML files")
    sweep.add_argument(
        "--grid", nargs="*", default=[], help="key=v1,v2 lists to sweep, e.g. data.rho=0.95,0.98"
    )
    sweep.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default 0)")
    sweep.add_argument("--metrics", nargs="*", help="table columns (default: test/* metrics)")
    sweep.add_argument("--out", required=True, help="folder of sweep.md and sweep.json")
    sweep.add_argument(
        "--runs-dir", help="parent of run folders (default $SOBRE_RUNS_DIR or runs/)"
    )
    recipes = sub.add_parser("recipes", help="list recipes with their paper and expected trend")
    recipes.add_argument("folder", nargs="?", default="recipes")
    return parser


def _duration(meta: dict[str, Any]) -> str:
    """The recipe's time on the CPU or, for a GPU-scale one, on a GPU."""
    if "cpu_minutes" in meta:
        return f"cpu time: {meta['cpu_minutes']} min"
    if "gpu_minutes" in meta:
        return f"gpu time: {meta['gpu_minutes']} min"
    return "time: not stated"


def _recipes(folder: str) -> None:
    from sobre.engine.recipes import load_yaml

    paths = sorted(Path(folder).rglob("*.yaml"))
    if not paths:
        raise SobreError(
            f"no recipes under {folder!r}; run from the repository root or pass a folder"
        )
    for path in paths:
        meta = load_yaml(path).get("meta") or {}
        sys.stdout.write(
            f"{path}\n    {meta.get('description', '')}\n"
            f"    paper: {meta.get('paper', '-')}  expected: {meta.get('expected', '-')}"
            f"  {_duration(meta)}\n"
        )


def run(argv: Sequence[str]) -> int:
    """Run the command line ``argv`` (without the program name)."""
    args, rest = _parser().parse_known_args(argv)
    if rest and args.command not in ("fit", "test", "sweep"):
        raise SobreError(f"unexpected arguments {' '.join(rest)!r} for `sobre {args.command}`")
    if args.command == "fit":
        from sobre.engine.run import fit

        if args.config is None and args.resume is None:
            raise SobreError("`sobre fit` needs --config RECIPE.yaml (or --resume RUN_DIR)")
        result = fit(args.config, overrides=rest, runs_dir=args.runs_dir, resume=args.resume)
        shown = {  # per-group metrics stay in metrics.json and the report's heat-map
            k: round(v, 4)
            for k, v in result.metrics.items()
            if isinstance(v, float) and "/group/" not in k
        }
        sys.stdout.write(f"run folder: {result.run_dir}\n{json.dumps(shown, indent=1)}\n")
    elif args.command == "measure":
        import torch

        from sobre.core.measure import measure
        from sobre.engine.run import load

        routine = load(args.checkpoint)
        shape = routine.checkpoint_info["input_shape"]
        result = measure(routine.net, torch.randn(args.batch_size, *shape))
        sys.stdout.write(result.table() + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    elif args.command == "test":
        from sobre.engine.recipes import parse_overrides
        from sobre.engine.run import retest

        overrides: dict[str, Any] = parse_overrides(rest) if rest else {}
        if args.ood or args.shift:
            overrides["trainer.callbacks"] = [
                {
                    "class_path": "sobre.uncertainty.callbacks.UncertaintyEvaluation",
                    "init_args": {"ood": args.ood, "shift": args.shift},
                }
            ]
        metrics = retest(args.checkpoint, overrides=overrides)
        sys.stdout.write(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=1))
    elif args.command == "report":
        from sobre.engine.report import compare, report

        if len(args.run_dirs) == 1:
            if args.out:
                raise SobreError("--out is for comparing several runs; a report goes in its run")
            sys.stdout.write(f"{report(args.run_dirs[0])}\n")
        else:
            sys.stdout.write(f"{compare(args.run_dirs, args.out or 'runs/compare')}\n")
    elif args.command == "sweep":
        from sobre.engine.recipes import parse_overrides
        from sobre.engine.sweep import parse_grid, sweep

        result = sweep(
            args.recipes,
            out_dir=args.out,
            grid=parse_grid(args.grid),
            seeds=args.seeds,
            overrides=parse_overrides(rest) if rest else None,
            metrics=args.metrics or None,
            runs_dir=args.runs_dir,
        )
        sys.stdout.write(f"{result.table}\n\n{result.out_dir / 'sweep.md'}\n")
    else:
        _recipes(args.folder)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sobre`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Lightning's start-up chatter and a torch CUDA_HOME notice drown our one line per epoch.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").disabled = True  # torch resets its level
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    debug = "--debug" in argv
    try:
        return run(argv)
    except SobreError as err:
        if debug:
            raise
        sys.stderr.write(f"sobre: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("sobre: interrupted; continue with `sobre fit --resume RUN_DIR`\n")
        return 130
