"""Bias discovery without bias labels (paper #17, bias.md §2): bias-capturing model → b̂.

#17 (Unsupervised Learning of Unbiased Visual Representations) debiases in three steps:

1. :func:`train_bias_capturing`: a network learns the easy (bias) shortcut first, so a model f_b
   trained briefly with cross-entropy (or the generalised CE of LfF, :class:`GCELoss`) captures
   the bias without having memorised the bias-conflicting samples;
2. :func:`pseudo_bias_labels`: b̂ = k-means cluster of f_b's pooled features (k chosen by the
   silhouette when unknown, globally or per class), or, in the binary case, b̂ = 1[f_b
   misclassifies x] (aligned 0 / conflicting 1, as JTT's error set);
3. any supervised debiasing :class:`~sobre.fairness.base.BiasRegularizer` (EnD, FairKL,
   GroupDRO) trains on :func:`with_pseudo_bias` ``(x, y, b̂)`` samples, unchanged.

:func:`normalized_mutual_info` scores b̂ against the true b; :func:`biasedness` is the spec's
measure of a model's bias (NMI between its predictions and b on a bias-balanced set, and the
aligned - conflicting accuracy gap).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice
from sobre.fairness.base import predictions, train
from sobre.fairness.metrics import AlignedBias, aligned_accuracy, as_labels, conflicting_accuracy
from sobre.fairness.probe import features_of

BiasLoss = Literal["ce", "gce"]
PseudoMethod = Literal["kmeans", "correctness"]

__all__ = [
    "Biasedness",
    "GCELoss",
    "PseudoBias",
    "PseudoBiasDataset",
    "biasedness",
    "discover_bias",
    "kmeans",
    "misclassified",
    "normalized_mutual_info",
    "pseudo_bias_labels",
    "silhouette_score",
    "train_bias_capturing",
    "with_pseudo_bias",
]


class GCELoss(nn.Module):
    """Generalised cross-entropy as LfF implements it: mean of CE(x, y) · p_y^q · q, p_y detached.

    Its gradient is q · p_y^q · ∇CE = q · ∇[(1 - p_y^q) / q], q times that of the GCE of Zhang &
    Sabuncu: samples the model already fits (high p_y, the bias-aligned ones) weigh more, so the
    model amplifies the easy shortcut.
    """

    def __init__(self, q: float = 0.7) -> None:
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"GCELoss: q must lie in (0, 1], got {q}; LfF uses q=0.7")
        self.q = q

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, targets, reduction="none")
        p_y = logits.detach().softmax(1).gather(1, targets[:, None]).squeeze(1)
        return (ce * p_y.pow(self.q) * self.q).mean()


def train_bias_capturing(
    model: nn.Module,
    loader: Iterable[Sequence[Any]],
    *,
    epochs: int = 2,
    loss: BiasLoss = "ce",
    q: float = 0.7,
    optimizer: Any = None,
) -> list[dict[str, float]]:
    """Step 1 of #17: train the bias-capturing model f_b briefly (in place).

    Args:
        model: f_b, usually the final model's architecture, freshly initialised.
        loader: training batches ``(x, y)`` or ``(x, y, b, ...)`` (b is not used).
        epochs: few, so that f_b learns the shortcut but not the conflicting samples (#17: 1-2).
        loss: ``"ce"`` or ``"gce"`` (:class:`GCELoss` with ``q``).
        optimizer: factory over parameters, as in :func:`~sobre.fairness.base.train`.

    Returns:
        The per-epoch losses of :func:`~sobre.fairness.base.train`.
    """
    check_choice("loss", loss, get_args(BiasLoss), "train_bias_capturing")
    criterion = GCELoss(q) if loss == "gce" else None
    return train(model, loader, epochs=epochs, optimizer=optimizer, criterion=criterion)


def _features(z: object, fn: str) -> Tensor:
    z = torch.as_tensor(z)
    if z.dim() != 2 or not len(z):
        raise ConfigError(
            f"{fn}: features must be a non-empty (N, D) matrix, got shape {tuple(z.shape)}; "
            f"pool or flatten them first (features_of does)"
        )
    if not torch.isfinite(z).all():
        raise ConfigError(f"{fn}: features hold NaN or infinite values; check the model")
    return z.detach().double()


def kmeans(
    z: Tensor, k: int, *, seed: int = 0, n_init: int = 3, max_iter: int = 100, tol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs (lowest inertia).

    Deterministic given ``seed`` (a private generator; the global RNG is untouched). An empty
    cluster is re-seeded with the point farthest from its centre.

    Args:
        z: (N, D) points.
        k: number of clusters, 1 ≤ k ≤ N.

    Returns:
        ``(labels, centres)``: (N,) int64 cluster ids and (k, D) centres (float64).
    """
    z = _features(z, "kmeans")
    if not 1 <= k <= len(z) or n_init < 1 or max_iter < 1:
        raise ConfigError(
            f"kmeans: need 1 <= k <= N ({len(z)} points), n_init >= 1 and max_iter >= 1; got "
            f"k={k}, n_init={n_init}, max_iter={max_iter}"
        )
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(n_init):
        centres = z[torch.randint(len(z), (1,), generator=gen)]
        for _ in range(1, k):  # k-means++: next centre drawn with probability ∝ D(x)²
            d2 = torch.cdist(z, centres).min(1).values.pow(2)
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2)
            centres = torch.cat([centres, z[torch.multinomial(probs, 1, generator=gen)]])
        for _ in range(max_iter):
            dist = torch.cdist(z, centres)
            labels = dist.argmin(1)
            empty = (torch.bincount(labels, minlength=k) == 0).nonzero().flatten()
            if len(empty):  # re-seed empty clusters with the points farthest from their centre
                far = dist.gather(1, labels[:, None]).squeeze(1).topk(len(empty)).indices
                labels[far] = empty
            counts = torch.bincount(labels, minlength=k)[:, None]
            new = torch.zeros_like(centres).index_add_(0, labels, z) / counts.clamp_min(1)
            new = torch.where(counts > 0, new, centres)
            shift = (new - centres).pow(2).sum()
            centres = new
            if shift <= tol * z.var(0).sum().clamp_min(1e-12):
                break
        labels = torch.cdist(z, centres).argmin(1)
        inertia = float((z - centres[labels]).pow(2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    assert best is not None
    return best[1], best[2]


def silhouette_score(z: Tensor, labels: Tensor) -> float:
    """Mean silhouette (b_i - a_i) / max(a_i, b_i) over the points (Euclidean, as sklearn's).

    a_i is the mean distance of point i to the other points of its cluster, b_i the smallest mean
    distance to another cluster; points alone in their cluster score 0.
    """
    z, labels = _features(z, "silhouette_score"), as_labels(labels, "labels", "silhouette_score")
    ids, labels = torch.unique(labels, return_inverse=True)
    if not 2 <= len(ids) < len(z):
        raise ConfigError(
            f"silhouette_score: needs 2 <= clusters < N, got {len(ids)} clusters for "
            f"{len(z)} points"
        )
    dist = torch.cdist(z, z)
    onehot = F.one_hot(labels, len(ids)).double()
    counts = onehot.sum(0)
    sums = dist @ onehot  # (N, k): summed distance of each point to each cluster
    own = counts[labels]
    a = sums.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    other = (sums / counts).scatter(1, labels[:, None], float("inf"))
    b = other.min(1).values
    s = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-300), 0.0)
    return float(s.mean())


