"""Batches with more than (input, target), e.g. the (x, y, b) samples of the fairness datasets:
the routine trains, validates and tests on them and hands the extras to methods as ctx.extra."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.methods import Regularizer, StepContext
from sobre.engine.routine import ClassificationRoutine
from sobre.engine.trainer import make_trainer


class SeesBias(Regularizer):
    name = "sees_bias"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, ctx: StepContext) -> torch.Tensor:
        (b,) = ctx.extra
        self.seen.append(b.clone())
        return ctx.outputs.sum() * 0.0


def test_three_item_batches_train_and_reach_methods(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    b = (y + 1) % 3
    loader = DataLoader(TensorDataset(x, y, b), batch_size=8)
    reg = SeesBias()
    routine = ClassificationRoutine(
        arch="small_cnn", arch_kwargs={"width": 4}, num_classes=3, regularizers=[reg]
    )
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False, enable_progress_bar=False)
    trainer.fit(routine, train_dataloaders=loader, val_dataloaders=loader)
    (result,) = trainer.test(routine, dataloaders=loader, verbose=False)
    assert torch.equal(torch.cat(reg.seen), b)
    assert 0.0 <= result["test/acc"] <= 1.0
