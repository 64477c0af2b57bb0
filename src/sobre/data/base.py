"""The base datamodule every sobre dataset extends, the dataset registry, seeded split helpers."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sobre.core.errors import ConfigError
from sobre.core.labels import inject_label_noise, keep_classes
from sobre.core.registry import Registry, suggest
from sobre.data.sampler import EpochSampler

__all__ = [
    "DATASETS",
    "SobreDataModule",
    "Splits",
    "carve_sizes",
    "check_fractions",
    "check_int",
    "datamodule_parameters",
    "default_data_root",
    "stratified_split",
]

log = logging.getLogger(__name__)

Sample = tuple[Tensor, Tensor]
Splits = tuple[Dataset[Sample], Dataset[Sample], Dataset[Sample]]
"""The (train, val, test) datasets of every factory; items are ``(input, label)`` tensors."""


def default_data_root() -> Path:
    """Where local datasets live: ``$SOBRE_DATA_DIR`` if set, else ``~/.cache/sobre/data``."""
    env = os.environ.get("SOBRE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sobre" / "data"


def refuse_label_wrappers(name: str, options: dict[str, Any]) -> None:
    """Refuse ``label_noise`` / ``classes`` for datasets of ``(x, y, b)`` samples.

    :mod:`sobre.core.labels` serves ``(x, y)`` pairs and would drop the bias label ``b``.
    """
    for key in ("label_noise", "classes"):
        if options.get(key):
            raise ConfigError(
                f"{name} does not support {key}={options[key]!r}: its samples are (x, y, b) "
                f"and sobre.core.labels serves (x, y), dropping the bias label b; remove {key}"
            )


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int ``>= minimum``, else a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{name} must be an integer >= {minimum}, got {value!r}; pass e.g. "
            f"{name}={max(minimum, 1)}"
        )
    return value


def check_fractions(**fractions: float) -> None:
    """Raise a :class:`ConfigError` unless each fraction is in (0, 1) and they sum below 1."""
    for key, fraction in fractions.items():
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not (0.0 < fraction < 1.0)
        ):
            raise ConfigError(
                f"{key} must be a fraction in (0, 1), got {fraction!r}; pass e.g. {key}=0.1"
            )
    if sum(fractions.values()) >= 1.0:
        raise ConfigError(
            f"{', '.join(f'{k}={v}' for k, v in fractions.items())} leave no "
            "training data; make them sum below 1"
        )


def carve_sizes(n: int, **fractions: float) -> list[int]:
    """Split sizes ``[rest, round(f1 * n), ...]`` for ``n`` items and the named fractions.

    Raises:
        ConfigError: a fraction is outside (0, 1), or a split would be empty.
    """
    check_fractions(**fractions)
    sizes = [round(fraction * n) for fraction in fractions.values()]
    if min(sizes) < 1 or n - sum(sizes) < 1:
        raise ConfigError(
            f"{n} samples are too few to carve {fractions} with every split "
            "non-empty; use more data or larger fractions"
        )
    return [n - sum(sizes), *sizes]


def stratified_split(labels: Tensor, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Seeded, class-balanced split of ``range(len(labels))`` into sorted index chunks of ``sizes``.

    The indices are shuffled, then ordered by their rank within their class divided by the class
    count, so every contiguous chunk holds each class in (rounded) proportion.

    Args:
        labels: integer class labels, shape ``(n,)``.
        sizes: chunk sizes, summing to ``n``.
        seed: seed of the shuffle; the same seed gives the same split.
    """
    n = len(labels)
    if sum(sizes) != n:
        raise ConfigError(f"split sizes {list(sizes)} must sum to the {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm].long()
    counts = torch.bincount(shuffled)
    by_class = torch.argsort(shuffled, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - starts[shuffled[by_class]]
    key = (rank.double() + 0.5) / counts[shuffled].double()
    ordered = perm[torch.argsort(key, stable=True)]
    return [chunk.sort().values for chunk in torch.split(ordered, list(sizes))]


class SobreDataModule(pl.LightningDataModule):
    """Base of every sobre datamodule: seeded splits, exact-resume shuffling, model-facing shapes.

    Subclasses set ``name`` (class attribute) and, in ``__init__``, ``num_classes``,
    ``input_shape`` and ``class_names``; they implement :meth:`build`. Datasets are built lazily
    by :meth:`setup` (or the first ``*_dataset`` access) and kept.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: the training seed: shuffling order and augmentation, not the split.
        pin_memory: pin batches in page-locked memory for faster GPU copies.
        label_noise: fraction in [0, 1) of *training* labels replaced by a random different
            class (a seeded random subset; validation and test keep their labels), as in the
            label-noise experiments of sparse double descent (DSD², #5, #21, #22).
        label_noise_seed: seed of the corrupted subset and of its labels (fixed by default, so
            runs with different training seeds see the same noisy dataset).
        classes: keep only these classes in every split, relabelled ``0 .. len(classes) - 1``
            in the given order (``num_classes`` and ``class_names`` follow), e.g. pretrain on
            digits ``[0, 1, 2, 3, 4]`` and fine-tune on ``[5, 6, 7, 8, 9]``.
    """

    name: str = ""
    input_shape: tuple[int, ...]

    def __init__(
        self,
        *,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        label_noise: float = 0.0,
        label_noise_seed: int = 0,
        classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.seed = check_int("seed", seed, 0)
        self.pin_memory = bool(pin_memory)
        if isinstance(label_noise, bool) or not 0.0 <= label_noise < 1.0:
            raise ConfigError(
                f"label_noise is the fraction of noisy training labels, in [0, 1); got "
                f"{label_noise!r}"
            )
        self.label_noise = float(label_noise)
        self.label_noise_seed = check_int("label_noise_seed", label_noise_seed, 0)
        self.classes = None if classes is None else [check_int("class", c, 0) for c in classes]
        if self.classes is not None and (
            len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)
        ):
            raise ConfigError(
                f"classes must list at least 2 distinct class indices, got {classes!r}; e.g. "
                "classes: [5, 6, 7, 8, 9]"
            )
        self._splits: Splits | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes the model sees (``len(classes)`` when a subset is kept)."""
        return len(self.classes) if self.classes is not None else self._num_classes

    @num_classes.setter
    def num_classes(self, value: int) -> None:
        if self.classes is not None and max(self.classes) >= value:
            raise ConfigError(
                f"classes {self.classes} name a class >= {value}, the number of classes of "
                f"{type(self).__name__}; use indices 0..{value - 1}"
            )
        self._num_classes = value

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the classes the model sees, in label order."""
        if self.classes is None:
            return self._class_names
        return tuple(self._class_names[c] for c in self.classes)

    @class_names.setter
    def class_names(self, value: Sequence[str]) -> None:
        self._class_names = tuple(value)

    @property
    def in_channels(self) -> int:
        """Channels of one sample (``input_shape[0]``)."""
        return self.input_shape[0]

    def build(self) -> Splits:
        """Build the (train, val, test) datasets; every subclass implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once (every stage shares them)."""
        if self._splits is None:
            train, val, test = self.build()
            if self.classes is not None:
                train, val, test = (keep_classes(d, self.classes) for d in (train, val, test))
            if self.label_noise:
                train = inject_label_noise(
                    train, self.label_noise, self.num_classes, self.label_noise_seed, shuffle=True
                )
                log.info("%s: %d training labels made noisy", self.name, len(train.noisy))
            self._splits = (train, val, test)
            log.info(
                "%s: %d train, %d val, %d test samples", self.name, *(len(s) for s in self._splits)
            )  # type: ignore[arg-type]

    def _built(self) -> Splits:
        self.setup()
        assert self._splits is not None
        return self._splits

    @property
    def train_dataset(self) -> Dataset[Sample]:
        """The training split."""
        return self._built()[0]

    def replace_train_dataset(self, dataset: Dataset[Sample]) -> None:
        """Train on ``dataset`` from now on (a stage's ``DatasetTransform``); val and test stay."""
        _, val, test = self._built()
        self._splits = (dataset, val, test)

    @property
    def val_dataset(self) -> Dataset[Sample]:
        """The validation split."""
        return self._built()[1]

    @property
    def test_dataset(self) -> Dataset[Sample]:
        """The test split (fixed, so test numbers compare across runs)."""
        return self._built()[2]

    def fit_epoch(self) -> int:
        """The epoch the attached trainer's fit loop is at (0 without a trainer).

        Reads ``fit_loop.epoch_progress.current.processed``: ``trainer.current_epoch`` is stale
        when Lightning requests the train dataloader, notably on resume.
        """
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_progress.current.processed)

    def train_dataloader(self) -> DataLoader[Sample]:
        """Batches of the training split in the order of (seed, current epoch)."""
        sampler = EpochSampler(self.train_dataset, seed=self.seed)  # type: ignore[arg-type]
        sampler.set_epoch(self.fit_epoch())
        return self._loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader[Sample]:
        """Batches of the validation split, in order."""
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader[Sample]:
        """Batches of the test split, in order."""
        return self._loader(self.test_dataset)

    def _loader(self, dataset: Dataset[Sample], sampler: EpochSampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def example_input(self, n: int = 2) -> Tensor:
        """The first ``n`` real training inputs, stacked: shape ``(n, *input_shape)``."""
        size = len(self.train_dataset)  # type: ignore[arg-type]
        if not 1 <= n <= size:
            raise ConfigError(f"example_input(n={n}) needs 1 <= n <= {size} (the train size)")
        return torch.stack([self.train_dataset[i][0] for i in range(n)])


DATASETS: Registry[type[SobreDataModule]] = Registry("dataset")
"""Dataset name -> :class:`SobreDataModule` subclass."""


def check_keywords(
    what: str, params: Mapping[str, inspect.Parameter], given: Iterable[str], example: str
) -> None:
    """Refuse keywords ``params`` lacks (with the closest valid one) and required ones not given.

    Args:
        what: the thing built, e.g. ``"dataset 'cifar10'"``.
        params: its keyword parameters.
        given: the keywords passed.
        example: how to pass a missing one, with ``{key}`` for its name.
    """
    given = list(given)
    for key in given:
        if key not in params:
            raise ConfigError(
                f"unknown parameter {key!r} for {what}{suggest(key, list(params))} "
                f"Valid parameters: {', '.join(params)}."
            )
    missing = [k for k, p in params.items() if p.default is p.empty and k not in given]
    if missing:
        raise ConfigError(
            f"{what} needs {', '.join(missing)}; pass e.g. {example.format(key=missing[0])}"
        )


def datamodule_parameters(cls: type[SobreDataModule]) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``cls`` accepts, its own first, then those it forwards to its bases."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        signature = inspect.signature(klass.__init__)  # type: ignore[misc]
        forwards = False
        for p in list(signature.parameters.values())[1:]:
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL:
                params.setdefault(p.name, p)
        if not forwards:
            break
    return params
