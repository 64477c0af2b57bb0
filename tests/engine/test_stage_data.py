"""Per-stage data: a stage may change the datamodule's arguments (e.g. pretrain on some classes,
fine-tune on others); later stages, the final test and ``retest`` use the changed data."""

from __future__ import annotations

import pytest

import sobre
from sobre.core.errors import ConfigError


@pytest.fixture
def transfer(tiny_recipe):
    tiny_recipe["data"]["num_classes"] = 4
    tiny_recipe["data"]["classes"] = [0, 1]
    tiny_recipe["trainer"]["max_epochs"] = 1
    tiny_recipe["stages"] = [
        {"name": "pretrain"},
        {"name": "finetune", "data": {"classes": [2, 3]}},
    ]
    return tiny_recipe


def test_a_stage_trains_and_tests_on_its_own_classes(transfer, runs_dir):
    result = sobre.fit(transfer)
    assert result.datamodule.classes == [2, 3]
    assert result.datamodule.num_classes == 2
    assert result.routine.num_classes == 2
    assert "test/acc" in result.metrics
    pretrain = result.run_dir / "checkpoints" / "pretrain" / "final.safetensors"
    finetune = result.run_dir / "checkpoints" / "finetune" / "final.safetensors"
    # retest rebuilds the data of the checkpoint's own stage: its accuracy is the final test's
    assert sobre.retest(finetune)["test/acc"] == pytest.approx(result.metrics["test/acc"])
    assert 0.0 <= sobre.retest(pretrain)["test/acc"] <= 1.0


def test_a_stage_that_changes_the_number_of_classes_is_refused(transfer, runs_dir):
    transfer["stages"][1]["data"] = {"classes": [1, 2, 3]}
    with pytest.raises(ConfigError, match=r"changes data to 3 classes.*built for 2"):
        sobre.fit(transfer)
    assert not list(runs_dir.glob("*/*/checkpoints"))  # refused before any training


def test_an_unknown_stage_data_argument_names_the_closest(transfer, runs_dir):
    transfer["stages"][1]["data"] = {"clases": [2, 3]}
    with pytest.raises(ConfigError, match=r"unknown parameter 'clases'.*classes"):
        sobre.fit(transfer)
    assert not list(runs_dir.glob("*/*/checkpoints"))
