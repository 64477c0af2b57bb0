"""The whole uncertainty table of a model: in-distribution, OOD detection and distribution shift.

:func:`evaluate` runs a model (an ordinary one, a packed one or a :class:`DeepEnsemble`) over
an in-distribution (ID) test loader, any OOD loaders and any shifted loaders, and returns an
:class:`UncertaintyReport`: accuracy, NLL, Brier, ECE / aECE, predictive entropy, mutual
information and disagreement on ID and shifted data; AUROC, AUPR-in / -out and FPR95 per OOD set
and OOD criterion; the reliability-diagram bins and a sample of the scores for the figures.
Member-major ``(M·B, K)`` logits are split with :func:`~sobre.core.members.split_members`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import model_device
from sobre.core.members import num_members, split_members
from sobre.uncertainty import metrics as M

HISTOGRAM_SAMPLES = 2000  # scores kept per set and criterion for the report's histograms
REPORT_FILE = "uncertainty.json"  # a run folder's report, for ``sobre report``


@dataclass
class UncertaintyReport:
    """What :func:`evaluate` measured; ``to_dict`` is what ``uncertainty.json`` holds.

    Attributes:
        num_members: M of the evaluated model.
        id: ID test metrics (``acc``, ``nll``, ``brier``, ``ece15``, ``aece15``, ``entropy``,
            ``mi``, ``disagreement``).
        ood: per OOD set, per criterion: ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95``
            (FPR95 with ``positive`` as chosen).
        shift: per shifted set, the same metrics as ``id``.
        reliability: the ID reliability-diagram bins (``confidence``, ``accuracy``, ``count``).
        scores: per set (``"id"`` and every OOD set), per criterion, up to
            ``HISTOGRAM_SAMPLES`` scores, for histograms.
        positive: the FPR95 convention used.
    """

    num_members: int
    id: dict[str, float]
    ood: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    shift: dict[str, dict[str, float]] = field(default_factory=dict)
    reliability: dict[str, list[float]] = field(default_factory=dict)
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    positive: str = "id"

    def flat(self, prefix: str = "test") -> dict[str, float]:
        """Scalars by key: ``test/nll``, ``ood/<set>/<criterion>/auroc``, ``shift/<set>/ece15``."""
        out = {f"{prefix}/{k}": v for k, v in self.id.items()}
        for name, by_criterion in self.ood.items():
            for criterion, values in by_criterion.items():
                out.update({f"ood/{name}/{criterion}/{k}": v for k, v in values.items()})
        for name, values in self.shift.items():
            out.update({f"shift/{name}/{k}": v for k, v in values.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_members": self.num_members,
            "positive": self.positive,
            "id": self.id,
            "ood": self.ood,
            "shift": self.shift,
            "reliability": self.reliability,
            "scores": self.scores,
        }

    def table(self) -> str:
        """A markdown summary: ID and shifted metrics, then OOD detection."""
        keys = list(self.id)
        rows = [("ID test", self.id), *((f"shift: {n}", v) for n, v in self.shift.items())]
        lines = ["| set | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{v[k]:.4f}" for k in keys) + " |" for n, v in rows]
        if self.ood:
            lines += [
                "",
                f"| OOD set | criterion | AUROC | AUPR-in | AUPR-out | FPR95 ({self.positive} +) |",
                "|---|---|---|---|---|---|",
            ]
            for name, by_criterion in self.ood.items():
                for criterion, v in by_criterion.items():
                    lines.append(
                        f"| {name} | {criterion} | {v['auroc']:.4f} | {v['aupr_in']:.4f} | "
                        f"{v['aupr_out']:.4f} | {v['fpr95']:.4f} |"
                    )
        return "\n".join(lines)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """Per-member logits ``(N, M, K)`` and labels ``(N,)`` of ``model`` in eval mode."""
    members = num_members(model)
    device = model_device(model)
    training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            out = model(x.to(device))
            logits.append(split_members(out, members).float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(training)
    if not logits:
        raise ConfigError("evaluate got an empty loader")
    return torch.cat(logits), torch.cat(labels)


def _classification(logits: Tensor, labels: Tensor, n_bins: int) -> dict[str, float]:
    probs = logits.softmax(-1)
    return {
        "acc": float(M.accuracy(probs, labels)),
        "nll": float(M.nll(probs, labels)),
        "brier": float(M.brier(probs, labels)),
        f"ece{n_bins}": float(M.ece(probs, labels, n_bins=n_bins)),
        f"aece{n_bins}": float(M.ece(probs, labels, n_bins=n_bins, adaptive=True)),
        "entropy": float(M.predictive_entropy(probs)),
        "mi": float(M.mutual_information(probs)),
        "disagreement": float(M.disagreement(probs)),
    }


def _scores(logits: Tensor, criteria: Sequence[str]) -> dict[str, Tensor]:
    probs = logits.softmax(-1)
    return {
        c: M.ood_scores(logits if c in M.LOGIT_CRITERIA else probs, criterion=c) for c in criteria
    }


def _sample(values: Tensor) -> list[float]:
    step = max(1, math.ceil(len(values) / HISTOGRAM_SAMPLES))
    return [round(float(v), 6) for v in values[::step]]


def evaluate(
    model: nn.Module,
    id_loader: Iterable[Any],
    ood_loaders: Mapping[str, Iterable[Any]] | None = None,
    shift_loaders: Mapping[str, Iterable[Any]] | None = None,
    *,
    criteria: Sequence[str] | None = None,
    n_bins: int = 15,
    positive: M.Positive = "id",
) -> UncertaintyReport:
    """Evaluate ``model`` on ID, OOD and shifted data (see the module docstring).

    Args:
        model: any classifier; ensembles declare ``num_members`` and return ``(M·B, K)``.
        id_loader: the ID test set, ``(x, y)`` batches.
        ood_loaders: name -> loader of an OOD set (labels ignored).
        shift_loaders: name -> loader of a shifted set with true labels.
        criteria: OOD scores (:func:`~sobre.uncertainty.metrics.ood_scores`); default
            ``msp``, ``energy`` and, for ensembles, ``mi``.
        n_bins: calibration bins.
        positive: the FPR95 convention (``"id"``: Hendrycks & Gimpel; ``"ood"``:
            torch-uncertainty's).
    """
    members = num_members(model)
    chosen = list(criteria or (["msp", "energy", "mi"] if members > 1 else ["msp", "energy"]))
    if "mi" in chosen and members == 1:
        raise ConfigError(
            "criterion 'mi' needs an ensemble (num_members >= 2); drop it for a single model"
        )
    logits, labels = predict(model, id_loader)
    probs = logits.softmax(-1)
    diagram = M.reliability_diagram(probs, labels, n_bins=n_bins)
    report = UncertaintyReport(
        num_members=members,
        id=_classification(logits, labels, n_bins),
        reliability={k: [float(v) for v in t] for k, t in diagram.items()},
        positive=positive,
    )
    id_scores = _scores(logits, chosen)
    report.scores["id"] = {c: _sample(s) for c, s in id_scores.items()}
    for name, loader in (ood_loaders or {}).items():
        ood_scores = _scores(predict(model, loader)[0], chosen)
        report.scores[name] = {c: _sample(s) for c, s in ood_scores.items()}
        report.ood[name] = {
            c: {
                k: float(v)
                for k, v in M.ood_metrics(id_scores[c], ood_scores[c], positive=positive).items()
            }
            for c in chosen
        }
    for name, loader in (shift_loaders or {}).items():
        report.shift[name] = _classification(*predict(model, loader), n_bins)
    return report
