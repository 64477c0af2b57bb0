"""CIFAR-10 and CIFAR-100 read from the official python-pickle batches in a local folder.

sobre never downloads them. The batches are pickles, so they are read with
:class:`RestrictedUnpickler`, which can rebuild numpy arrays and nothing else.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sobre.core.errors import ConfigError, DataNotFoundError, SobreError
from sobre.data.augment import CropFlipDataset
from sobre.data.base import (
    DATASETS,
    SobreDataModule,
    Splits,
    check_int,
    default_data_root,
    stratified_split,
)

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CifarSpec",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "cifar10_datasets",
    "cifar100_datasets",
    "cifar_folder",
    "read_pickle",
]

_SAFE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class UnsafePickleError(SobreError, pickle.UnpicklingError):
    """A pickle asked for something other than numpy arrays, lists, dicts, bytes and numbers."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and refuses any other global.

    Example:
        >>> with open("data_batch_1", "rb") as f:  # doctest: +SKIP
        ...     batch = RestrictedUnpickler(f, encoding="bytes").load()
    """

    def find_class(self, module: str, name: str) -> Any:
        """The allowed numpy global ``module.name``, or :class:`UnsafePickleError` for any other."""
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name}: dataset pickles may only hold numpy "
                "arrays, lists, dicts, bytes and numbers; the file is not a genuine dataset "
                "batch, replace it with a fresh copy from the official archive"
            ) from None


def read_pickle(path: Path) -> dict[bytes, Any]:
    """The dict stored in the pickle at ``path``, read with :class:`RestrictedUnpickler`."""
    with open(path, "rb") as f:
        obj = RestrictedUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise DataNotFoundError(
            f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict; "
            "replace it with a fresh copy from the official archive"
        )
    return obj


@dataclass(frozen=True)
class CifarSpec:
    """What distinguishes CIFAR-10 from CIFAR-100 on disk and in statistics."""

    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the folder must hold."""
        return (*self.train_files, self.test_file, self.meta_file)


