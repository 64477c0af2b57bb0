"""Uncertainty: Packed-Ensembles for any model, deep-ensemble baselines and their evaluation.

- ``packed``: packed layers (``PackedLinear``, ``PackedConv1d/2d/3d``, ``PackedLayerNorm``) and
  ``split_members`` (member-major ``(M·B, K)`` logits to ``(B, M, K)``).
- ``packify``: ``packify(model, ...)`` converts a model through ``torch.fx``; ``unpack_member``
  extracts one member as a standalone network.
- ``ensemble``: ``DeepEnsemble`` (sequential or ``torch.func`` stacked) and ``EnsembleLoss``.
- ``metrics``: accuracy, NLL, Brier, ECE, entropy, mutual information, disagreement, OOD scores
  and ``ood_metrics``, as plain functions over ``(B, M, K)`` probabilities and as torchmetrics.
- ``evaluate``: the whole ID / OOD / shift table of a model; ``callbacks``: it at the end of a
  Lightning test (loaded on first use); ``plots``: its report figures.

See docs/uncertainty.md.
"""

from typing import Any

from sobre.core.members import split_members
from sobre.uncertainty.ensemble import DeepEnsemble, Ensemble, EnsembleLoss, make_ensemble
from sobre.uncertainty.evaluate import UncertaintyReport, evaluate, predict
from sobre.uncertainty.metrics import (
    ECE,
    NLL,
    Accuracy,
    Brier,
    Disagreement,
    MutualInformation,
    OODMetrics,
    PredictiveEntropy,
    ReliabilityDiagram,
    accuracy,
    brier,
    disagreement,
    ece,
    fpr_at_tpr,
    mutual_information,
    nll,
    ood_metrics,
    ood_scores,
    predictive_entropy,
    reliability_diagram,
)
from sobre.uncertainty.packed import (
    PackedConv1d,
    PackedConv2d,
    PackedConv3d,
    PackedLayerNorm,
    PackedLinear,
    PackedSelfAttention,
    optimize_for_inference,
    packed_cat,
)
from sobre.uncertainty.packify import PackedEnsemble, Packify, Packing, packify, unpack_member


def __getattr__(name: str) -> Any:
    """``UncertaintyEvaluation`` (Lightning) on first use: ``import sobre.uncertainty`` is light."""
    if name == "UncertaintyEvaluation":
        from sobre.uncertainty.callbacks import UncertaintyEvaluation

        return UncertaintyEvaluation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ECE",
    "NLL",
    "Accuracy",
    "Brier",
    "DeepEnsemble",
    "Disagreement",
    "Ensemble",
    "EnsembleLoss",
    "MutualInformation",
    "OODMetrics",
    "PackedConv1d",
    "PackedConv2d",
    "PackedConv3d",
    "PackedEnsemble",
    "PackedLayerNorm",
    "PackedLinear",
    "PackedSelfAttention",
    "Packify",
    "Packing",
    "PredictiveEntropy",
    "ReliabilityDiagram",
    "UncertaintyEvaluation",
    "UncertaintyReport",
    "accuracy",
    "brier",
    "disagreement",
    "ece",
    "evaluate",
    "fpr_at_tpr",
    "make_ensemble",
    "mutual_information",
    "nll",
    "ood_metrics",
    "ood_scores",
    "optimize_for_inference",
    "packed_cat",
    "packify",
    "predict",
    "predictive_entropy",
    "reliability_diagram",
    "split_members",
    "unpack_member",
]
