"""Uncertainty metrics over per-member probabilities (trust spec §1.3), as functions and metrics.

Inputs. ``probs`` holds per-member probabilities of shape ``(B, M, K)``: B samples, M members
(M = 1 for a single model), K classes. The ensemble prediction is the member mean
``p̄_i = (1/M) Σ_m p_{i,m}`` (the mean of the member softmaxes, never the softmax of the mean
logits). ``labels`` are class indices of shape ``(B,)``. Functions that take labels also accept
``(B, K)`` as M = 1, because the labels' length pins the layout; the label-free ones (entropy,
mutual information, disagreement, OOD scores) need the explicit ``(B, M, K)``
(``probs.unsqueeze(1)`` for one model). Packed models output member-major ``(M·B, K)`` rows:
rearrange them with ``sobre.uncertainty.packed.split_members`` first. The metrics never read
M·B rows as samples: a row count that disagrees with the labels raises a
:class:`~sobre.core.errors.ConfigError`, as do probabilities that are not finite, negative or
do not sum to 1 (tolerance ``max(1e-4, 8·eps(dtype))``).

Outputs. Scalars are fractions (papers report ECE, accuracy and FPR95 in %), in the input's
floating dtype; entropies are in nats. The torchmetrics classes of the same names (CamelCase)
accumulate over batches with sum states (cat states where every value is needed: adaptive ECE,
OOD metrics), so they sync across DDP ranks through torchmetrics.

OOD scores follow one convention: **higher score = more likely OOD**. Where a convention differs
from torch-uncertainty 0.13 the docstring says so.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice

__all__ = [
    "ECE",
    "NLL",
    "Accuracy",
    "Brier",
    "Disagreement",
    "MutualInformation",
    "OODMetrics",
    "PredictiveEntropy",
    "ReliabilityDiagram",
    "accuracy",
    "brier",
    "disagreement",
    "ece",
    "fpr_at_tpr",
    "mutual_information",
    "nll",
    "ood_metrics",
    "ood_scores",
    "predictive_entropy",
    "reliability_diagram",
]

Reduction = Literal["mean", "none"]
Norm = Literal["l1", "l2", "max"]
Criterion = Literal["msp", "maxlogit", "energy", "entropy", "mi"]
Positive = Literal["id", "ood"]
REDUCTIONS: tuple[str, ...] = ("mean", "none")
NORMS: tuple[str, ...] = ("l1", "l2", "max")
PROB_CRITERIA: tuple[str, ...] = ("msp", "entropy", "mi")
LOGIT_CRITERIA: tuple[str, ...] = ("maxlogit", "energy")
POSITIVES: tuple[str, ...] = ("id", "ood")
NLL_EPS = 1e-12
SPLIT_HINT = (
    "for packed member-major (M·B, K) outputs use sobre.uncertainty.packed.split_members(x, M) "
    "to get (B, M, K)"
)


# --------------------------------------------------------------------------- input checks


def _tolerance(dtype: torch.dtype) -> float:
    return max(1e-4, 8 * torch.finfo(dtype).eps)


def _check_probs(probs: object, fn: str, *, members_required: bool) -> Tensor:
    """Validate probabilities; return them as ``(B, M, K)``, half precision raised to float32."""
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        got = f"dtype {probs.dtype}" if isinstance(probs, Tensor) else type(probs).__name__
        raise ConfigError(
            f"{fn}: probs must be a floating-point tensor of probabilities, got {got}"
        )
    shape = tuple(probs.shape)
    if probs.ndim == 2 and members_required:
        raise ConfigError(
            f"{fn}: probs must have shape (B, M, K) (samples, members, classes), got {shape}; "
            f"for a single model pass probs.unsqueeze(1); {SPLIT_HINT} (M·B rows are never read "
            "as samples)"
        )
    if probs.ndim == 2:
        probs = probs.unsqueeze(1)
    if probs.ndim != 3:
        expected = "(B, M, K)" if members_required else "(B, M, K) or (B, K)"
        raise ConfigError(f"{fn}: probs must have shape {expected}, got {shape}")
    if probs.numel() == 0:
        raise ConfigError(f"{fn}: probs must hold at least one sample, member and class: {shape}")
    tol = _tolerance(probs.dtype)
    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()
    if not bool(torch.isfinite(probs).all()):
        raise ConfigError(f"{fn}: probs contains NaN or inf; expected finite probabilities")
    low = float(probs.min())
    if low < -tol:
        raise ConfigError(
            f"{fn}: probs must be >= 0, found {low:.4g}; pass probabilities (softmax of "
            "logits), not logits"
        )
    off = float((probs.sum(-1) - 1).abs().max())
    if off > tol:
        raise ConfigError(
            f"{fn}: probs must sum to 1 over the last (class) dimension within {tol:g}, found a "
            f"row off by {off:.4g}; pass probabilities (softmax of logits), not logits"
        )
    return probs.clamp_min(0)


def _probs_labels(probs: Tensor, labels: Tensor, fn: str) -> tuple[Tensor, Tensor]:
    """Validate ``probs`` ((B, M, K) or (B, K)) against ``labels`` (B,)."""
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        got = f"dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ConfigError(f"{fn}: labels must be an integer tensor of class indices, got {got}")
    if labels.ndim != 1:
        raise ConfigError(
            f"{fn}: labels must have shape (B,) (class indices), got {tuple(labels.shape)}; "
            "for one-hot labels pass labels.argmax(-1)"
        )
    p = _check_probs(probs, fn, members_required=False)
    rows, n, shape = p.shape[0], labels.shape[0], tuple(probs.shape)
    if rows != n:
        hint = ""
        if len(shape) == 2 and n and rows % n == 0:
            hint = f"; probs has {rows} = {rows // n} × {n} rows: {SPLIT_HINT}"
        elif len(shape) == 3 and shape[1] == n:
            hint = "; probs looks member-first (M, B, K): pass probs.transpose(0, 1)"
        raise ConfigError(
            f"{fn}: labels has {n} entries but probs has {rows} samples (shape {shape}); "
            f"expected labels of shape ({rows},){hint}"
        )
    k = p.shape[-1]
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        bad = low if low < 0 else high
        raise ConfigError(
            f"{fn}: labels must be class indices in [0, {k - 1}] (K = {k} classes in probs), "
            f"found {bad}"
        )
    return p, labels.to(device=p.device, dtype=torch.long)


def _check_logits(logits: object, criterion: str) -> Tensor:
    fn = f"ood_scores(criterion={criterion!r})"
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ConfigError(f"{fn}: expects a floating-point logits tensor (B, M, K)")
    if logits.ndim != 3 or logits.numel() == 0:
        raise ConfigError(
            f"{fn}: logits must have shape (B, M, K), got {tuple(logits.shape)}; for a single "
            f"model pass logits.unsqueeze(1); {SPLIT_HINT}"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ConfigError(f"{fn}: logits contains NaN or inf")
    tol = _tolerance(logits.dtype)
    if bool((logits >= 0).all()) and float((logits.sum(-1) - 1).abs().max()) <= tol:
        raise ConfigError(
            f"{fn}: takes logits, but every row is a probability vector; pass the logits, or "
            f"use one of {', '.join(map(repr, PROB_CRITERIA))} for probabilities"
        )
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_scores(scores: object, arg: str, fn: str) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dtype == torch.bool or scores.is_complex():
        raise ConfigError(f"{fn}: {arg} must be a real tensor of per-sample scores of shape (N,)")
    if scores.ndim != 1 or scores.numel() == 0:
        raise ConfigError(
            f"{fn}: {arg} must have shape (N,) with N >= 1, got {tuple(scores.shape)}; turn "
            "(B, M, K) outputs into scores with ood_scores(...)"
        )
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ConfigError(f"{fn}: {arg} contains NaN or inf")
    return scores


def _reduce(values: Tensor, reduction: str, fn: str) -> Tensor:
    check_choice("reduction", reduction, REDUCTIONS, fn)
    return values.mean() if reduction == "mean" else values


def _entropy(p: Tensor) -> Tensor:
    """``H(p) = −Σ_k p_k log p_k`` over the last dim, in nats (0 log 0 = 0)."""
    return torch.special.entr(p).sum(-1)


# ------------------------------------------------------------------------------ accuracy etc.


def accuracy(probs: Tensor, labels: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Top-1 accuracy of the ensemble: ``acc = (1/N) Σ_i 1[argmax_k p̄_ik = y_i]`` (a fraction).

    Ties in p̄ go to the lowest class index (torch.argmax). ``reduction="none"`` gives the
    per-sample correctness (0/1).
    """
    p, y = _probs_labels(probs, labels, "accuracy")
    return _reduce((p.mean(1).argmax(-1) == y).to(p.dtype), reduction, "accuracy")


