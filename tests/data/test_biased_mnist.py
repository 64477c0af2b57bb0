"""Biased-MNIST: palette and pixel rule, per-class colour assignment, splits and the datamodule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from sobre import data
from sobre.core.errors import ConfigError
from sobre.data.biased import (
    FAIRKL_PALETTE,
    PALETTE,
    BiasedMNISTDataModule,
    colour_mnist,
)


def tiny_digits(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` 2x2 images per digit: ink at (0, 1) (value 7) and (1, 0) (value 0.3)."""
    labels = torch.arange(10).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 2, 2)
    images[:, 0, 1], images[:, 1, 0] = 7.0, 0.3
    return images, labels


def ink(dataset: TensorDataset) -> set[bytes]:
    """The binarised digits of a normalised background-coloured set (white pixels are 1.0)."""
    masks = (dataset.tensors[0] == 1.0).all(dim=1)
    return {m.numpy().tobytes() for m in masks}


@pytest.fixture(scope="module")
def dm() -> BiasedMNISTDataModule:
    module = data.create("biased_mnist", batch_size=64)
    assert isinstance(module, BiasedMNISTDataModule)
    return module


def test_pixel_rule_and_palette_on_a_hand_made_image() -> None:
    images, labels = tiny_digits(1)
    x, y, b = colour_mnist(images, labels, rho=1.0, seed=3)
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 2, 2)
    assert torch.equal(b, y)
    palette = torch.tensor(PALETTE, dtype=torch.uint8)
    assert palette[9].tolist() == [128, 128, 128]  # grey by default
    assert torch.equal(x[:, :, 0, 0], palette[y]) and torch.equal(x[:, :, 1, 1], palette[y])
    assert (x[:, :, 0, 1] == 255).all() and (x[:, :, 1, 0] == 255).all()  # any ink -> white

    x, y, b = colour_mnist(images, labels, rho=1.0, colour_target="digit", palette=FAIRKL_PALETTE)
    fairkl = torch.tensor(FAIRKL_PALETTE, dtype=torch.uint8)
    assert fairkl[9].tolist() == [50, 255, 128]
    assert torch.equal(x[:, :, 0, 1], fairkl[y]) and torch.equal(x[:, :, 1, 0], fairkl[y])
    assert (x[:, :, 0, 0] == 0).all() and (x[:, :, 1, 1] == 0).all()  # background stays black


@settings(max_examples=30, deadline=None)
@given(
    per_class=st.integers(1, 40),
    rho=st.floats(0.0, 1.0),
    n_confusing=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_assignment_aligned_counts_and_chunks_over_others(
    per_class: int, rho: float, n_confusing: int, seed: int
) -> None:
    images, labels = tiny_digits(per_class)
    _, y, b = colour_mnist(images, labels, rho, n_confusing=n_confusing, seed=seed)
    rest = per_class - math.floor(per_class * rho + 1e-9)
    chunk = math.ceil(rest / n_confusing) if rest else 1
    expected_chunks = sorted(len(c) for c in torch.arange(rest).split(chunk))
    for c in range(10):
        colours = b[y == c]
        assert int((colours == c).sum()) == per_class - rest
        conflicting = colours[colours != c]
        others = {(c + k) % 10 for k in range(1, n_confusing + 1)}
        assert set(conflicting.tolist()) <= others
        assert sorted(torch.bincount(conflicting, minlength=10)[list(others)].tolist()) == sorted(
            [0] * (n_confusing - len(expected_chunks)) + expected_chunks
        )


@pytest.mark.parametrize(
    ("rhos", "conflicting"),
    [((0.99, 0.995, 0.997, 0.999), (4, 2, 2, 1)), ((0.9, 0.95, 0.98, 0.99), (35, 18, 7, 4))],
)
def test_granularity_at_350_per_class_matches_the_spec(
    rhos: tuple[float, ...], conflicting: tuple[int, ...]
) -> None:
    images, labels = tiny_digits(350)
    for rho, n in zip(rhos, conflicting, strict=True):
        _, y, b = colour_mnist(images, labels, rho)
        assert torch.bincount(y[b != y], minlength=10).tolist() == [n] * 10


def test_n_conflicting_per_class_overrides_rho() -> None:
    images, labels = tiny_digits(20)
    _, y, b = colour_mnist(images, labels, rho=0.99, n_conflicting_per_class=3)
    assert torch.bincount(y[b != y], minlength=10).tolist() == [3] * 10
    with pytest.raises(ConfigError, match="at most 20"):
        colour_mnist(images, labels, rho=0.99, n_conflicting_per_class=21)


def test_colouring_is_deterministic_per_seed() -> None:
    images, labels = tiny_digits(30)
    first, again = (
        colour_mnist(images, labels, 0.5, seed=4),
        colour_mnist(images, labels, 0.5, seed=4),
    )
    other = colour_mnist(images, labels, 0.5, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
    assert not torch.equal(first[2], other[2])


def test_uniform_rest_makes_colour_independent_of_digit_at_rho_zero() -> None:
    images, labels = tiny_digits(100)
    _, y, b = colour_mnist(images, labels, 0.0, rest="uniform", seed=1)
    assert torch.bincount(y * 10 + b, minlength=100).tolist() == [10] * 100
    _, y, b = colour_mnist(images, labels, 0.9, rest="uniform", seed=1)
    aligned = torch.bincount(y[b == y], minlength=10)
    assert (aligned >= 90).all() and (aligned <= 91).all()  # 90 + at most one chunk of 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": -0.1}, "rho=0.95"),
        ({"rho": 1.5}, "in \\[0, 1\\]"),
        ({"rho": True}, "rho"),
        ({"palette": PALETTE[:9]}, "shape \\(9, 3\\), not \\(10, 3\\)"),
        ({"palette": [(0, 0, 0, 0)] * 10}, "10 RGB triples"),
        ({"palette": [(0, 0, 256)] * 10}, "outside 0..255"),
        ({"palette": [(0, 0, -1)] * 10}, "outside 0..255"),
        ({"palette": [(0, 0, 0.5)] * 10}, "non-integer"),
        ({"palette": "red"}, "10 RGB triples"),
        ({"n_confusing": 0}, "n_confusing=1"),
        ({"n_confusing": 10}, "at most 9"),
        ({"colour_target": "foreground"}, "'background', 'digit'"),
        ({"rest": "all", "rho": 0.5}, "'others', 'uniform'"),
        ({"rest": "uniform", "n_confusing": 5}, "leave n_confusing=9"),
    ],
)
def test_bad_options_raise_config_errors_naming_the_fix(kwargs: dict, message: str) -> None:
    images, labels = tiny_digits(2)
    options = {"rho": 0.5, **kwargs}
    with pytest.raises(ConfigError, match=message):
        colour_mnist(images, labels, **options)
    with pytest.raises(ConfigError, match=message):
        BiasedMNISTDataModule(**options)


