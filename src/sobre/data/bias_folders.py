"""Folder loaders of the bias benchmarks (samples ``(x, y, b)``) and a seeded image corrupter.

Every dataset is read from a local folder in the layout its authors released; sobre never
downloads data, and a missing folder raises a :class:`~sobre.core.errors.DataNotFoundError` that
shows the expected layout and where to obtain the data. Each has a :class:`DatasetCard`
(:data:`CARDS`: layout, classes, bias attribute, groups, conflicting ratios, normalisation), a
factory returning ``(train, val, test)`` (:func:`lff_datasets` for the three in the LfF/DFA
layout, ``*_datasets`` for the others) and a registered datamodule:

- ``colored_mnist``: Colored-MNIST of LfF/DFA, ``cmnist/<pct>/{align,conflict,valid}``;
- ``corrupted_cifar10``: Corrupted-CIFAR-10 of LfF/DFA, the same tree under ``cifar10c/``;
- ``bffhq``: biased FFHQ (y = age, b = gender), ``bffhq/{0.5pct/{align,conflict},valid,test}``;
- ``biased_celeba``: CelebA with a target and a bias attribute (default Blond_Hair / Male);
- ``waterbirds``: Waterbirds (``metadata.csv``; b = place);
- ``imagenet9``: 9-Class ImageNet (ReBias super-classes; b = -1 unless a ``bias_labels`` CSV).

Validation is the dataset's own split (``valid/``, partition 1, split 1), carved from ``train/``
for 9-Class ImageNet, whose test set is ImageNet's ``val/``. No augmentation is applied.

:func:`corrupt` applies one of the 10 :data:`CORRUPTIONS` (noise, blur, pixelate, JPEG,
contrast, brightness, saturate), with the CIFAR-10-C severities of Hendrycks & Dietterich, to any
image tensor, deterministically for a seed.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.functional import gaussian_blur

from sobre.core.errors import ConfigError, DataNotFoundError
from sobre.core.registry import check_choice, suggest
from sobre.data.base import (
    DATASETS,
    SobreDataModule,
    Splits,
    carve_sizes,
    check_int,
    default_data_root,
    refuse_label_wrappers,
    stratified_split,
)

__all__ = [
    "BFFHQ",
    "BIASED_CELEBA",
    "CARDS",
    "COLORED_MNIST",
    "CORRUPTED_CIFAR10",
    "CORRUPTIONS",
    "CORRUPTION_SEVERITIES",
    "IMAGENET9",
    "IMAGENET9_CLASSES",
    "IMAGENET9_RANGES",
    "IMAGENET_A_OVERLAP",
    "LFF_CARDS",
    "UNKNOWN_BIAS",
    "WATERBIRDS",
    "BFFHQDataModule",
    "BiasFolderDataModule",
    "BiasImageDataset",
    "BiasedCelebADataModule",
    "ColoredMNISTDataModule",
    "CorruptedCIFAR10DataModule",
    "DatasetCard",
    "ImageNet9DataModule",
    "WaterbirdsDataModule",
    "biased_celeba_datasets",
    "corrupt",
    "imagenet9_datasets",
    "imagenet9_superclasses",
    "lff_datasets",
    "lff_folders",
    "parse_label_bias",
    "waterbirds_datasets",
]

UNKNOWN_BIAS = -1
"""The bias label of a sample whose bias attribute is not in the data."""
TestSplit = Literal["all", "conflicting", "aligned"]
_TEST_SPLITS = ("all", "conflicting", "aligned")
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
_CONFLICT_SPELLINGS = ("conflict", "conlict")  # DFA's README spells the folder "conlict"
_DFA_MEAN, _DFA_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_DFA_SOURCE = (
    "download the preprocessed {name} linked from the README of "
    "https://github.com/kakaoenterprise/Learning-Debiased-Disentangled and extract it"
)
_LFF_LAYOUT = """{folder}/
  <pct>/align/<y>/<id>_<y>_<b>.png       (<pct> in {ratios}; bias-aligned training images)
  <pct>/conflict/<y>/<id>_<y>_<b>.png    (bias-conflicting training images; 'conlict' accepted)
  {valid}/...<id>_<y>_<b>.png{valid_note}
  test/...<id>_<y>_<b>.png               (flat or in <y>/ sub-folders)"""


@dataclass(frozen=True)
class DatasetCard:
    """What a bias benchmark is and how it lies on disk (``dataclasses.asdict`` gives a dict).

    Attributes:
        title: the benchmark's name.
        folder: the folder name expected under the data root.
        layout: the on-disk layout, shown when the folder is missing.
        source: where and how to obtain the data (sobre never downloads it).
        class_names: target classes, index = ``y``.
        bias_names: bias attribute values, index = ``b`` (empty when unknown).
        groups: how the groups ``(y, b)`` and the aligned ones are defined.
        ratios: the conflicting-ratio folders (``pct``) of the release, if any.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        crop_ratio: ``None``: resize to ``image_size`` squared; else resize the short side to
            ``image_size * crop_ratio`` and centre-crop ``image_size``.
        notes: provenance and caveats ([V] verified in the authors' code, [I] inferred).
    """

    title: str
    folder: str
    layout: str
    source: str
    class_names: tuple[str, ...]
    bias_names: tuple[str, ...]
    groups: str
    ratios: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_ratio: float | None = None
    notes: str = ""


_LFF_RATIOS = ("0.5pct", "1pct", "2pct", "5pct")
_LFF_GROUPS = "(y, b); aligned when b == y (file names <id>_<y>_<b>)"
COLORED_MNIST = DatasetCard(
    title="Colored-MNIST",
    folder="cmnist",
    layout=_LFF_LAYOUT.format(
        folder="cmnist", ratios=", ".join(_LFF_RATIOS), valid="<pct>/valid", valid_note=""
    ),
    source=_DFA_SOURCE.format(name="Colored-MNIST (cmnist)"),
    class_names=tuple(str(d) for d in range(10)),
    bias_names=tuple(f"colour_{k}" for k in range(10)),
    groups=_LFF_GROUPS,
    ratios=_LFF_RATIOS,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    notes="[V] layout and file names: DFA data/util.py. Digits coloured with per-sample jitter; "
    "10 colours [I].",
)
CORRUPTED_CIFAR10 = DatasetCard(
    title="Corrupted-CIFAR-10",
    folder="cifar10c",
    layout=_LFF_LAYOUT.format(
        folder="cifar10c", ratios=", ".join(_LFF_RATIOS), valid="<pct>/valid", valid_note=""
    ),
    source=_DFA_SOURCE.format(name="Corrupted-CIFAR-10 (cifar10c)"),
    class_names=(
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    bias_names=tuple(f"corruption_{k}" for k in range(10)),
    groups=_LFF_GROUPS,
    ratios=_LFF_RATIOS,
    mean=_DFA_MEAN,
    std=_DFA_STD,
    notes="[V] layout: DFA data/util.py. Bias b = index of the CIFAR-10-C corruption paired with "
    "class b. LfF make_dataset.py [V]: type0 = Snow, Frost, Fog, Brightness, Contrast, Spatter, "
    "Elastic, JPEG, Pixelate, Saturate; type1 = Gaussian Noise, Shot Noise, Impulse Noise, "
    "Speckle Noise, Gaussian Blur, Defocus Blur, Glass Blur, Motion Blur, Zoom Blur, Original; "
    "severity 4 in LfF. Which list (and order) the DFA release uses is not recorded [I].",
)
BFFHQ = DatasetCard(
    title="bFFHQ",
    folder="bffhq",
    layout=_LFF_LAYOUT.format(
        folder="bffhq",
        ratios="0.5pct",
        valid="valid",
        valid_note="                  (here beside <pct>/, not inside it)",
    ),
    source=_DFA_SOURCE.format(name="bFFHQ (bffhq)"),
    class_names=("young", "old"),
    bias_names=("female", "male"),
    groups=_LFF_GROUPS,
    ratios=("0.5pct",),
    mean=_DFA_MEAN,
    std=_DFA_STD,
    notes="[V] layout and DFA's test protocol (conflicting test images only: test_split="
    "'conflicting'): DFA data/util.py. y = age, b = gender; aligned = young women, old men, so "
    "0 = young/female, 1 = old/male [I]. DFA resizes to 224 and uses CIFAR statistics [V].",
)
BIASED_CELEBA = DatasetCard(
    title="biased-CelebA",
    folder="celeba",
    layout="""celeba/
  img_align_celeba/000001.jpg ...
  list_attr_celeba.txt        (count, 40 attribute names, then '<file> <+1|-1 x 40>' rows)
  list_eval_partition.txt     ('<file> <0|1|2>': train / val / test)""",
    source="download 'Align&Cropped Images' and the 'Anno' and 'Eval' text files by hand from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
    class_names=("target absent", "target present"),
    bias_names=("bias absent", "bias present"),
    groups="(y, b) with y, b in {0, 1}; 4 groups; Blond_Hair is aligned with not-Male",
    ratios=(),
    mean=_IMAGENET_MEAN,
    std=_IMAGENET_STD,
    crop_ratio=1.0,
    notes="[I] target Blond_Hair (or Heavy_Makeup), bias Male; report group-mean (unbiased), "
    "conflicting and worst-group accuracy.",
)
WATERBIRDS = DatasetCard(
    title="Waterbirds",
    folder="waterbird_complete95_forest2water2",
    layout="""waterbird_complete95_forest2water2/
  metadata.csv   (columns img_id, img_filename, y, split, place, place_filename;
                  split 0 / 1 / 2 = train / val / test)
  <img_filename> (e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg)""",
    source="download waterbird_complete95_forest2water2.tar.gz as linked from "
    "https://github.com/kohpangwei/group_DRO and extract it",
    class_names=("landbird", "waterbird"),
    bias_names=("land", "water"),
    groups="(y, place); aligned when place == y; train 4,795 (95 % aligned), val 1,199, test 5,794",
    ratios=(),
    mean=_IMAGENET_MEAN,
    std=_IMAGENET_STD,
    crop_ratio=256 / 224,
    notes="[I] average accuracy is weighted by the training group proportions (anniesch/jtt#2); "
    "worst-group accuracy = min over the 4 groups.",
)
IMAGENET9_CLASSES = ("dog", "cat", "frog", "turtle", "bird", "primate", "fish", "crab", "insect")
"""The 9 super-classes of 9-Class ImageNet (ReBias), index = ``y``."""
IMAGENET9_RANGES: tuple[tuple[int, int], ...] = (
    (151, 254),
    (281, 285),
    (30, 32),
    (33, 37),
    (89, 97),
    (372, 378),
    (393, 397),
    (118, 121),
    (306, 310),
)
"""Inclusive ImageNet class-index range of each super-class, in :data:`IMAGENET9_CLASSES` order."""
IMAGENET_A_OVERLAP: dict[int, tuple[int, ...]] = {
    0: (151, 207, 234, 235, 254),
    4: (89, 90, 94, 96, 97),
    5: (372, 373, 374, 375, 378),
}
"""Super-classes (dog, bird, primate) restricted to their ImageNet-A classes by ReBias [V]."""
IMAGENET9 = DatasetCard(
    title="9-Class ImageNet",
    folder="imagenet",
    layout="""imagenet/
  train/<wnid>/*.JPEG   (all 1,000 ILSVRC-2012 wnid folders: class index = sorted position)
  val/<wnid>/*.JPEG     (the 50,000 validation images sorted into wnid folders)""",
    source="download ILSVRC-2012 by hand from https://image-net.org and sort val/ into wnid "
    "folders (e.g. with the common valprep.sh script)",
    class_names=IMAGENET9_CLASSES,
    bias_names=(),
    groups="b = texture cluster, not in the data: -1 unless a bias_labels CSV (path,b) is given",
    ratios=(),
    mean=_IMAGENET_MEAN,
    std=_IMAGENET_STD,
    crop_ratio=256 / 224,
    notes="[V] super-class ranges and ImageNet-A restriction: clovaai/rebias. Validation is "
    "carved from train/; test = val/. ReBias's texture clusters (unbiased accuracy) are not "
    "released with ImageNet.",
)
CARDS: dict[str, DatasetCard] = {
    "colored_mnist": COLORED_MNIST,
    "corrupted_cifar10": CORRUPTED_CIFAR10,
    "bffhq": BFFHQ,
    "biased_celeba": BIASED_CELEBA,
    "waterbirds": WATERBIRDS,
    "imagenet9": IMAGENET9,
}
"""Dataset name -> :class:`DatasetCard`."""


# -- datasets -------------------------------------------------------------------------------------


class BiasImageDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """Image files with a label ``y`` and a bias label ``b`` each; items are ``(x, y, b)``.

    Images are read as RGB and passed through ``transform``; ``y`` and ``b`` (int64, ``b = -1``
    when unknown) are kept as tensors, so group counts need no image reads.
    """

    def __init__(
        self, paths: Sequence[Path], y: Tensor, b: Tensor, transform: Callable[[Any], Tensor]
    ) -> None:
        self.paths = list(paths)
        self.y = y.long()
        self.b = b.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        with Image.open(self.paths[index]) as image:
            x = self.transform(image.convert("RGB"))
        return x, self.y[index], self.b[index]

    def select(self, mask: Tensor) -> BiasImageDataset:
        """The samples where the boolean ``mask`` is true."""
        keep = mask.nonzero().flatten().tolist()
        return BiasImageDataset(
            [self.paths[i] for i in keep], self.y[keep], self.b[keep], self.transform
        )


def _transform(card: DatasetCard, image_size: int) -> transforms.Compose:
    check_int("image_size", image_size, 1)
    if card.crop_ratio is None:
        steps: list[Any] = [transforms.Resize((image_size, image_size))]
    else:
        steps = [
            transforms.Resize(round(image_size * card.crop_ratio)),
            transforms.CenterCrop(image_size),
        ]
    return transforms.Compose(
        [*steps, transforms.ToTensor(), transforms.Normalize(card.mean, card.std)]
    )


def _not_found(card: DatasetCard, problem: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{card.title} not found: {problem}. Expected the layout\n{card.layout}\n"
        f"sobre never downloads data: {card.source}, then pass root=<folder holding "
        f"{card.folder}/> (or the {card.folder} folder itself, or set SOBRE_DATA_DIR)."
    )


def _dataset_folder(card: DatasetCard, root: str | Path | None, required: Sequence[str]) -> Path:
    """``root`` if it holds ``required``, else ``root/card.folder`` if it does, else an error."""
    base = Path(root).expanduser() if root is not None else default_data_root()
    for candidate in (base, base / card.folder):
        if all((candidate / name).exists() for name in required):
            return candidate
    expected = base / card.folder
    if not expected.is_dir():
        raise _not_found(card, f"{expected} does not exist")
    missing = [name for name in required if not (expected / name).exists()]
    raise _not_found(card, f"{expected} lacks {', '.join(missing)}")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)


def _check_labels(card: DatasetCard, where: Path, y: Tensor, b: Tensor) -> None:
    if len(y) == 0:
        raise _not_found(card, f"no images under {where}")
    n_bias = len(card.bias_names)
    if y.min() < 0 or y.max() >= len(card.class_names) or (n_bias and b.max() >= n_bias):
        raise DataNotFoundError(
            f"{where} holds labels y in {y.min().item()}..{y.max().item()}, b up to "
            f"{b.max().item()}, outside the {len(card.class_names)} classes / {n_bias} bias "
            f"values of {card.title}; check that root points at {card.title}"
        )


# -- LfF / DFA trees: Colored-MNIST, Corrupted-CIFAR-10, bFFHQ ------------------------------------


def parse_label_bias(path: Path) -> tuple[int, int]:
    """``(y, b)`` from a file name ending in ``_<y>_<b>.<ext>`` (the LfF/DFA convention)."""
    fields = Path(path).stem.split("_")
    if len(fields) < 2 or not (fields[-2].isdigit() and fields[-1].isdigit()):
        raise DataNotFoundError(
            f"cannot read label and bias from {path}: LfF/DFA file names end in "
            "_<y>_<b>.png (e.g. 123_4_7.png); check that root points at the released tree"
        )
    return int(fields[-2]), int(fields[-1])


def _pct_folder(pct: object) -> str:
    if isinstance(pct, str) and pct.endswith("pct"):
        return pct
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or pct <= 0:
        raise ConfigError(
            f"pct is the percentage of bias-conflicting training images, e.g. pct=1 or "
            f"pct='0.5pct'; got {pct!r}"
        )
    return f"{float(pct):g}pct"


def lff_folders(
    card: DatasetCard, root: str | Path | None, pct: float | str
) -> dict[str, list[Path]]:
    """The folders of each split of an LfF/DFA tree: ``{"train", "val", "test"} -> folders``.

    ``train`` is ``<pct>/align`` plus ``<pct>/conflict`` (or DFA's ``conlict``), ``val`` is
    ``<pct>/valid`` or else ``valid`` beside ``<pct>`` (bFFHQ), ``test`` is ``test``. ``root`` is
    the dataset folder or its parent (default: the data root).

    Raises:
        DataNotFoundError: a folder is missing; the message shows the layout and the source.
    """
    pct = _pct_folder(pct)
    folder = _dataset_folder(card, root, (pct, "test"))
    top = folder / pct
    conflict = [top / s for s in _CONFLICT_SPELLINGS if (top / s).is_dir()]
    if not (top / "align").is_dir() or not conflict:
        raise _not_found(card, f"{top} lacks align/ or conflict/ (also spelled conlict/)")
    valid = [v for v in (top / "valid", folder / "valid") if v.is_dir()]
    if not valid:
        raise _not_found(card, f"neither {top / 'valid'} nor {folder / 'valid'} exists")
    return {"train": [top / "align", *conflict], "val": valid[:1], "test": [folder / "test"]}


def _lff_split(card: DatasetCard, folders: Sequence[Path], image_size: int) -> BiasImageDataset:
    paths = [p for f in folders for p in _images(f)]
    labels = torch.tensor([parse_label_bias(p) for p in paths], dtype=torch.long).view(-1, 2)
    y, b = labels[:, 0], labels[:, 1]
    _check_labels(card, folders[0], y, b)
    return BiasImageDataset(paths, y, b, _transform(card, image_size))


LFF_CARDS: dict[str, DatasetCard] = {
    "colored_mnist": COLORED_MNIST,
    "corrupted_cifar10": CORRUPTED_CIFAR10,
    "bffhq": BFFHQ,
}
"""The benchmarks in the LfF/DFA layout, by dataset name."""
_LFF_DEFAULTS = {"colored_mnist": (1, 28), "corrupted_cifar10": (1, 32), "bffhq": (0.5, 64)}
"""Default ``(pct, image_size)`` per benchmark: the release's ratio and on-disk side (bFFHQ:
64, DFA resizes to 224)."""


def lff_datasets(
    name: str,
    root: str | Path | None = None,
    *,
    pct: float | str | None = None,
    image_size: int | None = None,
    test_split: TestSplit = "all",
) -> Splits:
    """An LfF/DFA-layout benchmark (``colored_mnist``, ``corrupted_cifar10``, ``bffhq``):
    ``(3, image_size, image_size)`` samples ``(x, y, b)``, labels from the file names.

    Args:
        name: the benchmark (see :data:`LFF_CARDS`).
        root: its folder (``cmnist``, ``cifar10c``, ``bffhq``) or the parent (default: the data
            root).
        pct: the conflicting-ratio folder: 0.5, 1, 2, 5 (or ``"0.5pct"`` ...); default 1
            (0.5 for bFFHQ, the only one released).
        image_size: the side images are resized to (default: on-disk 28, 32; 64 for bFFHQ).
        test_split: ``"all"`` test images, or only the bias-``"conflicting"`` (DFA's bFFHQ
            number) or ``"aligned"`` ones.
    """
    check_choice("name", name, LFF_CARDS, "lff_datasets")
    check_choice("test_split", test_split, _TEST_SPLITS)
    card, (default_pct, default_size) = LFF_CARDS[name], _LFF_DEFAULTS[name]
    folders = lff_folders(card, root, default_pct if pct is None else pct)
    size = default_size if image_size is None else image_size
    train, val, test = (_lff_split(card, folders[s], size) for s in ("train", "val", "test"))
    if test_split != "all":
        test = test.select((test.b == test.y) == (test_split == "aligned"))
    return train, val, test


# -- biased CelebA --------------------------------------------------------------------------------

_CELEBA_FILES = ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt")


def _celeba_attribute_names(folder: Path) -> list[str]:
    with open(folder / "list_attr_celeba.txt") as f:
        f.readline()
        return f.readline().split()


def _celeba_attribute(name: str, names: Sequence[str], role: str) -> str:
    """The official spelling of attribute ``name`` (case and underscores ignored)."""
    key = name.replace("_", "").lower()
    for official in names:
        if official.replace("_", "").lower() == key:
            return official
    raise ConfigError(
        f"unknown CelebA attribute {role}={name!r}{suggest(name, list(names))} Pass one of the "
        f"{len(names)} names of list_attr_celeba.txt: {', '.join(names)}"
    )


def biased_celeba_datasets(
    root: str | Path | None = None,
    *,
    target: str = "Blond_Hair",
    bias: str = "Male",
    image_size: int = 64,
) -> Splits:
    """CelebA with ``y`` = ``target`` and ``b`` = ``bias`` attribute (0/1); official partition.

    Args:
        root: the ``celeba`` folder or its parent (default: the data root).
        target: the target attribute, e.g. ``"Blond_Hair"`` or ``"HeavyMakeup"`` (case and
            underscores are ignored).
        bias: the bias attribute, e.g. ``"Male"``.
        image_size: the side of the centre crop the aligned faces are resized to.

    Raises:
        ConfigError: an unknown attribute (the message suggests the closest names).
    """
    folder = _dataset_folder(BIASED_CELEBA, root, _CELEBA_FILES)
    names = _celeba_attribute_names(folder)
    columns = [
        1 + names.index(_celeba_attribute(a, names, r))
        for a, r in ((target, "target"), (bias, "bias"))
    ]
    with open(folder / "list_eval_partition.txt") as f:
        partition = dict(line.split() for line in f if line.strip())
    files: list[list[Path]] = [[], [], []]
    labels: list[list[tuple[int, int]]] = [[], [], []]
    with open(folder / "list_attr_celeba.txt") as f:
        rows = f.read().splitlines()[2:]
    for row in rows:
        fields = row.split()
        if not fields:
            continue
        if fields[0] not in partition:
            raise _not_found(BIASED_CELEBA, f"{fields[0]} is not in list_eval_partition.txt")
        split = int(partition[fields[0]])
        files[split].append(folder / "img_align_celeba" / fields[0])
        labels[split].append((int(fields[columns[0]] == "1"), int(fields[columns[1]] == "1")))
    transform = _transform(BIASED_CELEBA, image_size)
    splits = []
    for paths, yb in zip(files, labels, strict=True):
        t = torch.tensor(yb, dtype=torch.long).view(-1, 2)
        _check_labels(BIASED_CELEBA, folder / "list_eval_partition.txt", t[:, 0], t[:, 1])
        splits.append(BiasImageDataset(paths, t[:, 0], t[:, 1], transform))
    return splits[0], splits[1], splits[2]


# -- Waterbirds -----------------------------------------------------------------------------------


def waterbirds_datasets(root: str | Path | None = None, *, image_size: int = 64) -> Splits:
    """Waterbirds: ``y`` = waterbird, ``b`` = water place; splits from ``metadata.csv``.

    Args:
        root: the ``waterbird_complete95_forest2water2`` folder or its parent.
        image_size: the side of the centre crop (short side resized to ``image_size * 8 / 7``).
    """
    folder = _dataset_folder(WATERBIRDS, root, ("metadata.csv",))
    with open(folder / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    needed = ("img_filename", "y", "split", "place")
    if not rows or any(key not in rows[0] for key in needed):
        raise _not_found(WATERBIRDS, f"{folder / 'metadata.csv'} lacks the columns {needed}")
    transform = _transform(WATERBIRDS, image_size)
    splits = []
    for split in range(3):
        chosen = [r for r in rows if int(r["split"]) == split]
        y = torch.tensor([int(r["y"]) for r in chosen], dtype=torch.long)
        b = torch.tensor([int(r["place"]) for r in chosen], dtype=torch.long)
        _check_labels(WATERBIRDS, folder / "metadata.csv", y, b)
        splits.append(
            BiasImageDataset([folder / r["img_filename"] for r in chosen], y, b, transform)
        )
    return splits[0], splits[1], splits[2]


# -- 9-Class ImageNet -----------------------------------------------------------------------------


def imagenet9_superclasses(restrict_to_imagenet_a: bool = True) -> dict[int, int]:
    """ImageNet class index -> 9-Class ImageNet super-class, as in ReBias.

    Args:
        restrict_to_imagenet_a: keep only the dog, bird and primate classes that ImageNet-A
            also has (:data:`IMAGENET_A_OVERLAP`), as ReBias does.
    """
    mapping = {}
    for y, (first, last) in enumerate(IMAGENET9_RANGES):
        keep = IMAGENET_A_OVERLAP.get(y) if restrict_to_imagenet_a else None
        mapping.update({i: y for i in range(first, last + 1) if keep is None or i in keep})
    return mapping


def _read_bias_labels(path: str | Path) -> dict[str, int]:
    with open(Path(path).expanduser(), newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0] or "b" not in rows[0]:
        raise ConfigError(
            f"bias_labels={str(path)!r} must be a CSV with the header 'path,b' (path relative to "
            "the imagenet folder, e.g. val/n01641577/ILSVRC2012_val_00000292.JPEG)"
        )
    return {r["path"]: int(r["b"]) for r in rows}


def imagenet9_datasets(
    root: str | Path | None = None,
    *,
    image_size: int = 64,
    restrict_to_imagenet_a: bool = True,
    bias_labels: str | Path | None = None,
    val_fraction: float = 0.1,
    data_seed: int = 0,
) -> Splits:
    """9-Class ImageNet: the ReBias super-classes of ImageNet; ``b = -1`` unless ``bias_labels``.

    Class indices are the positions of the 1,000 sorted wnid folders of ``train/`` (ImageNet's
    standard order). Validation is carved from ``train/`` (stratified, ``data_seed``); the test
    set is ``val/``.

    Args:
        root: the ``imagenet`` folder (holding ``train/`` and ``val/``) or its parent.
        image_size: the side of the centre crop (short side resized to ``image_size * 8 / 7``).
        restrict_to_imagenet_a: see :func:`imagenet9_superclasses`.
        bias_labels: an optional CSV ``path,b`` (paths relative to the ``imagenet`` folder, e.g.
            texture clusters); unlisted images keep ``b = -1``.
        val_fraction: share of the training images carved for validation.
        data_seed: the seed of the carved validation split.
    """
    folder = _dataset_folder(IMAGENET9, root, ("train", "val"))
    wnids = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    if len(wnids) != 1000:
        raise _not_found(
            IMAGENET9,
            f"{folder / 'train'} holds {len(wnids)} class folders, not the 1,000 ILSVRC-2012 "
            "wnid folders whose sorted order gives the class indices",
        )
    known = _read_bias_labels(bias_labels) if bias_labels is not None else {}
    chosen = {wnids[i]: y for i, y in imagenet9_superclasses(restrict_to_imagenet_a).items()}
    transform = _transform(IMAGENET9, image_size)
    sets = []
    for split in ("train", "val"):
        paths = [p for w in sorted(chosen) for p in _images(folder / split / w)]
        if not paths:
            raise _not_found(
                IMAGENET9, f"no images of the 9 super-classes in {folder / split}/<wnid>/"
            )
        y = torch.tensor([chosen[p.parent.name] for p in paths], dtype=torch.long)
        keys = [p.relative_to(folder).as_posix() for p in paths]
        b = torch.tensor([known.get(k, UNKNOWN_BIAS) for k in keys], dtype=torch.long)
        sets.append(BiasImageDataset(paths, y, b, transform))
    train, test = sets
    sizes = carve_sizes(len(train), val_fraction=val_fraction)
    keep, val = stratified_split(train.y, sizes, seed=check_int("data_seed", data_seed, 0))
    return Subset(train, keep.tolist()), Subset(train, val.tolist()), test


# -- datamodules ----------------------------------------------------------------------------------


class BiasFolderDataModule(SobreDataModule):
    """Shared by the folder benchmarks: ``(x, y, b)`` samples, names from the :class:`DatasetCard`.

    ``label_noise`` and ``classes`` are refused: :mod:`sobre.core.labels` serves ``(x, y)``
    pairs and would drop ``b``. Subclasses set ``card`` and implement ``build``.
    """

    card: ClassVar[DatasetCard]

    def __init__(self, *, image_size: int, **common: Any) -> None:
        refuse_label_wrappers(self.name, common)
        super().__init__(**common)
        self.image_size = check_int("image_size", image_size, 1)
        self.input_shape = (3, image_size, image_size)
        self.class_names = self.card.class_names
        self.num_classes = len(self.class_names)
        self.bias_names: tuple[str, ...] = self.card.bias_names


class _LfFDataModule(BiasFolderDataModule):
    """An LfF/DFA tree (:func:`lff_datasets`): the folders are checked in ``__init__``.

    Args:
        root: the benchmark's folder or its parent (default: ``$SOBRE_DATA_DIR`` or
            ``~/.cache/sobre/data``). A missing folder fails here, before any training.
        pct: the conflicting-ratio folder: 0.5, 1, 2 or 5 (percent); default: the release's.
        image_size: the side images are resized to (default: the on-disk side).
        test_split: ``"all"``, ``"conflicting"`` or ``"aligned"`` test images.
        **common: :class:`SobreDataModule` arguments (batch_size, num_workers, seed, pin_memory).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        pct: float | str | None = None,
        image_size: int | None = None,
        test_split: TestSplit = "all",
        **common: Any,
    ) -> None:
        default_pct, default_size = _LFF_DEFAULTS[self.name]
        super().__init__(image_size=default_size if image_size is None else image_size, **common)
        check_choice("test_split", test_split, _TEST_SPLITS)
        self.root, self.pct, self.test_split = root, default_pct if pct is None else pct, test_split
        lff_folders(self.card, root, self.pct)  # a missing tree fails now

    def build(self) -> Splits:
        """List the files of each split; the test split is the one ``test_split`` names."""
        return lff_datasets(
            self.name,
            self.root,
            pct=self.pct,
            image_size=self.image_size,
            test_split=self.test_split,
        )


@DATASETS.register("colored_mnist")
class ColoredMNISTDataModule(_LfFDataModule):
    """Colored-MNIST (LfF/DFA) from ``cmnist/<pct>/...``: 10 digits, ``b`` = colour; 28x28."""

    name = "colored_mnist"
    card = COLORED_MNIST


@DATASETS.register("corrupted_cifar10")
class CorruptedCIFAR10DataModule(_LfFDataModule):
    """Corrupted-CIFAR-10 (LfF/DFA) from ``cifar10c/<pct>/...``: ``b`` = corruption; 32x32."""

    name = "corrupted_cifar10"
    card = CORRUPTED_CIFAR10


@DATASETS.register("bffhq")
class BFFHQDataModule(_LfFDataModule):
    """bFFHQ (DFA): ``y`` = age (young/old), ``b`` = gender; pct 0.5 (the release), 64x64;
    ``test_split="conflicting"`` is DFA's reported test set."""

    name = "bffhq"
    card = BFFHQ


@DATASETS.register("biased_celeba")
class BiasedCelebADataModule(BiasFolderDataModule):
    """CelebA with a binary target and bias attribute (default Blond_Hair / Male).

    Args:
        root: the ``celeba`` folder or its parent (default: the data root).
        target: the target attribute (case and underscores ignored, e.g. ``"HeavyMakeup"``).
        bias: the bias attribute.
        image_size: the side of the centre crop.
        **common: :class:`SobreDataModule` arguments.

    Raises:
        ConfigError: an unknown attribute name (the closest names are suggested).
    """

    name = "biased_celeba"
    card = BIASED_CELEBA

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        target: str = "Blond_Hair",
        bias: str = "Male",
        image_size: int = 64,
        **common: Any,
    ) -> None:
        super().__init__(image_size=image_size, **common)
        self.folder = _dataset_folder(self.card, root, _CELEBA_FILES)
        names = _celeba_attribute_names(self.folder)
        self.target = _celeba_attribute(target, names, "target")
        self.bias = _celeba_attribute(bias, names, "bias")
        self.class_names = (f"not {self.target}", self.target)
        self.bias_names = (f"not {self.bias}", self.bias)

    def build(self) -> Splits:
        """Read the attribute and partition files."""
        return biased_celeba_datasets(
            self.folder, target=self.target, bias=self.bias, image_size=self.image_size
        )


@DATASETS.register("waterbirds")
class WaterbirdsDataModule(BiasFolderDataModule):
    """Waterbirds: landbird/waterbird, ``b`` = land/water place; splits of ``metadata.csv``.

    Args:
        root: the ``waterbird_complete95_forest2water2`` folder or its parent.
        image_size: the side of the centre crop.
        **common: :class:`SobreDataModule` arguments.
    """

    name = "waterbirds"
    card = WATERBIRDS

    def __init__(
        self, root: str | Path | None = None, *, image_size: int = 64, **common: Any
    ) -> None:
        super().__init__(image_size=image_size, **common)
        self.folder = _dataset_folder(self.card, root, ("metadata.csv",))

    def build(self) -> Splits:
        """Read ``metadata.csv``."""
        return waterbirds_datasets(self.folder, image_size=self.image_size)


@DATASETS.register("imagenet9")
class ImageNet9DataModule(BiasFolderDataModule):
    """9-Class ImageNet (ReBias super-classes); ``b = -1`` unless ``bias_labels`` is given.

    Args:
        root: the ``imagenet`` folder (``train/``, ``val/``) or its parent.
        image_size: the side of the centre crop.
        restrict_to_imagenet_a: dog, bird, primate limited to ImageNet-A's classes (ReBias).
        bias_labels: optional CSV ``path,b`` of bias labels (e.g. texture clusters).
        val_fraction: share of ``train/`` carved for validation (the test set is ``val/``).
        data_seed: the seed of the carved validation split.
        **common: :class:`SobreDataModule` arguments.
    """

    name = "imagenet9"
    card = IMAGENET9

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        image_size: int = 64,
        restrict_to_imagenet_a: bool = True,
        bias_labels: str | Path | None = None,
        val_fraction: float = 0.1,
        data_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(image_size=image_size, **common)
        self.folder = _dataset_folder(self.card, root, ("train", "val"))
        carve_sizes(1000, val_fraction=val_fraction)  # checks the fraction before any reading
        self.options = {
            "image_size": image_size,
            "restrict_to_imagenet_a": bool(restrict_to_imagenet_a),
            "bias_labels": bias_labels,
            "val_fraction": val_fraction,
            "data_seed": check_int("data_seed", data_seed, 0),
        }

    def build(self) -> Splits:
        """List the super-class images of ``train/`` and ``val/`` and carve validation."""
        return imagenet9_datasets(self.folder, **self.options)


# -- corruptions ----------------------------------------------------------------------------------

CORRUPTION_SEVERITIES: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "saturate": ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),
}
"""Parameter of each corruption at severities 1-5: the CIFAR values of Hendrycks & Dietterich's
``make_cifar_c.py`` (noise σ / photon count / amount, blur σ, pixelate scale, JPEG quality,
contrast factor, brightness shift of V, saturation ``S * a + c`` in HSV)."""
CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTION_SEVERITIES)
"""The 10 cheap corruptions of :func:`corrupt` (pure torch/torchvision)."""


def _gaussian_noise(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    return x + c * torch.randn(x.shape, generator=gen)


def _shot_noise(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    return torch.poisson(x * c, generator=gen) / c


def _impulse_noise(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    u = torch.rand(x.shape, generator=gen)
    return torch.where(u < c / 2, 1.0, torch.where(u < c, 0.0, x))


def _speckle_noise(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    return x + x * c * torch.randn(x.shape, generator=gen)


def _gaussian_blur(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    radius = min(int(4 * c + 0.5), min(x.shape[-2:]) - 1)  # skimage's truncate = 4
    return gaussian_blur(x, [2 * radius + 1] * 2, [c, c]) if radius > 0 else x


def _pixelate(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _jpeg_compression(x: Tensor, c: int, gen: torch.Generator) -> Tensor:
    raw = (x * 255).round().to(torch.uint8)
    decoded = decode_jpeg(encode_jpeg(list(raw), quality=c))
    return torch.stack(decoded).float() / 255


def _contrast(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    means = x.mean(dim=(-2, -1), keepdim=True)
    return (x - means) * c + means


def _brightness(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    """HSV value ``V = max_c x`` shifted by ``c`` with hue and saturation kept (black -> grey)."""
    v = x.amax(dim=1, keepdim=True)
    shifted = (v + c).clamp(max=1.0)
    return torch.where(v > 0, x * shifted / v.clamp_min(1e-12), shifted)


def _saturate(x: Tensor, c: tuple[float, float], gen: torch.Generator) -> Tensor:
    """HSV saturation ``S -> S * a + b`` with hue and value kept (grey pixels get hue 0, red)."""
    if x.shape[1] == 1:
        return x
    v = x.amax(dim=1, keepdim=True)
    delta = v - x.amin(dim=1, keepdim=True)
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), 0.0)
    new_s = (s * c[0] + c[1]).clamp(0.0, 1.0)
    red = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1)
    share = torch.where(delta > 0, (v - x) / delta.clamp_min(1e-12), red)  # x = V (1 - S share)
    return v - v * new_s * share


_CORRUPT: dict[str, Callable[[Tensor, Any, torch.Generator], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "contrast": _contrast,
    "brightness": _brightness,
    "saturate": _saturate,
}


def corrupt(images: Tensor, corruption: str, severity: int = 4, *, seed: int = 0) -> Tensor:
    """``images`` with one of the 10 :data:`CORRUPTIONS` at ``severity`` (1-5), clipped to range.

    Pure torch: noise is drawn from a generator seeded with ``seed`` (same seed, same output);
    the other corruptions are deterministic. ``saturate`` leaves one-channel images unchanged.

    Args:
        images: ``(C, H, W)`` or ``(N, C, H, W)`` with ``C`` in {1, 3}: floats in [0, 1] or
            uint8 in 0..255 (the output has the same dtype and shape).
        corruption: a name of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (strong); LfF's Corrupted-CIFAR-10 uses 4.
        seed: seed of the random corruptions.

    Raises:
        ConfigError: unknown corruption (closest names suggested), severity outside 1-5, or a
            tensor of the wrong shape.
    """
    name = check_choice("corruption", corruption, CORRUPTIONS)
    if isinstance(severity, bool) or severity not in range(1, 6):
        raise ConfigError(f"severity must be an integer in 1..5, got {severity!r}; e.g. 4")
    if images.dim() not in (3, 4) or images.shape[-3] not in (1, 3):
        raise ConfigError(
            f"corrupt needs images (C, H, W) or (N, C, H, W) with C = 1 or 3, got "
            f"{tuple(images.shape)}"
        )
    is_bytes = images.dtype == torch.uint8
    x = images.float() / 255 if is_bytes else images.float()
    batch = x if x.dim() == 4 else x.unsqueeze(0)
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
    parameter = CORRUPTION_SEVERITIES[name][severity - 1]
    out = _CORRUPT[name](batch, parameter, gen).clamp(0.0, 1.0).view_as(x)
    if is_bytes:
        return (out * 255).round().to(torch.uint8)
    return out.to(images.dtype)
