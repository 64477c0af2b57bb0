"""Biased-MNIST (background colour), the fairness benchmark, built from the embedded mnist5k.

The generator follows the construction shared by clovaai/rebias and the EIDOSLAB repositories
(EnD, FairKL, How I Met Your Bias): every digit gets one of 10 colours ``b`` (the bias label);
a fraction ``rho`` of each class ``y`` gets colour ``b = y`` (bias-aligned), the rest the other
colours (bias-conflicting). ``rho = 0.1`` makes the colours about uniform (the unbiased test),
``rho = 1`` makes ``b == y`` (the biased test). Samples are ``(x, y, b)`` triples.

With ``rest="uniform"`` the non-aligned samples draw from all 10 colours, ``y`` included, so the
colour equals the digit with probability ``rho`` and is otherwise uniform: the private-attribute
variant ("Private-Coloured MNIST-5k") of the privacy experiments, where ``rho = 0`` gives a
colour independent of the digit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice
from sobre.data.base import (
    DATASETS,
    SobreDataModule,
    Splits,
    check_int,
    refuse_label_wrappers,
    stratified_split,
)
from sobre.data.packaged import _DIGIT_NAMES, _mnist5k_arrays

__all__ = [
    "BIASED_MNIST_MEAN",
    "BIASED_MNIST_SPLIT",
    "BIASED_MNIST_STD",
    "FAIRKL_PALETTE",
    "PALETTE",
    "BiasedMNISTDataModule",
    "biased_mnist_datasets",
    "colour_mnist",
]

Colour = tuple[int, int, int]
PALETTE: tuple[Colour, ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (225, 225, 0),
    (225, 0, 225),
    (0, 255, 255),
    (255, 128, 0),
    (255, 0, 128),
    (128, 0, 255),
    (128, 128, 128),
)
"""The ReBias/EnD palette, index = bias label ``b`` (colour 9 is grey)."""
FAIRKL_PALETTE: tuple[Colour, ...] = (*PALETTE[:9], (50, 255, 128))
"""The FairKL repository's background-mode palette: colour 9 replaced by (50, 255, 128)."""
BIASED_MNIST_MEAN = BIASED_MNIST_STD = (0.5, 0.5, 0.5)
"""Per-channel normalisation: ``x = (pixel / 255 - 0.5) / 0.5``, in [-1, 1]."""
BIASED_MNIST_SPLIT = (350, 50, 100)
"""Train, val and test digits per class drawn from mnist5k (fixed, seed 0): 3,500 / 500 / 1,000."""

ColourTarget = Literal["background", "digit"]
Rest = Literal["others", "uniform"]
TestSplit = Literal["unbiased", "biased"]
_UNBIASED_RHO: dict[str, float] = {"others": 0.1, "uniform": 0.0}
_EPS = 1e-9
_VAL_SEED, _TEST_SEED = 1, 2  # fixed colourings of val and test, whatever the training seed


