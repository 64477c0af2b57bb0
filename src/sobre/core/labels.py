"""Label noise shared by the data modules (``label_noise=``) and DSD²'s experiments.

DSD² (paper #5, authors' code) corrupts the *first* ``eps * N`` samples of the training set with
a random label different from the true one; a data module picks a seeded random subset instead,
since its training split may be sorted by class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

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


def dataset_labels(dataset: Dataset) -> Tensor:
    """The integer labels of a dataset yielding ``(x, y, ...)``, read without loading twice."""
    targets = getattr(dataset, "tensors", None)
    if targets is not None and len(targets) > 1:  # TensorDataset: no per-sample indexing
        return targets[1].long().clone()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


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
