"""``simple_conv`` / ``simple_conv_s``: the SimpleConvNet of the debiasing literature (ReBias, EnD).

Four blocks Conv-BN-activation (widths 16-32-64-128), global average pooling, a 128-d embedding
and a linear classifier ``fc``. The embedding is the module ``embedding`` (tap it with
:class:`~sobre.core.taps.FeatureTap`): the identity, or the row-wise L2 normalisation EnD and
FairKL put before their regularisers (``normalize=True``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice
from sobre.models.init import kaiming_fan_out
from sobre.models.registry import MODELS

WIDTHS = (16, 32, 64, 128)


class L2Normalize(nn.Module):
    """Row-wise L2 normalisation ``z / ‖z‖`` (the identity when ``enabled`` is false)."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def forward(self, z: Tensor) -> Tensor:
        return F.normalize(z, dim=1) if self.enabled else z

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}"


class SimpleConvNet(nn.Module):
    """SimpleConvNet (Bahng et al., ReBias 2020): 4 x (Conv k x k - BN - act), 16-32-64-128.

    Args:
        num_classes: outputs of ``fc``.
        in_channels: input channels (3 for the coloured MNIST variants).
        kernel_size: 7 in the papers; 3 in our CPU variant ``simple_conv_s``.
        pool_after: blocks (1-based) followed by a 2x2 max-pool (none in the papers; ``(1, 2)``
            in the CPU variants, which cuts the convs' cost about 15x on 28x28 inputs).
        last_activation: ``"relu"``, or ``"tanh"`` after the last BN (EnD, FairKL).
        normalize: L2-normalise the pooled 128-d features before ``fc``.
        detach_head: ``fc`` reads the embedding detached, so the task cross-entropy trains only
            the linear head (FairKL's "linear head on the frozen projections"; the encoder then
            learns from the regularisers alone).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        kernel_size: int = 7,
        pool_after: tuple[int, ...] | list[int] = (),
        last_activation: Literal["relu", "tanh"] = "relu",
        normalize: bool = False,
        detach_head: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(
                f"kernel_size must be odd and positive, got {kernel_size}; use 3 or 7"
            )
        check_choice("last_activation", last_activation, ("relu", "tanh"), "SimpleConvNet")
        bad = [b for b in pool_after if b not in (1, 2, 3, 4)]
        if bad:
            raise ConfigError(f"pool_after names blocks {bad}; the blocks are 1, 2, 3 and 4")
        layers: list[tuple[str, nn.Module]] = []
        width_in = in_channels
        for i, width in enumerate(WIDTHS, start=1):
            act: nn.Module = nn.Tanh() if i == 4 and last_activation == "tanh" else nn.ReLU()
            layers += [
                (f"conv{i}", nn.Conv2d(width_in, width, kernel_size, padding=kernel_size // 2)),
                (f"bn{i}", nn.BatchNorm2d(width)),
                (f"act{i}", act),
            ]
            if i in pool_after:
                layers.append((f"pool{i}", nn.MaxPool2d(2)))
            width_in = width
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = L2Normalize(normalize)
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        self.detach_head = detach_head
        self.init_weights()

    def init_weights(self) -> None:
        """The model's init scheme, :func:`~sobre.models.init.kaiming_fan_out`;
        :func:`~sobre.core.weights.fresh_weights` re-applies it."""
        kaiming_fan_out(self)

    def embed(self, x: Tensor) -> Tensor:
        """The 128-d embedding (pooled, normalised when ``normalize``)."""
        return self.embedding(self.pool(self.features(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        z = self.embed(x)
        return self.fc(z.detach() if self.detach_head else z)


def _factory(name: str, kernel_size: int, pool_after: tuple[int, ...], doc: str) -> None:
    def build(
        num_classes: int = 10,
        in_channels: int = 3,
        kernel_size: int = kernel_size,
        pool_after: tuple[int, ...] | list[int] = pool_after,
        last_activation: Literal["relu", "tanh"] = "relu",
        normalize: bool = False,
        detach_head: bool = False,
    ) -> SimpleConvNet:
        return SimpleConvNet(
            num_classes,
            in_channels,
            kernel_size,
            tuple(pool_after),
            last_activation,
            normalize,
            detach_head,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    MODELS.register(name)(build)


_factory("simple_conv", 7, (), "SimpleConvNet as in the papers: 7x7 kernels, no inner pooling.")
_factory(
    "simple_conv_s",
    3,
    (1, 2),
    "SimpleConvNet-S, the CPU variant (bias spec §0.4): 3x3 kernels, max-pool after blocks 1-2.",
)
