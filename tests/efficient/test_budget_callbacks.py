"""The budgeted callbacks in a two-stage transfer recipe: #33's BudgetCallback and TraDy's
SparseUpdateCallback stay within their budgets, act only in their stage, and resume exactly."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

import sobre
from sobre.core.errors import ConfigError
from sobre.core.serialization import load_tree
from sobre.efficient.callbacks import BudgetCallback, SparseUpdateCallback

BUDGET = {
    "class_path": "sobre.efficient.callbacks.BudgetCallback",
    "init_args": {"budget_fraction": 0.2, "scorer": "velocity", "per_class": 3},
}
TRADY = {
    "class_path": "sobre.efficient.callbacks.SparseUpdateCallback",
    "init_args": {"budget_fraction": 0.5, "train_fully": ["classifier"], "rank_batches": 2},
}


class Crash(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1 and trainer.max_epochs == 3:  # the fine-tuning stage
            raise RuntimeError("killed")


def _weights(run) -> dict[str, torch.Tensor]:
    return load_tree(run / "checkpoints/finetune/final.safetensors")[0]["state_dict"]


def assert_resumes_exactly(recipe: dict, runs_dir, reference) -> None:
    """A fit of ``recipe`` killed in its fine-tuning stage and resumed ends with the final
    weights of the uninterrupted run in ``reference``."""
    with pytest.raises(RuntimeError, match="killed"):
        sobre.fit(copy.deepcopy(recipe), callbacks=[Crash()])
    crashed = sorted((runs_dir / "tiny").iterdir())[-1]
    sobre.fit(resume=crashed)
    a, b = _weights(reference), _weights(crashed)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.mark.parametrize("method", [BUDGET, TRADY], ids=["budget", "trady"])
def test_budgeted_finetuning_stays_in_budget_and_resumes_exactly(transfer, runs_dir, method):
    transfer["stages"][1]["methods"] = [method]
    full = sobre.fit(copy.deepcopy(transfer))
    stages = full.metrics["stages"]
    assert "efficient/budget" in stages["finetune"] and "efficient/budget" not in stages["pretrain"]
    last = stages["finetune"]
    if method is BUDGET:
        assert last["efficient/realised"] <= last["efficient/budget"] <= 0.2
    else:
        assert last["efficient/saved_mb"] <= last["efficient/budget_mb"]
    # the model is plain again after the fit, and every parameter trainable
    net = full.routine.net
    assert all(
        type(m).__name__ in {"Conv2d", "Linear"}
        for m in net.modules()
        if hasattr(m, "weight") and m.weight is not None and m.weight.ndim in (2, 4)
    )
    assert all(p.requires_grad for p in net.parameters())
    assert_resumes_exactly(transfer, runs_dir, full.run_dir)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: BudgetCallback(), "exactly one of budget_fraction"),
        (lambda: BudgetCallback(budget_fraction=0.1, per_class=0), "per_class must be"),
        (lambda: SparseUpdateCallback(budget_fraction=0.1, rank_batches=0), "rank_batches"),
    ],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
