"""synthetic: any shape, balanced learnable labels, fully seeded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sobre.core.errors import ConfigError
from sobre.data.synthetic import SyntheticDataModule, synthetic_datasets


def test_shapes_sizes_and_balanced_labels() -> None:
    dm = SyntheticDataModule(input_shape=[3, 4, 5], num_classes=4, num_samples=80)
    assert (dm.input_shape, dm.in_channels, dm.num_classes) == ((3, 4, 5), 3, 4)
    assert dm.class_names == ("class_0", "class_1", "class_2", "class_3")
    train, val, test = dm.train_dataset, dm.val_dataset, dm.test_dataset
    assert [len(train), len(val), len(test)] == [60, 10, 10]
    assert train.tensors[0].shape == (60, 3, 4, 5)
    assert torch.bincount(train.tensors[1]).tolist() == [15] * 4


def test_fully_seeded_by_data_seed() -> None:
    a = synthetic_datasets(input_shape=(2, 3), data_seed=1)
    b = synthetic_datasets(input_shape=(2, 3), data_seed=1)
    c = synthetic_datasets(input_shape=(2, 3), data_seed=2)
    assert all(torch.equal(x.tensors[0], y.tensors[0]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].tensors[0], c[0].tensors[0])


def test_a_linear_model_fits_it() -> None:
    dm = SyntheticDataModule(input_shape=(1, 6, 6), num_classes=5, num_samples=400)
    x, y = dm.train_dataset.tensors
    model = nn.Linear(36, 5)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
        optimizer.step()
    xt, yt = dm.test_dataset.tensors
    accuracy = (model(xt.flatten(1)).argmax(1) == yt).float().mean().item()
    assert accuracy >= 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": ()}, "input_shape must be a non-empty tuple"),
        ({"input_shape": (1, 0)}, "each input_shape entry must be an integer >= 1"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"test_fraction": 0.0}, "test_fraction must be a fraction"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SyntheticDataModule(**kwargs)
