"""Efficient training: update fewer neurons for real (NEq, SCoTTi, NeVe, budgeted and dynamic
sparse updates).

- ``masks``: ``NeuronMask`` (per-layer boolean masks over output or input channels) and
  ``MaskedOptimizer`` (frozen rows stay bit-identical through any torch optimizer).
- ``select``: the ``ChannelSelector`` protocol and budgets in parameters or bytes.
- ``sparse``: channel-sparse layers whose backward computes and saves only what the trainable
  channels need; frozen-BN folding; a ReLU saving a bit-mask.

See docs/efficient.md.
"""

from sobre.efficient.masks import LAYERS, NORMS, MaskedOptimizer, NeuronMask
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

__all__ = [
    "LAYERS",
    "NORMS",
    "BitMaskReLU",
    "BitMaskReLU6",
    "Budget",
    "ChannelSelector",
    "ChannelSparseConv2d",
    "ChannelSparseLinear",
    "ImportanceSampling",
    "MaskedOptimizer",
    "NeuronMask",
    "RandomSelector",
    "StaticSelector",
    "TopK",
    "densify",
    "fold_frozen_bn",
    "mask_relus",
    "set_trainable",
    "sparsify",
    "trainable_fractions",
]
