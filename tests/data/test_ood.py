"""OOD and shifted sets: offline sets from mnist5k and sample photos; SVHN and CIFAR-10-C read from
tiny fake files in the official formats; the registry and the shape check of ``ood_dataset``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from sobre.core.errors import ConfigError, DataNotFoundError, UnknownNameError
from sobre.data.cifar import CIFAR10, CIFAR10DataModule
from sobre.data.ood import (
    OOD_SETS,
    OTHER_PHOTOS,
    PHOTOS,
    UNKNOWN,
    cifar10c,
    inverted_mnist,
    ood_dataset,
    photo_crops,
    shifted_mnist,
    svhn,
    svhn_arrays,
)
from sobre.data.packaged import MNIST_MEAN, MNIST_STD, MNIST5kDataModule, mnist5k_datasets

SVHN_N = 12
C10C_PER_SEVERITY = 4


def cifar10_norm(pixels: np.ndarray) -> torch.Tensor:
    """uint8 RGB values -> CIFAR-10-normalised floats."""
    rgb = torch.from_numpy(pixels.astype(np.float32)) / 255
    return (rgb - torch.tensor(CIFAR10.mean)) / torch.tensor(CIFAR10.std)


def write_svhn(folder: Path, n: int = SVHN_N, name: str = "test_32x32.mat") -> np.ndarray:
    """A fake SVHN ``.mat``: ``X`` (32, 32, 3, n) uint8, ``y`` (n, 1) in 1..10 (10: digit 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = (np.arange(32 * 32 * 3 * n).reshape(32, 32, 3, n) % 251).astype(np.uint8)
    savemat(folder / name, {"X": x, "y": (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)})
    return x


def write_cifar10c(folder: Path, corruption: str = "fog") -> np.ndarray:
    """A fake CIFAR-10-C folder: ``<corruption>.npy`` (5·4, 32, 32, 3) uint8 and ``labels.npy``."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 5 * C10C_PER_SEVERITY
    x = (np.arange(n)[:, None, None, None] * 10 + np.arange(3)).astype(np.uint8)
    x = np.broadcast_to(x, (n, 32, 32, 3)).copy()
    np.save(folder / f"{corruption}.npy", x)
    np.save(folder / "labels.npy", (np.arange(n) % 10).astype(np.uint8))
    return x


@pytest.fixture(scope="module")
def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    return mnist5k_datasets()[2].tensors  # type: ignore[attr-defined]


# -- offline sets -------------------------------------------------------------------------------


def test_photo_crops_shape_labels_statistics_and_seed() -> None:
    crops = photo_crops(n=200, seed=0)
    x, y = crops.tensors
    assert x.shape == (200, 1, 28, 28)
    assert (y == UNKNOWN).all()
    train = mnist5k_datasets()[0].tensors[0]  # type: ignore[attr-defined]
    assert abs(float(x.mean() - train.mean())) < 1e-4
    assert abs(float(x.std() - train.std())) < 1e-4
    assert torch.equal(x, photo_crops(n=200, seed=0).tensors[0])
    assert not torch.equal(x, photo_crops(n=200, seed=1).tensors[0])
    assert not torch.equal(x, photo_crops(n=200, seed=0, photos=("china",)).tensors[0])
    assert len({round(float(v), 4) for v in x.std(dim=(1, 2, 3))}) > 150  # distinct crops


def test_photo_crops_are_patches_of_the_photo() -> None:
    from sobre.data import ood

    x = photo_crops(n=20, seed=3, photos=("flower",)).tensors[0]
    crop = x[x.std(dim=(1, 2, 3)).argmax()][None]  # the most textured crop: (1, 1, 28, 28)
    photo = ood._photo("flower")[None, None]
    # normalised cross-correlation of the crop with every 28x28 window of the photo
    kernel = crop - crop.mean()
    dot = torch.nn.functional.conv2d(photo, kernel)
    ones = torch.ones_like(kernel)
    n = kernel.numel()
    local_sum = torch.nn.functional.conv2d(photo, ones)
    local_var = torch.nn.functional.conv2d(photo.square(), ones) - local_sum.square() / n
    ncc = dot / (local_var.clamp_min(1e-12).sqrt() * kernel.norm())
    assert float(ncc.max()) > 0.999  # an exact patch, up to the shared affine rescaling


def test_photo_crops_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="did you mean 'china'"):
        photo_crops(photos=("chinaa",))
    with pytest.raises(ConfigError, match="did you mean 'camera'"):
        photo_crops(photos=("camra",))
    with pytest.raises(ConfigError, match="n must be an integer >= 1"):
        photo_crops(n=0)
    with pytest.raises(ConfigError, match="at least one photo"):
        photo_crops(photos=())


def test_every_photo_loads_offline() -> None:
    from sobre.data import ood

    for name in (*PHOTOS, *OTHER_PHOTOS):
        photo = ood._photo(name)
        assert photo.ndim == 2 and min(photo.shape) >= 150
        assert float(photo.min()) >= 0.0 and float(photo.max()) <= 1.0


def test_inverted_mnist_inverts_raw_intensities(mnist_test) -> None:
    x, _ = mnist_test
    inv, y = inverted_mnist().tensors
    assert inv.shape == x.shape == (500, 1, 28, 28)
    assert (y == UNKNOWN).all()
    raw, raw_inv = x * MNIST_STD + MNIST_MEAN, inv * MNIST_STD + MNIST_MEAN
    assert torch.allclose(raw_inv, 1 - raw, atol=1e-5)
    assert len(inverted_mnist(split="val")) == 500
    with pytest.raises(ConfigError, match="did you mean 'test'"):
        inverted_mnist(split="tests")


def test_shifted_mnist_blurs_adds_seeded_noise_and_keeps_labels(mnist_test) -> None:
    x, labels = mnist_test
    shifted, y = shifted_mnist(seed=0).tensors
    assert shifted.shape == x.shape
    assert torch.equal(y, labels)
    assert torch.equal(shifted, shifted_mnist(seed=0).tensors[0])
    assert not torch.equal(shifted, shifted_mnist(seed=1).tensors[0])
    blurred = shifted_mnist(noise_std=0.0).tensors[0]
    noise = (shifted - blurred) * MNIST_STD  # back to raw units
    assert abs(float(noise.std()) - 0.5) < 0.01
    assert abs(float(noise.mean())) < 0.01
    # the blur keeps the total intensity (up to the reflected borders) and lowers the peaks
    raw, raw_blur = x * MNIST_STD + MNIST_MEAN, blurred * MNIST_STD + MNIST_MEAN
    assert torch.allclose(raw_blur.sum(dim=(2, 3)), raw.sum(dim=(2, 3)), rtol=0.02)
    assert (raw_blur.amax(dim=(2, 3)) < raw.amax(dim=(2, 3))).float().mean() > 0.9
    assert torch.allclose(shifted_mnist(noise_std=0.0, blur_sigma=0.0).tensors[0], x, atol=1e-6)
    with pytest.raises(ConfigError, match="noise_std must be a number >= 0"):
        shifted_mnist(noise_std=-1.0)


# -- local files --------------------------------------------------------------------------------


def test_svhn_reads_the_official_mat_layout(tmp_path: Path) -> None:
    pixels = write_svhn(tmp_path / "svhn")
    images, digits = svhn_arrays(tmp_path)
    assert images.shape == (SVHN_N, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert digits.tolist() == [(i + 1) % 10 for i in range(SVHN_N)]  # label 10 is the digit 0
    assert images[5, 2, 7, 9] == pixels[7, 9, 2, 5]
    dataset = svhn(root=tmp_path / "svhn")
    x, y = dataset[5]
    assert x.shape == (3, 32, 32)
    assert int(y) == UNKNOWN
    assert torch.allclose(x[:, 7, 9], cifar10_norm(pixels[7, 9, :, 5]))


def test_svhn_rejects_wrong_shapes_and_names_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        svhn(root=tmp_path)
    message = str(info.value)
    for part in (
        str(tmp_path / "svhn"),
        "test_32x32.mat",
        "ufldl.stanford.edu/housenumbers",
        "never downloads",
        "SOBRE_DATA_DIR",
    ):
        assert part in message
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": [[1, 2]]})
    with pytest.raises(DataNotFoundError, match=r"expected X: uint8 \(32, 32, 3, N\)"):
        svhn_arrays(tmp_path)
    with pytest.raises(ConfigError, match="'cifar10', 'cifar100'"):
        svhn(root=tmp_path, stats="imagenet")


def test_cifar10c_selects_corruption_and_severity(tmp_path: Path) -> None:
    pixels = write_cifar10c(tmp_path / "CIFAR-10-C")
    dataset = cifar10c(root=tmp_path, corruption="fog", severity=3)
    assert len(dataset) == C10C_PER_SEVERITY
    x, y = dataset[1]
    row = 2 * C10C_PER_SEVERITY + 1  # severity 3 is the third fifth of the rows
    assert x.shape == (3, 32, 32)
    assert int(y) == row % 10
    assert torch.allclose(x[:, 4, 4], cifar10_norm(pixels[row, 4, 4]))
    with pytest.raises(ConfigError, match="did you mean 'fog'"):
        cifar10c(root=tmp_path, corruption="fogg", severity=1)
    with pytest.raises(ConfigError, match=r"severity must be an integer in 1\.\.5"):
        cifar10c(root=tmp_path, corruption="fog", severity=6)
    with pytest.raises(
        DataNotFoundError, match=r"snow\.npy, labels\.npy.*zenodo\.org/records/2535967"
    ):
        cifar10c(root=tmp_path, corruption="snow", severity=1)
    np.save(tmp_path / "CIFAR-10-C" / "fog.npy", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(DataNotFoundError, match=r"holds \(7, 32, 32, 3\)"):
        cifar10c(root=tmp_path, corruption="fog", severity=1)


# -- registry and shape check -------------------------------------------------------------------


def test_registry_and_ood_dataset(tmp_path: Path, cifar10_root: Path) -> None:
    assert OOD_SETS.names() == sorted(
        ["photo_crops", "inverted_mnist", "shifted_mnist", "svhn", "cifar10c"]
    )
    mnist = MNIST5kDataModule()
    crops = ood_dataset("photo_crops", like=mnist, n=10, seed=2)
    assert torch.equal(crops.tensors[0], photo_crops(n=10, seed=2).tensors[0])  # type: ignore[attr-defined]
    with pytest.raises(UnknownNameError, match="did you mean 'svhn'"):
        ood_dataset("svnh")
    with pytest.raises(ConfigError, match=r"unknown parameter 'sead'.*did you mean 'seed'"):
        ood_dataset("photo_crops", sead=1)
    with pytest.raises(ConfigError, match="needs corruption, severity"):
        ood_dataset("cifar10c", root=tmp_path)
    write_svhn(cifar10_root / "svhn")
    with pytest.raises(ConfigError, match=r"\(3, 32, 32\).*'mnist5k'.*\(1, 28, 28\)"):
        ood_dataset("svhn", like=mnist, root=cifar10_root)
    cifar = CIFAR10DataModule(cifar10_root)
    with pytest.raises(ConfigError, match=r"\(1, 28, 28\).*'cifar10'.*\(3, 32, 32\)"):
        ood_dataset("inverted_mnist", like=cifar)
    x, y = ood_dataset("svhn", like=cifar, root=cifar10_root)[0]
    assert x.shape == cifar.input_shape
    assert int(y) == UNKNOWN