def check_rho(rho: object, name: str = "rho") -> float:
    """``rho`` as a float if it is a real number in [0, 1], else a :class:`ConfigError`."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
        raise ConfigError(
            f"{name} is the fraction of bias-aligned samples per class, in [0, 1]; got {rho!r}; "
            f"pass e.g. {name}=0.95"
        )
    return float(rho)


def check_palette(palette: object) -> Tensor:
    """The palette as a ``(10, 3)`` uint8 tensor, or a :class:`ConfigError` naming the fix."""
    fix = "pass 10 RGB triples of integers in 0..255, e.g. palette=sobre.data.biased.PALETTE"
    try:
        values = torch.as_tensor(palette)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(
            f"palette {palette!r} is not a table of numbers ({error}); {fix}"
        ) from None
    if values.shape != (10, 3):
        raise ConfigError(f"palette has shape {tuple(values.shape)}, not (10, 3); {fix}")
    if values.is_floating_point() and not torch.equal(values, values.round()):
        raise ConfigError(f"palette holds non-integer values; {fix}")
    if values.dtype == torch.bool or values.min() < 0 or values.max() > 255:
        raise ConfigError(
            f"palette values span {values.min().item()}..{values.max().item()}, outside 0..255; "
            f"{fix}"
        )
    return values.to(torch.uint8)


def check_colouring(
    n_confusing: object, n_conflicting_per_class: object, colour_target: object, rest: object
) -> None:
    """Raise a :class:`ConfigError` unless the :func:`colour_mnist` options are valid."""
    if check_int("n_confusing", n_confusing, 1) > 9:
        raise ConfigError(
            f"n_confusing is the number of colours other than y, at most 9; got {n_confusing}; "
            "pass e.g. n_confusing=9"
        )
    if n_conflicting_per_class is not None:
        check_int("n_conflicting_per_class", n_conflicting_per_class, 0)
    check_choice("colour_target", colour_target, ("background", "digit"))
    check_choice("rest", rest, ("others", "uniform"))
    if rest == "uniform" and n_confusing != 9:
        raise ConfigError(
            f"rest='uniform' spreads the non-aligned samples over all 10 colours, so "
            f"n_confusing={n_confusing} has no effect; leave n_confusing=9"
        )


def colour_mnist(
    images: Tensor,
    labels: Tensor,
    rho: float,
    *,
    palette: Sequence[Colour] | Tensor = PALETTE,
    n_confusing: int = 9,
    n_conflicting_per_class: int | None = None,
    colour_target: ColourTarget = "background",
    rest: Rest = "others",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Colour grey digits with a bias colour ``b``, aligned with ``y`` for a fraction ``rho``.

    Pixel rule: a pixel ``!= 0`` becomes white (255, 255, 255) and a zero pixel takes the colour
    ``palette[b]``; with ``colour_target="digit"`` the digit takes the colour and the background
    stays black. Assignment, per class ``y`` independently: shuffle the class's samples; the first
    ``n_aligned = floor(n_y * rho + 1e-9)`` get ``b = y``; the rest is cut in consecutive chunks
    of ``ceil(n_rest / n_confusing)`` and chunk ``k`` gets ``others[k]``, with ``others`` a
    shuffle of ``[(y + 1) % 10, ..., (y + n_confusing) % 10]``. The whole set is then shuffled.

    Args:
        images: grey digits, ``(N, H, W)`` or ``(N, 1, H, W)``, any dtype (only ``!= 0`` counts).
        labels: digit labels ``y`` in 0..9, shape ``(N,)``.
        rho: fraction of bias-aligned samples per class, in [0, 1].
        palette: 10 RGB triples in 0..255, index = bias label.
        n_confusing: how many other colours the conflicting samples of a class use (1..9).
        n_conflicting_per_class: conflicting samples per class, overriding the count ``rho``
            gives (with 350 digits per class, rho 0.995 and 0.997 both leave 2).
        colour_target: ``"background"`` (the benchmark) or ``"digit"``.
        rest: ``"others"`` (the benchmark: the non-aligned samples never get colour ``y``) or
            ``"uniform"`` (they are chunked over a shuffle of all 10 colours, ``y`` included:
            colour = digit with probability ``rho``, else uniform; needs ``n_confusing=9``).
        seed: seed of every shuffle; the same seed gives identical tensors.

    Returns:
        ``(x, y, b)``: uint8 images ``(N, 3, H, W)``, labels and bias labels (int64), shuffled.

    Raises:
        ConfigError: ``rho`` outside [0, 1], a bad palette, ``n_confusing`` outside 1..9, a
            conflicting count above a class size, labels outside 0..9, or unknown options.
    """
    rho = check_rho(rho)
    colours = check_palette(palette)
    check_colouring(n_confusing, n_conflicting_per_class, colour_target, rest)
    check_int("seed", seed, 0)
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or labels.shape != (len(images),):
        raise ConfigError(
            f"colour_mnist needs images (N, H, W) or (N, 1, H, W) and labels (N,); got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    y = labels.long()
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise ConfigError(f"labels must be digits 0..9, got {y.min().item()}..{y.max().item()}")

    gen = torch.Generator().manual_seed(seed)
    b = torch.empty_like(y)
    for c in y.unique().tolist():
        index = (y == c).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=gen)]
        if n_conflicting_per_class is None:
            n_aligned = math.floor(len(index) * rho + _EPS)
        elif n_conflicting_per_class > len(index):
            raise ConfigError(
                f"n_conflicting_per_class={n_conflicting_per_class} exceeds the "
                f"{len(index)} samples of class {c}; pass at most {len(index)}"
            )
        else:
            n_aligned = len(index) - n_conflicting_per_class
        shifts = range(1, n_confusing + 1) if rest == "others" else range(10)
        candidates = torch.tensor([(c + k) % 10 for k in shifts])
        others = candidates[torch.randperm(len(candidates), generator=gen)]
        b[index[:n_aligned]] = c
        conflicting = index[n_aligned:]
        if len(conflicting):
            chunks = conflicting.split(math.ceil(len(conflicting) / len(others)))
            for colour, chunk in zip(others, chunks, strict=False):
                b[chunk] = colour

    ink = (images != 0).unsqueeze(1)  # (N, 1, H, W)
    colour = colours[b][:, :, None, None]  # (N, 3, 1, 1)
    if colour_target == "background":
        x = torch.where(ink, torch.tensor(255, dtype=torch.uint8), colour)
    else:
        x = torch.where(ink, colour, torch.tensor(0, dtype=torch.uint8))
    order = torch.randperm(len(y), generator=gen)
    return x[order].contiguous(), y[order], b[order]


