"""SobreDataModule and the split helpers: loaders, exact-resume order under Lightning, splits."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.labels import dataset_labels
from sobre.data.base import (
    SobreDataModule,
    carve_sizes,
    check_int,
    datamodule_parameters,
    default_data_root,
    stratified_split,
)
from sobre.data.sampler import EpochSampler
from sobre.data.synthetic import SyntheticDataModule


def small(**kwargs: Any) -> SyntheticDataModule:
    return SyntheticDataModule(input_shape=(4,), num_classes=2, num_samples=40, **kwargs)


def first_features(loader: Any) -> list[float]:
    return [v for x, _ in loader for v in x[:, 0].tolist()]


def fake_trainer(epochs_done: int) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(processed=epochs_done))
    return SimpleNamespace(fit_loop=SimpleNamespace(epoch_progress=progress))


def test_stratified_split_sizes_cover_and_balance() -> None:
    labels = torch.arange(100) % 4
    chunks = stratified_split(labels, [60, 20, 20], seed=3)
    assert [len(c) for c in chunks] == [60, 20, 20]
    assert sorted(torch.cat(chunks).tolist()) == list(range(100))
    assert [torch.bincount(labels[c]).tolist() for c in chunks] == [[15] * 4, [5] * 4, [5] * 4]
    assert all(torch.equal(c, c.sort().values) for c in chunks)
    again = stratified_split(labels, [60, 20, 20], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(chunks, again, strict=True))
    assert not torch.equal(stratified_split(labels, [60, 20, 20], seed=4)[1], chunks[1])


def test_stratified_split_rounds_uneven_classes() -> None:
    labels = torch.tensor([0] * 70 + [1] * 30)
    val = stratified_split(labels, [90, 10], seed=0)[1]
    assert torch.bincount(labels[val]).tolist() == [7, 3]
    with pytest.raises(ConfigError, match="must sum to the 100 samples"):
        stratified_split(labels, [90, 9], seed=0)


def test_carve_sizes_and_its_errors() -> None:
    assert carve_sizes(1797, val_fraction=0.15, test_fraction=0.15) == [1257, 270, 270]
    with pytest.raises(ConfigError, match="too few"):
        carve_sizes(3, val_fraction=0.1)
    with pytest.raises(ConfigError, match="sum below 1"):
        carve_sizes(100, val_fraction=0.6, test_fraction=0.4)


def test_check_int_names_the_argument() -> None:
    assert check_int("seed", 3, 0) == 3
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
            check_int("seed", bad, 0)


def test_default_data_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOBRE_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("SOBRE_DATA_DIR")
    assert default_data_root() == Path.home() / ".cache" / "sobre" / "data"


def test_train_loader_follows_the_trainer_epoch() -> None:
    dm = small(batch_size=8, seed=4)
    x = dm.train_dataset.tensors[0][:, 0]
    for epoch in (0, 3):
        dm.trainer = fake_trainer(epoch) if epoch else None
        sampler = EpochSampler(dm.train_dataset, seed=4)
        sampler.set_epoch(epoch)
        assert first_features(dm.train_dataloader()) == x[list(sampler)].tolist()
    loader = dm.train_dataloader()
    assert loader.batch_size == 8
    assert isinstance(loader.sampler, EpochSampler)
    assert loader.sampler.epoch == 3


def test_val_and_test_loaders_keep_order_and_example_input_is_real() -> None:
    dm = small(batch_size=3)
    assert first_features(dm.val_dataloader()) == dm.val_dataset.tensors[0][:, 0].tolist()
    assert first_features(dm.test_dataloader()) == dm.test_dataset.tensors[0][:, 0].tolist()
    assert torch.equal(dm.example_input(3), dm.train_dataset.tensors[0][:3])
    with pytest.raises(ConfigError, match="example_input"):
        dm.example_input(0)


def test_datamodule_parameters_include_the_common_ones() -> None:
    params = datamodule_parameters(SyntheticDataModule)
    assert list(params)[:2] == ["input_shape", "num_classes"]
    assert {"batch_size", "num_workers", "seed", "pin_memory"} <= set(params)
    assert params["batch_size"].default == 128
    assert list(datamodule_parameters(SobreDataModule)) == [
        "batch_size",
        "num_workers",
        "seed",
        "pin_memory",
        "label_noise",
        "label_noise_seed",
        "classes",
    ]


def test_classes_keeps_a_relabelled_subset_in_every_split() -> None:
    dm = SyntheticDataModule(num_classes=4, classes=[3, 1], batch_size=8)
    dm.setup()
    assert dm.num_classes == 2
    assert dm.class_names == ("class_3", "class_1")
    full = SyntheticDataModule(num_classes=4, batch_size=8)
    full.setup()
    for kept, whole in zip(dm._built(), full._built(), strict=True):
        labels = dataset_labels(whole)
        assert len(kept) == int(((labels == 3) | (labels == 1)).sum())
        assert set(dataset_labels(kept).tolist()) <= {0, 1}
    x0, y0 = dm.train_dataset[0]
    first = int(
        (
            (dataset_labels(full.train_dataset) == 3) | (dataset_labels(full.train_dataset) == 1)
        ).nonzero()[0]
    )
    assert torch.equal(x0, full.train_dataset[first][0])
    assert int(y0) == (0 if int(full.train_dataset[first][1]) == 3 else 1)


@pytest.mark.parametrize(
    ("classes", "match"),
    [([2], "at least 2 distinct"), ([1, 1], "at least 2 distinct"), ([0, 7], "name a class >= 4")],
)
def test_bad_classes_are_refused_with_the_fix(classes: list[int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SyntheticDataModule(num_classes=4, classes=classes)


class Recorder(pl.LightningModule):
    """Records the first feature of every training sample, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.seen: dict[int, list[float]] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).extend(x[:, 0].tolist())
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(
    epochs: int, tmp_path: Path, ckpt: Path | None = None, num_workers: int = 0
) -> tuple[Recorder, pl.Trainer]:
    model = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    datamodule = small(batch_size=8, seed=2, num_workers=num_workers)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    return model, trainer


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_lightning_epochs_follow_the_sampler_and_resume_exactly(tmp_path: Path) -> None:
    full, _ = fit(3, tmp_path)
    x = small().train_dataset.tensors[0][:, 0]
    for epoch in range(3):
        sampler = EpochSampler(range(30), seed=2)
        sampler.set_epoch(epoch)
        assert full.seen[epoch] == x[list(sampler)].tolist()
    assert full.seen[0] != full.seen[1]

    _, first = fit(2, tmp_path)
    first.save_checkpoint(tmp_path / "two.ckpt")
    # a worker prefetches indices when Lightning creates the iterator, before it calls
    # set_epoch: only the datamodule reading the fit loop's epoch gets the order right
    resumed, _ = fit(3, tmp_path, ckpt=tmp_path / "two.ckpt", num_workers=1)
    assert resumed.seen == {2: full.seen[2]}


def test_label_noise_corrupts_training_labels_only_and_is_seeded():
    from sobre.core.labels import dataset_labels
    from sobre.data import create

    clean = create("synthetic", num_samples=200, num_classes=4)
    noisy = create("synthetic", num_samples=200, num_classes=4, label_noise=0.3)
    y_clean = dataset_labels(clean.train_dataset)
    y_noisy = torch.stack([noisy.train_dataset[i][1] for i in range(len(y_clean))])
    assert (y_clean != y_noisy).sum() == round(0.3 * len(y_clean))
    for split in ("val_dataset", "test_dataset"):
        assert torch.equal(
            dataset_labels(getattr(clean, split)), dataset_labels(getattr(noisy, split))
        )
    again = create("synthetic", num_samples=200, num_classes=4, label_noise=0.3, seed=5)
    assert torch.equal(again.train_dataset.labels, noisy.train_dataset.labels)  # not the seed
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="label_noise"):
            create("synthetic", label_noise=bad)
