"""Fairness: measuring and mitigating the bias a model learns from spurious attributes, and the
private information its features leak.

- ``metrics``: bias metrics over groups g = (y, b) of label and bias label — per-group,
  unbiased, bias-aligned / conflicting, worst-group and training-weighted average accuracy,
  ``BiasReport`` and explicit checkpoint selection (``select_checkpoint``).
- ``probe``: leakage of an attribute from frozen features (``bias_accuracy`` of the bias spec,
  the DisP / IRENE attack probe): ``features_of`` records a layer's pooled output,
  ``probe_attack`` / ``leakage`` train a fresh linear or MLP probe on it (accuracy, Î(Z; P)).
- ``base``: ``BiasRegularizer`` (methods reading the bias label b of (x, y, b) batches) and the
  plain loop ``train`` / ``predict`` / ``bias_report``.
- ``contrastive``: ε-SupInfoNCE / ε-SupCon and FairKL (#8); ``FairKLObjective`` = α·ε-SupInfoNCE
  + λ·FairKL on a tapped layer.
- ``disentangle``: EnD and DisP (#14), Gram-matrix regularisers on a tapped layer.
- ``irene``: IRENE (#23), an MI penalty with an internally trained private head.
- ``discovery``: unsupervised debiasing (#17): bias-capturing model, pseudo bias labels (k-means
  or correctness), NMI, biasedness; ``PseudoBias`` stage transform.
- ``groups``: GroupDRO and JTT (``JTTUpsample`` stage transform).
- ``surgeon``: unbiased sub-networks of a frozen model: Debiasing surgeon (#44,
  ``FantasticWeights``) and BISE (#9, channel gates then ``core.compact``).
- ``lightning`` (imported on first use): ``BiasMetrics``, the callback logging every validation
  and test epoch's bias metrics in recipes, and ``PrivacyProbe``, the post-test attack probe.
  ``plots``: the report figures (entry points).

See docs/fairness.md.
"""

from sobre.core.registry import lazy_attributes
from sobre.fairness.base import BiasRegularizer, bias_report, predict, train
from sobre.fairness.contrastive import EpsSupInfoNCE, FairKL, FairKLObjective
from sobre.fairness.discovery import (
    Biasedness,
    GCELoss,
    PseudoBias,
    biasedness,
    discover_bias,
    kmeans,
    misclassified,
    normalized_mutual_info,
    pseudo_bias_labels,
    train_bias_capturing,
    with_pseudo_bias,
)
from sobre.fairness.disentangle import DisP, EnD, end_terms
from sobre.fairness.groups import GroupDRO, JTTUpsample, jtt, jtt_upsample
from sobre.fairness.irene import IRENE, mutual_information_estimate
from sobre.fairness.metrics import (
    BiasReport,
    aligned_accuracy,
    average_accuracy,
    conflicting_accuracy,
    group_accuracies,
    group_counts,
    group_proportions,
    select_checkpoint,
    unbiased_accuracy,
    worst_group_accuracy,
)
from sobre.fairness.probe import ProbeKind, ProbeResult, features_of, leakage, probe_attack
from sobre.fairness.surgeon import BISE, FantasticWeights, MaskedSubnetwork, MaskResult

__getattr__ = lazy_attributes(__name__, "lightning", ("BiasMetrics", "PrivacyProbe"))

__all__ = [
    "BISE",
    "IRENE",
    "BiasMetrics",
    "BiasRegularizer",
    "BiasReport",
    "Biasedness",
    "DisP",
    "EnD",
    "EpsSupInfoNCE",
    "FairKL",
    "FairKLObjective",
    "FantasticWeights",
    "GCELoss",
    "GroupDRO",
    "JTTUpsample",
    "MaskResult",
    "MaskedSubnetwork",
    "PrivacyProbe",
    "ProbeKind",
    "ProbeResult",
    "PseudoBias",
    "aligned_accuracy",
    "average_accuracy",
    "bias_report",
    "biasedness",
    "conflicting_accuracy",
    "discover_bias",
    "end_terms",
    "features_of",
    "group_accuracies",
    "group_counts",
    "group_proportions",
    "jtt",
    "jtt_upsample",
    "kmeans",
    "leakage",
    "misclassified",
    "mutual_information_estimate",
    "normalized_mutual_info",
    "predict",
    "probe_attack",
    "pseudo_bias_labels",
    "select_checkpoint",
    "train",
    "train_bias_capturing",
    "unbiased_accuracy",
    "with_pseudo_bias",
    "worst_group_accuracy",
]
