"""Runs a tiny recipe with DDP on 2 CPU processes; each rank writes rank<r>.json (see test_ddp)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from toys import weights_digest

from sobre.core.masks import get_mask


class Digest(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        digest = weights_digest(pl_module.net)
        mask = get_mask(pl_module.net.features.conv2)
        digest.update(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            masked_channels=int((mask == 0).sum()),
        )
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(digest))


if __name__ == "__main__":
    import sobre

    out = Path(sys.argv[1])
    recipe = {
        "name": "ddp",
        "seed": 0,
        "data": {
            "name": "synthetic",
            "input_shape": [1, 8, 8],
            "num_classes": 3,
            "num_samples": 128,
            "batch_size": 16,
        },
        "model": {"arch": "small_cnn", "arch_kwargs": {"width": 4}, "lr": 0.01},
        "trainer": {
            "max_steps": 4,
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "enable_progress_bar": False,
            "limit_val_batches": 2,
        },
        "methods": [{"class_path": "toys.SharedChannelMask"}],
        "evaluate": {"measure": False, "report": False},
    }
    sobre.fit(recipe, runs_dir=out / "runs", callbacks=[Digest(out)])
