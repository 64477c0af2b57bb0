"""Random, learnable tensors of any shape, for tests and smoke runs: the ``synthetic`` dataset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset

from sobre.core.errors import ConfigError
from sobre.data.base import (
    DATASETS,
    SobreDataModule,
    Splits,
    carve_sizes,
    check_fractions,
    check_int,
    stratified_split,
)

__all__ = ["SyntheticDataModule", "as_shape", "synthetic_datasets"]


def as_shape(value: Sequence[int]) -> tuple[int, ...]:
    """A per-sample shape from a non-empty tuple or list of positive ints (YAML gives lists)."""
    if not isinstance(value, (tuple, list)) or not value:
        raise ConfigError(
            f"input_shape must be a non-empty tuple of ints, got {value!r}; "
            "pass e.g. input_shape=(1, 28, 28)"
        )
    return tuple(check_int("each input_shape entry", v, 1) for v in value)


def synthetic_datasets(
    *,
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    num_samples: int = 256,
    val_fraction: float = 0.125,
    test_fraction: float = 0.125,
    data_seed: int = 0,
) -> Splits:
    """Gaussian samples around one random mean per class, split stratified (all seeded).

    Each class ``c`` has a mean ``m_c ~ N(0, 1)`` per element; a sample is ``m_c + N(0, 1)``
    noise, so even a linear model separates the classes. Labels are balanced.

    Args:
        input_shape: per-sample shape.
        num_classes: number of classes.
        num_samples: samples in all three splits together.
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for testing.
        data_seed: the seed of the data and of the split.
    """
    shape = as_shape(input_shape)
    check_int("num_classes", num_classes, 2)
    n = check_int("num_samples", num_samples, 3)
    generator = torch.Generator().manual_seed(data_seed)
    means = torch.randn(num_classes, *shape, generator=generator)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    inputs = means[labels] + torch.randn(n, *shape, generator=generator)
    sizes = carve_sizes(n, val_fraction=val_fraction, test_fraction=test_fraction)
    train, val, test = (
        TensorDataset(inputs[i], labels[i]) for i in stratified_split(labels, sizes, seed=data_seed)
    )
    return train, val, test


@DATASETS.register("synthetic")
class SyntheticDataModule(SobreDataModule):
    """Random tensors of any shape with learnable labels (class-dependent means), fully seeded.

    Args:
        input_shape: per-sample shape, e.g. ``(1, 28, 28)`` or ``(3, 32, 32)``.
        num_classes: number of classes.
        num_samples: samples in all three splits together.
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for testing.
        data_seed: the seed of the data and split (independent of the training ``seed``).
        **common: :class:`~sobre.data.base.SobreDataModule` arguments.
    """

    name = "synthetic"

    def __init__(
        self,
        *,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        num_samples: int = 256,
        val_fraction: float = 0.125,
        test_fraction: float = 0.125,
        data_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.input_shape = as_shape(input_shape)
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.class_names = tuple(f"class_{c}" for c in range(num_classes))
        check_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
        self.options = {
            "input_shape": self.input_shape,
            "num_classes": num_classes,
            "num_samples": check_int("num_samples", num_samples, 3),
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "data_seed": check_int("data_seed", data_seed, 0),
        }

    def build(self) -> Splits:
        """Draw the samples and split them."""
        return synthetic_datasets(**self.options)
