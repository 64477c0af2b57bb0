"""The uncertainty table: plain evaluate(), and the Lightning callback inside a recipe run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sobre
from sobre.core.errors import ConfigError
from sobre.uncertainty import metrics as M
from sobre.uncertainty.ensemble import DeepEnsemble
from sobre.uncertainty.evaluate import evaluate, predict


def _data(n: int, shift: float = 0.0, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen) + shift
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=32)


def _ensemble() -> DeepEnsemble:
    return DeepEnsemble.from_factory(
        lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), 3, seed=0
    )


def test_evaluate_matches_the_metric_functions_on_an_ensemble():
    model = _ensemble()
    ids, ood, shifted = _data(96), _data(64, shift=4.0, seed=1), _data(64, shift=0.5, seed=2)
    report = evaluate(model, ids, {"far": ood}, {"near": shifted})
    logits, labels = predict(model, ids)
    assert logits.shape == (96, 3, 3) and report.num_members == 3
    probs = logits.softmax(-1)
    assert report.id["nll"] == pytest.approx(float(M.nll(probs, labels)))
    assert report.id["ece15"] == pytest.approx(float(M.ece(probs, labels)))
    assert report.id["mi"] == pytest.approx(float(M.mutual_information(probs)))
    assert set(report.ood["far"]) == {"msp", "energy", "mi"}
    far = M.ood_scores(predict(model, ood)[0].softmax(-1), "msp")
    expected = M.ood_metrics(M.ood_scores(probs, "msp"), far)
    assert report.ood["far"]["msp"]["auroc"] == pytest.approx(float(expected["auroc"]))
    assert set(report.shift["near"]) == set(report.id)
    flat = report.flat()
    assert {"test/nll", "ood/far/mi/fpr95", "shift/near/acc"} <= set(flat)
    assert len(report.scores["id"]["msp"]) == 96 and "far" in report.scores
    json.dumps(report.to_dict())  # JSON-able
    assert "| far | msp |" in report.table()


def test_single_models_get_no_mi_criterion():
    single = nn.Sequential(nn.Linear(6, 3))
    report = evaluate(single, _data(40), {"far": _data(40, shift=4.0)})
    assert set(report.ood["far"]) == {"msp", "energy"} and report.id["mi"] == 0.0
    with pytest.raises(ConfigError, match="'mi' needs an ensemble"):
        evaluate(single, _data(40), criteria=["mi"])


def test_a_recipe_reports_ood_and_shift_and_draws_the_figures(tiny_recipe, runs_dir):
    tiny_recipe["data"].update(input_shape=[1, 28, 28], num_classes=10, num_samples=160)
    tiny_recipe["trainer"].update(
        max_epochs=1,
        callbacks=[
            {
                "class_path": "sobre.uncertainty.callbacks.UncertaintyEvaluation",
                "init_args": {
                    "ood": {"photo_crops": {"n": 50}, "inverted_mnist": {}},
                    "shift": ["shifted_mnist"],
                },
            }
        ],
    )
    result = sobre.fit(tiny_recipe)
    metrics = result.metrics
    assert 0 <= metrics["test/ece15"] <= 1 and metrics["test/nll"] > 0
    assert 0 <= metrics["ood/photo_crops/msp/auroc"] <= 1
    assert "shift/shifted_mnist/acc" in metrics
    saved = json.loads((result.run_dir / "uncertainty.json").read_text())
    assert set(saved["ood"]) == {"photo_crops", "inverted_mnist"}
    figures = result.run_dir / "figures"
    assert (figures / "uncertainty_reliability.png").is_file()
    assert (figures / "uncertainty_ood.png").is_file()


def test_unknown_set_names_are_refused_with_a_suggestion():
    from sobre.uncertainty.callbacks import UncertaintyEvaluation

    with pytest.raises(ConfigError, match="photo_crops"):
        UncertaintyEvaluation(ood=["photo_crop"])


def test_sobre_test_recomputes_the_table_of_a_checkpoint(tiny_recipe, runs_dir, capsys):
    from sobre.engine.cli import main

    tiny_recipe["data"].update(input_shape=[1, 28, 28], num_classes=10, num_samples=160)
    tiny_recipe["trainer"]["max_epochs"] = 1
    tiny_recipe["evaluate"] = {"measure": False, "report": False, "checkpoint": "final"}
    result = sobre.fit(tiny_recipe)
    ckpt = result.run_dir / "checkpoints/train/final.safetensors"
    again = sobre.retest(ckpt)
    assert again["test/acc"] == pytest.approx(result.metrics["test/acc"])
    out = result.run_dir.parent / "t.json"
    code = main(["test", "--checkpoint", str(ckpt), "--ood", "inverted_mnist", "--json", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["test/acc"] == pytest.approx(result.metrics["test/acc"])
    assert 0 <= metrics["ood/inverted_mnist/msp/auroc"] <= 1
    assert "ood/inverted_mnist/energy/fpr95" in capsys.readouterr().out
