"""``sobre sweep``: recipes x settings x seeds, trained one after another, in one mean ± std table.

Each combination is an ordinary run (its own folder under ``runs/``). ``sweep.json`` in the
output folder records every finished run as soon as it ends, so an interrupted sweep continues
where it stopped when started again with the same output folder, and a finished one is only
re-tabulated. ``sweep.md`` states each recipe's model-selection rule next to its numbers: which
validation metric picked the tested checkpoint, or that the last weights were tested.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sobre.core.errors import ConfigError
from sobre.core.serialization import atomic_write_text
from sobre.engine.recipes import apply_overrides, load_yaml, normalize

log = logging.getLogger("sobre")

SKIPPED = ("/group/",)  # per-group keys belong in the runs' own reports, not in the table


@dataclass
class SweepResult:
    """The output folder, one record per run and the table's markdown."""

    out_dir: Path
    runs: list[dict[str, Any]]
    table: str


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["data.rho=0.95,0.98"]`` -> ``{"data.rho": [0.95, 0.98]}`` (values read as YAML)."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise ConfigError(
                f"grid entry {item!r} must look like key=v1,v2 (e.g. data.rho=0.95,0.98)"
            )
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def selection_rule(recipe: Mapping[str, Any]) -> str:
    """How a recipe picks the checkpoint it tests, in words."""
    evaluate = recipe.get("evaluate") or {}
    if evaluate.get("checkpoint", "best") == "final":
        return "last epoch (final weights)"
    monitor = evaluate.get("monitor", "val/acc")
    return f"best {monitor} ({'min' if monitor.endswith('loss') else 'max'}) of the last stage"


def _key(record: Mapping[str, Any]) -> str:
    return json.dumps([record["recipe"], record["setting"], record["seed"]], sort_keys=True)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f} (n=1)"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f} (n={len(values)})"


def tabulate(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """Markdown table: one row per (recipe, setting), mean ± std over seeds, in %."""
    if not runs:
        raise ConfigError("no finished run to tabulate")
    if metrics is None:
        found = {k for r in runs for k, v in r["metrics"].items() if isinstance(v, int | float)}
        metrics = sorted(
            k for k in found if k.startswith("test/") and not any(s in k for s in SKIPPED)
        )
    rows: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in runs:
        rows.setdefault((r["recipe"], json.dumps(r["setting"], sort_keys=True)), []).append(r)
    lines = [
        "| recipe | setting | selection | " + " | ".join(metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for (recipe, setting), group in rows.items():
        cells = [
            _fmt([float(g["metrics"][m]) for g in group if m in g["metrics"]]) for m in metrics
        ]
        shown = ", ".join(f"{k}={v}" for k, v in json.loads(setting).items()) or "-"
        lines.append(
            f"| {recipe} | {shown} | {group[0]['selection']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def sweep(
    recipes: Sequence[str | Path],
    *,
    out_dir: str | Path,
    grid: Mapping[str, Sequence[Any]] | None = None,
    seeds: Sequence[int] = (0,),
    overrides: Mapping[str, Any] | None = None,
    metrics: Sequence[str] | None = None,
    runs_dir: str | Path | None = None,
) -> SweepResult:
    """Run every recipe for every combination of ``grid`` values and every seed.

    Args:
        recipes: recipe YAML paths (the methods to compare).
        out_dir: where ``sweep.json`` and ``sweep.md`` go; an existing ``sweep.json`` there is
            continued (finished combinations are not run again).
        grid: dotted recipe keys -> values to sweep (e.g. ``{"data.rho": [0.95, 0.98]}``).
        seeds: values of the recipes' ``seed`` and ``data.seed`` (initialisation, data order and
            any seeded data generation such as Biased-MNIST's colouring).
        overrides: dotted keys set in every run (e.g. ``{"trainer.max_epochs": 8}``).
        metrics: columns of the table (default: every ``test/*`` metric but per-group ones).
        runs_dir: parent of the run folders (default ``$SOBRE_RUNS_DIR`` or ``runs/``).
    """
    from sobre.engine.run import fit

    if not recipes:
        raise ConfigError("sweep needs at least one recipe YAML")
    if not seeds:
        raise ConfigError("sweep needs at least one seed, e.g. --seeds 0 1 2")
    grid = {k: list(v) for k, v in (grid or {}).items()}
    empty = [k for k, v in grid.items() if not v]
    if empty:
        raise ConfigError(f"grid keys {empty} have no value; give at least one each")
    settings = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    plans = []
    for path in recipes:  # every combination is checked before the first run starts
        raw = load_yaml(path)
        for setting in settings:
            recipe = apply_overrides(raw, {**(overrides or {}), **setting})
            plans.append((str(path), setting, recipe, selection_rule(normalize(recipe))))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = out / "sweep.json"
    done: list[dict[str, Any]] = json.loads(state.read_text()) if state.is_file() else []
    finished = {_key(r) for r in done}
    total = len(plans) * len(seeds)
    for i, ((path, setting, recipe, rule), seed) in enumerate(itertools.product(plans, seeds)):
        record = {"recipe": Path(path).stem, "setting": setting, "seed": seed}
        if _key(record) in finished:
            continue
        log.info("sweep %d/%d: %s %s seed %d", i + 1, total, record["recipe"], setting, seed)
        # the seed drives everything random: initialisation and the data's order and colouring
        result = fit(apply_overrides(recipe, {"seed": seed, "data.seed": seed}), runs_dir=runs_dir)
        record.update(selection=rule, run_dir=str(result.run_dir), metrics=result.metrics)
        done.append(record)
        atomic_write_text(state, json.dumps(done, indent=1))
    table = tabulate(done, metrics)
    atomic_write_text(
        out / "sweep.md",
        f"# Sweep\n\nMean ± std over seeds, in %. `selection` is each recipe's model-selection "
        f"rule (evaluate.monitor / evaluate.checkpoint).\n\n{table}\n",
    )
    return SweepResult(out, done, table)
