"""IRENE: the MI estimates, the private head's own step, and its place in the training loops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.methods import StepContext
from sobre.engine.routine import ClassificationRoutine
from sobre.engine.trainer import make_trainer
from sobre.fairness.base import train
from sobre.fairness.irene import IRENE, mutual_information_estimate
from sobre.models import create


def _ctx(z: torch.Tensor, *extra: torch.Tensor, epoch: int = 0) -> StepContext:
    y = torch.zeros(len(z), dtype=torch.long)
    return StepContext(nn.Identity(), z, y, None, {"embedding": z}, epoch=epoch, extra=extra)


def _batch(n: int = 64, d: int = 8, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that carry the private label p in their first k coordinates, plus noise."""
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(n) % k
    return torch.randn(n, d, generator=g) + 2.0 * F.pad(F.one_hot(p, k).float(), (0, d - k)), p


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 24),
    k=st.integers(2, 5),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["variational", "joint"]),
)
def test_estimates_are_non_negative(n: int, k: int, seed: int, kind: str) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    z, p = torch.randn(n, 3, generator=g) * 5, torch.randint(0, k, (n,), generator=g)
    assert mutual_information_estimate(z, p, nn.Linear(3, k), kind=kind).item() >= 0.0


@pytest.mark.parametrize("kind", ["variational", "joint"])
def test_chance_head_gives_zero_and_a_perfect_head_gives_the_entropy(kind: str) -> None:
    z, p = _batch()
    chance = nn.Linear(8, 4)  # ignores z: predicts the batch marginal
    nn.init.zeros_(chance.weight)
    nn.init.zeros_(chance.bias)
    assert mutual_information_estimate(z, p, chance, kind=kind).item() == pytest.approx(0, abs=1e-6)
    perfect = nn.Linear(4, 4)
    nn.init.eye_(perfect.weight)
    nn.init.zeros_(perfect.bias)
    onehot = 30.0 * F.one_hot(p, 4).float()
    assert mutual_information_estimate(onehot, p, perfect, kind=kind).item() == pytest.approx(
        math.log(4), abs=1e-4
    )


def test_head_step_improves_the_head_and_the_outer_loop_never_sees_it() -> None:
    torch.manual_seed(0)
    z, p = _batch()
    irene = IRENE(8, 4, lam=1.0, head="mlp", head_steps=5, head_lr=1e-2)
    assert not any(q.requires_grad for q in irene.parameters())
    before = F.cross_entropy(irene.head(z), p).item()
    mi_before = mutual_information_estimate(z, p, irene.head).item()
    for _ in range(4):
        irene.head_step(z, p)
    assert F.cross_entropy(irene.head(z), p).item() < before - 0.1
    assert mutual_information_estimate(z, p, irene.head).item() > mi_before
    assert not any(q.requires_grad or q.grad is not None for q in irene.parameters())

    # the penalty's gradient reaches z only; the head is left to its own step
    z = z.clone().requires_grad_(True)
    penalty = irene(_ctx(z, p))
    penalty.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(q.grad is None for q in irene.parameters())
    assert penalty.item() == pytest.approx(irene.last_mi.item()) and irene.last_mi > 0


def test_warmup_trains_the_head_without_penalty() -> None:
    z, p = _batch()
    irene = IRENE(8, 4, lam=5.0, warmup_epochs=2)
    weight = irene.head.weight.clone()
    assert irene(_ctx(z, p, epoch=1)).item() == 0.0
    assert not torch.equal(weight, irene.head.weight)
    assert irene(_ctx(z, p, epoch=2)).item() == pytest.approx(5.0 * irene.last_mi.item())