def _choose_k(z: Tensor, max_clusters: int, seed: int, sample: int) -> int:
    """The k in 2..max_clusters with the best silhouette, on a seeded subsample of ``z``."""
    gen = torch.Generator().manual_seed(seed)
    sub = z[torch.randperm(len(z), generator=gen)[:sample]]
    ks = range(2, min(max_clusters, len(sub) - 1) + 1)
    if not ks:
        raise ConfigError(
            f"pseudo_bias_labels: {len(sub)} samples are too few to choose k by silhouette; "
            f"pass n_clusters"
        )
    scores = {k: silhouette_score(sub, kmeans(sub, k, seed=seed)[0]) for k in ks}
    return max(scores, key=lambda k: (scores[k], -k))


def misclassified(model: nn.Module, loader: Iterable[Sequence[Any]]) -> Tensor:
    """1[model(x) ≠ y] per sample, in loader order (eval mode, restored afterwards).

    JTT's error set, and #17's binary pseudo bias label (1 = bias-conflicting).
    """
    pred, y = predictions(model, loader, items=2, need="(x, y, ...)", fn="misclassified")
    return pred != y


def _check_order(loader: object, fn: str) -> None:
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        raise ConfigError(
            f"{fn}: the loader shuffles, so the labels would not follow the dataset's order; "
            f"pass DataLoader(dataset, batch_size=..., shuffle=False)"
        )


