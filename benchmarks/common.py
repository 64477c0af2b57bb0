"""Helpers shared by the benchmark scripts: their common options, BN statistics, interleaved
timing, the JSON result."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def timing_parser(
    doc: str, out: Path, *, rounds: int, warmup: int, threads: int
) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line with the options every timing script takes:
    ``--rounds``, ``--warmup``, ``--threads`` and ``--out`` (the JSON result path)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds ({rounds})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed rounds ({warmup})")
    parser.add_argument("--threads", type=int, default=threads, help=f"CPU threads ({threads})")
    parser.add_argument("--out", type=Path, default=out, help=f"JSON result path ({out.name})")
    return parser


def calibrate_bn(model: nn.Module, x: Tensor) -> nn.Module:
    """BN running statistics from 3 train-mode batches (no grad), so that folding is meaningful."""
    with torch.no_grad():
        model.train()
        for i in range(3):
            model(x + 0.1 * i)
    return model


def interleaved(
    steps: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds of every timed step, steps interleaved with a rotating first one."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def machine_name(cores: bool = False) -> str:
    """The CPU architecture and processor name, with ``"<n> cores"`` if ``cores``."""
    parts = (platform.machine(), platform.processor(), f"{os.cpu_count()} cores" if cores else "")
    return " ".join(filter(None, parts))


def write_result(out: Path, benchmark: str, start: float | None, **fields: Any) -> dict[str, Any]:
    """Write ``benchmark``, the UTC date, the seconds since ``start`` (none if ``start`` is
    ``None``), the torch version and ``fields`` as indented JSON to ``out``; return the dict."""
    result: dict[str, Any] = {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if start is not None:
        result["seconds"] = round(time.perf_counter() - start, 1)
    result |= {"torch": torch.__version__, **fields}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}" + (f" ({result['seconds']} s)" if start is not None else ""))
    return result
