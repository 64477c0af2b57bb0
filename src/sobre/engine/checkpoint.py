"""Lightning checkpoints as safetensors + JSON through Lightning's ``CheckpointIO`` extension point.

Every tensor of Lightning's checkpoint dict (weights, optimizer moments, callback and RNG state)
goes into the ``.safetensors`` file, the rest into JSON (see :mod:`sobre.core.serialization`);
the JSON sidecar also carries the run's info (recipe, metrics, versions, git hash). Loading never
unpickles.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO

from sobre.core.serialization import load_tree, save_tree, sidecar_path


class SafetensorsCheckpointIO(CheckpointIO):
    """Save and load Lightning checkpoints as safetensors + JSON sidecar, atomically.

    Args:
        info: called at each save; returns JSON-able metadata for the sidecar (recipe, metrics).
    """

    def __init__(self, info: Callable[[], dict[str, Any]] | None = None) -> None:
        self.info = info

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        info = self.info() if self.info is not None else {}
        info = {
            **info,
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
        }
        save_tree(checkpoint, path, info=info)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        tree, _ = load_tree(path)
        return tree

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        for p in (Path(path), sidecar_path(path)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class SafeModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing ``.safetensors`` files (via :class:`SafetensorsCheckpointIO`)."""

    FILE_EXTENSION = ".safetensors"
