"""Efficient training: update fewer neurons for real (NEq, SCoTTi, NeVe, budgeted and dynamic
sparse updates).

- ``masks``: ``NeuronMask`` (per-layer boolean masks over output or input channels) and
  ``MaskedOptimizer`` (frozen rows stay bit-identical through any torch optimizer).
- ``select``: the ``ChannelSelector`` protocol and budgets in parameters or bytes.
- ``sparse``: channel-sparse layers whose backward computes and saves only what the trainable
  channels need; frozen-BN folding; a ReLU saving a bit-mask.
- ``probe``: per-neuron outputs on a fixed probe set (the activation tap of the velocity methods).
- ``neq``: NEq (#11) and SCoTTi (#38, learned thresholds).
- ``neve``: NeVe (#48), LR decay and early stopping from neural velocity.
- ``budget``: neuron selection under a parameter budget (#33).
- ``dynamic``: TraDy (#41) and MeDyate (#45), memory-budgeted dynamic channel updates.
- ``compress``: HOSVD_ε / SVD_ε (#35) and ASI (#37) compressed activations: ``CompressedConv2d``,
  ``CompressedLinear``, ``compress_activations`` / ``decompress_activations``, ``ASIState``,
  ``select_ranks``.
- ``wasi``: WASI (#46), low-rank weights and ASI-compressed inputs for transformers' linear
  layers, exported as two plain Linears; ``lora``: minimal LoRA, its peer arm.
- ``callbacks`` (Lightning, imported on first use): ``NEqCallback``, ``NeVeCallback``,
  ``BudgetCallback``, ``SparseUpdateCallback``, ``ActivationCompressionCallback``.

See docs/efficient.md.
"""

from sobre.core.registry import lazy_attributes
from sobre.efficient.budget import BudgetedNeuronSelector
from sobre.efficient.compress import (
    ASIState,
    CompressedConv2d,
    CompressedLinear,
    compress_activations,
    decompress_activations,
    explained_rank,
    hosvd,
    select_ranks,
    svd_compress,
    svd_reconstruct,
    tucker_reconstruct,
)
from sobre.efficient.dynamic import SAMPLERS, SCORERS, ChannelBudget, LayerStats, UpdatePlan
from sobre.efficient.lora import LoRALinear, add_lora, merge_lora
from sobre.efficient.masks import LAYERS, NORMS, MaskedOptimizer, NeuronMask
from sobre.efficient.neq import NEq, SCoTTi, backward_saving, drive_sparse, shuffle_mask
from sobre.efficient.neve import NeuralVelocity, VelocityPlateau, VelocityReport
from sobre.efficient.probe import ProbeOutputs, noise_probe, probe_inputs
from sobre.efficient.select import (
    Budget,
    ChannelSelector,
    ImportanceSampling,
    RandomSelector,
    StaticSelector,
    TopK,
)
from sobre.efficient.sparse import (
    BitMaskReLU,
    BitMaskReLU6,
    ChannelSparseConv2d,
    ChannelSparseLinear,
    densify,
    fold_frozen_bn,
    mask_relus,
    set_trainable,
    sparsify,
    trainable_fractions,
)
from sobre.efficient.wasi import WASILinear, export_wasi, unwasi, wasi

_CALLBACKS = (
    "ActivationCompressionCallback",
    "BudgetCallback",
    "NEqCallback",
    "NeVeCallback",
    "SparseUpdateCallback",
)

__getattr__ = lazy_attributes(__name__, "callbacks", _CALLBACKS)

__all__ = [
    "LAYERS",
    "NORMS",
    "SAMPLERS",
    "SCORERS",
    "ASIState",
    "ActivationCompressionCallback",
    "BitMaskReLU",
    "BitMaskReLU6",
    "Budget",
    "BudgetCallback",
    "BudgetedNeuronSelector",
    "ChannelBudget",
    "ChannelSelector",
    "ChannelSparseConv2d",
    "ChannelSparseLinear",
    "CompressedConv2d",
    "CompressedLinear",
    "ImportanceSampling",
    "LayerStats",
    "LoRALinear",
    "MaskedOptimizer",
    "NEq",
    "NEqCallback",
    "NeVeCallback",
    "NeuralVelocity",
    "NeuronMask",
    "ProbeOutputs",
    "RandomSelector",
    "SCoTTi",
    "SparseUpdateCallback",
    "StaticSelector",
    "TopK",
    "UpdatePlan",
    "VelocityPlateau",
    "VelocityReport",
    "WASILinear",
    "add_lora",
    "backward_saving",
    "compress_activations",
    "decompress_activations",
    "densify",
    "drive_sparse",
    "explained_rank",
    "export_wasi",
    "fold_frozen_bn",
    "hosvd",
    "mask_relus",
    "merge_lora",
    "noise_probe",
    "probe_inputs",
    "select_ranks",
    "set_trainable",
    "shuffle_mask",
    "sparsify",
    "svd_compress",
    "svd_reconstruct",
    "trainable_fractions",
    "tucker_reconstruct",
    "unwasi",
    "wasi",
]
