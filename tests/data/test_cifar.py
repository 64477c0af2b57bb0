"""CIFAR-10/100 read from tiny fake batches in the real pickle format; the restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sobre.core.errors import DataNotFoundError, SobreError
from sobre.data.augment import CropFlipDataset
from sobre.data.cifar import (
    CIFAR10,
    CIFAR100,
    CIFAR10DataModule,
    CIFAR100DataModule,
    RestrictedUnpickler,
    UnsafePickleError,
    cifar10_datasets,
    read_pickle,
)

SMALL_VAL = {"val_size": 10}


def test_cifar10_reads_fake_batches(cifar10_root: Path) -> None:
    dm = CIFAR10DataModule(cifar10_root, **SMALL_VAL)
    assert (dm.name, dm.num_classes, dm.in_channels, dm.input_shape) == (
        "cifar10",
        10,
        3,
        (3, 32, 32),
    )
    assert dm.class_names == tuple(f"c{i}" for i in range(10))
    assert [len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)] == [90, 10, 30]
    image, label = dm.test_dataset[7]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert label.item() == 7
    expected = (207 / 255 - torch.tensor(CIFAR10.mean)) / torch.tensor(CIFAR10.std)
    assert torch.allclose(image[:, 5, 9], expected)
    val_labels = sorted(int(dm.val_dataset[i][1]) for i in range(10))
    assert val_labels == list(range(10))  # stratified: one per class


def test_every_training_image_lands_in_exactly_one_split(cifar10_root: Path) -> None:
    train, val, _ = cifar10_datasets(cifar10_root, val_size=10)
    seen = sorted(
        int(d[i][0][0, 0, 0].mul(CIFAR10.std[0]).add(CIFAR10.mean[0]).mul(255).round())
        for d in (train, val)
        for i in range(len(d))
    )
    assert seen == list(range(100))


def test_val_split_follows_data_seed_not_seed(cifar10_root: Path) -> None:
    def val_images(**kwargs: int) -> torch.Tensor:
        return cifar10_datasets(cifar10_root, val_size=10, **kwargs)[1].images

    assert torch.equal(val_images(seed=0), val_images(seed=5))
    assert not torch.equal(val_images(data_seed=0), val_images(data_seed=1))


def test_root_may_be_the_folder_itself_or_come_from_the_environment(
    cifar10_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = CIFAR10DataModule(cifar10_root / "cifar-10-batches-py")
    assert direct.folder == cifar10_root / "cifar-10-batches-py"
    monkeypatch.setenv("SOBRE_DATA_DIR", str(cifar10_root))
    assert CIFAR10DataModule().folder == cifar10_root / "cifar-10-batches-py"


def test_cifar10_augment_wraps_train_only(cifar10_root: Path) -> None:
    dm = CIFAR10DataModule(cifar10_root, augment=True, seed=3, **SMALL_VAL)
    train = dm.train_dataset
    assert isinstance(train, CropFlipDataset)
    assert (train.padding, train.flip, train.seed) == (4, True, 3)
    assert not isinstance(dm.val_dataset, CropFlipDataset)
    black = torch.tensor([-m / s for m, s in zip(CIFAR10.mean, CIFAR10.std, strict=True)])
    assert torch.allclose(train.fill.flatten(), black)


@pytest.mark.parametrize(
    ("label_type", "classes", "first_names"),
    [("fine", 100, ("f0", "f1")), ("coarse", 20, ("g0", "g1"))],
)
def test_cifar100_fine_and_coarse(
    cifar100_root: Path, label_type: str, classes: int, first_names: tuple[str, str]
) -> None:
    dm = CIFAR100DataModule(cifar100_root, label_type=label_type, val_size=40)
    assert (dm.num_classes, dm.input_shape) == (classes, (3, 32, 32))
    assert dm.class_names[:2] == first_names
    assert [len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)] == [160, 40, 50]
    assert [int(dm.test_dataset[i][1]) for i in (0, 21, 49)] == [0, 21 % classes, 49 % classes]
    image = dm.test_dataset[3][0]
    expected = (3 / 255 - torch.tensor(CIFAR100.mean)) / torch.tensor(CIFAR100.std)
    assert torch.allclose(image[:, 0, 0], expected)


def test_cifar100_rejects_an_unknown_label_type(cifar100_root: Path) -> None:
    with pytest.raises(SobreError, match=r"'fine' \(100 classes\) or 'coarse'"):
        CIFAR100DataModule(cifar100_root, label_type="medium")


@pytest.mark.parametrize(
    ("module", "folder", "files", "title"),
    [
        (
            CIFAR10DataModule,
            "cifar-10-batches-py",
            ("data_batch_1", "test_batch", "batches.meta"),
            "CIFAR-10 python version",
        ),
        (
            CIFAR100DataModule,
            "cifar-100-python",
            ("train", "test", "meta"),
            "CIFAR-100 python version",
        ),
    ],
)
def test_missing_folder_error_says_where_and_how(
    tmp_path: Path, module: type, folder: str, files: tuple[str, ...], title: str
) -> None:
    with pytest.raises(DataNotFoundError) as info:
        module(tmp_path)
    message = str(info.value)
    assert str(tmp_path / folder) in message
    assert all(name in message for name in files)
    assert title in message
    assert "cs.toronto.edu/~kriz/cifar.html" in message
    assert "never downloads" in message
    assert "SOBRE_DATA_DIR" in message
    assert "does not exist" in message


def test_partial_folder_names_the_missing_files(cifar10_root: Path) -> None:
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        CIFAR10DataModule(cifar10_root)


class _Evil:
    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, ("echo pwned",)


def test_restricted_unpickler_refuses_os_system(
    cifar10_root: Path, write_pickle: Callable[[Path, Any], None]
) -> None:
    payload = pickle.dumps({b"data": _Evil()}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle (posix|nt)\.system"):
        RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    batch = cifar10_root / "cifar-10-batches-py" / "data_batch_1"
    write_pickle(batch, {b"data": _Evil(), b"labels": [0]})
    with pytest.raises(pickle.UnpicklingError, match="fresh copy"):
        cifar10_datasets(cifar10_root, val_size=10)


def test_restricted_unpickler_rebuilds_arrays_of_any_protocol() -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 4):
        payload = pickle.dumps({b"data": array, b"labels": [1, 2]}, protocol=protocol)
        loaded = RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
        assert np.array_equal(loaded[b"data"], array)
        assert loaded[b"labels"] == [1, 2]


def test_a_pickle_that_is_not_a_dict_is_rejected(
    tmp_path: Path, write_pickle: Callable[[Path, Any], None]
) -> None:
    write_pickle(tmp_path / "batch", [1, 2, 3])
    with pytest.raises(DataNotFoundError, match="holds a list, not a CIFAR batch dict"):
        read_pickle(tmp_path / "batch")
