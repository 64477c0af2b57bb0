"""Init schemes shared by sobre's nets (each net's ``init_weights()`` applies one)."""

from __future__ import annotations

from torch import nn


def kaiming_fan_out(model: nn.Module) -> None:
    """Kaiming-normal fan-out weights for every ``nn.Conv2d`` of ``model`` (He et al. 2015, the
    ResNet scheme; BatchNorm keeps its unit scale and zero shift, the rest PyTorch's defaults)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
