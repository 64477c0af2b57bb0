"""``torch.fx`` helpers shared by the families that trace models (activation sites, packing)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def third_party_leaves() -> tuple[set[type], tuple[Callable[..., Any], ...]]:
    """timm's no-trace modules and functions when timm is loaded (a timm model exists): tracers
    keep them as leaves, as timm's own ``symbolic_trace`` does."""
    layers = sys.modules.get("timm.layers")
    if layers is None or not hasattr(layers, "get_notrace_modules"):
        return set(), ()
    fns = tuple(f for f in layers.get_notrace_functions() if callable(f))
    return set(layers.get_notrace_modules()), fns
