"""BiasMetrics: a recipe on an (x, y, b) dataset logs the bias metrics per epoch and at test,
and the recipe's ``evaluate.monitor`` selects the best checkpoint by one of them."""

from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import sobre
from sobre.core.errors import ConfigError
from sobre.engine.recipes import normalize
from sobre.engine.routine import ClassificationRoutine
from sobre.engine.trainer import make_trainer
from sobre.fairness import BiasMetrics
from sobre.fairness.metrics import group_proportions


def _recipe() -> dict:
    return {
        "name": "bias_tiny",
        "data": {"name": "biased_mnist", "rho": 0.95, "batch_size": 256},
        "model": {"arch": "simple_conv_s"},
        "trainer": {
            "max_epochs": 2,
            "limit_train_batches": 3,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "sobre.fairness.BiasMetrics"}],
        },
        "evaluate": {"monitor": "val/unbiased", "measure": False, "report": False},
    }


def test_recipe_logs_bias_metrics_and_selects_by_them(runs_dir) -> None:
    result = sobre.fit(_recipe())
    m = result.metrics
    for key in ("test/unbiased", "test/worst_group", "test/aligned", "test/conflicting"):
        assert 0.0 <= m[key] <= 1.0
    assert 0.0 <= m["test/biased_acc"] <= 1.0 and 0.0 <= m["test/average"] <= 1.0
    groups = [k for k in m if k.startswith("test/group/")]
    assert len(groups) == 100  # the unbiased test holds every (y, b) pair
    assert m["test/unbiased"] == pytest.approx(sum(m[k] for k in groups) / 100)
    rows = list(csv.DictReader((result.run_dir / "logs" / "train" / "metrics.csv").open()))
    val = [float(r["val/unbiased"]) for r in rows if r.get("val/unbiased")]
    assert len(val) == 2
    best = json.loads((result.run_dir / "checkpoints" / "train" / "best.json").read_text())
    assert best["info"]["metrics"]["val/unbiased"] == pytest.approx(max(val), abs=1e-6)


def test_monitor_must_be_a_validation_metric() -> None:
    recipe = _recipe()
    recipe["evaluate"]["monitor"] = "test/unbiased"
    with pytest.raises(ConfigError, match=r"evaluate\.monitor"):
        normalize(recipe)


def test_pairs_are_refused_with_the_fix(tmp_path) -> None:
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    routine = ClassificationRoutine(arch="small_cnn", arch_kwargs={"width": 4}, num_classes=2)
    trainer = make_trainer(
        tmp_path, max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[BiasMetrics()]
    )
    with pytest.raises(ConfigError, match=r"\(x, y, b\) batches"):
        trainer.test(routine, dataloaders=loader, verbose=False)


def test_privacy_probe_attacks_the_trained_features(runs_dir) -> None:
    recipe = _recipe()
    recipe["data"].update(rest="uniform", rho=0.9)
    recipe["trainer"]["callbacks"].append(
        {"class_path": "sobre.fairness.PrivacyProbe", "init_args": {"epochs": 20}}
    )
    metrics = sobre.fit(recipe).metrics
    for kind in ("linear", "mlp"):
        assert 0.0 <= metrics[f"test/probe_{kind}"] <= 1.0
        assert metrics[f"test/probe_{kind}_mi"] >= 0.0


class _FolderLike(torch.utils.data.Dataset):
    """(x, y, b) samples with stored ``y`` / ``b`` tensors, as the bias folder datasets keep."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=gen)
        self.y = torch.randint(0, 2, (n,), generator=gen)
        self.b = torch.randint(0, 2, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i], self.b[i]


def _test_average(tmp_path, train: torch.utils.data.Dataset) -> dict[str, float]:
    torch.manual_seed(0)
    routine = ClassificationRoutine(arch="small_cnn", arch_kwargs={"width": 4}, num_classes=2)
    trainer = make_trainer(
        tmp_path, max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[BiasMetrics()]
    )
    data = pl.LightningDataModule.from_datasets(test_dataset=_FolderLike(32, seed=1), batch_size=16)
    data.train_dataset = train  # what BiasMetrics reads the training group proportions from
    return trainer.test(routine, datamodule=data, verbose=False)[0]


def test_average_reads_the_stored_labels_of_any_training_set(tmp_path, caplog) -> None:
    stored = Subset(_FolderLike(40, seed=2), list(range(0, 40, 3)))
    metrics = _test_average(tmp_path, stored)
    assert "test/average" in metrics
    y, b = stored.dataset.y[stored.indices], stored.dataset.b[stored.indices]
    group_acc = {k[len("test/group/") :]: v for k, v in metrics.items() if "group/" in k}
    props = group_proportions(y, b)
    expected = sum(p * group_acc[f"y={g[0]},b={g[1]}"] for g, p in props.items())
    assert metrics["test/average"] == pytest.approx(expected, abs=1e-6)

    unknown = _FolderLike(12, seed=3)
    unknown.b[:4] = -1
    with caplog.at_level("WARNING", logger="sobre.fairness.lightning"):
        assert "test/average" not in _test_average(tmp_path, unknown)
    assert "4 training samples have an unknown bias label" in caplog.text
