"""``mlp``: a flatten + fully connected ReLU network for images or flat feature vectors."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.models.registry import MODELS


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
        if input_shape is not None:
            size = math.prod(input_shape)
            if in_features is not None and in_features != size:
                raise ConfigError(
                    f"mlp got in_features={in_features} but input_shape={tuple(input_shape)} "
                    f"holds {size} values: pass only one of them"
                )
        else:
            size = in_features if in_features is not None else in_channels * input_size**2
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
