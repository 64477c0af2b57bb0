"""imagefolder: a PNG tree resized to image_size, carved or given val/test, clear layout errors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from sobre.core.errors import ConfigError, DataNotFoundError
from sobre.data.imagefolder import ImageFolderDataModule

TreeWriter = Callable[[tuple[str, ...]], Path]


def labels(dataset: torch.utils.data.Dataset) -> list[int]:
    return sorted(int(dataset[i][1]) for i in range(len(dataset)))  # type: ignore[arg-type]


def test_train_only_tree_is_carved_stratified(imagefolder_root: Path) -> None:
    dm = ImageFolderDataModule(imagefolder_root, image_size=16, val_fraction=0.1, test_fraction=0.2)
    assert (dm.name, dm.num_classes, dm.input_shape) == ("imagefolder", 3, (3, 16, 16))
    assert dm.class_names == ("cat", "dog", "emu")
    train, val, test = dm.train_dataset, dm.val_dataset, dm.test_dataset
    assert [len(train), len(val), len(test)] == [21, 3, 6]
    assert labels(val) == [0, 1, 2]
    assert labels(test) == [0, 0, 1, 1, 2, 2]
    assert isinstance(train, Subset)
    assert set(train.indices).isdisjoint(val.indices)
    image, label = test[0]
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image, torch.full_like(image, 40 * int(label) / 255 * 2 - 1), atol=1e-6)


def test_grayscale_gives_one_channel(imagefolder_root: Path) -> None:
    dm = ImageFolderDataModule(imagefolder_root, image_size=8, grayscale=True)
    assert (dm.in_channels, dm.input_shape) == (1, (1, 8, 8))
    assert dm.example_input(2).shape == (2, 1, 8, 8)


def test_carved_split_is_seeded(imagefolder_root: Path) -> None:
    def val_indices(data_seed: int) -> list[int]:
        return ImageFolderDataModule(imagefolder_root, data_seed=data_seed).val_dataset.indices

    assert val_indices(0) == val_indices(0)
    assert val_indices(0) != val_indices(1)


def test_given_val_and_test_folders_are_used(image_tree: TreeWriter) -> None:
    root = image_tree(("train", "val", "test"))
    dm = ImageFolderDataModule(root)
    sizes = [len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert sizes == [30, 30, 30]
    assert labels(dm.test_dataset) == sorted(list(range(3)) * 10)


def test_given_val_only_carves_test(image_tree: TreeWriter) -> None:
    root = image_tree(("train", "val"))
    dm = ImageFolderDataModule(root, test_fraction=0.1)
    assert [len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)] == [27, 30, 3]


def test_missing_tree_lists_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        ImageFolderDataModule(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "train") in message
    assert "train/<class_a>/*.png|*.jpg" in message
    assert "val/<class_a>" in message
    assert "root=" in message


def test_val_classes_must_match_train(image_tree: TreeWriter) -> None:
    root = image_tree(("train", "val"))
    shutil.rmtree(root / "val" / "emu")
    with pytest.raises(ConfigError, match="give both the same class folders"):
        ImageFolderDataModule(root).setup()
