"""Shared fixtures: one thread per test worker, tiny recipes on synthetic data, two gloo ranks."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


@pytest.fixture
def tiny_recipe(tmp_path) -> dict:
    """A recipe that trains a 4-channel CNN on 96 synthetic 8x8 images in a second or two."""
    return {
        "name": "tiny",
        "seed": 3,
        "data": {
            "name": "synthetic",
            "input_shape": [1, 8, 8],
            "num_classes": 3,
            "num_samples": 96,
            "batch_size": 16,
        },
        "model": {"arch": "small_cnn", "arch_kwargs": {"width": 4}, "lr": 0.01},
        "trainer": {"max_epochs": 2, "enable_progress_bar": False},
    }


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SOBRE_RUN_DIR", raising=False)
    path = tmp_path / "runs"
    monkeypatch.setenv("SOBRE_RUNS_DIR", str(path))
    return path


Worker = Callable[[int, int, str], None]


@pytest.fixture
def gloo_ranks(tmp_path) -> Callable[[Worker], list[Any]]:
    """``run(worker)``: ``worker(rank, port, out_dir)`` in two spawned processes (it joins a gloo
    group on ``port`` and saves ``out_dir/rank<r>.pt``); returns what each rank saved."""

    def run(worker: Worker) -> list[Any]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.start_processes(
            worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
        )
        return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    return run