def _normalised(x: Tensor, y: Tensor, b: Tensor) -> TensorDataset:
    mean = torch.tensor(BIASED_MNIST_MEAN)[:, None, None]
    std = torch.tensor(BIASED_MNIST_STD)[:, None, None]
    return TensorDataset((x.float() / 255.0 - mean) / std, y, b)


def biased_mnist_datasets(
    *,
    rho: float = 0.95,
    val_rho: float | None = None,
    seed: int = 0,
    rest: Rest = "others",
    **colouring: Any,
) -> dict[str, TensorDataset]:
    """Biased-MNIST-5k: ``train``, ``val``, ``unbiased`` and ``biased`` test sets of ``(x, y, b)``.

    The mnist5k digits are split 350/50/100 per class (stratified, fixed with seed 0); training
    digits are coloured with ``rho`` (seed ``seed``), validation digits with ``val_rho``, the
    1,000 test digits twice: ``rho = 1`` (biased) and the unbiased ``rho`` (0.1, or 0 with
    ``rest="uniform"``: each (y, b) group then holds exactly 10 test digits). Val and test
    colourings are fixed whatever ``seed``. Inputs are normalised to [-1, 1], ``(3, 28, 28)``.

    Args:
        rho: fraction of bias-aligned training samples per class.
        val_rho: that of the validation set (default: the unbiased test's).
        seed: seed of the training colouring.
        rest: ``"others"`` or ``"uniform"``, see :func:`colour_mnist`.
        **colouring: ``palette``, ``n_confusing``, ``n_conflicting_per_class`` (training set
            only) and ``colour_target``, see :func:`colour_mnist`.
    """
    check_choice("rest", rest, tuple(_UNBIASED_RHO))
    unbiased = _UNBIASED_RHO[rest]
    val_rho = unbiased if val_rho is None else check_rho(val_rho, "val_rho")
    shared = {k: v for k, v in colouring.items() if k != "n_conflicting_per_class"}
    images, labels = _mnist5k_arrays()
    sizes = [n * 10 for n in BIASED_MNIST_SPLIT]
    train, val, test = stratified_split(labels, sizes, seed=0)
    x, y = images[train], labels[train]
    return {
        "train": _normalised(*colour_mnist(x, y, rho, rest=rest, seed=seed, **colouring)),
        "val": _normalised(
            *colour_mnist(images[val], labels[val], val_rho, rest=rest, seed=_VAL_SEED, **shared)
        ),
        **{
            name: _normalised(
                *colour_mnist(
                    images[test], labels[test], test_rho, rest=rest, seed=_TEST_SEED, **shared
                )
            )
            for name, test_rho in (("unbiased", unbiased), ("biased", 1.0))
        },
    }


