"""Every recipe under recipes/ is valid and says what it reproduces and what it costs; those on a
local dataset (CIFAR, CelebA, ...: GPU scale) ask for its folder instead of downloading it."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import sobre
from sobre.core.errors import DataNotFoundError
from sobre.engine.recipes import load_yaml, normalize

ROOT = Path(__file__).resolve().parents[2] / "recipes"
PAPERS = sorted(p for p in ROOT.rglob("*.yaml") if p.parent != ROOT)  # quickstart aside


def _reads_a_folder(path: Path) -> bool:
    """Whether the recipe's data module reads a local folder (takes a ``root``)."""
    module, _, name = normalize(load_yaml(path))["data"]["class_path"].rpartition(".")
    return "root" in inspect.signature(getattr(importlib.import_module(module), name)).parameters


LOCAL = [p for p in PAPERS if _reads_a_folder(p)]


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


@pytest.mark.parametrize("path", PAPERS, ids=[_id(p) for p in PAPERS])
def test_paper_recipe_is_valid_and_documented(path: Path) -> None:
    meta = normalize(load_yaml(path))["meta"]
    assert meta["description"] and meta["paper"] and meta["expected"]
    assert "cpu_minutes" in meta or "gpu_minutes" in meta


@pytest.mark.parametrize("path", LOCAL, ids=[_id(p) for p in LOCAL])
def test_local_data_recipes_ask_for_their_folder(
    path: Path, tmp_path: Path, runs_dir: Path
) -> None:
    with pytest.raises(DataNotFoundError, match="download"):
        sobre.fit(path, overrides={"data.root": str(tmp_path / "missing")})
