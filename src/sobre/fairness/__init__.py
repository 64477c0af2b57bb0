"""Fairness: measuring and mitigating the bias a model learns from spurious attributes.

- ``metrics``: bias metrics over groups g = (y, b) of label and bias label — per-group,
  unbiased, bias-aligned / conflicting, worst-group and training-weighted average accuracy,
  ``BiasReport`` and explicit checkpoint selection (``select_checkpoint``).

Debiasing methods (losses, trainers, post-hoc edits) are to come in this family.
"""

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

__all__ = [
    "BiasReport",
    "aligned_accuracy",
    "average_accuracy",
    "conflicting_accuracy",
    "group_accuracies",
    "group_counts",
    "group_proportions",
    "select_checkpoint",
    "unbiased_accuracy",
    "worst_group_accuracy",
]
