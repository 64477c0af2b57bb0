"""#17 on Biased-MNIST-5k (bias spec §2 acceptance and calibration): a briefly trained
bias-capturing model's pooled features cluster by colour, so k-means pseudo bias labels b̂
recover b, also on the bias-conflicting samples (where b ≠ y); GroupDRO on (y, b̂) groups and JTT
(whose 2-epoch error set is the conflicting set, #17's "correctness" pseudo label) beat vanilla
training at the same 8-epoch budget. Three seeds; a per-seed table is logged.

Measured (seeds 0/1/2, unbiased %): vanilla 10.4 / 10.0 / 10.4, GroupDRO(b̂) 33.5 / 41.5 / 37.6,
JTT (T = 2, λ_up = 20) 72.5 / 80.2 / 72.2; NMI 1.000, conflicting NMI(b̂, y) 0.046. Biasedness
(NMI(ŷ, b) and aligned - conflicting gap on the rho = 0.1 test) falls from vanilla to GroupDRO."""

from __future__ import annotations

import logging
import statistics

import pytest
import torch
from torch.utils.data import DataLoader

from sobre.data.biased import biased_mnist_datasets
from sobre.fairness.base import bias_report, predict, train
from sobre.fairness.discovery import (
    biasedness,
    discover_bias,
    normalized_mutual_info,
    with_pseudo_bias,
)
from sobre.fairness.groups import GroupDRO, jtt
from sobre.models import create

log = logging.getLogger(__name__)
SEEDS = (0, 1, 2)


def _net() -> torch.nn.Module:
    return create("simple_conv_s", num_classes=10, in_channels=3)


def _seed_row(seed: int) -> dict[str, float]:
    sets = biased_mnist_datasets(rho=0.95, seed=seed)
    train_set = sets["train"]
    y, b = train_set.tensors[1], train_set.tensors[2]
    torch.manual_seed(seed)
    b_hat = discover_bias(_net(), train_set, epochs=2, layer="embedding", n_clusters=10, seed=seed)
    conflicting = b != y
    row = {
        "nmi_b": normalized_mutual_info(b_hat, b),
        "conf_nmi_b": normalized_mutual_info(b_hat[conflicting], b[conflicting]),
        "conf_nmi_y": normalized_mutual_info(b_hat[conflicting], y[conflicting]),
    }
    tests = {k: DataLoader(sets[k], batch_size=500) for k in ("unbiased", "biased")}
    pseudo = with_pseudo_bias(train_set, b_hat)
    for name, regs in (("vanilla", []), ("groupdro", [GroupDRO(10, 10, eta=0.01)])):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = _net()
        loader = DataLoader(pseudo, batch_size=256, shuffle=True, generator=gen)
        train(model, loader, epochs=8, regularizers=regs)
        row[f"{name}_unbiased"] = bias_report(model, tests["unbiased"]).unbiased
        row[f"{name}_biased"] = bias_report(model, tests["biased"]).accuracy
        score = biasedness(*predict(model, tests["unbiased"]))
        row[f"{name}_nmi_pred_b"], row[f"{name}_gap"] = score.nmi_bias, score.gap
    torch.manual_seed(seed)
    model, errors = jtt(_net, train_set, identify_epochs=2, epochs=8, lambda_up=20, seed=seed)
    row["jtt_err_precision"] = float(conflicting[errors].double().mean()) if errors.any() else 0.0
    row["jtt_err_recall"] = float(errors[conflicting].double().mean())
    row["jtt_unbiased"] = bias_report(model, tests["unbiased"]).unbiased
    row["jtt_biased"] = bias_report(model, tests["biased"]).accuracy
    score = biasedness(*predict(model, tests["unbiased"]))
    row["jtt_nmi_pred_b"], row["jtt_gap"] = score.nmi_bias, score.gap
    return row


@pytest.mark.slow
def test_pseudo_bias_labels_recover_the_colour_and_groupdro_and_jtt_beat_vanilla() -> None:
    torch.set_num_threads(1)
    rows = {seed: _seed_row(seed) for seed in SEEDS}
    keys = list(rows[SEEDS[0]])
    log.info("seed  " + "  ".join(keys))
    for seed, row in rows.items():
        log.info(f"{seed:<4}  " + "  ".join(f"{row[k]:.3f}" for k in keys))
    for seed, row in rows.items():
        assert row["nmi_b"] >= 0.8, (seed, row)
        assert row["conf_nmi_b"] >= 0.8, (seed, row)
        assert row["conf_nmi_y"] <= 0.2, (seed, row)
        assert row["groupdro_biased"] >= 0.9 and row["jtt_biased"] >= 0.9, (seed, row)
        assert row["groupdro_nmi_pred_b"] < row["vanilla_nmi_pred_b"], (seed, row)
        assert row["groupdro_gap"] < row["vanilla_gap"], (seed, row)
        assert row["jtt_err_precision"] >= 0.9 and row["jtt_err_recall"] >= 0.9, (seed, row)
    for method, mean_gain in (("groupdro", 0.15), ("jtt", 0.4)):
        gain = [row[f"{method}_unbiased"] - row["vanilla_unbiased"] for row in rows.values()]
        assert statistics.mean(gain) >= mean_gain and min(gain) >= mean_gain - 0.05, (method, gain)
