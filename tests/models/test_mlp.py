"""Tests of sobre.models.mlp: input size from input_shape/in_features/images, hidden layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sobre.core.errors import ConfigError
from sobre.core.measure import depth
from sobre.models import MLP, create


@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 28), (1, 32), (3, 32)])
def test_images_are_flattened(in_channels: int, size: int) -> None:
    model = create("mlp", num_classes=10, in_channels=in_channels, input_size=size)
    assert model.features.fc1.in_features == in_channels * size * size
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)


def test_input_shape_wins_over_image_size() -> None:
    model = create("mlp", num_classes=10, in_channels=1, input_size=28, input_shape=(40,))
    assert model.features.fc1.in_features == 40
    assert model(torch.randn(5, 40)).shape == (5, 10)


def test_in_features_for_flat_inputs() -> None:
    model = MLP(num_classes=3, in_features=12, hidden=(8,))
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [8, 3]
    assert model(torch.randn(2, 12)).shape == (2, 3)


def test_no_hidden_layer_is_a_linear_model() -> None:
    model = MLP(num_classes=4, in_features=6, hidden=())
    assert len(model.features) == 0
    assert sum(p.numel() for p in model.parameters()) == 6 * 4 + 4


def test_conflicting_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="pass only one"):
        MLP(in_features=10, input_shape=(3, 4))


def test_relus_are_distinct_modules() -> None:
    relus = [m for m in MLP(hidden=(16, 16, 16)).modules() if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == 3
    assert not any(m.inplace for m in relus)


def test_residual_mlp_blocks_preserve_shape_and_count_sites():
    plain = create("residual_mlp", num_classes=10, in_channels=1, width=16, blocks=8)
    x = torch.randn(3, 1, 28, 28)
    assert plain(x).shape == (3, 10)
    assert sum(isinstance(m, nn.ReLU) for m in plain.modules()) == 8
    assert depth(plain, x) == 8
    post = create(
        "residual_mlp",
        width=16,
        blocks=3,
        batch_norm=True,
        post_activation=True,
        in_features=40,
        in_channels=1,
    )
    assert sum(isinstance(m, nn.ReLU) for m in post.modules()) == 6
    assert sum(isinstance(m, nn.BatchNorm1d) for m in post.modules()) == 6
    h = torch.randn(4, 16)
    assert post.blocks[1](h).shape == h.shape
    assert post(torch.randn(4, 40)).shape == (4, 10)
