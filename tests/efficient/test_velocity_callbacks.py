"""NEq and NeVe as Lightning callbacks in recipes: they act, log, and resume exactly."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

import sobre
from sobre.core.errors import ConfigError
from sobre.core.serialization import load_tree
from sobre.efficient.callbacks import NEqCallback, NeVeCallback

NEQ = "sobre.efficient.callbacks.NEqCallback"
NEVE = "sobre.efficient.callbacks.NeVeCallback"


class Crash(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.at:
            raise RuntimeError("killed")


@pytest.fixture
def recipe(tiny_recipe):
    tiny_recipe["model"] = {
        "arch": "small_cnn",
        "arch_kwargs": {"width": 4},
        "optimizer": "sgd",
        "lr": 0.05,
        "weight_decay": 0.001,
        "scheduler": "none",
    }
    tiny_recipe["evaluate"] = {"measure": False, "report": False, "checkpoint": "final"}
    return tiny_recipe


def _weights(run) -> dict[str, torch.Tensor]:
    return load_tree(run / "checkpoints/train/final.safetensors")[0]["state_dict"]


def test_neq_freezes_logs_and_resumes_exactly(recipe, runs_dir):
    recipe["trainer"].update(
        max_epochs=4,
        callbacks=[{"class_path": NEQ, "init_args": {"eps": 0.05, "per_class": 4}}],
    )
    full = sobre.fit(copy.deepcopy(recipe))
    stages = full.metrics["stages"]["train"]
    assert stages["efficient/frozen"] > 0
    assert stages["velocity/mean"] > 0
    assert 0 < stages["efficient/backward_saving"] < 0.6
    assert stages["efficient/step_ms"] > 0 and stages["efficient/saved_mb"] > 0
    with pytest.raises(RuntimeError, match="killed"):
        sobre.fit(copy.deepcopy(recipe), callbacks=[Crash(at=2)])
    crashed = sorted((runs_dir / "tiny").iterdir())[-1]
    sobre.fit(resume=crashed)
    a, b = _weights(full.run_dir), _weights(crashed)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def _neve_fit(recipe, **init_args):
    recipe["trainer"].update(
        max_epochs=5, callbacks=[{"class_path": NEVE, "init_args": {"n_probe": 8, **init_args}}]
    )
    result = sobre.fit(recipe)
    neve = next(c for c in result.routine.trainer.callbacks if isinstance(c, NeVeCallback))
    return result, neve


def test_neve_decays_the_lr_from_the_velocity_signal(recipe, runs_dir):
    result, neve = _neve_fit(recipe, patience=0, factor=0.5, stop_below=None)
    stage = result.metrics["stages"]["train"]
    assert neve.plateau.num_decays >= 1
    assert stage["lr"] == pytest.approx(0.05 * 0.5**neve.plateau.num_decays)
    assert stage["neve/decays"] == neve.plateau.num_decays
    assert stage["velocity/mean"] > 0 and "velocity/signal" in stage
    assert result.routine.trainer.current_epoch == 5  # never stopped


def test_neve_stops_the_fit_without_held_out_data(recipe, runs_dir):
    result, neve = _neve_fit(recipe, stop_below=10.0)  # any velocity is below: stop at once
    assert neve.plateau.should_stop
    assert result.routine.trainer.current_epoch == 1
    assert (result.run_dir / "checkpoints/train/final.safetensors").is_file()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NEqCallback(eps=-1.0), "eps must be"),
        (lambda: NEqCallback(per_class=0), "per_class must be"),
        (lambda: NEqCallback(velocity_rule="papers"), "velocity_rule"),
        (
            lambda: NeVeCallback(probe="val"),
            r"probe='val' is unknown; choose one of \['noise', 'train'\]",
        ),
        (lambda: NeVeCallback(factor=2.0), "factor must be in"),
    ],
)
def test_bad_arguments_fail_when_the_recipe_is_read(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
