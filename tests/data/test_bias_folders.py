"""Bias benchmark folder loaders on tiny fake trees in the real layouts, and the corruptions."""

from __future__ import annotations

import colorsys
import csv
from itertools import combinations
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from sobre.core.errors import ConfigError, DataNotFoundError
from sobre.data import bias_folders as bf
from sobre.data import create
from sobre.data.base import DATASETS

N_CLASSES = 3  # classes written per LfF tree (bFFHQ: 2)


def png(path: Path, colour: tuple[int, int, int] = (0, 0, 0), size: tuple[int, int] = (6, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def colour_of(y: int, b: int) -> tuple[int, int, int]:
    return (40 * y, 0, 20 * b)


def write_lff(
    root: Path,
    folder: str,
    *,
    pct: str = "1pct",
    conflict: str = "conflict",
    valid_beside_pct: bool = False,
    valid_by_class: bool = False,
    n_classes: int = N_CLASSES,
) -> Path:
    """An LfF/DFA tree: per class 2 aligned + 1 conflicting train, 1 valid, 1 + 1 test images."""
    base = root / folder
    valid = base / "valid" if valid_beside_pct else base / pct / "valid"
    for y in range(n_classes):
        other = (y + 1) % n_classes
        for i in range(2):
            png(base / pct / "align" / str(y) / f"{i}{y}_{y}_{y}.png", colour_of(y, y))
        png(base / pct / conflict / str(y) / f"9_{y}_{other}.png", colour_of(y, other), (5, 7))
        png(
            valid / (str(y) if valid_by_class else "") / f"v{y}_{y}_{other}.png",
            colour_of(y, other),
        )
        png(base / "test" / str(y) / f"a{y}_{y}_{y}.png", colour_of(y, y))
        png(base / "test" / str(y) / f"c{y}_{y}_{other}.png", colour_of(y, other))
    return root


def triples(dataset: torch.utils.data.Dataset) -> list[tuple[int, int]]:
    return sorted((int(dataset[i][1]), int(dataset[i][2])) for i in range(len(dataset)))  # type: ignore[arg-type]


# -- LfF / DFA trees ------------------------------------------------------------------------------


def test_colored_mnist_yields_x_y_b_parsed_from_file_names(tmp_path: Path) -> None:
    dm = bf.ColoredMNISTDataModule(write_lff(tmp_path, "cmnist"), pct=1)
    assert (dm.name, dm.num_classes, dm.input_shape) == ("colored_mnist", 10, (3, 28, 28))
    assert len(dm.bias_names) == 10
    train, val, test = dm.train_dataset, dm.val_dataset, dm.test_dataset
    aligned = [(y, y) for y in range(N_CLASSES) for _ in range(2)]
    conflicting = [(y, (y + 1) % N_CLASSES) for y in range(N_CLASSES)]
    assert triples(train) == sorted(aligned + conflicting)
    assert triples(val) == sorted(conflicting)
    assert len(test) == 2 * N_CLASSES
    x, y, b = train[len(train) - 1]
    assert x.shape == (3, 28, 28)
    assert y.dtype == b.dtype == torch.long
    expected = (torch.tensor(colour_of(int(y), int(b)), dtype=torch.float) / 255 - 0.5) / 0.5
    assert torch.allclose(x[:, 3, 3], expected, atol=1e-6)


@pytest.mark.parametrize("spelling", ["conflict", "conlict"])
def test_both_conflict_spellings_are_read(tmp_path: Path, spelling: str) -> None:
    root = write_lff(tmp_path, "cifar10c", pct="0.5pct", conflict=spelling, valid_by_class=True)
    train, val, _ = bf.lff_datasets("corrupted_cifar10", root, pct=0.5, image_size=8)
    assert sum(int(b != y) for y, b in triples(train)) == N_CLASSES
    assert len(val) == N_CLASSES  # valid/<y>/*, as in the CIFAR-10-C release
    assert train[0][0].shape == (3, 8, 8)


def test_bffhq_valid_beside_pct_and_test_splits(tmp_path: Path) -> None:
    root = write_lff(tmp_path, "bffhq", pct="0.5pct", valid_beside_pct=True, n_classes=2)
    dm = bf.BFFHQDataModule(root / "bffhq", test_split="conflicting", image_size=16)
    assert (dm.num_classes, dm.class_names, dm.bias_names) == (
        2,
        ("young", "old"),
        ("female", "male"),
    )
    assert len(dm.val_dataset) == 2
    assert all(y != b for y, b in triples(dm.test_dataset))
    _, _, aligned = bf.lff_datasets("bffhq", root, test_split="aligned", image_size=16)
    assert all(y == b for y, b in triples(aligned))
    assert len(aligned) == 2


def test_missing_tree_shows_layout_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        bf.ColoredMNISTDataModule(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cmnist") in message
    assert "<pct>/align/<y>/<id>_<y>_<b>.png" in message
    assert "conlict" in message
    assert "Learning-Debiased-Disentangled" in message
    assert "root=" in message


def test_missing_ratio_folder_and_bad_pct(tmp_path: Path) -> None:
    root = write_lff(tmp_path, "cmnist", pct="1pct")
    with pytest.raises(DataNotFoundError, match="lacks 5pct"):
        bf.lff_datasets("colored_mnist", root, pct=5)
    with pytest.raises(ConfigError, match="pct=1"):
        bf.lff_datasets("colored_mnist", root, pct=-1)


def test_bad_file_name_is_reported(tmp_path: Path) -> None:
    root = write_lff(tmp_path, "cmnist")
    png(root / "cmnist" / "1pct" / "align" / "0" / "noisy.png")
    with pytest.raises(DataNotFoundError, match="_<y>_<b>"):
        bf.lff_datasets("colored_mnist", root)


@given(st.text("ab-c0", max_size=6), st.integers(0, 99), st.integers(0, 99))
def test_label_and_bias_are_the_last_two_fields(prefix: str, y: int, b: int) -> None:
    assert bf.parse_label_bias(Path(f"x/{prefix}_{y}_{b}.png")) == (y, b)


def test_label_noise_and_classes_are_refused(tmp_path: Path) -> None:
    root = write_lff(tmp_path, "cmnist")
    for key, value in (("label_noise", 0.1), ("classes", [0, 1])):
        with pytest.raises(ConfigError, match=f"remove {key}"):
            bf.ColoredMNISTDataModule(root, **{key: value})


def test_registered_and_batched_through_create(tmp_path: Path) -> None:
    assert set(bf.CARDS) <= set(DATASETS.names())
    dm = create("corrupted_cifar10", root=write_lff(tmp_path, "cifar10c"), batch_size=4)
    x, y, b = next(iter(dm.train_dataloader()))
    assert (x.shape, y.shape, b.shape) == ((4, 3, 32, 32), (4,), (4,))


# -- CelebA, Waterbirds, 9-Class ImageNet ---------------------------------------------------------

CELEBA_ATTRIBUTES = ("5_o_Clock_Shadow", "Blond_Hair", "Heavy_Makeup", "Male")
CELEBA_ROWS = (  # file, partition, attributes (+1 / -1)
    ("000001.jpg", 0, (-1, 1, 1, -1)),
    ("000002.jpg", 0, (1, -1, -1, 1)),
    ("000003.jpg", 0, (-1, 1, -1, 1)),
    ("000004.jpg", 1, (-1, -1, 1, -1)),
    ("000005.jpg", 2, (1, 1, 1, 1)),
    ("000006.jpg", 2, (-1, -1, -1, -1)),
)


def write_celeba(root: Path) -> Path:
    folder = root / "celeba"
    for name, _, _ in CELEBA_ROWS:
        png(folder / "img_align_celeba" / name, size=(9, 11))
    lines = [str(len(CELEBA_ROWS)), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f"{n} " + " ".join(f"{a:2d}" for a in attrs) for n, _, attrs in CELEBA_ROWS]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p, _ in CELEBA_ROWS)
    )
    return root


def test_celeba_target_and_bias_attributes(tmp_path: Path) -> None:
    dm = bf.BiasedCelebADataModule(write_celeba(tmp_path), image_size=8)
    assert dm.class_names == ("not Blond_Hair", "Blond_Hair")
    assert triples(dm.train_dataset) == [(0, 1), (1, 0), (1, 1)]
    assert triples(dm.val_dataset) == [(0, 0)]
    assert triples(dm.test_dataset) == [(0, 0), (1, 1)]
    assert dm.train_dataset[0][0].shape == (3, 8, 8)
    train, _, _ = bf.biased_celeba_datasets(tmp_path, target="HeavyMakeup", bias="5_o_clock_shadow")
    assert triples(train) == [(0, 0), (0, 1), (1, 0)]


def test_celeba_unknown_attribute_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'Blond_Hair'"):
        bf.BiasedCelebADataModule(write_celeba(tmp_path), target="Blond_Hiar")


def test_waterbirds_splits_and_place_bias(tmp_path: Path) -> None:
    folder = tmp_path / bf.WATERBIRDS.folder
    rows = [(i, f"00{i % 2}.Bird/b_{i}.jpg", i % 2, i % 3, (i // 2) % 2) for i in range(9)]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for i, name, y, split, place in rows:
            png(folder / name, size=(10, 8))
            writer.writerow([i, name, y, split, place, f"/p/{i}.jpg"])
    dm = bf.WaterbirdsDataModule(tmp_path, image_size=8)
    assert dm.class_names == ("landbird", "waterbird")
    for split, dataset in enumerate((dm.train_dataset, dm.val_dataset, dm.test_dataset)):
        assert triples(dataset) == sorted((y, p) for _, _, y, s, p in rows if s == split)
    assert dm.test_dataset[0][0].shape == (3, 8, 8)


def write_imagenet(root: Path) -> Path:
    """1,000 wnid folders (sorted = index); images in frog 30, bird 89, dogs 151/152, 500."""
    folder = root / "imagenet"
    for i in range(1000):
        (folder / "train" / f"n{i:08d}").mkdir(parents=True)
    for i in (30, 89, 151, 152, 500):
        for k in range(4):
            png(folder / "train" / f"n{i:08d}" / f"t{k}.JPEG", size=(12, 9))
        png(folder / "val" / f"n{i:08d}" / "v.JPEG", size=(12, 9))
    return root


def test_imagenet9_superclasses_from_sorted_wnids(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    csv_path = tmp_path / "bias.csv"
    csv_path.write_text(f"path,b\nval/n{30:08d}/v.JPEG,2\n")
    dm = bf.ImageNet9DataModule(root, image_size=8, val_fraction=0.25, bias_labels=csv_path)
    assert dm.class_names[:3] == ("dog", "cat", "frog")
    train, val, test = dm.train_dataset, dm.val_dataset, dm.test_dataset
    assert (len(train), len(val)) == (9, 3)  # 3 classes x 4 (152 is not an ImageNet-A dog)
    assert triples(test) == [(0, -1), (2, 2), (4, -1)]
    assert test[0][0].shape == (3, 8, 8)
    _, _, every_dog = bf.imagenet9_datasets(root, image_size=8, restrict_to_imagenet_a=False)
    assert [y for y, _ in triples(every_dog)] == [0, 0, 2, 4]


def test_imagenet9_needs_the_1000_wnid_folders(tmp_path: Path) -> None:
    (tmp_path / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    with pytest.raises(DataNotFoundError, match="holds 1 class folders"):
        bf.imagenet9_datasets(tmp_path)


def test_superclass_map_follows_rebias() -> None:
    full, restricted = bf.imagenet9_superclasses(False), bf.imagenet9_superclasses()
    assert len(full) == sum(last - first + 1 for first, last in bf.IMAGENET9_RANGES)
    assert sorted(i for i, y in restricted.items() if y == 0) == [151, 207, 234, 235, 254]
    assert sum(1 for y in restricted.values() if y == 1) == 5  # cats unrestricted


# -- corruptions ----------------------------------------------------------------------------------


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_corruptions_keep_shape_range_and_are_seeded(images: torch.Tensor) -> None:
    assert len(bf.CORRUPTIONS) == 10
    for name in bf.CORRUPTIONS:
        out = bf.corrupt(images, name, 4, seed=3)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert torch.equal(out, bf.corrupt(images, name, 4, seed=3))
        assert not torch.equal(out, images)
    noisy = bf.corrupt(images, "gaussian_noise", seed=1)
    assert not torch.equal(noisy, bf.corrupt(images, "gaussian_noise", seed=2))


def test_corruptions_differ_from_each_other(images: torch.Tensor) -> None:
    outs = {name: bf.corrupt(images, name, 5) for name in bf.CORRUPTIONS}
    for a, b in combinations(bf.CORRUPTIONS, 2):
        assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_corrupt_single_uint8_and_gray_images(images: torch.Tensor) -> None:
    raw = (images[0] * 255).to(torch.uint8)
    for name in bf.CORRUPTIONS:
        out = bf.corrupt(raw, name, 2)
        assert out.shape == raw.shape and out.dtype == torch.uint8
        gray = bf.corrupt(images[:, :1], name, 2)
        assert gray.shape == (2, 1, 16, 16)


def test_brightness_and_saturate_match_hsv(images: torch.Tensor) -> None:
    pixels = images[0, :, 0, :8].T.tolist()  # 8 RGB pixels
    for name, (shift_v, scale_s, shift_s) in (
        ("brightness", (0.3, 1.0, 0.0)),
        ("saturate", (0.0, 2.0, 0.1)),
    ):
        severity = 5 if name == "brightness" else 4
        out = bf.corrupt(images, name, severity)[0, :, 0, :8].T.tolist()
        for rgb, got in zip(pixels, out, strict=True):
            h, s, v = colorsys.rgb_to_hsv(*rgb)
            s, v = min(1.0, s * scale_s + shift_s), min(1.0, v + shift_v)
            assert got == pytest.approx(colorsys.hsv_to_rgb(h, s, v), abs=1e-5)


def test_corrupt_rejects_bad_input(images: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="did you mean 'pixelate'"):
        bf.corrupt(images, "pixelated")
    with pytest.raises(ConfigError, match="severity"):
        bf.corrupt(images, "contrast", 6)
    with pytest.raises(ConfigError, match="C = 1 or 3"):
        bf.corrupt(images[:, :2], "contrast")
