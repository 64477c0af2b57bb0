"""The member-major layout of ensemble outputs, and the routine training an ensemble with it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.members import member_targets, num_members, split_members


def test_split_members_is_member_major():
    m, b, k = 3, 4, 5
    per_member = [torch.randn(b, k) for _ in range(m)]
    out = split_members(torch.cat(per_member), m)
    assert out.shape == (b, m, k)
    for i in range(m):
        assert torch.equal(out[:, i], per_member[i])
    assert torch.equal(member_targets(torch.arange(b), m), torch.arange(b).repeat(m))
    with pytest.raises(ConfigError, match=r"\(M·B, K\) with M=3"):
        split_members(torch.randn(10, 5), 3)
    with pytest.raises(ConfigError, match="num_members"):
        split_members(torch.randn(6, 5), 0)


class TwoHeads(nn.Module):
    """A toy 2-member ensemble: two independent linear classifiers, member-major output."""

    num_members = 2

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(4, 3) for _ in range(2))

    def forward(self, x):
        return torch.cat([h(x.flatten(1)) for h in self.heads])


def test_routine_trains_and_evaluates_an_ensemble_on_its_mean_prediction():
    from sobre.engine import ClassificationRoutine

    assert num_members(TwoHeads()) == 2 and num_members(nn.Linear(2, 2)) == 1
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x[:, :3].argmax(1)
    net = TwoHeads()
    routine = ClassificationRoutine(net=net, num_classes=3, lr=0.05)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(routine, loader, loader)
    out = trainer.test(routine, loader, verbose=False)[0]
    with torch.no_grad():
        mean = split_members(net(x), 2).softmax(-1).mean(1)
    assert out["test/acc"] == pytest.approx(float((mean.argmax(1) == y).float().mean()))
    assert out["test/loss"] == pytest.approx(float(F.nll_loss(mean.log(), y)), rel=1e-5)
