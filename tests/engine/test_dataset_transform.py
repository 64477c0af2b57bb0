"""A stage's DatasetTransform rewrites the training set from the model the last stage left; its
tensors are saved in the run, so a resumed run trains on the same set without recomputing it."""

from __future__ import annotations

import pytest
import toys
from toys import Crash

import sobre
from sobre.core.serialization import load_tree


def _recipe(tiny_recipe: dict) -> dict:
    tiny_recipe["stages"] = [
        {"name": "first", "max_epochs": 1},
        {"name": "second", "max_epochs": 3, "transforms": [{"class_path": "toys.EasierHalf"}]},
    ]
    tiny_recipe["evaluate"] = {"measure": False, "report": False}
    return tiny_recipe


def test_dataset_transform_trains_the_next_stage_on_the_new_set(tiny_recipe, runs_dir) -> None:
    toys.EasierHalf.calls.clear()
    result = sobre.fit(_recipe(tiny_recipe))
    assert toys.EasierHalf.calls == ["apply"]
    state, _ = load_tree(result.run_dir / "checkpoints/second/dataset_transform_0.safetensors")
    train = result.datamodule.train_dataset
    assert train.indices == state["indices"].tolist()
    assert len(train) == len(train.dataset) // 2
    assert result.metrics["stages"]["second"]["transforms"][0]["transform"] == "EasierHalf"


def test_resume_restores_the_saved_set(tiny_recipe, runs_dir) -> None:
    full = sobre.fit(_recipe(tiny_recipe))
    toys.EasierHalf.calls.clear()
    with pytest.raises(RuntimeError, match="killed"):
        sobre.fit(_recipe(tiny_recipe), callbacks=[Crash(at=1)])
    crashed = sorted((runs_dir / "tiny").iterdir())[-1]
    assert toys.EasierHalf.calls == ["apply"]
    resumed = sobre.fit(resume=crashed)
    assert toys.EasierHalf.calls == ["apply", "restore"]
    assert resumed.metrics["test/acc"] == full.metrics["test/acc"]
    assert resumed.metrics["test/loss"] == pytest.approx(full.metrics["test/loss"], abs=1e-6)
