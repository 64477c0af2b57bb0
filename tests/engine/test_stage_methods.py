"""Per-stage methods and methods that use an earlier stage's model (``from_stage``)."""

from __future__ import annotations

import pytest
import torch
import toys

import sobre
from sobre.core.errors import ConfigError

ANCHOR = {"class_path": "toys.Anchor", "init_args": {"from_stage": "first"}}


@pytest.fixture
def two_stages(tiny_recipe):
    tiny_recipe["trainer"]["max_epochs"] = 1
    tiny_recipe["stages"] = [{"name": "first"}, {"name": "second", "methods": [ANCHOR]}]
    return tiny_recipe


def test_stage_method_gets_the_earlier_stage_model_and_acts_in_its_stage_only(two_stages, runs_dir):
    toys.Anchor.bound.clear()
    result = sobre.fit(two_stages)
    stages = result.metrics["stages"]
    assert "train/loss/anchor" in stages["second"]
    assert "train/loss/anchor" not in stages["first"]
    assert len(result.routine.regularizers) == 0  # removed once its stage finished
    (reference,) = toys.Anchor.bound
    first = sobre.load(result.run_dir / "checkpoints" / "first" / "final.safetensors").net
    for name, param in first.named_parameters():
        torch.testing.assert_close(reference[name], param.detach(), rtol=0, atol=0)


def test_repeated_stage_rebinds_the_same_reference(two_stages, runs_dir):
    two_stages["stages"][1]["repeat"] = 2
    toys.Anchor.bound.clear()
    sobre.fit(two_stages)
    assert len(toys.Anchor.bound) == 2
    for name, tensor in toys.Anchor.bound[0].items():
        assert torch.equal(tensor, toys.Anchor.bound[1][name])


@pytest.mark.parametrize(
    ("stages", "methods", "where"),
    [
        ([{"name": "first", "methods": [ANCHOR]}], None, "stage 'first'"),
        ([{"name": "second", "methods": [ANCHOR]}, {"name": "first"}], None, "stage 'second'"),
        ([{"name": "first"}, {"name": "second"}], [ANCHOR], "the recipe's methods"),
    ],
)
def test_from_stage_must_name_an_earlier_stage(tiny_recipe, runs_dir, stages, methods, where):
    tiny_recipe["stages"] = stages
    if methods:
        tiny_recipe["methods"] = methods
    with pytest.raises(ConfigError, match=f"from_stage='first'.*in {where}.*earlier stage"):
        sobre.fit(tiny_recipe)
    assert not list(runs_dir.glob("*/*/checkpoints"))  # refused before any training


def test_unknown_stage_key_is_named(tiny_recipe, runs_dir):
    tiny_recipe["stages"] = [{"name": "first", "method": [ANCHOR]}]
    with pytest.raises(ConfigError, match="did you mean 'methods'"):
        sobre.fit(tiny_recipe)