def nll(probs: Tensor, labels: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Negative log-likelihood of the ensemble: ``NLL = −(1/N) Σ_i log max(p̄_{i,y_i}, 1e-12)``.

    Computed on the averaged probabilities p̄ (not the mean of member NLLs). The clip at 1e-12
    keeps it finite (at most −log 1e-12 ≈ 27.6 per sample); torch-uncertainty's
    ``CategoricalNLL`` takes ``log(probs)`` without clipping, so a zero probability on the
    label gives inf there. Both agree whenever ``p̄_{i,y_i} >= 1e-12``.
    """
    p, y = _probs_labels(probs, labels, "nll")
    p_true = p.mean(1).gather(-1, y[:, None]).squeeze(-1)
    return _reduce(-p_true.clamp_min(NLL_EPS).log(), reduction, "nll")


def brier(
    probs: Tensor, labels: Tensor, top_class: bool = False, reduction: Reduction = "mean"
) -> Tensor:
    """Brier score of the ensemble, summed over classes (not divided by K).

    ``BS = (1/N) Σ_i Σ_k (p̄_ik − 1[k = y_i])²`` in [0, 2]. With ``top_class=True`` only the
    top-label probability counts: ``BS_top = (1/N) Σ_i (max_k p̄_ik − 1[argmax_k p̄_ik = y_i])²``
    in [0, 1]. For M = 1 this equals torch-uncertainty's ``BrierScore``; for M > 1 theirs
    averages the member Brier scores (1/M) Σ_m BS(p_m), which is >= BS(p̄) (convexity).
    """
    p, y = _probs_labels(probs, labels, "brier")
    mean = p.mean(1)
    if top_class:
        conf, pred = mean.max(-1)
        values = (conf - (pred == y).to(mean.dtype)).square()
    else:
        values = (mean - F.one_hot(y, mean.shape[-1]).to(mean.dtype)).square().sum(-1)
    return _reduce(values, reduction, "brier")


# ---------------------------------------------------------------------------------- calibration


def _check_n_bins(n_bins: object, fn: str) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"{fn}: n_bins must be an integer >= 1, got {n_bins!r}")
    return n_bins


def _top_label(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence ``c_i = max_k p̄_ik`` and correctness ``a_i = 1[argmax p̄_i = y_i]``."""
    conf, pred = p.mean(1).max(-1)
    return conf, (pred == y)


def _edges(n_bins: int, like: Tensor) -> Tensor:
    return torch.linspace(0, 1, n_bins + 1, dtype=like.dtype, device=like.device)


def _bin_sums(
    conf: Tensor, correct: Tensor, n_bins: int, adaptive: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-bin ``(count, Σ confidence, Σ correct, lower, upper)``, bins by increasing confidence.

    Equal-width bins are ``[b/n, (b+1)/n)``, the last one closed at 1. Equal-mass bins split the
    confidences sorted (stably) into ``n_bins`` runs whose sizes differ by at most one, the
    larger ones first; their bounds are the smallest and largest confidence inside (NaN when
    the bin is empty, i.e. N < n_bins).
    """
    device = conf.device
    if adaptive:
        conf, order = torch.sort(conf, stable=True)
        correct = correct[order]
        q, r = divmod(conf.numel(), n_bins)
        sizes = q + (torch.arange(n_bins, device=device) < r).long()
        index = torch.repeat_interleave(torch.arange(n_bins, device=device), sizes)
        ends = sizes.cumsum(0)
        filled = sizes > 0
        lower = torch.full((n_bins,), torch.nan, dtype=torch.float64, device=device)
        upper = lower.clone()
        lower[filled] = conf[(ends - sizes)[filled]].double()
        upper[filled] = conf[ends[filled] - 1].double()
    else:
        edges = _edges(n_bins, conf)
        index = torch.bucketize(conf, edges[1:-1], right=True)
        lower, upper = edges[:-1].double(), edges[1:].double()
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=device)
    # scatter_add_ rather than bincount(weights=...): deterministic mode allows it on CUDA.
    count = torch.zeros(n_bins, dtype=torch.long, device=device)
    count.scatter_add_(0, index, torch.ones_like(index))
    conf_sum = zeros.clone().scatter_add_(0, index, conf.double())
    correct_sum = zeros.scatter_add_(0, index, correct.double())
    return count, conf_sum, correct_sum, lower, upper


def _diagram(
    count: Tensor,
    conf_sum: Tensor,
    correct_sum: Tensor,
    lower: Tensor,
    upper: Tensor,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    n = count.double()
    return {
        "confidence": (conf_sum.double() / n).to(dtype),
        "accuracy": (correct_sum.double() / n).to(dtype),
        "count": count,
        "lower": lower.to(dtype),
        "upper": upper.to(dtype),
    }


def _calibration_error(diagram: dict[str, Tensor], norm: str) -> Tensor:
    count = diagram["count"]
    filled = count > 0
    weight = count[filled].double() / count.sum()
    gap = (diagram["accuracy"][filled].double() - diagram["confidence"][filled].double()).abs()
    if norm == "l1":
        value = (weight * gap).sum()
    elif norm == "l2":
        value = (weight * gap.square()).sum().sqrt()
    else:
        value = gap.max()
    return value.to(diagram["confidence"].dtype)


def _reliability(
    probs: Tensor, labels: Tensor, n_bins: int, adaptive: bool, fn: str
) -> dict[str, Tensor]:
    _check_n_bins(n_bins, fn)
    p, y = _probs_labels(probs, labels, fn)
    return _diagram(*_bin_sums(*_top_label(p, y), n_bins, adaptive), dtype=p.dtype)


def reliability_diagram(
    probs: Tensor, labels: Tensor, n_bins: int = 15, adaptive: bool = False
) -> dict[str, Tensor]:
    """Reliability-diagram data for the top label of p̄, per bin of confidence.

    With ``c_i = max_k p̄_ik`` and ``a_i = 1[argmax_k p̄_ik = y_i]``, returns tensors of length
    ``n_bins``: ``confidence`` = conf(B_b) = mean c_i in bin b, ``accuracy`` = acc(B_b) = mean a_i,
    ``count`` = |B_b| (int64), and the bin bounds ``lower`` / ``upper``. Empty bins have NaN
    confidence and accuracy. Equal-width bins (default) are ``[b/n, (b+1)/n)`` with the last
    closed at 1; ``adaptive=True`` uses equal-mass bins (see :func:`ece`).
    """
    return _reliability(probs, labels, n_bins, adaptive, "reliability_diagram")


def ece(
    probs: Tensor,
    labels: Tensor,
    n_bins: int = 15,
    norm: Norm = "l1",
    adaptive: bool = False,
) -> Tensor:
    """Top-label expected calibration error of the ensemble (Guo et al. 2017), a fraction.

    ``ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|`` over the non-empty bins, with the
    confidence ``c_i = max_k p̄_ik`` and ``acc`` the fraction of ``argmax_k p̄_ik = y_i``.
    ``norm="l2"`` gives ``sqrt(Σ_b (|B_b|/N) gap_b²)`` (RMSCE), ``norm="max"`` ``max_b gap_b``
    (MCE). Default: 15 equal-width bins ``[b/15, (b+1)/15)`` on [0, 1], the last closed at 1
    (torch-uncertainty's routine default). ``adaptive=True`` gives aECE: equal-mass bins, the
    sorted confidences split into ``n_bins`` runs of sizes differing by at most one (as
    torch-uncertainty's ``AdaptiveCalibrationError``). Papers report ECE in %.

    Differs from torchmetrics / torch-uncertainty only when some confidence equals exactly 1:
    they put those samples in an extra bin of their own, here they join the last bin.
    """
    check_choice("norm", norm, NORMS, "ece")
    return _calibration_error(_reliability(probs, labels, n_bins, adaptive, "ece"), norm)


# ------------------------------------------------------------------------ ensemble uncertainty


def predictive_entropy(probs: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Predictive (total) entropy ``H(p̄_i) = −Σ_k p̄_ik log p̄_ik`` in nats, probs ``(B, M, K)``.

    ``H(p̄) = E_m H(p_m) + MI`` (aleatoric + epistemic). torch-uncertainty's ``Entropy`` on
    ``(B, M, K)`` returns the expected member entropy ``(1/M) Σ_m H(p_m)`` instead, which equals
    ``predictive_entropy − mutual_information``; both agree for M = 1.
    """
    p = _check_probs(probs, "predictive_entropy", members_required=True)
    return _reduce(_entropy(p.mean(1)), reduction, "predictive_entropy")


def mutual_information(probs: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Epistemic uncertainty ``MI_i = max(0, H(p̄_i) − (1/M) Σ_m H(p_im))`` in nats.

    The mutual information between the prediction and the member index (BALD), probs
    ``(B, M, K)``; 0 when all members agree exactly, and for M = 1. Clamped at 0 per sample
    (torch-uncertainty clamps the batch sum; the same up to rounding).
    """
    p = _check_probs(probs, "mutual_information", members_required=True)
    values = (_entropy(p.mean(1)) - _entropy(p).mean(1)).clamp_min(0)
    return _reduce(values, reduction, "mutual_information")


def disagreement(probs: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Fraction of member pairs whose top-1 predictions differ, per sample, then averaged.

    ``D_i = (2 / (M(M−1))) Σ_{m<m'} 1[argmax_k p_imk ≠ argmax_k p_im'k]`` in [0, 1], probs
    ``(B, M, K)``. For M = 1 there is no pair and D = 0 (torch-uncertainty returns NaN there).
    """
    p = _check_probs(probs, "disagreement", members_required=True)
    pred = p.argmax(-1)
    m = pred.shape[1]
    if m == 1:
        values = torch.zeros(pred.shape[0], dtype=p.dtype, device=p.device)
    else:
        agree = (pred[:, :, None] == pred[:, None, :]).sum((1, 2)) - m  # ordered pairs, m ≠ m'
        values = 1 - agree.to(p.dtype) / (m * (m - 1))
    return _reduce(values, reduction, "disagreement")


# ------------------------------------------------------------------------------------------ OOD


def ood_scores(probs_or_logits: Tensor, criterion: Criterion = "msp") -> Tensor:
    """Per-sample OOD scores ``(B,)``; **higher = more likely out-of-distribution**.

    The input depends on the criterion (both ``(B, M, K)``; ``x.unsqueeze(1)`` for one model):

    - from probabilities: ``"msp"`` ``s = −max_k p̄_k`` (Hendrycks & Gimpel 2017, the default);
      ``"entropy"`` ``s = H(p̄)``; ``"mi"`` ``s = MI`` (ensembles only, M >= 2).
    - from logits, averaged over members ``z̄ = (1/M) Σ_m z_m``: ``"maxlogit"``
      ``s = −max_k z̄_k``; ``"energy"`` ``s = −log Σ_k exp z̄_k`` (Liu et al. 2020).

    Same scores as torch-uncertainty's criteria except ``"entropy"`` for M > 1, where theirs is
    the expected member entropy (1/M) Σ_m H(p_m).
    """
    criteria = PROB_CRITERIA + LOGIT_CRITERIA
    check_choice("criterion", criterion, criteria, "ood_scores")
    if criterion in LOGIT_CRITERIA:
        mean_logits = _check_logits(probs_or_logits, criterion).mean(1)
        if criterion == "maxlogit":
            return -mean_logits.max(-1).values
        return -mean_logits.logsumexp(-1)
    fn = f"ood_scores(criterion={criterion!r})"
    p = _check_probs(probs_or_logits, fn, members_required=True)
    if criterion == "msp":
        return -p.mean(1).max(-1).values
    if criterion == "entropy":
        return predictive_entropy(p, reduction="none")
    if p.shape[1] == 1:
        raise ConfigError(
            f"{fn}: needs an ensemble (M >= 2 members); with M = 1 every score is 0. Use 'msp', "
            "'entropy', 'maxlogit' or 'energy' for a single model"
        )
    return mutual_information(p, reduction="none")


def _ranking(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative true / false positives at each distinct threshold, highest score first.

    Tied scores enter together (the sklearn / torchmetrics convention), in float64.
    """
    scores, order = torch.sort(scores.double(), descending=True, stable=True)
    positive = positive[order]
    last = torch.cat(
        [
            torch.nonzero(scores[1:] != scores[:-1]).squeeze(1),
            torch.tensor([scores.numel() - 1], device=scores.device),
        ]
    )
    tps = positive.double().cumsum(0)[last]
    return tps, (last + 1).double() - tps


def _auroc(tps: Tensor, fps: Tensor) -> Tensor:
    zero = tps.new_zeros(1)
    return torch.trapezoid(torch.cat([zero, tps / tps[-1]]), torch.cat([zero, fps / fps[-1]]))


def _average_precision(tps: Tensor, fps: Tensor) -> Tensor:
    recall = torch.cat([tps.new_zeros(1), tps / tps[-1]])
    return (recall.diff() * tps / (tps + fps)).sum()


def _fpr_at(tps: Tensor, fps: Tensor, tpr: float) -> Tensor:
    first = torch.nonzero(tps / tps[-1] >= tpr)[0, 0]
    return fps[first] / fps[-1]


def _id_ood(
    id_scores: Tensor, ood_scores: Tensor, positive: str, fn: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenated scores, OOD flags and the result dtype, after checking both score sets."""
    _check_scores(id_scores, "id_scores", fn)
    _check_scores(ood_scores, "ood_scores", fn)
    check_choice("positive", positive, POSITIVES, fn)
    scores = torch.cat([id_scores.double(), ood_scores.double().to(id_scores.device)])
    is_ood = torch.arange(scores.numel(), device=scores.device) >= id_scores.numel()
    dtype = id_scores.dtype if id_scores.is_floating_point() else torch.get_default_dtype()
    return scores, is_ood, dtype


def fpr_at_tpr(
    id_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95, positive: Positive = "id"
) -> Tensor:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr``.

    Scores are OOD scores (higher = more OOD). ``positive="id"`` (default; Hendrycks & Gimpel,
    ODIN): accept as ID every sample with ``s <= τ``, τ the smallest threshold accepting at
    least ``tpr`` of the ID samples; return the fraction of OOD samples accepted as ID.
    ``positive="ood"`` (torch-uncertainty's ``FPR95(pos_label=1)``): flag as OOD every sample
    with ``s >= τ``, τ the largest threshold catching at least ``tpr`` of the OOD samples; return
    the fraction of ID samples flagged OOD. Tied scores are never split. The two differ in
    general (see the tests for an asymmetric example).
    """
    fn = "fpr_at_tpr"
    if isinstance(tpr, bool) or not isinstance(tpr, int | float) or not 0 < tpr <= 1:
        raise ConfigError(f"{fn}: tpr must be a number in (0, 1], got {tpr!r}")
    scores, is_ood, dtype = _id_ood(id_scores, ood_scores, positive, fn)
    curve = _ranking(-scores, ~is_ood) if positive == "id" else _ranking(scores, is_ood)
    return _fpr_at(*curve, float(tpr)).to(dtype)


def ood_metrics(
    id_scores: Tensor, ood_scores: Tensor, positive: Positive = "id"
) -> dict[str, Tensor]:
    """OOD-detection metrics from per-sample OOD scores (higher = more OOD) of both sets.

    - ``auroc`` = P(s_ood > s_id) + ½ P(s_ood = s_id): the area under the ROC curve. Flipping
      the positive class flips the score direction as well, so it is the same for both
      ``positive`` values (= torch-uncertainty's ``BinaryAUROC`` with OOD = 1).
    - ``aupr_out``: average precision ``AP = Σ_n (R_n − R_{n−1}) P_n`` with OOD positive,
      ranked by ``s`` (torch-uncertainty's "AUPR"). ``aupr_in``: AP with ID positive, ranked
      by ``−s``. Both are returned whatever ``positive`` is.
    - ``fpr95``: :func:`fpr_at_tpr` at 95 % with this ``positive`` — ``"id"`` (default): the
      fraction of OOD accepted as ID when 95 % of ID is accepted; ``"ood"`` (torch-uncertainty):
      the fraction of ID flagged OOD at the threshold that catches 95 % of OOD.

    Exact (no thresholds grid); tied scores handled like sklearn and torchmetrics. Scores are
    ranked in float64 as given (torchmetrics squashes scores outside [0, 1] with a sigmoid,
    which can create ties in float32 for large scores).
    """
    scores, is_ood, dtype = _id_ood(id_scores, ood_scores, positive, "ood_metrics")
    out_curve = _ranking(scores, is_ood)
    in_curve = _ranking(-scores, ~is_ood)
    fpr_curve = in_curve if positive == "id" else out_curve
    values = {
        "auroc": _auroc(*out_curve),
        "aupr_in": _average_precision(*in_curve),
        "aupr_out": _average_precision(*out_curve),
        "fpr95": _fpr_at(*fpr_curve, 0.95),
    }
    return {key: value.to(dtype) for key, value in values.items()}


# ------------------------------------------------------------------------ torchmetrics classes


class _SampleMean(Metric):
    """Mean of a per-sample metric over every update: sum and count states, summed in DDP."""

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False
    total: Tensor
    samples: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("samples", torch.tensor(0), dist_reduce_fx="sum")

    def _add(self, values: Tensor) -> None:
        self.total += values.double().sum().to(self.total.dtype)
        self.samples += values.numel()

    def compute(self) -> Tensor:
        return self.total / self.samples


class Accuracy(_SampleMean):
    """Accumulated :func:`accuracy`: ``update(probs, labels)``, probs (B, M, K) or (B, K)."""

    higher_is_better = True

    def update(self, probs: Tensor, labels: Tensor) -> None:
        self._add(accuracy(probs, labels, reduction="none"))


class NLL(_SampleMean):
    """Accumulated :func:`nll` (p̄ clipped at 1e-12): ``update(probs, labels)``."""

    higher_is_better = False

    def update(self, probs: Tensor, labels: Tensor) -> None:
        self._add(nll(probs, labels, reduction="none"))


class Brier(_SampleMean):
    """Accumulated :func:`brier` (sum over classes, or ``top_class``): ``update(probs, labels)``."""

    higher_is_better = False

    def __init__(self, top_class: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top_class = top_class

    def update(self, probs: Tensor, labels: Tensor) -> None:
        self._add(brier(probs, labels, top_class=self.top_class, reduction="none"))


class PredictiveEntropy(_SampleMean):
    """Accumulated mean :func:`predictive_entropy` H(p̄) (nats): ``update(probs)``, (B, M, K)."""

    def update(self, probs: Tensor) -> None:
        self._add(predictive_entropy(probs, reduction="none"))


class MutualInformation(_SampleMean):
    """Accumulated mean :func:`mutual_information` (nats): ``update(probs)``, ``(B, M, K)``."""

    def update(self, probs: Tensor) -> None:
        self._add(mutual_information(probs, reduction="none"))


class Disagreement(_SampleMean):
    """Accumulated mean :func:`disagreement`: ``update(probs)``, ``(B, M, K)``."""

    def update(self, probs: Tensor) -> None:
        self._add(disagreement(probs, reduction="none"))


class _TopLabelBins(Metric):
    """Top-label confidence bins over every update.

    Equal-width bins keep per-bin sums (count, Σ confidence, Σ correct; O(n_bins) memory, summed
    in DDP); equal-mass bins need every confidence (cat states).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_bins: int = 15, adaptive: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins = _check_n_bins(n_bins, type(self).__name__)
        self.adaptive = bool(adaptive)
        if self.adaptive:
            self.add_state("confidences", [], dist_reduce_fx="cat")
            self.add_state("correct", [], dist_reduce_fx="cat")
        else:
            self.add_state("count", torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("conf_sum", torch.zeros(n_bins), dist_reduce_fx="sum")
            self.add_state("correct_sum", torch.zeros(n_bins), dist_reduce_fx="sum")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        conf, correct = _top_label(*_probs_labels(probs, labels, type(self).__name__))
        if self.adaptive:
            self.confidences.append(conf)
            self.correct.append(correct.to(conf.dtype))
            return
        count, conf_sum, correct_sum, _, _ = _bin_sums(conf, correct, self.n_bins, False)
        self.count += count
        self.conf_sum += conf_sum.to(self.conf_sum.dtype)
        self.correct_sum += correct_sum.to(self.correct_sum.dtype)

    def _diagram(self) -> dict[str, Tensor]:
        dtype = torch.get_default_dtype()
        if self.adaptive:
            conf, correct = dim_zero_cat(self.confidences), dim_zero_cat(self.correct)
            return _diagram(*_bin_sums(conf, correct, self.n_bins, True), dtype=dtype)
        edges = _edges(self.n_bins, self.conf_sum).double()
        return _diagram(
            self.count, self.conf_sum, self.correct_sum, edges[:-1], edges[1:], dtype=dtype
        )


class ReliabilityDiagram(_TopLabelBins):
    """Accumulated :func:`reliability_diagram`: ``update(probs, labels)``; ``compute()`` -> dict."""

    def compute(self) -> dict[str, Tensor]:
        return self._diagram()


class ECE(_TopLabelBins):
    """Accumulated :func:`ece` (``n_bins=15``, ``norm="l1"``, ``adaptive=False``; a fraction).

    ``key`` names the variant for logging (``ece15``, ``aece15``, ``ece15_l2``), so the binning
    is always in the logged name.
    """

    higher_is_better = False

    def __init__(
        self, n_bins: int = 15, norm: Norm = "l1", adaptive: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(n_bins=n_bins, adaptive=adaptive, **kwargs)
        self.norm = check_choice("norm", norm, NORMS, "ECE")

    @property
    def key(self) -> str:
        suffix = "" if self.norm == "l1" else f"_{self.norm}"
        return f"{'a' if self.adaptive else ''}ece{self.n_bins}{suffix}"

    def compute(self) -> Tensor:
        return _calibration_error(self._diagram(), self.norm)


class OODMetrics(Metric):
    """Accumulated :func:`ood_metrics`: ``update(scores, is_ood)``; ``compute()`` -> dict.

    ``scores`` are per-sample OOD scores ``(N,)`` (see :func:`ood_scores`); ``is_ood`` a bool or
    a bool tensor ``(N,)``. Keeps every score (cat states).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, positive: Positive = "id", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.positive = check_choice("positive", positive, POSITIVES, "OODMetrics")
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("is_ood", [], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_ood: bool | Tensor) -> None:
        fn = "OODMetrics.update"
        _check_scores(scores, "scores", fn)
        flags = torch.as_tensor(is_ood, device=scores.device)
        if flags.dtype != torch.bool or flags.ndim > 1 or flags.numel() not in (1, len(scores)):
            raise ConfigError(
                f"{fn}: is_ood must be a bool or a bool tensor of shape ({len(scores)},), got "
                f"{is_ood!r}"
            )
        self.scores.append(scores)
        self.is_ood.append(flags.expand(len(scores)).to(scores.dtype))

    def compute(self) -> dict[str, Tensor]:
        scores, flags = dim_zero_cat(self.scores), dim_zero_cat(self.is_ood).bool()
        if bool(flags.all()) or not bool(flags.any()):
            raise ConfigError(
                "OODMetrics.compute: needs both ID and OOD scores; call update(scores, False) "
                "for the ID set and update(scores, True) for the OOD set"
            )
        return ood_metrics(scores[~flags], scores[flags], positive=self.positive)
