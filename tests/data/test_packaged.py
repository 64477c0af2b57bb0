"""mnist5k, digits and mnist1d: shapes, classes, split sizes, stratification and determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from sobre.core.errors import ConfigError
from sobre.data.augment import CropFlipDataset
from sobre.data.packaged import (
    MNIST_MEAN,
    MNIST_STD,
    DigitsDataModule,
    MNIST1DDataModule,
    MNIST5kDataModule,
    mnist1d_datasets,
)


def labels_of(dataset: Dataset) -> torch.Tensor:
    assert isinstance(dataset, TensorDataset)
    return dataset.tensors[1]


def test_mnist5k_attributes_before_setup() -> None:
    dm = MNIST5kDataModule()
    assert (dm.name, dm.num_classes, dm.in_channels, dm.input_shape) == (
        "mnist5k",
        10,
        1,
        (1, 28, 28),
    )
    assert dm.class_names == tuple("0123456789")


def test_mnist5k_split_is_fixed_stratified_and_normalised() -> None:
    a, b = MNIST5kDataModule(seed=0), MNIST5kDataModule(seed=9)
    sizes = [len(d) for d in (a.train_dataset, a.val_dataset, a.test_dataset)]
    assert sizes == [4000, 500, 500]
    for split, per_class in ((a.train_dataset, 400), (a.val_dataset, 50), (a.test_dataset, 50)):
        assert torch.bincount(labels_of(split)).tolist() == [per_class] * 10
    assert torch.equal(a.test_dataset.tensors[0], b.test_dataset.tensors[0])  # seed-independent
    x = a.train_dataset.tensors[0]
    assert x.shape == (4000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD)
    assert x.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD)
    assert x.mean().item() == pytest.approx(0.0, abs=0.1)
    assert x.std().item() == pytest.approx(1.0, abs=0.15)


def test_mnist5k_augment_shifts_by_at_most_two_pixels() -> None:
    plain, shifted = MNIST5kDataModule(), MNIST5kDataModule(augment=True, seed=1)
    data = shifted.train_dataset
    assert isinstance(data, CropFlipDataset)
    assert data.padding == 2
    assert not data.flip
    image, label = data[0]
    original, original_label = plain.train_dataset[0]
    top, left = data.offsets[0].tolist()
    assert label == original_label
    padded = F.pad(original, (2, 2, 2, 2), value=-MNIST_MEAN / MNIST_STD)
    assert torch.equal(image, padded[:, top : top + 28, left : left + 28])
    assert torch.equal(shifted.val_dataset.tensors[0], plain.val_dataset.tensors[0])


def test_digits_shapes_range_and_seeded_split() -> None:
    dm = DigitsDataModule()
    assert (dm.num_classes, dm.input_shape) == (10, (1, 8, 8))
    sizes = [len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert sizes == [1257, 270, 270]
    x = dm.train_dataset.tensors[0]
    assert x.shape == (1257, 1, 8, 8)
    assert x.min() == 0.0
    assert x.max() == 1.0
    again, other = DigitsDataModule(), DigitsDataModule(data_seed=1)
    assert torch.equal(labels_of(again.test_dataset), labels_of(dm.test_dataset))
    assert not torch.equal(other.test_dataset.tensors[0], dm.test_dataset.tensors[0])
    counts = torch.bincount(labels_of(dm.val_dataset))
    assert counts.min() >= 26
    assert counts.max() <= 28


def test_mnist1d_generates_locally_with_given_sizes() -> None:
    dm = MNIST1DDataModule(num_samples=500, data_seed=3)
    assert (dm.num_classes, dm.input_shape) == (10, (1, 40))
    train, val, test = dm.train_dataset, dm.val_dataset, dm.test_dataset
    assert [len(train), len(val), len(test)] == [360, 40, 100]
    assert train[0][0].shape == (1, 40)
    assert train[0][0].dtype == torch.float32
    counts = torch.bincount(labels_of(val), minlength=10)
    assert counts.min() >= 3
    assert counts.max() <= 5  # stratified: ~4 per class
    again = mnist1d_datasets(num_samples=500, data_seed=3)
    assert torch.equal(again[2].tensors[0], test.tensors[0])
    other = mnist1d_datasets(num_samples=500, data_seed=4)
    assert not torch.equal(other[2].tensors[0], test.tensors[0])


def test_mnist1d_leaves_global_generators_alone() -> None:
    random.seed(11)
    np.random.seed(11)
    expected = (random.random(), np.random.rand())
    random.seed(11)
    np.random.seed(11)
    mnist1d_datasets(num_samples=200, data_seed=5)
    assert (random.random(), np.random.rand()) == expected


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MNIST1DDataModule(num_samples=5), "num_samples must be an integer >= 20"),
        (lambda: DigitsDataModule(val_fraction=1.5), "val_fraction must be a fraction"),
        (lambda: DigitsDataModule(val_fraction=0.5, test_fraction=0.5), "sum below 1"),
        (lambda: MNIST5kDataModule(batch_size=0), "batch_size must be an integer >= 1"),
    ],
)
def test_bad_arguments_fail_in_init(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=match):
        build()
