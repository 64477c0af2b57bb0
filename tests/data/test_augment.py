"""CropFlipDataset: shifted copies padded with the fill value, seeded by (seed, epoch, index)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from sobre.data.augment import CropFlipDataset

IMAGES = torch.arange(6 * 2 * 5 * 5, dtype=torch.float32).view(6, 2, 5, 5) + 1.0
BASE = TensorDataset(IMAGES, torch.arange(6))


def make(seed: int = 0, flip: bool = True) -> CropFlipDataset:
    return CropFlipDataset(BASE, padding=2, flip=flip, fill=[-1.0, -2.0], seed=seed)


def reference(index: int, top: int, left: int, flipped: bool) -> torch.Tensor:
    """Pad by 2 with the per-channel fill, crop at (top, left), maybe flip."""
    canvas = torch.tensor([-1.0, -2.0]).view(2, 1, 1).repeat(1, 9, 9)
    canvas[:, 2:7, 2:7] = IMAGES[index]
    out = canvas[:, top : top + 5, left : left + 5]
    return out.flip(-1) if flipped else out


def test_items_are_padded_shifted_and_flipped_copies() -> None:
    data = make()
    data.set_epoch(3)
    for i in range(len(data)):
        image, label = data[i]
        top, left = data.offsets[i].tolist()
        assert 0 <= top <= 4
        assert 0 <= left <= 4
        assert torch.equal(image, reference(i, top, left, bool(data.flips[i])))
        assert label.item() == i


def test_same_seed_and_epoch_same_augmentation_whatever_the_history() -> None:
    walked, fresh = make(seed=4), make(seed=4)
    for epoch in range(3):
        walked.set_epoch(epoch)
    fresh.set_epoch(2)
    assert all(torch.equal(walked[i][0], fresh[i][0]) for i in range(6))


def test_epochs_and_seeds_change_the_draws() -> None:
    a, b = make(seed=0), make(seed=1)
    draws = a.offsets.clone()
    a.set_epoch(1)
    assert not torch.equal(draws, a.offsets)
    assert not torch.equal(draws, b.offsets)


def test_without_flip_nothing_is_mirrored() -> None:
    data = make(flip=False)
    for i in range(len(data)):
        top, left = data.offsets[i].tolist()
        assert torch.equal(data[i][0], reference(i, top, left, flipped=False))
