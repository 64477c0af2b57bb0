"""EpochSampler: the order of epoch e is a function of (seed, e) only, and shards across ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sobre.core.errors import ConfigError
from sobre.data import sampler as sampler_module
from sobre.data.sampler import EpochSampler, epoch_seed


def order(n: int, seed: int, epoch: int, **ranks: int) -> list[int]:
    sampler = EpochSampler(range(n), seed=seed, **ranks)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_is_the_seeded_randperm() -> None:
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1000003 + 3))
    assert order(50, seed=7, epoch=3) == expected.tolist()
    assert epoch_seed(7, 3) == 7 * 1000003 + 3


def test_same_seed_and_epoch_same_order_and_a_permutation() -> None:
    first = order(100, seed=1, epoch=2)
    assert first == order(100, seed=1, epoch=2)
    assert sorted(first) == list(range(100))


def test_different_epochs_and_seeds_differ() -> None:
    assert order(100, seed=1, epoch=0) != order(100, seed=1, epoch=1)
    assert order(100, seed=1, epoch=0) != order(100, seed=2, epoch=0)


def test_epoch_order_ignores_history() -> None:
    walked = EpochSampler(range(64), seed=5)
    for epoch in range(4):
        walked.set_epoch(epoch)
        list(walked)
    walked.set_epoch(4)
    assert list(walked) == order(64, seed=5, epoch=4)
    assert list(walked) == list(walked)  # iterating again does not advance anything


def test_shards_pad_by_repeating_the_head() -> None:
    full = order(10, seed=0, epoch=1)
    padded = full + full[:2]  # 10 -> 12, a multiple of 3
    shards = [order(10, seed=0, epoch=1, rank=r, world_size=3) for r in range(3)]
    assert shards == [padded[r::3] for r in range(3)]
    assert [len(EpochSampler(range(10), rank=r, world_size=3)) for r in range(3)] == [4, 4, 4]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), world_size=st.integers(1, 6), epoch=st.integers(0, 5))
def test_shards_cover_everything_with_equal_lengths(n: int, world_size: int, epoch: int) -> None:
    shards = [
        order(n, seed=3, epoch=epoch, rank=r, world_size=world_size) for r in range(world_size)
    ]
    expected_len = -(-n // world_size)
    assert all(len(s) == expected_len for s in shards)
    merged = [i for s in shards for i in s]
    assert set(merged) == set(range(n))
    assert len(merged) - len(set(merged)) == expected_len * world_size - n


def test_single_process_defaults_to_rank_zero_of_one() -> None:
    sampler = EpochSampler(range(5))
    assert (sampler.rank, sampler.world_size, len(sampler)) == (0, 1, 5)


def test_rank_and_world_size_come_from_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sampler_module.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(sampler_module.dist, "get_world_size", lambda: 4)
    sampler = EpochSampler(range(10), seed=2)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (1, 4, 3)
    assert list(sampler) == order(10, seed=2, epoch=0, rank=1, world_size=4)


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_is_a_config_error(rank: int, world_size: int) -> None:
    with pytest.raises(ConfigError, match="0 <= rank < world_size"):
        EpochSampler(range(5), rank=rank, world_size=world_size)


def test_set_epoch_reaches_an_epoch_aware_dataset() -> None:
    class Recorder(list[int]):
        epochs: list[int]

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

    data = Recorder(range(4))
    data.epochs = []
    sampler = EpochSampler(data, seed=0)
    sampler.set_epoch(3)
    sampler.set_epoch(4)
    assert data.epochs == [3, 4]
