"""Writers of tiny fake dataset folders in the real on-disk formats (CIFAR pickles, PNG trees)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

CIFAR10_TRAIN_PER_BATCH = 20  # 5 batches -> 100 training images
CIFAR10_TEST = 30
CIFAR100_TRAIN = 200
CIFAR100_TEST = 50
IMAGEFOLDER_CLASSES = ("cat", "dog", "emu")
IMAGEFOLDER_PER_CLASS = 10


def dump(path: Path, obj: Any) -> None:
    """Pickle ``obj`` to ``path`` with protocol 2, as the official CIFAR batches are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def fake_images(n: int, offset: int) -> np.ndarray:
    """``n`` uint8 CIFAR rows ``(n, 3072)``; row ``i`` is filled with ``(offset + i) % 256``."""
    return ((np.arange(n, dtype=np.int64)[:, None] + offset) % 256 * np.ones(3072)).astype(np.uint8)


def write_cifar10(folder: Path) -> Path:
    """A fake ``cifar-10-batches-py`` folder: 5 train batches, a test batch and the meta file."""
    for b in range(5):
        n = CIFAR10_TRAIN_PER_BATCH
        dump(
            folder / f"data_batch_{b + 1}",
            {
                b"batch_label": b"training batch",
                b"data": fake_images(n, b * n),
                b"labels": [(b * n + i) % 10 for i in range(n)],
                b"filenames": [b"img.png"] * n,
            },
        )
    dump(
        folder / "test_batch",
        {b"data": fake_images(CIFAR10_TEST, 200), b"labels": [i % 10 for i in range(CIFAR10_TEST)]},
    )
    dump(
        folder / "batches.meta",
        {
            b"label_names": [f"c{i}".encode() for i in range(10)],
            b"num_cases_per_batch": CIFAR10_TRAIN_PER_BATCH,
        },
    )
    return folder


def write_cifar100(folder: Path) -> Path:
    """A fake ``cifar-100-python`` folder: train, test and meta with fine and coarse labels."""
    for name, n in (("train", CIFAR100_TRAIN), ("test", CIFAR100_TEST)):
        dump(
            folder / name,
            {
                b"data": fake_images(n, 0),
                b"fine_labels": [i % 100 for i in range(n)],
                b"coarse_labels": [i % 20 for i in range(n)],
            },
        )
    dump(
        folder / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"g{i}".encode() for i in range(20)],
        },
    )
    return folder


def write_imagefolder(root: Path, splits: tuple[str, ...] = ("train",)) -> Path:
    """PNG trees ``root/<split>/<class>/<i>.png``; class ``k`` images are filled with ``40 * k``."""
    for split in splits:
        for k, cls in enumerate(IMAGEFOLDER_CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(IMAGEFOLDER_PER_CLASS):
                size = (10 + i, 12)  # varied sizes: the datamodule resizes
                image = Image.new("RGB", size, (40 * k, 40 * k, 40 * k))
                image.save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    """A data root holding a fake ``cifar-10-batches-py``."""
    write_cifar10(tmp_path / "cifar-10-batches-py")
    return tmp_path


@pytest.fixture
def cifar100_root(tmp_path: Path) -> Path:
    """A data root holding a fake ``cifar-100-python``."""
    write_cifar100(tmp_path / "cifar-100-python")
    return tmp_path


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    """An image tree with ``train/`` only (val and test are carved)."""
    return write_imagefolder(tmp_path / "images")


@pytest.fixture
def image_tree(tmp_path: Path) -> Callable[[tuple[str, ...]], Path]:
    """Writes an image tree with the given split folders under ``tmp_path/tree``."""
    return lambda splits: write_imagefolder(tmp_path / "tree", splits)


@pytest.fixture
def write_pickle() -> Callable[[Path, Any], None]:
    """The protocol-2 pickle writer, for tests that forge their own files."""
    return dump
