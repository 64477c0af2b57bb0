"""Tests of sobre.core.dist: no-op behaviour in one process and a 2-process gloo run."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sobre.core import dist
from sobre.core.masks import attach_mask, get_mask
from sobre.core.taps import RunningStats

WORLD = 2


def test_single_process_helpers_are_noops() -> None:
    assert not dist.is_distributed()
    assert dist.world_size() == 1
    assert dist.rank() == 0
    assert dist.is_rank_zero()
    t = torch.tensor([1.0, -2.0, 3.0])
    for fn in (dist.all_reduce_sum, dist.all_reduce_max, dist.all_reduce_min, dist.broadcast):
        out = fn(t)
        assert out is not t
        assert out.data_ptr() != t.data_ptr()
        torch.testing.assert_close(out, t)
    torch.testing.assert_close(dist.all_reduce_mean(t), t)
    parts = [torch.arange(6.0).reshape(2, 3), torch.tensor([7.0])]
    summed = dist.all_reduce_sum_each(parts)
    assert [p.shape for p in summed] == [(2, 3), (1,)]
    for got, part in zip(summed, parts, strict=True):
        assert torch.equal(got, part) and got.data_ptr() != part.data_ptr()
    mean_int = dist.all_reduce_mean(torch.tensor([2, 3]))
    assert mean_int.dtype.is_floating_point
    torch.testing.assert_close(mean_int, torch.tensor([2.0, 3.0]))


def test_helpers_do_not_modify_input_in_place() -> None:
    t = torch.tensor([1.0, 2.0])
    dist.all_reduce_sum(t).add_(10)
    torch.testing.assert_close(t, torch.tensor([1.0, 2.0]))


def test_rank_zero_only_runs_on_rank_zero() -> None:
    calls: list[int] = []

    @dist.rank_zero_only
    def record(value: int) -> int:
        """Docstring kept."""
        calls.append(value)
        return value * 2

    assert record(3) == 6
    assert calls == [3]
    assert record.__doc__ == "Docstring kept."


def _batch(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3 + rank, 4, 2, 2, generator=gen) + rank


def _ddp_masked_step(rank: int) -> dict[str, torch.Tensor]:
    """One DDP step on a channel-masked layer whose mask differs on rank 1 before wrapping."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    mask = attach_mask(model[0], kind="channel")
    if rank == 0:
        mask[1] = 0.0  # DDP broadcasts rank 0's buffers, so rank 1 must end up masked too
    ddp = DistributedDataParallel(model)
    ddp(torch.randn(2, 4) + rank).square().sum().backward()
    grad = model[0].parametrizations.weight.original.grad
    assert grad is not None
    live = get_mask(model[0])
    assert live is not None
    return {"ddp_mask": live.clone(), "ddp_grad": grad.clone()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        t = torch.tensor([rank + 1.0, 2.0 * (rank + 1)])
        before = t.clone()
        stats = RunningStats().update(_batch(rank)).all_reduce()
        result = {
            "info": torch.tensor(
                [dist.is_distributed(), dist.world_size(), dist.rank(), dist.is_rank_zero()],
                dtype=torch.float64,
            ),
            "sum": dist.all_reduce_sum(t),
            "mean": dist.all_reduce_mean(t),
            "max": dist.all_reduce_max(t),
            "min": dist.all_reduce_min(t),
            "bcast": dist.broadcast(t, src=1),
            "unchanged": torch.tensor(float(torch.equal(t, before))),
            "zero_only": torch.tensor(float(dist.rank_zero_only(lambda: 1)() is not None)),
            "count": torch.tensor(float(stats.count)),
            "s_mean": stats.mean,
            "s_var": stats.var,
            "s_min": stats.min,
            "s_max": stats.max,
            "s_pos": stats.frac_positive,
        }
        result.update(_ddp_masked_step(rank))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        # DDP's reducer sits in a reference cycle holding the process group: freed only at
        # interpreter exit, after the group is gone, it aborts a worker in about one run of 5.
        gc.collect()
        tdist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_agree(gloo_ranks) -> None:
    res = gloo_ranks(_worker)
    for r, out in enumerate(res):
        assert out["info"].tolist() == [1.0, 2.0, float(r), float(r == 0)]
        torch.testing.assert_close(out["sum"], torch.tensor([3.0, 6.0]))
        torch.testing.assert_close(out["mean"], torch.tensor([1.5, 3.0]))
        torch.testing.assert_close(out["max"], torch.tensor([2.0, 4.0]))
        torch.testing.assert_close(out["min"], torch.tensor([1.0, 2.0]))
        torch.testing.assert_close(out["bcast"], torch.tensor([2.0, 4.0]))
        assert out["unchanged"].item() == 1.0
        assert out["zero_only"].item() == float(r == 0)

    torch.testing.assert_close(res[1]["ddp_mask"], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(res[0]["ddp_mask"], res[1]["ddp_mask"])
    assert torch.equal(res[0]["ddp_grad"], res[1]["ddp_grad"])  # gradients all-reduced
    assert float(res[0]["ddp_grad"][1].abs().sum()) == 0.0
    assert float(res[0]["ddp_grad"].abs().sum()) > 0.0

    full = torch.cat([_batch(0), _batch(1)]).double()
    dims = (0, 2, 3)
    expected = {
        "count": torch.tensor(full.numel() / 4),
        "s_mean": full.mean(dims).float(),
        "s_var": full.var(dims, correction=0).float(),
        "s_min": full.amin(dims).float(),
        "s_max": full.amax(dims).float(),
        "s_pos": (full > 0).double().mean(dims).float(),
    }
    for key, value in expected.items():
        assert torch.equal(res[0][key], res[1][key]), key  # identical on every rank
        torch.testing.assert_close(res[0][key], value, rtol=1e-5, atol=1e-5)
