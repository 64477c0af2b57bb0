"""Tests of sobre.models.factory: name resolution, torchvision/timm builds, channel adaptation."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import torchvision
from torch import nn

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.models import CifarResNet, create, names, replace_first_conv

OURS = [
    "lenet5",
    "mlp",
    "residual_mlp",
    "resnet18_cifar",
    "resnet20",
    "resnet32",
    "resnet34_cifar",
    "resnet50_cifar",
    "resnet56",
    "resnet8",
    "simple_conv",
    "simple_conv_s",
    "small_cnn",
    "vit_tiny28",
]


def test_names_lists_our_nets() -> None:
    assert names() == OURS


def test_resolution_order_and_prefixes() -> None:
    import timm.models.resnet

    assert isinstance(create("resnet20"), CifarResNet)
    assert isinstance(create("resnet18"), torchvision.models.ResNet)
    assert isinstance(create("tv:resnet18"), torchvision.models.ResNet)
    assert isinstance(create("timm:resnet18"), timm.models.resnet.ResNet)
    assert (
        type(create("vit_tiny_patch16_224", depth=1, input_size=32, patch_size=8)).__module__
        == "timm.models.vision_transformer"
    )


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_take_any_channel_count(name: str, in_channels: int) -> None:
    model = create(name, num_classes=10, in_channels=in_channels).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == in_channels
    assert model(torch.randn(2, in_channels, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "path"), [("resnet18", "conv1"), ("mobilenet_v2", "features.0.0")]
)
def test_replacement_keeps_conv_hyper_parameters(name: str, path: str) -> None:
    reference = torchvision.models.get_model(name, weights=None).get_submodule(path)
    new = create(name, in_channels=1).get_submodule(path)
    assert new.weight.shape == (reference.out_channels, 1, *reference.kernel_size)
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(new, attr) == getattr(reference, attr)
    assert (new.bias is None) == (reference.bias is None)


def test_replace_first_conv_copies_every_setting_and_the_bias() -> None:
    torch.manual_seed(0)
    old = nn.Conv2d(3, 8, 5, stride=2, padding=1, dilation=2, bias=True, padding_mode="reflect")
    model = nn.Sequential(nn.Sequential(old, nn.ReLU()), nn.Conv2d(8, 4, 3))
    new = replace_first_conv(model, in_channels=5)
    assert model[0][0] is new
    assert (new.in_channels, new.out_channels, new.kernel_size) == (5, 8, (5, 5))
    assert (new.stride, new.padding, new.dilation) == ((2, 2), (1, 1), (2, 2))
    assert new.padding_mode == "reflect"
    torch.testing.assert_close(new.bias, old.bias)
    assert model[1].in_channels == 8
    assert model(torch.randn(1, 5, 20, 20)).shape == (1, 4, 5, 5)


def test_replace_first_conv_needs_a_conv() -> None:
    with pytest.raises(ConfigError, match=r"no nn\.Conv2d"):
        replace_first_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), in_channels=1)


def test_timm_vit_on_small_inputs() -> None:
    model = create(
        "vit_tiny_patch16_224", num_classes=10, in_channels=1, input_size=32, patch_size=4, depth=2
    ).eval()
    assert model.patch_embed.img_size == (32, 32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_timm_swin_on_small_inputs() -> None:
    model = create(
        "timm:swin_tiny_patch4_window7_224",
        num_classes=10,
        in_channels=3,
        input_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=24,
        depths=(1, 1, 1, 1),
    ).eval()
    assert model.patch_embed.img_size == (32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_explicit_img_size_wins_for_timm() -> None:
    model = create("vit_tiny_patch16_224", input_size=28, img_size=32, patch_size=8, depth=1)
    assert model.patch_embed.img_size == (32, 32)


def test_unknown_name_suggests_close_names_from_every_source() -> None:
    with pytest.raises(UnknownNameError) as info:
        create("resnet2")
    message = str(info.value)
    assert "'resnet20'" in message
    assert "(sobre)" in message
    assert "(torchvision)" in message
    assert "(timm)" in message
    suggested = re.findall(r"'([^']+)'", message.split("?")[0].split("Did you mean")[1])
    assert 3 <= len(suggested) <= 9


def test_prefix_limits_the_suggestions() -> None:
    with pytest.raises(UnknownNameError, match="'resnet18'") as info:
        create("tv:resnet1")
    assert "(sobre)" not in str(info.value)
    assert "(timm)" not in str(info.value)


def test_timm_prefix_without_timm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"sobre\[timm\]"):
        create("timm:resnet18")
    with pytest.raises(UnknownNameError, match=r"sobre\[timm\]"):
        create("vit_tiny_patch16_224")


def test_pretrained_without_weights_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="weights_path") as info:
        create("resnet18", pretrained=True)
    assert "download" in str(info.value)


def test_unknown_argument_names_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match="does not take widht") as info:
        create("small_cnn", widht=8)
    assert "width" in str(info.value)
    with pytest.raises(ConfigError, match="rejected its arguments"):
        create("resnet18", widht=8)


@pytest.mark.parametrize(("arg", "value"), [("num_classes", 0), ("in_channels", 0)])
def test_counts_must_be_positive(arg: str, value: int) -> None:
    with pytest.raises(ConfigError, match=arg):
        create("lenet5", **{arg: value})


def test_kwargs_reach_our_nets() -> None:
    model = create("small_cnn", num_classes=3, in_channels=1, width=4)
    assert model.features.conv1.out_channels == 4
    assert model.classifier.out_features == 3
