"""Tests of sobre.core.measure.backward_flops: exact analytic counts, FlopCounterMode when dense."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.measure import BackwardFlops, backward_flops, flops


def cnn() -> nn.Sequential:
    """conv(3->4, 3x3) - BN - ReLU - conv(4->6, 3x3, stride 2) - ReLU - pool - linear(6->5)."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=1),
            bn1=nn.BatchNorm2d(4),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(4, 6, 3, stride=2, padding=1),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 5),
        )
    )


X = torch.randn(2, 3, 8, 8)
# Forward FLOPs: 2 * output entries * fan-in per layer.
CONV0 = 2 * (2 * 4 * 8 * 8) * 3 * 9
CONV3 = 2 * (2 * 6 * 4 * 4) * 4 * 9
HEAD = 2 * 2 * 6 * 5


def test_dense_step_matches_flop_counter_exactly() -> None:
    model = cnn()
    counted = backward_flops(model, X)
    assert counted == BackwardFlops(
        forward=CONV0 + CONV3 + HEAD, grad_input=CONV3 + HEAD, grad_weight=CONV0 + CONV3 + HEAD
    )
    assert counted.step == flops(model, X, train_step=True)
    assert counted.forward == flops(model, X)


def test_dense_resnet18_step_matches_flop_counter() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert backward_flops(model, x).step == flops(model, x, train_step=True)


def test_first_layer_and_frozen_prefix_need_no_input_gradient() -> None:
    model = cnn()
    model.conv1.requires_grad_(False)  # frozen first conv: nothing above it needs its input grad
    counted = backward_flops(model, X)
    assert counted.grad_weight == CONV3 + HEAD
    assert counted.grad_input == CONV3 + HEAD  # conv3's input still comes from the BN affine
    model.bn1.requires_grad_(False)
    counted = backward_flops(model, X)
    assert counted.grad_input == HEAD  # conv3's input no longer requires grad
    assert counted.step == flops(model, X, train_step=True)


def test_masks_and_fractions_scale_the_weight_gradient_only() -> None:
    model = cnn()
    mask = torch.tensor([True, False, False, True, False, False])  # 2 of 6 output channels
    counted = backward_flops(model, X, {"conv2": mask, "fc": 0.5})
    assert counted.grad_weight == CONV0 + CONV3 // 3 + HEAD // 2
    assert counted.grad_input == CONV3 + HEAD
    assert backward_flops(model, X, {"conv1": 0.0}).grad_weight == CONV3 + HEAD


def test_grouped_conv_weight_gradient_costs_its_forward() -> None:
    # FlopCounterMode's grad-weight formula ignores groups (torch 2.x), so it counts a depthwise
    # conv's weight gradient `groups` times too high; the analytic count does not.
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    x = torch.randn(2, 8, 5, 5)
    counted = backward_flops(model, x)
    assert counted.forward == 2 * (2 * 8 * 25) * 1 * 9
    assert counted.grad_weight == counted.forward
    assert counted.grad_input == 0


def test_module_called_twice_counts_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x))

    counted = backward_flops(Twice(), torch.randn(3, 4))
    one = 2 * 3 * 4 * 4
    assert counted == BackwardFlops(forward=2 * one, grad_input=one, grad_weight=2 * one)


def test_model_state_is_left_unchanged() -> None:
    model = cnn().eval()
    stats = model.bn1.running_mean.clone()
    backward_flops(model, X)
    assert not model.training
    assert torch.equal(model.bn1.running_mean, stats)
    assert all(p.grad is None for p in model.parameters())


def test_unknown_layer_name_suggests_close_one() -> None:
    with pytest.raises(UnknownNameError, match=r"did you mean 'conv2'"):
        backward_flops(cnn(), X, {"conv_2": 0.5})
    with pytest.raises(UnknownNameError, match="not a Conv or Linear"):
        backward_flops(cnn(), X, {"bn1": 0.5})


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.ones(5, dtype=torch.bool), r"shape \(6,\)"),
        (torch.ones(6), "bool tensor"),
        (1.5, r"\[0, 1\]"),
    ],
)
def test_bad_mask_or_fraction_explains_fix(value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        backward_flops(cnn(), X, {"conv2": value})  # type: ignore[dict-item]
