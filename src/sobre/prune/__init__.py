"""Pruning and depth reduction (EGP, NEPENTHE, EASIER, LaCoOT, DSD², double descent).

Shared machinery: activation call sites (``sites``), activation entropy (``entropy``), iterative
magnitude pruning on the core masks (``imp``), exact depth surgery (``surgery``) and ``compact``
(zeroed channels into smaller dense layers). Methods: ``egp`` (EGP, NEPENTHE), ``easier``
(EASIER), ``lacoot`` (LaCoOT), ``dsd2`` and ``curves`` (DSD², sparse double descent);
``callbacks``: their Lightning callbacks (loaded on first use). Every
structure edit is a recorded ``sobre.core.edits`` edit, so pruned models reload from their recipe
without pickles; see docs/prune.md.
"""

from sobre.core.compact import channel_groups, compact, compact_report
from sobre.core.registry import lazy_attributes
from sobre.prune.curves import is_monotone, sdd_score, sparsity_curve
from sobre.prune.dsd2 import DistillationLoss, inject_label_noise
from sobre.prune.easier import Easier
from sobre.prune.egp import EntropyGuidedPruner
from sobre.prune.entropy import ActivationEntropy, EntropyReport, binary_entropy
from sobre.prune.imp import (
    IMPSchedule,
    MagnitudePruner,
    PruneReport,
    Reinitialize,
    Rewinder,
    global_sparsity,
)
from sobre.prune.lacoot import (
    CollapseBlocks,
    LaCoOT,
    auto_pairs,
    disjoint_blocks,
    max_sliced_w2,
    rank_blocks,
    remove_blocks,
)
from sobre.prune.sites import Site, UniquifyActivations, find_sites, uniquify_activations
from sobre.prune.surgery import (
    ChannelGate,
    fold_linear,
    linearize,
    remove_block,
    replace_activation,
)

_CALLBACKS = ("EasierCallback", "EntropyGuidedPruningCallback", "IMPCallback")

__getattr__ = lazy_attributes(__name__, "callbacks", _CALLBACKS)

__all__ = [
    "ActivationEntropy",
    "ChannelGate",
    "CollapseBlocks",
    "DistillationLoss",
    "Easier",
    "EasierCallback",
    "EntropyGuidedPruner",
    "EntropyGuidedPruningCallback",
    "EntropyReport",
    "IMPCallback",
    "IMPSchedule",
    "LaCoOT",
    "MagnitudePruner",
    "PruneReport",
    "Reinitialize",
    "Rewinder",
    "Site",
    "UniquifyActivations",
    "auto_pairs",
    "binary_entropy",
    "channel_groups",
    "compact",
    "compact_report",
    "disjoint_blocks",
    "find_sites",
    "fold_linear",
    "global_sparsity",
    "inject_label_noise",
    "is_monotone",
    "linearize",
    "max_sliced_w2",
    "rank_blocks",
    "remove_block",
    "remove_blocks",
    "replace_activation",
    "sdd_score",
    "sparsity_curve",
    "uniquify_activations",
]
