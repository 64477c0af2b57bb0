"""Out-of-distribution (OOD) and shifted evaluation sets, registered in :data:`OOD_SETS`.

OOD sets yield ``(x, -1)`` (:data:`UNKNOWN`: no class of the ID set); shifted sets keep the true
labels. Every set has the shape and normalisation of the in-distribution (ID) set it is paired
with. Offline sets, built from what installed packages ship (nothing is downloaded):

- ``photo_crops``: random 28x28 grayscale crops of scikit-image's sample photos (``astronaut``,
  ``camera``, ``chelsea``, ``coffee``, ``rocket``; also scikit-learn's ``china``, ``flower`` and
  matplotlib's ``grace_hopper``), rescaled so that the set's pixel mean and std equal those of
  the normalised mnist5k training split;
- ``inverted_mnist``: mnist5k images with inverted intensities (1 - x before normalisation);
- ``shifted_mnist``: mnist5k images blurred (Gaussian, σ = 1 px) plus Gaussian noise σ = 0.5 in
  [0, 1] intensity units, before normalisation; labels kept.

Local files (you download them by hand; a missing folder raises a ``DataNotFoundError`` saying
where to put them and where to get them):

- ``svhn``: SVHN cropped digits, ``<root>/svhn/{train,test,extra}_32x32.mat`` (OOD for CIFAR);
- ``cifar10c``: CIFAR-10-C, ``<root>/CIFAR-10-C/<corruption>.npy`` + ``labels.npy`` (shift).

:func:`ood_dataset` builds a set by name and checks its input shape against the ID datamodule.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from sobre.core.errors import ConfigError, DataNotFoundError
from sobre.core.registry import Registry, check_choice
from sobre.data.base import SobreDataModule, check_int, check_keywords, default_data_root
from sobre.data.cifar import CIFAR10, CIFAR100, CifarSpec, _ByteImages
from sobre.data.packaged import MNIST_MEAN, MNIST_STD, mnist5k_datasets

__all__ = [
    "CIFAR10C_CORRUPTIONS",
    "OOD_SETS",
    "OTHER_PHOTOS",
    "PHOTOS",
    "UNKNOWN",
    "cifar10c",
    "inverted_mnist",
    "ood_dataset",
    "photo_crops",
    "shifted_mnist",
    "svhn",
    "svhn_arrays",
]

UNKNOWN = -1
"""The label of every sample of an OOD set (no class of the ID set)."""

OOD_SETS: Registry[Callable[..., Dataset[tuple[Tensor, Tensor]]]] = Registry("OOD set")
"""OOD / shifted set name -> builder taking keyword arguments only."""

_MNIST_SPLITS = ("train", "val", "test")
PHOTOS: tuple[str, ...] = ("astronaut", "camera", "chelsea", "coffee", "rocket")  # scikit-image
OTHER_PHOTOS: tuple[str, ...] = ("china", "flower", "grace_hopper")  # scikit-learn, matplotlib
"""Default photos of ``photo_crops``: they ship with scikit-learn and matplotlib."""
_NORMS: dict[str, CifarSpec] = {"cifar10": CIFAR10, "cifar100": CIFAR100}

CIFAR10C_CORRUPTIONS: tuple[str, ...] = (
    "brightness",
    "contrast",
    "defocus_blur",
    "elastic_transform",
    "fog",
    "frost",
    "gaussian_blur",
    "gaussian_noise",
    "glass_blur",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "saturate",
    "shot_noise",
    "snow",
    "spatter",
    "speckle_noise",
    "zoom_blur",
)
"""The 19 corruption files of CIFAR-10-C (15 benchmark corruptions + 4 held-out ones)."""

_SVHN_SOURCE = 'the "Format 2: cropped digits" file {file} by hand from http://ufldl.stanford.edu/housenumbers/'
_CIFAR10C_SOURCE = (
    "CIFAR-10-C.tar by hand from https://zenodo.org/records/2535967 (Hendrycks & Dietterich, "
    "2019) and extract it"
)


def _local_folder(
    title: str, folder: str, files: Sequence[str], root: str | Path | None, source: str
) -> Path:
    """``root`` if it holds ``files``, else ``root/folder`` if it does, else a DataNotFoundError."""
    base = Path(root).expanduser() if root is not None else default_data_root()
    for candidate in (base, base / folder):
        if all((candidate / name).is_file() for name in files):
            return candidate
    expected = base / folder
    state = "does not exist" if not expected.is_dir() else "lacks some of them"
    raise DataNotFoundError(
        f"{title} not found: expected {', '.join(files)} in {expected} (it {state}) or in {base}. "
        f"sobre never downloads data: download {source} into {expected}, or pass "
        f"root=<folder holding the files> (or set SOBRE_DATA_DIR)."
    )


def _mnist5k_split(split: str) -> TensorDataset:
    dataset = mnist5k_datasets()[_MNIST_SPLITS.index(check_choice("split", split, _MNIST_SPLITS))]
    assert isinstance(dataset, TensorDataset)
    return dataset


def _unknown(n: int) -> Tensor:
    return torch.full((n,), UNKNOWN, dtype=torch.long)


# -- offline sets ---------------------------------------------------------------------------------


def _gray(image: np.ndarray) -> Tensor:
    """A photo as a 2-D float tensor in [0, 1]: luma 0.2125 R + 0.7154 G + 0.0721 B for colour."""
    array = np.asarray(image)
    x = torch.from_numpy(array.astype(np.float32))
    if array.dtype == np.uint8:
        x /= 255.0
    if x.ndim == 3:
        x = x[..., :3] @ torch.tensor([0.2125, 0.7154, 0.0721])
    return x


@functools.lru_cache(maxsize=16)
def _photo(name: str) -> Tensor:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return _gray(load_sample_image(f"{name}.jpg"))
    if name == "grace_hopper":
        import matplotlib
        from PIL import Image

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        with Image.open(path) as image:
            return _gray(np.asarray(image.convert("RGB")))
    skimage_data = importlib.import_module("skimage.data")  # the bundled images, no download
    return _gray(getattr(skimage_data, name)())


@functools.lru_cache(maxsize=1)
def _mnist5k_train_stats() -> tuple[float, float]:
    x = _mnist5k_split("train").tensors[0]
    return float(x.mean()), float(x.std())


@OOD_SETS.register("photo_crops")
def photo_crops(*, n: int = 1000, seed: int = 0, photos: Sequence[str] = PHOTOS) -> TensorDataset:
    """``n`` random 28x28 grayscale crops of sample photos, OOD for mnist5k: ``(1, 28, 28)``.

    Crop ``i`` takes a photo and a position drawn with ``seed``; the whole set is then mapped by
    one affine map so that its pixel mean and std equal those of the normalised mnist5k
    training split (intensity statistics are not a give-away). Labels are :data:`UNKNOWN`.

    Args:
        n: number of crops.
        seed: seed of the photo and position of every crop.
        photos: names from :data:`PHOTOS` (scikit-image's, the default) or
            :data:`OTHER_PHOTOS`.
    """
    n = check_int("n", n, 1)
    names = [check_choice("photo", p, (*PHOTOS, *OTHER_PHOTOS)) for p in photos]
    if not names:
        raise ConfigError(f"photos must name at least one photo, e.g. photos={PHOTOS}")
    images = [_photo(p) for p in names]
    side = 28
    gen = torch.Generator().manual_seed(seed)
    which = torch.randint(len(images), (n,), generator=gen).tolist()
    crops = torch.empty(n, 1, side, side)
    for i, k in enumerate(which):
        h, w = images[k].shape
        top = int(torch.randint(h - side + 1, (1,), generator=gen))
        left = int(torch.randint(w - side + 1, (1,), generator=gen))
        crops[i, 0] = images[k][top : top + side, left : left + side]
    mean, std = _mnist5k_train_stats()
    crops = (crops - crops.mean()) / crops.std() * std + mean
    return TensorDataset(crops, _unknown(n))


@OOD_SETS.register("inverted_mnist")
def inverted_mnist(*, split: str = "test") -> TensorDataset:
    """mnist5k images with inverted intensities (raw 1 - x, then normalised), OOD, ``(1, 28, 28)``.

    Args:
        split: the mnist5k split to invert (``"train"``, ``"val"`` or ``"test"``).
    """
    x = _mnist5k_split(split).tensors[0]
    raw = x * MNIST_STD + MNIST_MEAN
    return TensorDataset((1.0 - raw - MNIST_MEAN) / MNIST_STD, _unknown(len(x)))


@OOD_SETS.register("shifted_mnist")
def shifted_mnist(
    *, split: str = "test", seed: int = 0, noise_std: float = 0.5, blur_sigma: float = 1.0
) -> TensorDataset:
    """mnist5k blurred then noised (covariate shift, labels kept), ``(1, 28, 28)``.

    In raw [0, 1] intensities: x' = G_σb * x + σ·ε, ε ~ N(0, 1) drawn with ``seed`` (no
    clipping), G_σb a Gaussian kernel of size 2⌈3σb⌉ + 1; then the mnist5k normalisation.

    Args:
        split: the mnist5k split to shift.
        seed: seed of the noise.
        noise_std: σ of the additive noise in [0, 1] intensity units (0: no noise).
        blur_sigma: σb of the blur in pixels (0: no blur).
    """
    for key, value in (("noise_std", noise_std), ("blur_sigma", blur_sigma)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{key} must be a number >= 0, got {value!r}")
    from torchvision.transforms.functional import gaussian_blur

    dataset = _mnist5k_split(split)
    x, y = dataset.tensors
    raw = x * MNIST_STD + MNIST_MEAN
    if blur_sigma > 0:
        size = 2 * math.ceil(3 * blur_sigma) + 1
        raw = gaussian_blur(raw, [size, size], [float(blur_sigma)] * 2)
    noise = torch.randn(raw.shape, generator=torch.Generator().manual_seed(seed))
    return TensorDataset((raw + noise_std * noise - MNIST_MEAN) / MNIST_STD, y.clone())


# -- local files ----------------------------------------------------------------------------------


def _bad_file(path: Path, what: str, got: object) -> DataNotFoundError:
    return DataNotFoundError(
        f"{path} holds {got}, expected {what}; it is not a genuine copy: replace it with a fresh "
        "one from the official source"
    )


def svhn_arrays(root: str | Path | None = None, *, split: str = "test") -> tuple[Tensor, Tensor]:
    """SVHN cropped digits as uint8 images ``(N, 3, 32, 32)`` and digits ``(N,)`` (label 10 -> 0).

    Reads the official ``<split>_32x32.mat`` (MATLAB v5: ``X`` of shape (32, 32, 3, N), ``y``
    of shape (N, 1) with labels 1..10, 10 meaning the digit 0) with ``scipy.io.loadmat``, which
    unpickles nothing.

    Args:
        root: the folder holding the file, or its parent holding ``svhn/`` (default: the data
            root, ``$SOBRE_DATA_DIR`` or ``~/.cache/sobre/data``).
        split: ``"test"``, ``"train"`` or ``"extra"``.
    """
    file = f"{check_choice('split', split, ('test', 'train', 'extra'))}_32x32.mat"
    folder = _local_folder("SVHN", "svhn", (file,), root, _SVHN_SOURCE.format(file=file))
    from scipy.io import loadmat

    mat = loadmat(folder / file)
    images, labels = np.asarray(mat.get("X")), np.asarray(mat.get("y"))
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.dtype != np.uint8:
        raise _bad_file(
            folder / file, "X: uint8 (32, 32, 3, N)", f"X: {images.dtype} {images.shape}"
        )
    n = images.shape[3]
    if labels.size != n or not np.isin(labels, np.arange(1, 11)).all():
        raise _bad_file(folder / file, f"y: {n} labels in 1..10", f"y: {labels.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1)))
    return x, torch.from_numpy(labels.reshape(-1).astype(np.int64) % 10)


@OOD_SETS.register("svhn")
def svhn(
    *, root: str | Path | None = None, split: str = "test", stats: str = "cifar10"
) -> Dataset[tuple[Tensor, Tensor]]:
    """SVHN as an OOD set for CIFAR: ``(3, 32, 32)`` normalised like the ID set, labels -1.

    Args:
        root: see :func:`svhn_arrays`.
        split: ``"test"`` (26,032 images), ``"train"`` or ``"extra"``.
        stats: the ID set whose normalisation to apply, ``"cifar10"`` or ``"cifar100"``
            (:func:`ood_dataset` passes the ``like`` datamodule's name).
    """
    spec = _NORMS[check_choice("stats", stats, tuple(_NORMS))]
    images, _ = svhn_arrays(root, split=split)
    return _ByteImages(images, _unknown(len(images)), spec)


@OOD_SETS.register("cifar10c")
def cifar10c(
    *, root: str | Path | None = None, corruption: str, severity: int
) -> Dataset[tuple[Tensor, Tensor]]:
    """One corruption at one severity of CIFAR-10-C (shift set, labels kept), ``(3, 32, 32)``.

    The official ``<corruption>.npy`` stacks the 10,000 CIFAR-10 test images at severities 1..5
    (uint8, ``(50000, 32, 32, 3)``), ``labels.npy`` their labels; severity ``s`` is the ``s``-th
    fifth of the rows. Read with ``allow_pickle=False``; normalised with CIFAR-10's statistics.

    Args:
        root: the ``CIFAR-10-C`` folder or its parent (default: the data root).
        corruption: one of :data:`CIFAR10C_CORRUPTIONS`.
        severity: 1 (mild) .. 5 (strong).
    """
    corruption = check_choice("corruption", corruption, CIFAR10C_CORRUPTIONS)
    if isinstance(severity, bool) or severity not in range(1, 6):
        raise ConfigError(f"severity must be an integer in 1..5, got {severity!r}")
    files = (f"{corruption}.npy", "labels.npy")
    folder = _local_folder("CIFAR-10-C", "CIFAR-10-C", files, root, _CIFAR10C_SOURCE)
    images = np.load(folder / files[0], mmap_mode="r", allow_pickle=False)
    labels = np.load(folder / files[1], mmap_mode="r", allow_pickle=False)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.shape[0] % 5:
        raise _bad_file(folder / files[0], "uint8 (5·N, 32, 32, 3)", images.shape)
    if labels.shape != images.shape[:1]:
        raise _bad_file(folder / files[1], f"({images.shape[0]},) labels", labels.shape)
    per = images.shape[0] // 5
    rows = slice((severity - 1) * per, severity * per)
    x = torch.from_numpy(np.ascontiguousarray(images[rows].transpose(0, 3, 1, 2), dtype=np.uint8))
    return _ByteImages(x, torch.from_numpy(labels[rows].astype(np.int64)), CIFAR10)


def ood_dataset(
    name: str, *, like: SobreDataModule | None = None, **kwargs: Any
) -> Dataset[tuple[Tensor, Tensor]]:
    """The OOD or shifted set ``name`` built with ``kwargs``, checked against the ID datamodule.

    Args:
        name: a name of :data:`OOD_SETS`.
        like: the ID datamodule; the set's input shape must equal its ``input_shape``, and sets
            normalised like their ID set (``svhn``'s ``stats``) follow its name when it is
            ``cifar10`` or ``cifar100``.
        **kwargs: the builder's keyword arguments (``root``, ``n``, ``seed``, ``split``,
            ``corruption``, ``severity``, ...).

    Raises:
        UnknownNameError: unknown ``name`` (with the closest known names).
        ConfigError: an unknown or missing keyword, or a shape that differs from ``like``'s.
    """
    builder = OOD_SETS.get(name)
    params = inspect.signature(builder).parameters
    check_keywords(f"OOD set {name!r}", params, kwargs, "{key}=...")
    if like is not None and "stats" in params and "stats" not in kwargs and like.name in _NORMS:
        kwargs["stats"] = like.name
    dataset = builder(**kwargs)
    if like is not None:
        shape = tuple(dataset[0][0].shape)
        if shape != tuple(like.input_shape):
            raise ConfigError(
                f"OOD set {name!r} has inputs of shape {shape} but the ID dataset "
                f"{like.name!r} has input_shape {tuple(like.input_shape)}; pick an OOD set of "
                f"the ID set's shape (for (1, 28, 28): photo_crops, inverted_mnist, "
                f"shifted_mnist; for (3, 32, 32): svhn, cifar10c)"
            )
    return dataset
