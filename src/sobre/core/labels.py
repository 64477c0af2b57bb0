"""Label edits shared by the data modules: label noise (``label_noise=``, DSD²'s experiments)
and class subsets (``classes=``, the transfer protocol of the efficient-training papers).

DSD² (paper #5, authors' code) corrupts the *first* ``eps * N`` samples of the training set with
a random label different from the true one; a data module picks a seeded random subset instead,
since its training split may be sorted by class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from sobre.core.errors import ConfigError


class NoisyLabels(Dataset):
    """A dataset serving ``labels`` in place of the wrapped dataset's labels.

    Attributes:
        dataset: the wrapped dataset (its inputs are served unchanged).
        labels: the labels served, noisy ones included.
        noisy: indices whose label was changed.
    """

    def __init__(self, dataset: Dataset, labels: Tensor, noisy: Tensor) -> None:
        self.dataset, self.labels, self.noisy = dataset, labels, noisy

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        return self.dataset[index][0], self.labels[index]

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to a seeded augmentation underneath (a no-op otherwise)."""
        inner = getattr(self.dataset, "set_epoch", None)
        if inner is not None:
            inner(epoch)


class _EpochSubset(Subset):
    """A ``Subset`` that forwards ``set_epoch`` to a seeded augmentation underneath."""

    def set_epoch(self, epoch: int) -> None:
        inner = getattr(self.dataset, "set_epoch", None)
        if inner is not None:
            inner(epoch)


def keep_classes(dataset: Dataset, classes: list[int]) -> NoisyLabels:
    """The samples of ``classes`` only, relabelled ``0 .. len(classes) - 1`` in that order
    (e.g. digits 5-9 as 0-4 for a transfer task); no label is noisy.

    Raises:
        ConfigError: ``classes`` empty or repeated, or a class with no sample in ``dataset``.
    """
    if not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"classes must be distinct class indices, got {classes!r}")
    labels = dataset_labels(dataset)
    new = torch.full_like(labels, -1)
    for i, c in enumerate(classes):
        new[labels == c] = i
    present = set(new[new >= 0].unique().tolist())
    missing = [c for i, c in enumerate(classes) if i not in present]
    if missing:
        raise ConfigError(
            f"classes {missing} have no sample here (labels present: "
            f"{sorted(set(labels.tolist()))}); pick classes the dataset has"
        )
    keep = (new >= 0).nonzero().flatten()
    return NoisyLabels(_EpochSubset(dataset, keep.tolist()), new[keep], keep[:0])


_STORED = {1: ("labels", "y"), 2: ("b",)}  # per-sample label tensors datasets keep by item


def dataset_labels(dataset: Dataset, item: int = 1) -> Tensor:
    """The integer labels at position ``item`` of a dataset's samples (1: the class ``y`` of
    ``(x, y, ...)``, 2: the bias label ``b`` of ``(x, y, b)``).

    Read from the tensors the dataset stores where it keeps them (a ``TensorDataset``,
    :class:`NoisyLabels`, a dataset with per-sample ``y`` / ``b`` tensors such as the bias
    folders', ``Subset`` s of these), so no input is loaded; otherwise each sample is loaded once.
    """
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset, item)
        return inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    n = len(dataset)  # type: ignore[arg-type]
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) > item:  # TensorDataset: no per-sample indexing
        return tensors[item].long().clone()
    for name in _STORED.get(item, ()):
        stored = getattr(dataset, name, None)
        if isinstance(stored, Tensor) and stored.ndim == 1 and len(stored) == n:
            return stored.long().clone()
    return torch.tensor([int(dataset[i][item]) for i in range(n)], dtype=torch.long)


def inject_label_noise(
    dataset: Dataset, eps: float, num_classes: int, seed: int = 0, shuffle: bool = False
) -> NoisyLabels:
    """Give ``round(eps * N)`` samples a random label *different* from their true one.

    Args:
        dataset: yields ``(x, y, ...)`` with integer labels.
        eps: fraction of noisy labels in ``[0, 1)``.
        num_classes: number of classes (>= 2).
        seed: seed of the replacement labels (and of the subset when ``shuffle``).
        shuffle: corrupt a seeded random subset; ``False`` corrupts the *first* samples, as the
            DSD² code does (shuffle a class-sorted dataset first, or only its first classes get
            noise).
    """
    if not 0.0 <= eps < 1.0:
        raise ConfigError(f"the label-noise fraction must be in [0, 1), got {eps}")
    if num_classes < 2:
        raise ConfigError(f"label noise needs num_classes >= 2, got {num_classes}")
    labels = dataset_labels(dataset)
    n_noisy = round(eps * len(labels))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen) if shuffle else torch.arange(len(labels))
    noisy = order[:n_noisy].sort().values
    shift = torch.randint(1, num_classes, (n_noisy,), generator=gen)  # never the true label
    served = labels.clone()
    served[noisy] = (labels[noisy] + shift) % num_classes
    return NoisyLabels(dataset, served, noisy)