def test_datamodule_splits_are_stratified_and_disjoint(dm: BiasedMNISTDataModule) -> None:
    assert (dm.name, dm.num_classes, dm.input_shape, dm.class_names) == (
        "biased_mnist",
        10,
        (3, 28, 28),
        tuple("0123456789"),
    )
    sets = dm.train_dataset, dm.val_dataset, dm.unbiased_test_dataset, dm.biased_test_dataset
    assert all(isinstance(s, TensorDataset) for s in sets)
    for split, per_class in zip(sets, (350, 50, 100, 100), strict=True):
        assert torch.bincount(split.tensors[1]).tolist() == [per_class] * 10
    train, val, unbiased, biased = (ink(s) for s in sets)
    assert len(train) == 3500 and len(unbiased) == 1000  # the binarised digits are all distinct
    assert not train & val and not train & unbiased and not val & unbiased
    assert unbiased == biased  # the two test sets colour the same digits


def test_datamodule_colours_each_split_as_specified(dm: BiasedMNISTDataModule) -> None:
    _, y, b = dm.train_dataset.tensors
    assert torch.bincount(y[b == y], minlength=10).tolist() == [332] * 10  # rho 0.95: 18 off
    _, y, b = dm.val_dataset.tensors
    assert torch.bincount(y[b == y], minlength=10).tolist() == [5] * 10  # rho 0.1
    _, y, b = dm.unbiased_test_dataset.tensors
    assert torch.bincount(y * 10 + b, minlength=100).tolist() == [10] * 100  # uniform colours
    _, y, b = dm.biased_test_dataset.tensors
    assert torch.equal(b, y)
    assert dm.test_dataset is dm.unbiased_test_dataset


def test_datamodule_yields_normalised_triples(dm: BiasedMNISTDataModule) -> None:
    x, y, b = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 28, 28) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert y.shape == b.shape == (64,)
    grey = torch.tensor([128 / 255 * 2 - 1] * 3)
    background = dm.biased_test_dataset.tensors[0][:, :, 0, 0]  # corner pixel is never ink
    labels = dm.biased_test_dataset.tensors[1]
    assert torch.allclose(background[labels == 9], grey.expand(100, 3), atol=1e-6)


def test_training_colouring_follows_the_seed_and_test_does_not(dm: BiasedMNISTDataModule) -> None:
    other = BiasedMNISTDataModule(seed=1, test_split="biased")
    assert not torch.equal(other.train_dataset.tensors[2], dm.train_dataset.tensors[2])
    assert torch.equal(other.val_dataset.tensors[0], dm.val_dataset.tensors[0])
    assert torch.equal(other.unbiased_test_dataset.tensors[0], dm.unbiased_test_dataset.tensors[0])
    assert other.test_dataset is other.biased_test_dataset
    fixed = BiasedMNISTDataModule(seed=1, data_seed=0)
    assert torch.equal(fixed.train_dataset.tensors[0], dm.train_dataset.tensors[0])


def test_datamodule_override_and_refusals() -> None:
    module = BiasedMNISTDataModule(n_conflicting_per_class=2, colour_target="digit")
    x, y, b = module.train_dataset.tensors
    assert torch.bincount(y[b != y], minlength=10).tolist() == [2] * 10
    assert (x[:, :, 0, 0] == -1.0).all()  # digit mode: black background
    for key, value in (("label_noise", 0.1), ("classes", [0, 1])):
        with pytest.raises(ConfigError, match=f"does not support {key}.*bias label b"):
            BiasedMNISTDataModule(**{key: value})
    with pytest.raises(ConfigError, match="'unbiased', 'biased'"):
        BiasedMNISTDataModule(test_split="ood")
