"""ActivationCompressionCallback in a two-stage transfer recipe: HOSVD_ε and budgeted ASI save
measured bytes in the fine-tuning stage only, leave a plain model, and resume exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from test_budget_callbacks import assert_resumes_exactly

import sobre
from sobre.core.errors import ConfigError
from sobre.efficient.callbacks import ActivationCompressionCallback

LAYERS = ["features.conv3", "features.conv4"]
HOSVD = {
    "class_path": "sobre.efficient.callbacks.ActivationCompressionCallback",
    "init_args": {"layers": LAYERS, "explained_var": 0.8, "train_fully": ["classifier"]},
}
NONE = {
    "class_path": "sobre.efficient.callbacks.ActivationCompressionCallback",
    "init_args": {"layers": LAYERS, "method": "none", "train_fully": ["classifier"]},
}
WASI = {
    "class_path": "sobre.efficient.callbacks.ActivationCompressionCallback",
    "init_args": {"layers": ["classifier"], "method": "wasi", "ranks": 2, "weight_var": 0.9},
}
LORA = {
    "class_path": "sobre.efficient.callbacks.ActivationCompressionCallback",
    "init_args": {"layers": ["classifier"], "method": "lora", "lora_rank": 2},
}
ASI = {
    "class_path": "sobre.efficient.callbacks.ActivationCompressionCallback",
    "init_args": {
        "layers": LAYERS,
        "method": "asi",
        "budget_fraction": 0.1,
        "train_fully": ["classifier"],
    },
}


@pytest.mark.parametrize(
    "method", [HOSVD, ASI, NONE, WASI, LORA], ids=["hosvd", "asi", "none", "wasi", "lora"]
)
def test_compressed_finetuning_saves_bytes_and_resumes_exactly(transfer, runs_dir, method):
    transfer["stages"][1]["methods"] = [method]
    full = sobre.fit(copy.deepcopy(transfer))
    stages = full.metrics["stages"]
    assert "efficient/saved_mb" not in stages["pretrain"]
    last = stages["finetune"]
    if method is NONE:  # the baseline: same frozen set and folding, nothing compressed
        assert last["efficient/analytic_mb"] == 0
        assert last["efficient/saved_mb"] <= last["efficient/uncompressed_mb"]  # mask ReLUs
    elif method is LORA:  # adapters cut trained parameters, not saved activations (spec §10)
        assert last["efficient/analytic_mb"] == 0
        assert last["efficient/saved_mb"] >= 0.95 * last["efficient/uncompressed_mb"]
    else:
        assert last["efficient/saved_mb"] < last["efficient/uncompressed_mb"]
        assert last["efficient/compression"] > 1 and last["efficient/analytic_mb"] > 0
    if method is ASI:  # the factors stay under the budget: 10 % of the uncompressed step
        assert last["efficient/analytic_mb"] <= 0.1 * last["efficient/uncompressed_mb"] + 1e-9
    net = full.routine.net  # plain again and trainable: BN folded, no compressed layer left
    assert {type(m).__name__ for m in net.modules()} <= {
        "SmallCNN",
        "Sequential",
        "Conv2d",
        "Identity",
        "ReLU",
        "MaxPool2d",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Linear",
        "BitMaskReLU",
    }
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert_resumes_exactly(transfer, runs_dir, full.run_dir)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "asi"}, "exactly one of ranks, budget_bytes or budget_fraction"),
        ({"method": "asi", "ranks": 2, "budget_bytes": 10}, "exactly one of"),
        ({"budget_bytes": 10, "budget_fraction": 0.1, "method": "asi"}, "not both"),
        ({"budget_fraction": 1.5, "method": "asi"}, r"budget_fraction must lie in \(0, 1\]"),
        ({"ranks": 2}, "ranks and budgets are ASI's and WASI's"),
        ({"method": "wasi"}, "method='wasi' needs exactly one of"),
        ({"method": "hosdv"}, "did you mean 'hosvd'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ActivationCompressionCallback(**kwargs)
