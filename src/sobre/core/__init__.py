"""The shared core every family stands on; it imports torch only (no Lightning, no family).

- ``taps``: :class:`FeatureTap`, the one way to record intermediate features (by name, glob or type).
- ``masks``: binary or soft masks on weights, channels and gradients that survive ``state_dict``/DDP.
- ``dist``: all-reduce helpers so every rank takes the same decision; no-ops outside distributed runs.
- ``measure``: parameters, FLOPs, latency, saved-activation and peak memory, depth.
- ``methods``: the method protocols (:class:`Regularizer`, hooks) and :class:`StepContext`.
- ``serialization``: safetensors + JSON files, written atomically, read without unpickling.
- ``registry``/``errors``: named registries with "did you mean" errors.
"""

from sobre.core.errors import (
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    SobreError,
    UnknownNameError,
)
from sobre.core.methods import (
    EpochHook,
    GradientHook,
    ModelTransform,
    Regularizer,
    SetupHook,
    StepContext,
    total,
)
from sobre.core.registry import Registry

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataNotFoundError",
    "EpochHook",
    "GradientHook",
    "ModelTransform",
    "Registry",
    "Regularizer",
    "SetupHook",
    "SobreError",
    "StepContext",
    "UnknownNameError",
    "total",
]
