"""``mlp``: a flatten + fully connected ReLU network for images or flat feature vectors."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.models.registry import MODELS


def _flat_size(
    in_channels: int, input_size: int, in_features: int | None, input_shape: tuple[int, ...] | None
) -> int:
    """Flat input size: ``input_shape`` first, then ``in_features``, then an image's size."""
    if input_shape is not None:
        size = math.prod(input_shape)
        if in_features is not None and in_features != size:
            raise ConfigError(
                f"got in_features={in_features} but input_shape={tuple(input_shape)} holds "
                f"{size} values: pass only one of them"
            )
        return size
    return in_features if in_features is not None else in_channels * input_size**2


@MODELS.register("mlp")
class MLP(nn.Module):
    """A multi-layer perceptron (Rumelhart, Hinton & Williams, 1986) with ReLU hidden layers.

    The input is flattened; its size is, in order of precedence, the product of ``input_shape``
    (e.g. ``(40,)`` for MNIST-1D), ``in_features``, or ``in_channels * input_size**2`` for images.

    Args:
        num_classes: Number of outputs.
        in_channels: Channels of image inputs.
        input_size: Height (= width) of image inputs.
        hidden: Widths of the hidden layers (may be empty: a linear model).
        in_features: Flat input size, for non-image inputs.
        input_shape: Shape of one input without the batch dimension.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        hidden: tuple[int, ...] = (256, 128),
        in_features: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        size = _flat_size(in_channels, input_size, in_features, input_shape)
        layers: list[tuple[str, nn.Module]] = []
        for index, width in enumerate(hidden, start=1):
            layers += [(f"fc{index}", nn.Linear(size, width)), (f"relu{index}", nn.ReLU(False))]
            size = width
        self.flatten = nn.Flatten()
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(B, num_classes)``."""
        return self.classifier(self.features(self.flatten(x)))


class ResidualBlock(nn.Module):
    """``x + fc2(relu(fc1(x)))``; with ``batch_norm`` and ``post_activation``, the ResNet form
    ``relu(x + bn2(fc2(relu(bn1(fc1(x))))))``. One activation module per site."""

    def __init__(self, width: int, batch_norm: bool = False, post_activation: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.bn1 = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.relu = nn.ReLU(False)
        self.fc2 = nn.Linear(width, width)
        self.bn2 = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.out_relu = nn.ReLU(False) if post_activation else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Same shape as ``x``: the block can be removed (replaced by the identity)."""
        return self.out_relu(x + self.bn2(self.fc2(self.relu(self.bn1(self.fc1(x))))))


@MODELS.register("residual_mlp")
class ResidualMLP(nn.Module):
    """A residual MLP: flatten, a linear stem, ``blocks`` shape-preserving residual blocks, a head.

    The test bed of the depth-reduction papers' CPU runs (spec compression §1, §4): without batch
    norm each block has one ReLU site (EGP); with ``batch_norm=True, post_activation=True`` each
    block is ``relu(x + f(x))`` as in a ResNet (LaCoOT).

    Args:
        num_classes: Number of outputs.
        in_channels: Channels of image inputs.
        input_size: Height (= width) of image inputs.
        width: Width of the stem output and of every block.
        blocks: Number of residual blocks.
        batch_norm: BatchNorm1d after each linear layer of a block.
        post_activation: ReLU after the residual sum.
        in_features: Flat input size, for non-image inputs.
        input_shape: Shape of one input without the batch dimension.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        width: int = 128,
        blocks: int = 8,
        batch_norm: bool = False,
        post_activation: bool = False,
        in_features: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.stem = nn.Linear(_flat_size(in_channels, input_size, in_features, input_shape), width)
        self.blocks = nn.Sequential(
            *(ResidualBlock(width, batch_norm, post_activation) for _ in range(blocks))
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(B, num_classes)``."""
        return self.classifier(self.blocks(self.stem(self.flatten(x))))