def pseudo_bias_labels(
    model: nn.Module,
    loader: Iterable[Sequence[Any]],
    layer: str = "embedding",
    *,
    method: PseudoMethod = "kmeans",
    n_clusters: int | None = None,
    per_class: bool = False,
    max_clusters: int = 10,
    silhouette_sample: int = 1000,
    seed: int = 0,
) -> Tensor:
    """Step 2 of #17: pseudo bias labels b̂ of the loader's samples, in loader order.

    ``"kmeans"`` clusters the pooled features of ``layer`` (:func:`~sobre.fairness.probe.
    features_of`) with :func:`kmeans`; globally, or within each class y when ``per_class`` (the
    ids are then made unique across classes: class after class, cluster ids 0, 1, ... follow on).
    Without ``n_clusters``, k maximises the :func:`silhouette_score` over 2..``max_clusters`` on
    at most ``silhouette_sample`` samples (per class when ``per_class``). ``"correctness"`` gives
    b̂ = 1[f_b misclassifies x] (0 aligned, 1 conflicting); ``layer`` is then unused.

    Args:
        model: the trained bias-capturing model f_b.
        loader: unshuffled batches ``(x, y)`` or ``(x, y, b, ...)`` of the training set.
        layer: module whose output are the features (``"embedding"`` in SimpleConvNet).
        seed: seed of k-means and of the silhouette subsample.

    Returns:
        (N,) int64 pseudo bias labels, ≥ 0.
    """
    check_choice("method", method, get_args(PseudoMethod), "pseudo_bias_labels")
    if n_clusters is not None and n_clusters < 1:
        raise ConfigError(f"pseudo_bias_labels: n_clusters must be >= 1 or None, got {n_clusters}")
    if max_clusters < 2 or silhouette_sample < 3:
        raise ConfigError(
            f"pseudo_bias_labels: max_clusters must be >= 2 and silhouette_sample >= 3, got "
            f"{max_clusters} and {silhouette_sample}"
        )
    _check_order(loader, "pseudo_bias_labels")
    if method == "correctness":
        return misclassified(model, loader).long()
    z, *rest = features_of(model, loader, layer)
    if per_class and not rest:
        raise ConfigError(
            "pseudo_bias_labels: per_class=True needs the labels y: pass (x, y, ...) batches"
        )
    parts = [(torch.arange(len(z)), z)]
    if per_class:
        y = rest[0]
        parts = [((y == c).nonzero().flatten(), z[y == c]) for c in torch.unique(y).tolist()]
    b_hat = torch.empty(len(z), dtype=torch.long)
    offset = 0
    for index, zc in parts:
        k = n_clusters or _choose_k(zc, max_clusters, seed, silhouette_sample)
        if k > len(zc):
            raise ConfigError(
                f"pseudo_bias_labels: n_clusters={k} exceeds the {len(zc)} samples to cluster; "
                f"pass fewer clusters"
            )
        b_hat[index] = kmeans(zc, k, seed=seed)[0] + offset
        offset += k
    return b_hat


