"""Shared fixtures: one thread per test worker, tiny recipes on synthetic data."""

from __future__ import annotations

import os

import pytest
import torch

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