def test_state_dict_round_trip_resumes_the_head_and_its_optimizer_exactly() -> None:
    z, p = _batch()
    torch.manual_seed(1)
    a = IRENE(8, 4, head="mlp", head_steps=2)
    for _ in range(3):
        a(_ctx(z, p))
    torch.manual_seed(2)
    b = IRENE(8, 4, head="mlp", head_steps=2)
    b.load_state_dict(a.state_dict())
    assert b.head_optimizer.state_dict()["state"][0]["step"] == 6
    z2, p2 = _batch(seed=1)
    a(_ctx(z2, p2))
    b(_ctx(z2, p2))
    for qa, qb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(qa, qb)
    assert torch.equal(a.last_mi, b.last_mi)


def test_bad_inputs_are_config_errors() -> None:
    z, p = _batch()
    with pytest.raises(ConfigError, match="pseudo bias labels"):
        IRENE(8, 4)(_ctx(z))
    with pytest.raises(ConfigError, match="feature_dim=16"):
        IRENE(16, 4)(_ctx(z, p))
    with pytest.raises(ConfigError, match="num_private"):
        IRENE(8, 3)(_ctx(z, p))
    with pytest.raises(ConfigError, match="head="):
        IRENE(8, 4, head="deep")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mi="):
        mutual_information_estimate(z, p, nn.Linear(8, 4), kind="kl")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head_steps"):
        IRENE(8, 4, head_steps=0)
    with pytest.raises(ConfigError, match="lam"):
        IRENE(8, 4, lam=-1.0)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 3
    x = torch.randn(48, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y, torch.arange(48) % 4), batch_size=16)


def test_trains_in_the_plain_loop_and_in_the_lightning_routine(tmp_path) -> None:
    torch.manual_seed(0)
    irene = IRENE(128, 4, lam=0.1, head="mlp", head_steps=2)
    head = [q.clone() for q in irene.parameters()]
    model = create("simple_conv_s", num_classes=3, in_channels=3)
    history = train(model, _loader(), epochs=1, regularizers=[irene])
    assert set(history[0]) == {"task", "irene"}
    assert irene.head_optimizer.state_dict()["state"][0]["step"] == 3 * 2
    assert any(not torch.equal(a, b) for a, b in zip(head, irene.parameters(), strict=True))

    irene = IRENE(128, 4, lam=0.1, head_steps=1)
    routine = ClassificationRoutine(
        arch="simple_conv_s", num_classes=3, in_channels=3, regularizers=[irene]
    )
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False, enable_progress_bar=False)
    trainer.fit(routine, train_dataloaders=_loader())
    outer = {id(q) for g in trainer.optimizers[0].param_groups for q in g["params"]}
    assert outer and not outer & {id(q) for q in irene.parameters()}
    assert irene.head_optimizer.state_dict()["state"][0]["step"] == 3


@pytest.mark.parametrize("kind", ["variational", "joint"])
def test_gradient_stays_finite_when_the_head_is_certain(kind: str) -> None:
    z, p = _batch()
    z = (z * 1e3).requires_grad_(True)  # softmax probabilities underflow to exactly 0
    head = nn.Linear(8, 4)
    mutual_information_estimate(z, p, head, kind=kind).backward()
    assert torch.isfinite(z.grad).all()


def _head_after_steps(z: torch.Tensor, p: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    irene = IRENE(8, 4, head_steps=3, head_lr=0.1)
    irene.head_step(z, p)
    return {k: v.clone() for k, v in irene.head.state_dict().items()}


def _irene_worker(rank: int, port: int, out_dir: str) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        z, p = _batch(n=16)
        half = slice(0, 8) if rank == 0 else slice(8, 16)
        torch.save(_head_after_steps(z[half], p[half]), Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_keep_one_head_equal_to_the_full_batch_head(gloo_ranks) -> None:
    heads = gloo_ranks(_irene_worker)
    full = _head_after_steps(*_batch(n=16))
    alone = _head_after_steps(*(t[:8] for t in _batch(n=16)))
    for key, value in full.items():
        assert torch.equal(heads[0][key], heads[1][key]), key
        torch.testing.assert_close(heads[0][key], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone["weight"], full["weight"])  # the halves alone disagree
