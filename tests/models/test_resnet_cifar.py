"""Tests of sobre.models.resnet_cifar: parameter counts, depth, width, shortcuts and shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sobre.core.errors import ConfigError
from sobre.models import CifarResNet, create, resnet20
from sobre.models.resnet_cifar import BasicBlock

OPTION_A_RESNET20 = 269_722  # He et al. 2016, table 6 ("0.27M"), zero-padding shortcuts
OPTION_B_SHORTCUTS = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two 1x1 convs + their BN


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_has_the_paper_count_plus_two_projection_shortcuts() -> None:
    assert count(resnet20(num_classes=10, in_channels=3)) == OPTION_A_RESNET20 + OPTION_B_SHORTCUTS
    assert count(resnet20()) == 272_474


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 9), ("resnet32", 15), ("resnet56", 27)])
def test_depth_gives_3n_blocks(name: str, blocks: int) -> None:
    model = create(name)
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == blocks
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == int(name.removeprefix("resnet"))


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56"])
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 28), (1, 32), (3, 32)])
def test_output_shape(name: str, in_channels: int, size: int) -> None:
    model = create(name, num_classes=10, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)


def test_projection_shortcuts_only_where_the_shape_changes() -> None:
    model = resnet20()
    projections = [
        name
        for name, m in model.named_modules()
        if isinstance(m, BasicBlock) and not isinstance(m.shortcut, nn.Identity)
    ]
    assert projections == ["features.layer2.0", "features.layer3.0"]
    assert model.features.layer3[0].shortcut.conv.stride == (2, 2)


def test_width_multiplies_stage_channels() -> None:
    model = resnet20(width=0.5)
    stages = [model.features.layer1, model.features.layer2, model.features.layer3]
    assert [stage[0].conv2.out_channels for stage in stages] == [8, 16, 32]
    assert model.classifier.in_features == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_relus_are_one_module_per_site() -> None:
    relus = [m for m in resnet20().modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9
    assert len({id(m) for m in relus}) == len(relus)
    assert not any(m.inplace for m in relus)


@pytest.mark.parametrize("depth", [18, 21, 2])
def test_bad_depth_is_refused(depth: int) -> None:
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        CifarResNet(depth=depth)


def test_cifar_stem_resnet18_keeps_the_full_resolution_in_layer1() -> None:
    model = create("resnet18_cifar")
    assert count(model) == 11_173_962  # the CIFAR ResNet-18 count (torchvision's is 11,181,642)
    assert count(model) == count(create("resnet18")) - 64 * 3 * (49 - 9)
    seen: list[torch.Size] = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen == [(2, 64, 32, 32)]  # the ImageNet stem gives 8x8 here


@pytest.mark.parametrize(
    ("name", "in_channels", "classes"),
    [("resnet18_cifar", 1, 10), ("resnet34_cifar", 3, 100), ("resnet50_cifar", 3, 100)],
)
def test_cifar_stem_variants_shapes_and_init(name: str, in_channels: int, classes: int) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=classes, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, 28, 28)).shape == (2, classes)
    conv = model.layer4[0].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(float(conv.weight.std()) * (fan_out / 2) ** 0.5 - 1) < 0.05
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
