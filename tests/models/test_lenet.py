"""Tests of sobre.models.lenet: shapes on 28x28 and 32x32, layer layout, activation modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sobre.models import LeNet5, create


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_output_shape(in_channels: int, size: int) -> None:
    model = create("lenet5", num_classes=7, in_channels=in_channels, input_size=size)
    out = model(torch.randn(4, in_channels, size, size))
    assert out.shape == (4, 7)
    assert model.features.conv1.in_channels == in_channels


@pytest.mark.parametrize(("size", "padding"), [(28, 2), (32, 0)])
def test_inputs_reach_32_so_the_flattened_size_is_400(size: int, padding: int) -> None:
    model = LeNet5(input_size=size)
    assert model.features.conv1.padding == (padding, padding)
    assert model.classifier.fc1.in_features == 16 * 5 * 5
    assert [m.out_features for m in model.classifier if isinstance(m, nn.Linear)] == [120, 84, 10]


def test_relus_are_distinct_modules_and_not_inplace() -> None:
    relus = [m for m in LeNet5().modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4
    assert len({id(m) for m in relus}) == 4
    assert not any(m.inplace for m in relus)


def test_parameter_count_matches_the_architecture() -> None:
    expected = (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84)
    expected += 84 * 10 + 10
    assert sum(p.numel() for p in LeNet5().parameters()) == expected == 61_706
