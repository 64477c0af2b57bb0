"""Tests of sobre.models.cnn: shapes, width, parameter count, and that it fits a small batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sobre.models import SmallCNN, create


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_output_shape(in_channels: int, size: int) -> None:
    model = create("small_cnn", num_classes=5, in_channels=in_channels, input_size=size)
    assert model(torch.randn(3, in_channels, size, size)).shape == (3, 5)


def test_width_sets_channels_and_parameter_count() -> None:
    model = SmallCNN(width=8)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16]
    conv_params = 1 * 8 * 9 + 8 * 8 * 9 + 8 * 16 * 9 + 16 * 16 * 9
    bn_params = 2 * (8 + 8 + 16 + 16)
    head_params = 16 * 7 * 7 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == conv_params + bn_params + head_params


def test_feature_map_is_7x7_on_28x28() -> None:
    model = SmallCNN()
    assert model.features(torch.randn(2, 1, 28, 28)).shape == (2, 64, 7, 7)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == 4
    assert not any(m.inplace for m in relus)


def test_memorises_a_small_batch() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = SmallCNN(width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy == 1.0
