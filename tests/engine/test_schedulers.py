"""The routine's LR schedules: multistep drops at its milestones, one-cycle steps per batch over
the whole fit; bad settings are refused."""

from __future__ import annotations

import pytest
import torch

import sobre
from sobre.core.errors import ConfigError
from sobre.engine.routine import ClassificationRoutine


def test_multistep_multiplies_the_lr_by_gamma_at_each_milestone() -> None:
    routine = ClassificationRoutine(
        arch="mlp", optimizer="sgd", lr=0.1, scheduler="multistep", milestones=[3, 1], gamma=0.5
    )
    config = routine.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])


def test_multistep_without_milestones_says_how_to_set_them() -> None:
    with pytest.raises(ConfigError, match="milestones: \\[10\\]"):
        ClassificationRoutine(arch="mlp", scheduler="multistep")


def test_gamma_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match="gamma must lie in"):
        ClassificationRoutine(arch="mlp", scheduler="multistep", milestones=[2], gamma=2.0)


def test_onecycle_steps_per_batch_over_the_whole_fit(tiny_recipe, runs_dir) -> None:
    tiny_recipe["model"].update(optimizer="adamw", lr=0.01, scheduler="onecycle")
    result = sobre.fit(tiny_recipe)
    (config,) = result.routine.trainer.lr_scheduler_configs
    sched = config.scheduler
    assert config.interval == "step" and isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    batches = -(-len(result.routine.trainer.datamodule.train_dataset) // 16)
    assert sched.total_steps == sched.last_epoch == 2 * batches  # every step of both epochs
    assert sched.get_last_lr()[0] < 0.1 * 0.01  # annealed far below the peak
