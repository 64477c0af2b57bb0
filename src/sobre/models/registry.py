"""The registry of sobre's own small networks (``MODELS``), filled by the net modules on import."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from sobre.core.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
