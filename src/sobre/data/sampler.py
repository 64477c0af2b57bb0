"""The training sampler: a seeded shuffle whose order in epoch ``e`` depends on (seed, e) only.

That property makes a resumed run see exactly the batches an uninterrupted run would have seen,
whatever happened before. The sampler also shards itself across distributed ranks, so it needs no
:class:`~torch.utils.data.DistributedSampler` around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from sobre.core.errors import ConfigError

__all__ = ["EpochAware", "EpochSampler", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch`` in a run seeded with ``seed``: ``seed * 1000003 + epoch``."""
    return seed * 1000003 + epoch


@runtime_checkable
class EpochAware(Protocol):
    """Anything whose randomness follows the epoch (a seeded augmentation, a sampler)."""

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the randomness of ``epoch``."""


class EpochSampler(Sampler[int]):
    """Shuffles ``range(len(data_source))`` with ``randperm`` seeded by ``epoch_seed(seed, epoch)``.

    Under ``torch.distributed`` (or with explicit ``rank``/``world_size``), the permutation is
    padded by repeating its head to a multiple of ``world_size`` and rank ``r`` takes
    ``order[r::world_size]``, so every rank yields the same number of indices. When
    ``data_source`` is itself :class:`EpochAware` (a seeded augmentation), :meth:`set_epoch` is
    forwarded to it.

    Args:
        data_source: the dataset to index.
        seed: the run's seed.
        rank: this process's rank; defaults to the ``torch.distributed`` rank (0 outside DDP).
        world_size: the number of ranks; defaults to the ``torch.distributed`` world size (1).
    """

    def __init__(
        self,
        data_source: Sized,
        seed: int = 0,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        )
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"EpochSampler got rank={self.rank}, world_size={self.world_size}; "
                "pass world_size >= 1 and 0 <= rank < world_size"
            )
        self.data_source = data_source
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from now on (and tell an epoch-aware dataset)."""
        self.epoch = epoch
        if isinstance(self.data_source, EpochAware):
            self.data_source.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.data_source) // self.world_size)

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=generator)
        if self.world_size > 1 and n > 0:
            total = len(self) * self.world_size
            order = order.repeat(-(-total // n))[:total][self.rank :: self.world_size]
        return iter(order.tolist())
