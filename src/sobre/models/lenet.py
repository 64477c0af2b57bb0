"""LeNet-5 for 28x28 or 32x32 digits, with ReLU modules and max pooling."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from sobre.models.registry import MODELS


@MODELS.register("lenet5")
class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998, "Gradient-based learning applied to document recognition").

    conv(6, 5x5) - pool - conv(16, 5x5) - pool - fc(120) - fc(84) - fc(num_classes), with the
    modern ReLU and 2x2 max pooling in place of the paper's tanh and trainable subsampling.
    Inputs smaller than 32x32 are zero-padded by ``conv1`` so that they reach 32x32 (padding 2 for
    28x28 MNIST, the usual variant); the flattened size follows ``input_size``.

    Args:
        num_classes: Number of outputs.
        in_channels: Number of input channels.
        input_size: Height (= width) of the inputs the net will see.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        padding = max(0, 33 - input_size) // 2
        side = ((input_size + 2 * padding - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding),
                relu1=nn.ReLU(inplace=False),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(6, 16, kernel_size=5),
                relu2=nn.ReLU(inplace=False),
                pool2=nn.MaxPool2d(2),
            )
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(16 * side * side, 120),
                relu3=nn.ReLU(inplace=False),
                fc2=nn.Linear(120, 84),
                relu4=nn.ReLU(inplace=False),
                fc3=nn.Linear(84, num_classes),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(B, num_classes)``."""
        return self.classifier(self.flatten(self.features(x)))
