"""GroupDRO (online group weights) and JTT (error set, upsampling, two-stage run)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.methods import DatasetTransform, StepContext
from sobre.fairness.groups import GroupDRO, JTTUpsample, jtt, jtt_upsample, upsample_indices


def _ctx(logits: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor) -> StepContext:
    return StepContext(nn.Identity(), None, y, logits, extra=extra)


def _hard_group_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 classes x 2 bias values; group (y=1, b=0) is misclassified, the others are right."""
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    b = torch.tensor([0, 1, 1, 0, 0, 1])
    right = F.one_hot(y, 2).float() * 4
    logits = torch.where(((y == 1) & (b == 0))[:, None], right.flip(1), right)
    return logits, y, b


def test_weights_move_to_the_worst_group_and_the_loss_is_their_mix() -> None:
    logits, y, b = _hard_group_batch()
    dro = GroupDRO(2, 2, eta=0.5)
    assert dro.task_weight == 0.0 and torch.allclose(dro.q, torch.full((4,), 0.25))
    for _ in range(20):
        loss = dro(_ctx(logits, y, b))
    worst = 1 * 2 + 0  # g = y · num_bias + b
    assert int(dro.q.argmax()) == worst and dro.q[worst] > 0.99
    assert dro.q.sum() == pytest.approx(1.0)
    per_sample = F.cross_entropy(logits, y, reduction="none")
    group_loss = torch.stack([per_sample[(y * 2 + b) == g].mean() for g in range(4)])
    torch.testing.assert_close(loss, (dro.q * group_loss).sum())


def test_q_is_not_updated_outside_training() -> None:
    logits, y, b = _hard_group_batch()
    dro = GroupDRO(2, 2, eta=0.5).eval()
    dro(_ctx(logits, y, b))
    assert torch.allclose(dro.q, torch.full((4,), 0.25))


def test_groups_by_bias_only_and_absent_groups() -> None:
    logits, y, b = _hard_group_batch()
    dro = GroupDRO(2, 3, eta=1.0, groups="b")
    dro(_ctx(logits, y, b))
    assert dro.q.shape == (3,) and dro.q[2] < dro.q[0]  # b = 2 absent: loss 0, weight falls


def test_state_dict_round_trip_resumes_exactly() -> None:
    logits, y, b = _hard_group_batch()
    dro = GroupDRO(2, 2, eta=0.3)
    for _ in range(3):
        dro(_ctx(logits, y, b))
    resumed = GroupDRO(2, 2, eta=0.3)
    resumed.load_state_dict(dro.state_dict())
    assert torch.equal(resumed.q, dro.q)
    assert torch.equal(resumed(_ctx(logits, y, b)), dro(_ctx(logits, y, b)))
    assert torch.equal(resumed.q, dro.q)


def test_groupdro_needs_b_and_valid_arguments() -> None:
    logits, y, b = _hard_group_batch()
    with pytest.raises(ConfigError, match="needs bias labels"):
        GroupDRO(2, 2)(_ctx(logits, y))
    with pytest.raises(ConfigError, match="out of range"):
        GroupDRO(2, 1)(_ctx(logits, y, b))
    with pytest.raises(ConfigError, match="eta > 0"):
        GroupDRO(2, 2, eta=0.0)
    with pytest.raises(ConfigError, match="groups="):
        GroupDRO(2, 2, groups="y")  # type: ignore[arg-type]


def _dro_step(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two GroupDRO steps of a seeded linear model (DDP-wrapped when distributed)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    model = DistributedDataParallel(net) if tdist.is_initialized() else net
    dro = GroupDRO(2, 2, eta=0.5)
    for _ in range(2):
        net.zero_grad()
        dro(_ctx(model(x), y, b)).backward()
    return {"q": dro.q.clone(), "grad": net.weight.grad.clone()}


def _full_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, b = _hard_group_batch()
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), y, b


def _dro_worker(rank: int, port: int, out_dir: str) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        part = slice(0, 4) if rank == 0 else slice(4, 6)  # uneven shards
        x, y, b = (t[part] for t in _full_batch())
        torch.save(_dro_step(x, y, b), Path(out_dir) / f"rank{rank}.pt")
    finally:
        # DDP's reducer sits in a reference cycle holding the process group: freed only at
        # interpreter exit, after the group is gone, it aborts a worker in about one run of 5.
        gc.collect()
        tdist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_groupdro_equals_the_full_batch(gloo_ranks) -> None:
    single = _dro_step(*_full_batch())
    for out in gloo_ranks(_dro_worker):
        torch.testing.assert_close(out["q"], single["q"])
        torch.testing.assert_close(out["grad"], single["grad"])


def test_upsample_indices_counts() -> None:
    errors = torch.tensor([False, True, False, True, False])
    index = upsample_indices(errors, 4)
    counts = torch.bincount(index, minlength=5)
    assert counts.tolist() == [1, 4, 1, 4, 1]
    assert torch.equal(upsample_indices(errors, 1), torch.arange(5))
    with pytest.raises(ConfigError, match="lambda_up"):
        upsample_indices(errors, 0)
    with pytest.raises(ConfigError, match="bool mask"):
        upsample_indices(torch.tensor([0, 1]), 2)


class _Sign(nn.Module):
    """Predicts class 1 iff x > 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], 1)


def test_jtt_error_set_is_the_misclassified_samples() -> None:
    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0]])
    y = torch.tensor([1, 1, 0, 0])
    errors, upsampled = jtt_upsample(_Sign(), TensorDataset(x, y), lambda_up=3, batch_size=3)
    assert errors.tolist() == [False, True, True, False]
    assert len(upsampled) == 4 + 2 * 2
    assert sorted(upsampled.indices) == [0, 1, 1, 1, 2, 2, 2, 3]


def test_jtt_runs_both_stages() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).long()
    model, errors = jtt(
        lambda: nn.Linear(2, 2), TensorDataset(x, y), identify_epochs=1, epochs=2, lambda_up=5
    )
    assert isinstance(model, nn.Linear) and errors.shape == (64,) and errors.dtype == torch.bool


def test_jtt_stage_transform_applies_and_restores() -> None:
    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0]])
    data = TensorDataset(x, torch.tensor([1, 1, 0, 0]))
    transform = JTTUpsample(lambda_up=3)
    new, state = transform.apply_dataset(_Sign(), data)
    assert isinstance(transform, DatasetTransform)
    assert transform.report() == {"errors": 2.0, "size": 8.0}
    assert transform.restore_dataset(data, state).indices == new.indices
    with pytest.raises(ConfigError, match="lambda_up"):
        JTTUpsample(lambda_up=0)