@DATASETS.register("biased_mnist")
class BiasedMNISTDataModule(SobreDataModule):
    """Biased-MNIST-5k (background colour): ``(3, 28, 28)`` in [-1, 1], samples ``(x, y, b)``.

    Train 3,500 digits coloured with ``rho``, val 500 (disjoint digits, ``val_rho``), and two
    test sets on the same 1,000 digits: ``unbiased`` (rho 0.1; 0 with ``rest="uniform"``) and
    ``biased`` (rho 1, ``b == y``). :attr:`test_dataset` (and ``test_dataloader``) serve the one
    ``test_split`` names; :attr:`unbiased_test_dataset` and :attr:`biased_test_dataset` give
    both. The training colouring follows ``seed`` (or ``data_seed``); val and test are fixed.

    ``label_noise`` and ``classes`` are refused: :mod:`sobre.core.labels` serves ``(x, y)``
    pairs and would drop ``b``.

    Args:
        rho: fraction of bias-aligned training digits per class; 0.95 (18 conflicting digits
            per class) is the CPU calibration, the papers use 0.99-0.999 on the full MNIST.
        n_conflicting_per_class: exact conflicting training digits per class (overrides ``rho``).
        n_confusing: colours other than ``y`` the conflicting digits use (1..9).
        palette: 10 RGB triples (default :data:`PALETTE`, grey colour 9).
        colour_target: ``"background"`` or ``"digit"``.
        rest: ``"others"`` (the benchmark) or ``"uniform"`` (the private-attribute variant).
        val_rho: rho of the validation set (default: the unbiased test's).
        test_split: ``"unbiased"`` or ``"biased"``, the set :attr:`test_dataset` returns.
        data_seed: seed of the training colouring (default: ``seed``).
        **common: :class:`SobreDataModule` arguments (batch_size, num_workers, seed, pin_memory).
    """

    name = "biased_mnist"

    def __init__(
        self,
        *,
        rho: float = 0.95,
        n_conflicting_per_class: int | None = None,
        n_confusing: int = 9,
        palette: Sequence[Colour] = PALETTE,
        colour_target: ColourTarget = "background",
        rest: Rest = "others",
        val_rho: float | None = None,
        test_split: TestSplit = "unbiased",
        data_seed: int | None = None,
        **common: Any,
    ) -> None:
        refuse_label_wrappers(self.name, common)
        super().__init__(**common)
        check_rho(rho)
        check_palette(palette)
        if val_rho is not None:
            check_rho(val_rho, "val_rho")
        check_colouring(n_confusing, n_conflicting_per_class, colour_target, rest)
        check_choice("test_split", test_split, ("unbiased", "biased"))
        self.test_split = test_split
        self.options: dict[str, Any] = {
            "rho": rho,
            "val_rho": val_rho,
            "seed": self.seed if data_seed is None else check_int("data_seed", data_seed, 0),
            "rest": rest,
            "palette": palette,
            "n_confusing": n_confusing,
            "n_conflicting_per_class": n_conflicting_per_class,
            "colour_target": colour_target,
        }
        self._tests: dict[str, TensorDataset] = {}
        self.num_classes = 10
        self.input_shape = (3, 28, 28)
        self.class_names = _DIGIT_NAMES

    def build(self) -> Splits:
        """Colour the fixed split; the test split is the one ``test_split`` names."""
        sets = biased_mnist_datasets(**self.options)
        self._tests = {"unbiased": sets["unbiased"], "biased": sets["biased"]}
        return sets["train"], sets["val"], self._tests[self.test_split]

    @property
    def unbiased_test_dataset(self) -> Dataset:
        """The 1,000 test digits with uniform colours (rho 0.1, or 0 if ``rest="uniform"``)."""
        self._built()
        return self._tests["unbiased"]

    @property
    def biased_test_dataset(self) -> Dataset:
        """The same 1,000 test digits with ``b == y`` (rho 1)."""
        self._built()
        return self._tests["biased"]