def normalized_mutual_info(a: Tensor, b: Tensor) -> float:
    """NMI(a, b) = I(a; b) / ((H(a) + H(b)) / 2), arithmetic normalisation (sklearn's default).

    Labels are any integers (only equality counts); two single-cluster labellings score 1, a
    mutual information of 0 scores 0.
    """
    fn = "normalized_mutual_info"
    a, b = as_labels(a, "a", fn), as_labels(b, "b", fn)
    if len(a) != len(b) or not len(a):
        raise ConfigError(
            f"{fn}: a and b must label the same non-empty samples, got lengths {len(a)} and "
            f"{len(b)}"
        )
    ia, a = torch.unique(a, return_inverse=True)
    ib, b = torch.unique(b, return_inverse=True)
    if len(ia) == len(ib) == 1:
        return 1.0
    joint = torch.zeros(len(ia), len(ib), dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= len(a)
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    if mi <= 0.0:
        return 0.0
    h = float(-(pa * pa.log()).sum() - (pb * pb.log()).sum()) / 2
    return min(1.0, mi / max(h, 1e-300))


@dataclass(frozen=True)
class Biasedness:
    """How biased a model is (bias.md §2): on a bias-balanced split, its predictions should
    carry the target, not the bias.

    Attributes:
        nmi_bias: NMI(ŷ, b), 0 for an unbiased model, 1 for a pure bias classifier.
        nmi_target: NMI(ŷ, y), for reference (1 for a perfect classifier).
        gap: aligned - conflicting accuracy.
    """

    nmi_bias: float
    nmi_target: float
    gap: float


def biasedness(pred: Tensor, y: Tensor, b: Tensor, *, aligned: AlignedBias = None) -> Biasedness:
    """The :class:`Biasedness` of predictions ``pred`` on an (x, y, b) split with both aligned
    and conflicting samples (e.g. ``biasedness(*predict(model, unbiased_loader))``)."""
    return Biasedness(
        nmi_bias=normalized_mutual_info(pred, b),
        nmi_target=normalized_mutual_info(pred, y),
        gap=aligned_accuracy(pred, y, b, aligned=aligned)
        - conflicting_accuracy(pred, y, b, aligned=aligned),
    )


class PseudoBiasDataset(Dataset):
    """``dataset`` whose samples become ``(x, y, b̂[i])``: the bias label replaced by b̂."""

    def __init__(self, dataset: Dataset, b_hat: Tensor) -> None:
        self.dataset = dataset
        self.b_hat = as_labels(b_hat, "b_hat", "with_pseudo_bias")
        n = len(dataset)  # type: ignore[arg-type]
        if len(self.b_hat) != n:
            raise ConfigError(
                f"with_pseudo_bias: {len(self.b_hat)} pseudo labels for a dataset of {n} "
                f"samples; compute them over the same dataset with an unshuffled loader"
            )
        if n and self.b_hat.min() < 0:
            raise ConfigError("with_pseudo_bias: pseudo labels must be >= 0 (cluster ids)")

    def __len__(self) -> int:
        return len(self.b_hat)

    def __getitem__(self, i: int) -> tuple[Any, Any, Tensor]:
        x, y, *_ = self.dataset[i]
        return x, y, self.b_hat[i]


def with_pseudo_bias(dataset: Dataset, b_hat: Tensor) -> PseudoBiasDataset:
    """Step 3 of #17: ``dataset`` yielding ``(x, y, b̂)``, for any BiasRegularizer unchanged."""
    return PseudoBiasDataset(dataset, b_hat)


def discover_bias(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int = 2,
    loss: BiasLoss = "ce",
    batch_size: int = 256,
    seed: int = 0,
    **options: Any,
) -> Tensor:
    """Steps 1-2 of #17 on ``dataset``: train f_b (``model``, in place; shuffled with ``seed``)
    and return b̂ of every sample (``options``: those of :func:`pseudo_bias_labels`)."""
    gen = torch.Generator().manual_seed(seed)
    train_bias_capturing(
        model,
        DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen),
        epochs=epochs,
        loss=loss,
    )
    return pseudo_bias_labels(
        model, DataLoader(dataset, batch_size=batch_size), seed=seed, **options
    )


class PseudoBias:
    """Stage transform (a ``DatasetTransform``) for #17 in recipes: the model the last stage
    trained is the bias-capturing f_b; the next stages train on ``(x, y, b̂)`` with
    b̂ = :func:`pseudo_bias_labels` of the training set (true bias labels, if any, are dropped).

    Follow it with a fresh-weights transform and a debiasing method (EnD, FairKL, GroupDRO) in
    the same stage. ``report()`` gives the number of clusters and, when the training set holds
    true bias labels, NMI(b̂, b) (logged with the stage, never used for training).

    Args:
        layer, method, n_clusters, per_class, seed: see :func:`pseudo_bias_labels`.
        batch_size: batch of the pass over the training set.
    """

    def __init__(
        self,
        layer: str = "embedding",
        method: PseudoMethod = "kmeans",
        n_clusters: int | None = 10,
        per_class: bool = False,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        self.options = {
            "layer": layer,
            "method": method,
            "n_clusters": n_clusters,
            "per_class": per_class,
            "seed": seed,
        }
        self.batch_size = batch_size
        self._report: dict[str, float] = {}

    def apply_dataset(
        self, model: nn.Module, dataset: Dataset
    ) -> tuple[Dataset, dict[str, Tensor]]:
        """b̂ over ``dataset`` in order; the new set and ``{"b_hat": b̂}``."""
        loader = DataLoader(dataset, batch_size=self.batch_size)
        b_hat = pseudo_bias_labels(model, loader, **self.options)
        self._report = {"clusters": float(len(b_hat.unique()))}
        true_b = [batch[2] for batch in loader if len(batch) > 2]
        if true_b:
            self._report["nmi_true_bias"] = normalized_mutual_info(b_hat, torch.cat(true_b))
        return with_pseudo_bias(dataset, b_hat), {"b_hat": b_hat}

    def restore_dataset(self, dataset: Dataset, state: dict[str, Tensor]) -> Dataset:
        """The same set from the saved b̂ (a resumed run)."""
        return with_pseudo_bias(dataset, state["b_hat"])

    def report(self) -> dict[str, float]:
        """Clusters found and NMI with the true bias labels (when the data has them)."""
        return dict(self._report)
