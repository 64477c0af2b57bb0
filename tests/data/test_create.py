"""sobre.data.create and the DATASETS registry: names, keyword checks, "did you mean" errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sobre import data
from sobre.core.errors import ConfigError, UnknownNameError


def test_every_dataset_is_registered() -> None:
    assert data.DATASETS.names() == [
        "bffhq",
        "biased_celeba",
        "biased_mnist",
        "cifar10",
        "cifar100",
        "colored_mnist",
        "corrupted_cifar10",
        "digits",
        "imagefolder",
        "imagenet9",
        "mnist1d",
        "mnist5k",
        "synthetic",
        "waterbirds",
    ]
    assert data.DEFAULT_DATASET == "mnist5k"
    assert all(data.DATASETS.get(n).name == n for n in data.DATASETS.names())


def test_create_builds_the_registered_datamodule() -> None:
    dm = data.create("synthetic", input_shape=(2, 5), num_classes=3, batch_size=16, seed=7)
    assert isinstance(dm, data.SyntheticDataModule)
    assert (dm.input_shape, dm.in_channels, dm.num_classes) == ((2, 5), 2, 3)
    assert (dm.batch_size, dm.seed, dm.num_workers, dm.pin_memory) == (16, 7, 0, False)


def test_create_reaches_the_file_datasets(cifar10_root: Path) -> None:
    dm = data.create("cifar10", root=cifar10_root, val_size=10)
    assert (dm.name, dm.num_classes) == ("cifar10", 10)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UnknownNameError) as info:
        data.create("mnsit5k")
    message = str(info.value)
    assert "did you mean 'mnist5k'" in message
    assert "digits, imagefolder, imagenet9, mnist1d, mnist5k, synthetic, waterbirds" in message


@pytest.mark.parametrize(
    ("name", "key", "closest"),
    [
        ("mnist5k", "batchsize", "batch_size"),
        ("synthetic", "num_class", "num_classes"),
        ("cifar10", "valsize", "val_size"),
    ],
)
def test_unknown_keyword_suggests_the_closest_parameter(name: str, key: str, closest: str) -> None:
    with pytest.raises(ConfigError) as info:
        data.create(name, **{key: 1})
    message = str(info.value)
    assert f"unknown parameter {key!r} for dataset {name!r}" in message
    assert f"did you mean {closest!r}" in message
    assert "Valid parameters:" in message


def test_missing_required_keyword_is_named() -> None:
    with pytest.raises(ConfigError, match=r"dataset 'imagefolder' needs root; pass e\.g\."):
        data.create("imagefolder")
