"""Any local image tree laid out as ``root/train/<class>/*.png|jpg`` (plus optional val, test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from sobre.core.errors import ConfigError, DataNotFoundError
from sobre.data.base import (
    DATASETS,
    SobreDataModule,
    Splits,
    carve_sizes,
    check_fractions,
    check_int,
    stratified_split,
)

__all__ = ["ImageFolderDataModule", "imagefolder_classes", "imagefolder_datasets"]

_LAYOUT = """root/
  train/<class_a>/*.png|*.jpg   (required, one folder per class)
  val/<class_a>/...             (optional; carved from train when absent)
  test/<class_a>/...            (optional; carved from train when absent)"""


def imagefolder_classes(root: str | Path) -> tuple[str, ...]:
    """The sorted class folder names of ``root/train``.

    Raises:
        DataNotFoundError: ``root/train`` is missing or holds no class folder; the message shows
            the expected layout.
    """
    train = Path(root).expanduser() / "train"
    classes = sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
    if not classes:
        raise DataNotFoundError(
            f"no image classes found in {train}: imagefolder expects the layout\n{_LAYOUT}\n"
            "Point root= at a folder laid out this way (sobre never downloads data)."
        )
    return tuple(classes)


def imagefolder_datasets(
    root: str | Path,
    *,
    image_size: int = 32,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    data_seed: int = 0,
) -> Splits:
    """The train/val/test splits of an image tree, resized to ``image_size`` and scaled to [-1, 1].

    A missing ``val/`` or ``test/`` folder is carved from ``train/`` (stratified, seeded by
    ``data_seed``) with ``val_fraction`` / ``test_fraction`` of its images.

    Args:
        root: the folder holding ``train/`` (and optionally ``val/``, ``test/``).
        image_size: the side every image is resized to.
        grayscale: one channel instead of three.
        val_fraction: share of ``train/`` carved for validation when ``val/`` is absent.
        test_fraction: share of ``train/`` carved for testing when ``test/`` is absent.
        data_seed: the seed of the carved splits.
    """
    root = Path(root).expanduser()
    classes = imagefolder_classes(root)
    channels = 1 if grayscale else 3
    steps: list[Any] = [transforms.Grayscale(1)] if grayscale else []
    transform = transforms.Compose(
        [
            *steps,
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * channels, [0.5] * channels),
        ]
    )
    train = ImageFolder(root / "train", transform=transform, target_transform=torch.tensor)
    given: dict[str, Dataset[Any]] = {}
    for split in ("val", "test"):
        if (root / split).is_dir():
            folder = ImageFolder(root / split, transform=transform, target_transform=torch.tensor)
            if tuple(folder.classes) != classes:
                raise ConfigError(
                    f"{root / split} has classes {folder.classes} but train/ has "
                    f"{list(classes)}; give both the same class folders"
                )
            given[split] = folder
    missing = {
        f"{s}_fraction": f
        for s, f in (("val", val_fraction), ("test", test_fraction))
        if s not in given
    }
    if not missing:
        return train, given["val"], given["test"]
    labels = torch.as_tensor(train.targets)
    chunks = stratified_split(labels, carve_sizes(len(labels), **missing), seed=data_seed)
    carved = {
        key.removesuffix("_fraction"): Subset(train, idx.tolist())
        for key, idx in zip(missing, chunks[1:], strict=True)
    }
    parts = {**given, **carved}
    return Subset(train, chunks[0].tolist()), parts["val"], parts["test"]


@DATASETS.register("imagefolder")
class ImageFolderDataModule(SobreDataModule):
    """A local image tree ``root/train/<class>/*`` (plus optional ``val/``, ``test/``).

    Args:
        root: the folder holding ``train/``; a missing or empty one fails here, before training.
        image_size: the side every image is resized to.
        grayscale: one channel instead of three.
        val_fraction: share of ``train/`` carved for validation when ``val/`` is absent.
        test_fraction: share of ``train/`` carved for testing when ``test/`` is absent.
        data_seed: the seed of the carved splits (independent of the training ``seed``).
        **common: :class:`~sobre.data.base.SobreDataModule` arguments.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int = 32,
        grayscale: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        data_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.root = Path(root).expanduser()
        self.class_names = imagefolder_classes(self.root)
        self.num_classes = len(self.class_names)
        self.input_shape = (
            1 if grayscale else 3,
            check_int("image_size", image_size, 1),
            image_size,
        )
        check_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
        self.options = {
            "image_size": image_size,
            "grayscale": bool(grayscale),
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "data_seed": check_int("data_seed", data_seed, 0),
        }

    def build(self) -> Splits:
        """Read the tree and carve the missing splits."""
        return imagefolder_datasets(self.root, **self.options)
