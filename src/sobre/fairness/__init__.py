"""Fairness: measuring and mitigating the bias a model learns from spurious attributes.

- ``metrics``: bias metrics over groups g = (y, b) of label and bias label — per-group,
  unbiased, bias-aligned / conflicting, worst-group and training-weighted average accuracy,
  ``BiasReport`` and explicit checkpoint selection (``select_checkpoint``).
- ``probe``: leakage of an attribute from frozen features (``bias_accuracy`` of the bias spec,
  the DisP / IRENE attack probe): ``features_of`` records a layer's pooled output, ``leakage``
  trains a fresh linear or MLP probe on it and returns its test accuracy.

- ``base``: ``BiasRegularizer`` (methods reading the bias label b of (x, y, b) batches) and the
  plain loop ``train`` / ``predict`` / ``bias_report``.
- ``lightning`` (imported on first use): ``BiasMetrics``, the callback logging every validation
  and test epoch's bias metrics in recipes.
"""

from sobre.core.registry import lazy_attributes
from sobre.fairness.base import BiasRegularizer, bias_report, predict, train
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
from sobre.fairness.probe import ProbeKind, features_of, leakage

__getattr__ = lazy_attributes(__name__, "lightning", ("BiasMetrics",))

__all__ = [
    "BiasMetrics",
    "BiasRegularizer",
    "BiasReport",
    "ProbeKind",
    "aligned_accuracy",
    "average_accuracy",
    "bias_report",
    "conflicting_accuracy",
    "features_of",
    "group_accuracies",
    "group_counts",
    "group_proportions",
    "leakage",
    "predict",
    "select_checkpoint",
    "train",
    "unbiased_accuracy",
    "worst_group_accuracy",
]
