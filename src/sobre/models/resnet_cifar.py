"""CIFAR-style ResNets of He et al. 2016: resnet8/20/32/56 (3 stages, projection (option B)
shortcuts) and resnet18/34/50_cifar (torchvision's ResNets with the CIFAR stem)."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import Bottleneck, ResNet

from sobre.core.errors import ConfigError
from sobre.models.init import kaiming_fan_out
from sobre.models.registry import MODELS

STAGE_CHANNELS: tuple[int, int, int] = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; the shortcut is a 1x1 conv + BN when shapes change.

    Args:
        in_channels: Channels of the block's input.
        out_channels: Channels of the block's output.
        stride: Stride of the first conv (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 ("Deep residual learning for image recognition", §4.2).

    A 3x3 conv stem, then 3 stages of ``n = (depth - 2) / 6`` basic blocks with 16, 32 and 64
    channels (times ``width``; stages 2 and 3 start with stride 2), global average pooling and a
    linear classifier. Shortcuts that change shape use option B (1x1 conv + BN) rather than the
    paper's CIFAR option A (zero padding): resnet20 has 272,474 parameters for 10 classes and 3
    input channels, 2,752 more than option A's 269,722 (the paper's "0.27M"). Size-agnostic:
    28x28 and 32x32 inputs both work.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: Number of outputs.
        in_channels: Number of input channels.
        width: Multiplier of the stage channels (each stage keeps at least one channel).
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(
                f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}: use 20, 32 or 56"
            )
        if width <= 0:
            raise ConfigError(f"width must be > 0, got {width}: use e.g. 0.5, 1 or 2")
        blocks = (depth - 2) // 6
        c1, c2, c3 = (max(1, round(c * width)) for c in STAGE_CHANNELS)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
                bn1=nn.BatchNorm2d(c1),
                relu1=nn.ReLU(inplace=False),
                layer1=_stage(c1, c1, blocks, stride=1),
                layer2=_stage(c1, c2, blocks, stride=2),
                layer3=_stage(c2, c3, blocks, stride=2),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c3, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The model's init scheme, :func:`~sobre.models.init.kaiming_fan_out`;
        :func:`~sobre.core.weights.fresh_weights` re-applies it."""
        kaiming_fan_out(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(B, num_classes)``."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


@MODELS.register("resnet8")
def resnet8(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-8 for CIFAR (1 block per stage): the CPU model of the efficient-training specs."""
    return CifarResNet(8, num_classes, in_channels, width)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage); see :class:`CifarResNet`."""
    return CifarResNet(20, num_classes, in_channels, width)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage); see :class:`CifarResNet`."""
    return CifarResNet(32, num_classes, in_channels, width)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage); see :class:`CifarResNet`."""
    return CifarResNet(56, num_classes, in_channels, width)


class CifarStemResNet(ResNet):
    """torchvision's ResNet with the CIFAR stem of the papers' CIFAR experiments: a 3x3 stride-1
    ``conv1`` and no max pool, so ``layer1`` sees the full 32x32 image (the ImageNet stem's 7x7
    stride-2 conv and max pool cut it to 8x8). Same module names as ``torchvision`` (``conv1``,
    ``layer1``-``layer4``, ``fc``), so whatever handles torchvision's resnet18 handles it.

    Args:
        block: ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50).
        layers: Blocks per stage.
        num_classes: Number of outputs.
        in_channels: Number of input channels.
    """

    def __init__(
        self,
        block: type[TVBasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """torchvision's ResNet scheme, :func:`~sobre.models.init.kaiming_fan_out`;
        :func:`~sobre.core.weights.fresh_weights` re-applies it."""
        kaiming_fan_out(self)


@MODELS.register("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarStemResNet:
    """ResNet-18 with the CIFAR stem (11.17M parameters at 10 classes); see
    :class:`CifarStemResNet`."""
    return CifarStemResNet(TVBasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@MODELS.register("resnet34_cifar")
def resnet34_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarStemResNet:
    """ResNet-34 with the CIFAR stem; see :class:`CifarStemResNet`."""
    return CifarStemResNet(TVBasicBlock, [3, 4, 6, 3], num_classes, in_channels)


@MODELS.register("resnet50_cifar")
def resnet50_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarStemResNet:
    """ResNet-50 (bottleneck blocks) with the CIFAR stem; see :class:`CifarStemResNet`."""
    return CifarStemResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)
