"""dataset_labels: the y or b of every sample, from stored tensors where a dataset keeps them."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from sobre.core.labels import dataset_labels, keep_classes


class _Stored(Dataset):
    """Keeps y and b as tensors; loading a sample is refused, to prove no sample is loaded."""

    def __init__(self, y: Tensor, b: Tensor) -> None:
        self.y, self.b = y, b

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        raise AssertionError("a stored label was read by loading the sample")


class _Plain(Dataset):
    """Serves (x, y, b) samples only."""

    def __init__(self, y: Tensor, b: Tensor) -> None:
        self.y_, self.b_ = y, b

    def __len__(self) -> int:
        return len(self.y_)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return torch.zeros(2), self.y_[i], self.b_[i]


Y = torch.tensor([0, 1, 2, 1, 0, 2])
B = torch.tensor([1, 1, 0, 0, 2, 2])


@pytest.mark.parametrize(
    "dataset",
    [TensorDataset(torch.zeros(6, 2), Y, B), _Stored(Y, B), _Plain(Y, B)],
    ids=["tensors", "stored", "loaded"],
)
def test_y_and_b_of_a_dataset_and_of_its_subsets(dataset: Dataset) -> None:
    assert torch.equal(dataset_labels(dataset), Y)
    assert torch.equal(dataset_labels(dataset, 2), B)
    nested = Subset(Subset(dataset, [5, 3, 1, 0]), [2, 0])
    assert torch.equal(dataset_labels(nested), Y[[1, 5]])
    assert torch.equal(dataset_labels(nested, 2), B[[1, 5]])
    assert dataset_labels(dataset, 2).dtype == torch.long


def test_kept_classes_read_their_relabelled_y_without_loading() -> None:
    kept = keep_classes(TensorDataset(torch.zeros(6, 2), Y), [2, 1])
    assert torch.equal(dataset_labels(kept), torch.tensor([1, 0, 1, 0]))


def test_a_missing_item_is_an_index_error() -> None:
    with pytest.raises(IndexError):
        dataset_labels(TensorDataset(torch.zeros(6, 2), Y), 2)