CIFAR10 = CifarSpec(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarSpec(
    title="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def cifar_folder(spec: CifarSpec, root: str | Path | None = None) -> Path:
    """The folder holding ``spec``'s files: ``root`` itself if it holds them, else ``root/folder``.

    ``root`` defaults to :func:`~sobre.data.base.default_data_root`.

    Raises:
        DataNotFoundError: the files are missing; the message says where they are expected and
            how to obtain them.
    """
    base = Path(root).expanduser() if root is not None else default_data_root()
    for folder in (base, base / spec.folder):
        if all((folder / name).is_file() for name in spec.files):
            return folder
    expected = base / spec.folder
    missing = [name for name in spec.files if not (expected / name).is_file()]
    state = "does not exist" if not expected.is_dir() else f"lacks {', '.join(missing)}"
    raise DataNotFoundError(
        f"{spec.title} not found: expected the folder {expected} holding {', '.join(spec.files)} "
        f"(it {state}). sobre never downloads data: download the "
        f'"{spec.title} python version" ({spec.archive}) by hand from '
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {base}, or pass "
        f"root=<folder holding {spec.folder}> (or set SOBRE_DATA_DIR)."
    )


class _ByteImages(Dataset[tuple[Tensor, Tensor]]):
    """uint8 images kept as bytes (4x less memory than floats), normalised per item."""

    def __init__(self, images: Tensor, labels: Tensor, spec: CifarSpec) -> None:
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(spec.mean).view(-1, 1, 1)
        self.std = torch.tensor(spec.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index].float().div_(255.0).sub_(self.mean).div_(self.std)
        return image, self.labels[index]


def _read_batches(folder: Path, files: tuple[str, ...], label_key: bytes) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in files:
        batch = read_pickle(folder / name)
        if b"data" not in batch or label_key not in batch:
            raise DataNotFoundError(
                f"{folder / name} lacks b'data' or {label_key!r}; replace it "
                "with a fresh copy from the official archive"
            )
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _cifar_datasets(
    spec: CifarSpec,
    root: str | Path | None,
    label_key: bytes,
    *,
    val_size: int,
    augment: bool,
    seed: int,
    data_seed: int,
) -> Splits:
    folder = cifar_folder(spec, root)
    x, y = _read_batches(folder, spec.train_files, label_key)
    if not 1 <= val_size < len(y):
        raise ConfigError(
            f"val_size={val_size} must be in [1, {len(y) - 1}] for the {len(y)} "
            f"{spec.title} training images; pass a smaller val_size"
        )
    train_idx, val_idx = stratified_split(y, [len(y) - val_size, val_size], seed=data_seed)
    train = _ByteImages(x[train_idx], y[train_idx], spec)
    val = _ByteImages(x[val_idx], y[val_idx], spec)
    test = _ByteImages(*_read_batches(folder, (spec.test_file,), label_key), spec)
    if augment:
        black = [-m / s for m, s in zip(spec.mean, spec.std, strict=True)]
        return CropFlipDataset(train, padding=4, flip=True, fill=black, seed=seed), val, test
    return train, val, test


def cifar10_datasets(
    root: str | Path | None = None,
    *,
    val_size: int = 5000,
    augment: bool = False,
    seed: int = 0,
    data_seed: int = 0,
) -> Splits:
    """CIFAR-10 from local batches: normalised ``(3, 32, 32)``, 10 classes.

    Args:
        root: the ``cifar-10-batches-py`` folder or its parent (default: the data root).
        val_size: training images held out for validation (stratified, seeded by ``data_seed``).
        augment: random crop (padding 4) and horizontal flip, seeded by ``seed`` and the epoch.
        seed: the training seed (augmentation only).
        data_seed: the seed of the validation split.
    """
    return _cifar_datasets(
        CIFAR10, root, b"labels", val_size=val_size, augment=augment, seed=seed, data_seed=data_seed
    )


def _label_key(label_type: str) -> bytes:
    if label_type not in ("fine", "coarse"):
        raise ConfigError(
            f"label_type={label_type!r} is not 'fine' (100 classes) or 'coarse' "
            "(20 superclasses); pass one of them"
        )
    return f"{label_type}_labels".encode()


def cifar100_datasets(
    root: str | Path | None = None,
    *,
    label_type: str = "fine",
    val_size: int = 5000,
    augment: bool = False,
    seed: int = 0,
    data_seed: int = 0,
) -> Splits:
    """CIFAR-100 from local files: normalised ``(3, 32, 32)``, 100 fine or 20 coarse classes.

    Args:
        root: the ``cifar-100-python`` folder or its parent (default: the data root).
        label_type: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
        val_size: training images held out for validation (stratified, seeded by ``data_seed``).
        augment: random crop (padding 4) and horizontal flip, seeded by ``seed`` and the epoch.
        seed: the training seed (augmentation only).
        data_seed: the seed of the validation split.
    """
    return _cifar_datasets(
        CIFAR100,
        root,
        _label_key(label_type),
        val_size=val_size,
        augment=augment,
        seed=seed,
        data_seed=data_seed,
    )


class _CifarDataModule(SobreDataModule):
    """Shared CIFAR logic: the folder and class names are checked in ``__init__``."""

    spec: ClassVar[CifarSpec]

    def _open(
        self,
        root: str | Path | None,
        names_key: bytes,
        val_size: int,
        augment: bool,
        data_seed: int,
    ) -> None:
        """Check the folder, read the class names from the meta file, record the options."""
        self.folder = cifar_folder(self.spec, root)
        meta = read_pickle(self.folder / self.spec.meta_file)
        if names_key not in meta:
            raise DataNotFoundError(
                f"{self.folder / self.spec.meta_file} lacks {names_key!r}; "
                "replace it with a fresh copy from the official archive"
            )
        self.class_names = tuple(n.decode() for n in meta[names_key])
        self.num_classes = len(self.class_names)
        self.input_shape = (3, 32, 32)
        self.options = {
            "val_size": check_int("val_size", val_size, 1),
            "augment": bool(augment),
            "seed": self.seed,
            "data_seed": check_int("data_seed", data_seed, 0),
        }


@DATASETS.register("cifar10")
class CIFAR10DataModule(_CifarDataModule):
    """CIFAR-10 from local batches: ``(3, 32, 32)``, 10 classes, 45000/5000/10000 by default.

    Args:
        root: the ``cifar-10-batches-py`` folder or its parent (default: ``$SOBRE_DATA_DIR`` or
            ``~/.cache/sobre/data``). A missing folder fails here, before any training.
        val_size: training images held out for validation.
        augment: random crop (padding 4) and horizontal flip.
        data_seed: the seed of the validation split (independent of the training ``seed``).
        **common: :class:`~sobre.data.base.SobreDataModule` arguments.
    """

    name = "cifar10"
    spec = CIFAR10

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        val_size: int = 5000,
        augment: bool = False,
        data_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self._open(root, b"label_names", val_size, augment, data_seed)

    def build(self) -> Splits:
        """Read the batches and carve the validation split."""
        return cifar10_datasets(self.folder, **self.options)


@DATASETS.register("cifar100")
class CIFAR100DataModule(_CifarDataModule):
    """CIFAR-100 from local files: ``(3, 32, 32)``, 100 fine (or 20 coarse) classes.

    Args:
        root: the ``cifar-100-python`` folder or its parent (default: ``$SOBRE_DATA_DIR`` or
            ``~/.cache/sobre/data``). A missing folder fails here, before any training.
        label_type: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
        val_size: training images held out for validation.
        augment: random crop (padding 4) and horizontal flip.
        data_seed: the seed of the validation split (independent of the training ``seed``).
        **common: :class:`~sobre.data.base.SobreDataModule` arguments.
    """

    name = "cifar100"
    spec = CIFAR100

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        label_type: str = "fine",
        val_size: int = 5000,
        augment: bool = False,
        data_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.label_type = label_type
        self._open(
            root,
            _label_key(label_type).replace(b"labels", b"label_names"),
            val_size,
            augment,
            data_seed,
        )

    def build(self) -> Splits:
        """Read the files and carve the validation split."""
        return cifar100_datasets(self.folder, label_type=self.label_type, **self.options)
