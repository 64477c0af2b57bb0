"""Bias metrics over groups g = (y, b) of a label y and a bias label b (spec bias.md §0.3).

Given predictions ŷ, labels y and bias labels b: per-group accuracies acc_g, the unbiased
accuracy (1/|G|) Σ_g acc_g over the non-empty groups G (LNL/EnD protocol), the bias-aligned
(b = aligned_bias(y)) and bias-conflicting (b ≠ aligned_bias(y)) accuracies, the worst-group
accuracy min_g acc_g (GroupDRO protocol) and the average accuracy Σ_g p_g acc_g weighted by the
*training* group proportions p_g (Waterbirds protocol). Inputs are 1-D torch tensors or numpy
arrays of integer classes; results are Python floats in [0, 1]. A split lacking the samples a
metric needs raises ``ConfigError`` naming the missing group instead of returning NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice

Group = tuple[int, int]
AlignedBias = Mapping[int, int] | Callable[[int], int] | None
SelectBy = Literal["val_unbiased", "val_worst_group", "last"]

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


def as_labels(values: object, arg: str, fn: str) -> Tensor:
    """``values`` as a 1-D int64 tensor of class indices; a ConfigError naming ``fn`` and
    ``arg`` otherwise (shared by the metrics and the leakage probe)."""
    t = torch.as_tensor(values)
    if t.dim() != 1:
        raise ConfigError(
            f"{fn}: {arg} must be 1-D (one class per sample), got shape {tuple(t.shape)}; "
            f"pass predicted classes (e.g. logits.argmax(1)), not logits"
        )
    if t.numel() and (t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex):
        raise ConfigError(
            f"{fn}: {arg} must hold integer classes, got dtype {t.dtype}; pass class indices "
            f"(e.g. logits.argmax(1), or labels.long())"
        )
    return t.detach().cpu().long()


def _check(*named: tuple[str, object], fn: str) -> list[Tensor]:
    ts = [as_labels(v, arg, fn) for arg, v in named]
    sizes = {arg: len(t) for (arg, _), t in zip(named, ts, strict=True)}
    if len(set(sizes.values())) > 1:
        raise ConfigError(
            f"{fn}: lengths differ ({', '.join(f'{a}: {n}' for a, n in sizes.items())}); "
            f"pass one prediction, label and bias label per sample"
        )
    if not ts[0].numel():
        raise ConfigError(f"{fn}: empty input (0 samples); evaluate on a non-empty split")
    return ts


def _tally(correct: Tensor, y: Tensor, b: Tensor) -> dict[Group, tuple[int, int]]:
    """``{g: (correct, count)}`` for the groups present, sorted by g."""
    groups, inverse = torch.unique(torch.stack([y, b], 1), dim=0, return_inverse=True)
    hits = torch.bincount(inverse, weights=correct.double(), minlength=len(groups))
    counts = torch.bincount(inverse, minlength=len(groups))
    return {
        (int(g[0]), int(g[1])): (int(h), int(n))
        for g, h, n in zip(groups.tolist(), hits.tolist(), counts.tolist(), strict=True)
    }


def _present(y: Tensor, b: Tensor) -> str:
    groups = torch.unique(torch.stack([y, b], 1), dim=0).tolist()
    return ", ".join(f"(y={g[0]}, b={g[1]})" for g in groups)


def group_counts(y: Tensor, b: Tensor) -> dict[Group, int]:
    """Number of samples n_g of each group g = (y, b) present, sorted by g."""
    y, b = _check(("y", y), ("b", b), fn="group_counts")
    return {g: n for g, (_, n) in _tally(torch.zeros_like(y), y, b).items()}


def group_proportions(y_train: Tensor, b_train: Tensor) -> dict[Group, float]:
    """Training group proportions p_g = n_g / N, the weights of ``average_accuracy``."""
    counts = group_counts(y_train, b_train)
    total = sum(counts.values())
    return {g: n / total for g, n in counts.items()}


def group_accuracies(pred: Tensor, y: Tensor, b: Tensor) -> dict[Group, float]:
    """Accuracy acc_g of each group g = (y, b) present in the split, sorted by g."""
    pred, y, b = _check(("pred", pred), ("y", y), ("b", b), fn="group_accuracies")
    return {g: h / n for g, (h, n) in _tally(pred == y, y, b).items()}


def unbiased_accuracy(pred: Tensor, y: Tensor, b: Tensor) -> float:
    """Unbiased accuracy (1/|G|) Σ_g acc_g, the mean over the non-empty groups G."""
    accs = group_accuracies(pred, y, b)
    return sum(accs.values()) / len(accs)


def worst_group_accuracy(pred: Tensor, y: Tensor, b: Tensor) -> float:
    """Worst-group accuracy min_g acc_g (not necessarily that of the smallest group)."""
    return min(group_accuracies(pred, y, b).values())


def _aligned_mask(y: Tensor, b: Tensor, aligned: AlignedBias, fn: str) -> Tensor:
    """``b == aligned_bias(y)`` per sample; ``aligned=None`` means aligned_bias(y) = y."""
    if aligned is None:
        return b == y
    classes = torch.unique(y).tolist()
    if isinstance(aligned, Mapping):
        missing = [c for c in classes if c not in aligned]
        if missing:
            raise ConfigError(
                f"{fn}: aligned has no entry for classes {missing} (keys: {sorted(aligned)}); "
                f"map every class y to its bias-aligned b"
            )
        lookup = {c: int(aligned[c]) for c in classes}
    elif callable(aligned):
        lookup = {c: int(aligned(c)) for c in classes}
    else:
        raise ConfigError(
            f"{fn}: aligned must be None, a mapping class -> bias or a callable, "
            f"got {type(aligned).__name__}"
        )
    target = torch.tensor([lookup[c] for c in y.tolist()], dtype=torch.long)
    return b == target


def _masked_accuracy(correct: Tensor, mask: Tensor) -> float | None:
    return correct[mask].double().mean().item() if mask.any() else None


def _subset_accuracy(
    pred: Tensor, y: Tensor, b: Tensor, aligned: AlignedBias, *, want: bool, fn: str
) -> float:
    pred, y, b = _check(("pred", pred), ("y", y), ("b", b), fn=fn)
    acc = _masked_accuracy(pred == y, _aligned_mask(y, b, aligned, fn) == want)
    if acc is None:
        kind, rel = ("bias-aligned", "==") if want else ("bias-conflicting", "!=")
        raise ConfigError(
            f"{fn}: no {kind} sample (b {rel} aligned_bias(y)) among the {len(y)} samples "
            f"(groups present: {_present(y, b)}); evaluate on a split that has some, or check "
            f"aligned= (default aligned_bias(y) = y)"
        )
    return acc


def aligned_accuracy(pred: Tensor, y: Tensor, b: Tensor, *, aligned: AlignedBias = None) -> float:
    """Accuracy on the bias-aligned samples, b = aligned_bias(y).

    Args:
        aligned: aligned_bias as a mapping class -> bias or a callable; ``None`` means
            aligned_bias(y) = y (Biased-MNIST).

    Raises:
        ConfigError: no bias-aligned sample in the split (the message lists the groups present).
    """
    return _subset_accuracy(pred, y, b, aligned, want=True, fn="aligned_accuracy")


def conflicting_accuracy(
    pred: Tensor, y: Tensor, b: Tensor, *, aligned: AlignedBias = None
) -> float:
    """Accuracy on the bias-conflicting samples, b ≠ aligned_bias(y) (see ``aligned_accuracy``).

    Raises:
        ConfigError: no bias-conflicting sample in the split.
    """
    return _subset_accuracy(pred, y, b, aligned, want=False, fn="conflicting_accuracy")


def average_accuracy(pred: Tensor, y: Tensor, b: Tensor, weights: Mapping[Group, float]) -> float:
    """Average accuracy Σ_g p_g acc_g / Σ_g p_g with p_g the *training* group proportions
    (``group_proportions(y_train, b_train)``); groups of the split absent from ``weights``
    weigh 0.

    Raises:
        ConfigError: a negative or all-zero weight, or a group with positive weight that has no
            sample in the split.
    """
    fn = "average_accuracy"
    accs = group_accuracies(pred, y, b)
    w = {(int(g[0]), int(g[1])): float(p) for g, p in weights.items()}
    negative = {g: p for g, p in w.items() if not p >= 0}
    if negative or not sum(w.values()) > 0:
        raise ConfigError(
            f"{fn}: weights must be non-negative with a positive sum, got {w}; pass the "
            f"training group proportions, group_proportions(y_train, b_train)"
        )
    empty = [g for g, p in w.items() if p > 0 and g not in accs]
    if empty:
        raise ConfigError(
            f"{fn}: groups {empty} have positive weight but no sample in this split (groups "
            f"present: {sorted(accs)}); evaluate on a split covering them or give them weight 0"
        )
    return sum(p * accs[g] for g, p in w.items() if p > 0) / sum(w.values())


def _key(g: Group) -> str:
    return f"y={g[0]},b={g[1]}"


@dataclass(frozen=True)
class BiasReport:
    """Every bias metric of one split.

    Attributes:
        accuracy: plain accuracy over all samples.
        unbiased: mean group accuracy (1/|G|) Σ_g acc_g.
        aligned: bias-aligned accuracy; ``None`` when the split has no aligned sample.
        conflicting: bias-conflicting accuracy; ``None`` when the split has none.
        worst_group: min_g acc_g.
        group_accuracy: acc_g per group g = (y, b) present.
        group_count: n_g per group present.
        average: Σ_g p_g acc_g with the training proportions; ``None`` without ``train_weights``.
    """

    accuracy: float
    unbiased: float
    aligned: float | None
    conflicting: float | None
    worst_group: float
    group_accuracy: dict[Group, float]
    group_count: dict[Group, int]
    average: float | None = None

    @classmethod
    def from_predictions(
        cls,
        pred: Tensor,
        y: Tensor,
        b: Tensor,
        *,
        aligned: AlignedBias = None,
        train_weights: Mapping[Group, float] | None = None,
    ) -> BiasReport:
        """All metrics of predicted classes ``pred`` against labels ``y`` and bias labels ``b``.

        Args:
            aligned: aligned_bias (see ``aligned_accuracy``).
            train_weights: training group proportions for ``average`` (else it is ``None``).
        """
        pred, y, b = _check(("pred", pred), ("y", y), ("b", b), fn="BiasReport.from_predictions")
        tally = _tally(pred == y, y, b)
        accs = {g: h / n for g, (h, n) in tally.items()}
        mask = _aligned_mask(y, b, aligned, "BiasReport.from_predictions")
        correct = pred == y
        return cls(
            accuracy=correct.double().mean().item(),
            unbiased=sum(accs.values()) / len(accs),
            aligned=_masked_accuracy(correct, mask),
            conflicting=_masked_accuracy(correct, ~mask),
            worst_group=min(accs.values()),
            group_accuracy=accs,
            group_count={g: n for g, (_, n) in tally.items()},
            average=None if train_weights is None else average_accuracy(pred, y, b, train_weights),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict; group keys are written ``"y=..,b=.."``."""
        return {
            "accuracy": self.accuracy,
            "unbiased": self.unbiased,
            "aligned": self.aligned,
            "conflicting": self.conflicting,
            "worst_group": self.worst_group,
            "average": self.average,
            "group_accuracy": {_key(g): a for g, a in self.group_accuracy.items()},
            "group_count": {_key(g): n for g, n in self.group_count.items()},
        }


def select_checkpoint(
    history: Sequence[Mapping[str, Any]], select_by: SelectBy = "val_unbiased"
) -> int:
    """Index of the epoch chosen from per-epoch metric dicts; model selection is explicit.

    ``"val_unbiased"`` / ``"val_worst_group"`` pick the epoch maximising that key (the earliest
    on ties; epochs without the key, e.g. not validated, or with NaN are skipped); ``"last"``
    the last epoch.

    Raises:
        ConfigError: unknown ``select_by``, empty history, or no epoch holding the key.
    """
    check_choice("select_by", select_by, get_args(SelectBy))
    if not history:
        raise ConfigError("select_checkpoint: empty history; train at least one epoch")
    if select_by == "last":
        return len(history) - 1
    values = [(h.get(select_by), i) for i, h in enumerate(history)]
    scored = [(float(v), i) for v, i in values if v is not None and not math.isnan(float(v))]
    if not scored:
        raise ConfigError(
            f"select_checkpoint: no epoch has {select_by!r} (keys of the last epoch: "
            f"{sorted(history[-1])}); validate with bias labels, or use select_by='last'"
        )
    return max(scored, key=lambda s: (s[0], -s[1]))[1]
