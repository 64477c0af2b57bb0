"""Fixtures of the efficient-family tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def transfer(tiny_recipe: dict) -> dict:
    """The tiny recipe as a two-stage transfer: pretrain on classes 0-1 (2 epochs), fine-tune on
    2-3 (3 epochs), SGD without a schedule, final checkpoint, no report."""
    tiny_recipe["data"].update(num_classes=4, classes=[0, 1], num_samples=160)
    tiny_recipe["model"].update(optimizer="sgd", lr=0.05, scheduler="none")
    tiny_recipe["trainer"]["max_epochs"] = 2
    tiny_recipe["evaluate"] = {"measure": False, "report": False, "checkpoint": "final"}
    tiny_recipe["stages"] = [
        {"name": "pretrain"},
        {"name": "finetune", "max_epochs": 3, "data": {"classes": [2, 3]}},
    ]
    return tiny_recipe
