"""Seeded tensor augmentation whose randomness is a function of (seed, epoch, index) only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sobre.data.sampler import epoch_seed

__all__ = ["CropFlipDataset"]

_STREAM_OFFSET = 0x9E3779B9  # keeps the augmentation stream apart from the shuffling stream


class CropFlipDataset(Dataset[tuple[Tensor, Tensor]]):
    """Pads images by ``padding`` pixels of ``fill``, crops back at a random offset, maybe flips.

    The offsets and flips of every index are drawn at once in :meth:`set_epoch` from a generator
    seeded with ``epoch_seed(seed, epoch)`` (plus a fixed offset), so a resumed run sees the very
    same augmented samples. :class:`~sobre.data.sampler.EpochSampler` forwards its epoch here.

    Args:
        base: a dataset of ``(image (C, H, W), label)`` pairs, already normalised.
        padding: the largest shift in pixels.
        flip: also flip horizontally with probability 1/2.
        fill: the per-channel value of the padding (the normalised black).
        seed: the run's seed.
    """

    def __init__(
        self,
        base: Dataset[tuple[Tensor, Tensor]],
        *,
        padding: int,
        flip: bool,
        fill: Sequence[float],
        seed: int,
    ) -> None:
        self.base = base
        self.padding = padding
        self.flip = flip
        self.fill = torch.tensor(fill, dtype=torch.float32).view(-1, 1, 1)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the offsets and flips of ``epoch`` for every index."""
        n = len(self)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch) + _STREAM_OFFSET)
        self.offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        self.flips = torch.rand(n, generator=generator) < 0.5
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.base[index]
        channels, height, width = image.shape
        p = self.padding
        canvas = self.fill.expand(channels, height + 2 * p, width + 2 * p).clone()
        canvas[:, p : p + height, p : p + width] = image
        top, left = self.offsets[index].tolist()
        out = canvas[:, top : top + height, left : left + width]
        if self.flip and self.flips[index]:
            out = out.flip(-1)
        return out, label
