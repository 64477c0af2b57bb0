"""The shared core every family stands on; it imports torch only (no Lightning, no family).

- ``taps``: :class:`FeatureTap`, the one way to record intermediate features (name, glob, type).
- ``masks``: binary or soft masks on weights, channels and gradients (state_dict and DDP safe).
- ``dist``: all-reduce helpers so every rank takes the same decision; no-ops when not distributed.
- ``measure``: parameters, FLOPs, latency, saved-activation and peak memory, depth.
- ``labels``: label-noise injection (data modules, DSD²).
- ``members``: the member-major ``(M·B, K)`` layout of ensemble outputs.
- ``methods``: the method protocols (:class:`Regularizer`, hooks) and :class:`StepContext`.
- ``serialization``: safetensors + JSON files, written atomically, read without unpickling.
- ``edits``: atomic, recorded structure edits, replayed when a checkpoint is loaded.
- ``compact``: zeroed channels become smaller dense layers (Torch-Pruning imported lazily);
  shared by pruning and the fairness sub-network methods.
- ``weights``: ``fresh_weights(model, seed)``, what each module's and the model's own init draw.
- ``registry``/``errors``: named registries with "did you mean" errors.
"""

from sobre.core import dist
from sobre.core.errors import (
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    SobreError,
    UnknownNameError,
)
from sobre.core.masks import (
    MaskInfo,
    attach_mask,
    bake,
    get_mask,
    iter_masks,
    remove_masks,
    restore_masks,
    sparsity,
)
from sobre.core.measure import Measurement, measure
from sobre.core.members import member_targets, num_members, split_members
from sobre.core.methods import (
    EpochHook,
    GradientHook,
    ModelTransform,
    NeedsStageModel,
    Regularizer,
    SetupHook,
    StepContext,
    total,
)
from sobre.core.registry import Registry
from sobre.core.taps import FeatureTap, RunningStats

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataNotFoundError",
    "EpochHook",
    "FeatureTap",
    "GradientHook",
    "MaskInfo",
    "Measurement",
    "ModelTransform",
    "NeedsStageModel",
    "Registry",
    "Regularizer",
    "RunningStats",
    "SetupHook",
    "SobreError",
    "StepContext",
    "UnknownNameError",
    "attach_mask",
    "bake",
    "dist",
    "get_mask",
    "iter_masks",
    "measure",
    "member_targets",
    "num_members",
    "remove_masks",
    "restore_masks",
    "sparsity",
    "split_members",
    "total",
]
