"""Sparsity curves, monotonicity and the sparse double descent score (spec compression §5-§7)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sobre.core.errors import ConfigError
from sobre.core.masks import get_mask
from sobre.models import create
from sobre.prune.curves import is_monotone, sdd_score, sparsity_curve
from sobre.prune.entropy import ActivationEntropy
from sobre.prune.imp import MagnitudePruner, Rewinder, global_sparsity

# The spec's baseline (§5.5), accuracies as fractions: 85.8 dense -> minimum 71.5 at 99.3 %
# -> 79.2 at 99.7 % -> 72.3 at 99.9 %.
SPEC = [
    (0.0, 0.858),
    (0.8, 0.851),
    (0.96, 0.835),
    (0.99, 0.79),
    (0.993, 0.715),
    (0.995, 0.75),
    (0.997, 0.792),
    (0.999, 0.723),
]


def _curve(points, key: str = "test_acc") -> list[dict]:
    return [{"round": i, "sparsity": s, key: a} for i, (s, a) in enumerate(points)]


def _brute(values: list[float]) -> tuple[float, float]:
    """Largest pairwise rise, and max over m of min(dip(m), rise(m)), by definition."""
    n = len(values)
    rise = max(values[j] - values[i] for i in range(n) for j in range(i, n))
    strength = max(
        min(max(values[: m + 1]) - values[m], max(values[m:]) - values[m]) for m in range(n)
    )
    return rise, strength


def test_spec_example_dip_and_recovery():
    score = sdd_score(_curve(SPEC))
    assert score["dip"] == pytest.approx(0.143, abs=1e-9)
    assert score["recovery"] == pytest.approx(0.077, abs=1e-9)
    assert score["score"] == pytest.approx(0.077, abs=1e-9)
    assert score["peak_sparsity"] == 0.0
    assert score["valley_sparsity"] == 0.993
    assert score["recovery_sparsity"] == 0.997
    assert not is_monotone(_curve(SPEC), tol=0.01)
    assert is_monotone(_curve(SPEC), tol=0.08)  # the largest rise is the recovery, 7.7 pt


def test_monotone_curve_scores_zero():
    curve = _curve([(0.0, 0.95), (0.5, 0.95), (0.8, 0.94), (0.96, 0.90), (0.99, 0.60)])
    assert is_monotone(curve, tol=0.0)
    assert sdd_score(curve) == {
        "dip": 0.0,
        "recovery": 0.0,
        "score": 0.0,
        "peak_sparsity": None,
        "valley_sparsity": None,
        "recovery_sparsity": None,
    }


def test_flat_and_single_point_curves():
    flat = _curve([(0.2 * i, 0.9) for i in range(5)])
    assert is_monotone(flat, tol=0.0) and sdd_score(flat)["score"] == 0.0
    single = _curve([(0.0, 0.5)])
    assert is_monotone(single, tol=0.0) and sdd_score(single)["dip"] == 0.0


def test_noisy_monotone_curve_has_a_tiny_score():
    curve = _curve([(0.0, 0.90), (0.5, 0.895), (0.8, 0.898), (0.9, 0.85), (0.99, 0.70)])
    score = sdd_score(curve)
    assert score["score"] == pytest.approx(0.003, abs=1e-9)
    assert score["valley_sparsity"] == 0.5 and score["recovery_sparsity"] == 0.8
    assert is_monotone(curve, tol=0.01) and not is_monotone(curve, tol=0.002)


def test_rise_without_a_fall_is_not_sdd_but_not_monotone():
    curve = _curve([(0.0, 0.85), (0.5, 0.87), (0.8, 0.88), (0.96, 0.80)])
    assert sdd_score(curve)["score"] == 0.0
    assert not is_monotone(curve, tol=0.01)


def test_slow_climb_counts_as_a_rise():
    curve = _curve([(0.1 * i, 0.80 + 0.005 * i) for i in range(5)])  # +0.5 pt per step
    assert not is_monotone(curve, tol=0.01)
    assert is_monotone(curve, tol=0.021)  # the whole climb is 2 pt


def test_the_stronger_of_two_valleys_is_reported():
    curve = _curve([(0.0, 0.9), (0.5, 0.7), (0.8, 0.8), (0.9, 0.5), (0.99, 0.85)])
    score = sdd_score(curve)
    assert score["valley_sparsity"] == 0.9 and score["recovery_sparsity"] == 0.99
    assert score["dip"] == pytest.approx(0.4) and score["recovery"] == pytest.approx(0.35)


def test_points_are_ordered_by_sparsity_and_other_keys_work():
    points = _curve(SPEC, key="val_acc")
    shuffled = points[:]
    random.Random(0).shuffle(shuffled)
    assert sdd_score(shuffled, key="val_acc") == sdd_score(points, key="val_acc")
    assert is_monotone(shuffled, key="val_acc") == is_monotone(points, key="val_acc")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=12))
def test_scores_match_their_definitions(values):
    curve = _curve([(i / 12, v) for i, v in enumerate(values)])
    rise, strength = _brute(values)
    score = sdd_score(curve)
    assert score["score"] == pytest.approx(strength, abs=1e-12)
    assert score["score"] <= score["dip"] + 1e-12 and score["score"] <= score["recovery"] + 1e-12
    assert score["recovery"] <= rise + 1e-12
    for tol in (0.0, 0.05, 0.3):
        assert is_monotone(curve, tol=tol) == (rise <= tol)
    if score["valley_sparsity"] is not None:
        assert score["peak_sparsity"] <= score["valley_sparsity"] < score["recovery_sparsity"]
    falling = _curve([(i / 12, v) for i, v in enumerate(sorted(values, reverse=True))])
    assert is_monotone(falling, tol=0.0) and sdd_score(falling)["score"] == 0.0


def test_bad_curves_raise_config_errors():
    with pytest.raises(ConfigError, match="empty"):
        sdd_score([])
    with pytest.raises(ConfigError, match=r"'test_acc'.*did you mean.*test_ac"):
        is_monotone([{"sparsity": 0.0, "test_ac": 0.9}])
    with pytest.raises(ConfigError, match="no 'sparsity'"):
        sdd_score([{"test_acc": 0.9}])
    with pytest.raises(ConfigError, match="expected a number"):
        sdd_score(_curve([(0.0, math.nan)]))
    with pytest.raises(ConfigError, match="tol"):
        is_monotone(_curve(SPEC), tol=-0.1)
    with pytest.raises(ConfigError, match="name of a curve metric"):
        is_monotone(_curve(SPEC), 0.01)  # tol passed where the key goes


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    # 8*16 + 16*8 = 256 weights: 25 % of the live ones is a whole number for 4 rounds
    return create("mlp", num_classes=8, in_features=8, hidden=(16,))


def _loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 8, generator=gen), torch.zeros(16, dtype=torch.long)) for _ in range(2)
    ]


def test_curve_follows_the_imp_sparsity_and_records_every_round():
    model, pruner, calls = _mlp(), MagnitudePruner(0.25), []
    data = _loader()
    x = torch.cat([b[0] for b in data])

    def retrain(m: nn.Module) -> None:  # a stand-in loop: moves every weight, masks stay
        calls.append(global_sparsity(m))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_acc": float(m(x).argmax(1).eq(0).float().mean()), "seen": torch.tensor(3)}

    curve = sparsity_curve(model, pruner, 4, retrain, evaluate, loader=data)
    assert [p["round"] for p in curve] == [0, 1, 2, 3, 4]
    expected = [1 - 0.75**r for r in range(5)]
    assert [p["sparsity"] for p in curve] == pytest.approx(expected, abs=1e-12)
    assert calls == pytest.approx(expected[1:], abs=1e-12)  # pruned before each retrain
    assert all(p["seen"] == 3.0 and 0.0 <= p["test_acc"] <= 1.0 for p in curve)
    report = ActivationEntropy(neuron="unit").compute(model, data)
    assert list(curve[-1]["layer_entropy"]) == ["features.relu1"]
    assert curve[-1]["entropy"] == pytest.approx(report.layer_entropy["features.relu1"])
    assert all(0.0 <= p["entropy"] <= 1.0 for p in curve)
    assert json.loads(json.dumps(curve)) == curve


def test_curve_without_loader_has_no_entropy_and_zero_rounds_is_the_dense_point():
    model = _mlp()
    curve = sparsity_curve(model, MagnitudePruner(0.5), 0, lambda m: None, lambda m: {"a": 1})
    assert curve == [{"round": 0, "sparsity": 0.0, "a": 1.0}]
    assert get_mask(model.classifier) is None


def test_weight_rewinding_between_rounds():
    model, seen = _mlp(), []
    rewinder = Rewinder("weight_rewind")
    rewinder.capture(model)
    start = model.classifier.weight.detach().clone()

    def retrain(m: nn.Module) -> None:
        w = m.classifier.weight.detach()
        seen.append(torch.equal(w, start * get_mask(m.classifier)))
        with torch.no_grad():
            m.classifier.parametrizations.weight.original.add_(1.0)

    curve = sparsity_curve(model, MagnitudePruner(0.5), 2, retrain, lambda m: {}, rewinder=rewinder)
    assert seen == [True, True] and curve[-1]["sparsity"] == pytest.approx(0.75)


def test_bad_arguments_raise_before_pruning():
    model = _mlp()
    pruner = MagnitudePruner(0.5)
    for rounds in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="rounds"):
            sparsity_curve(model, pruner, rounds, lambda m: None, lambda m: {})
    with pytest.raises(ConfigError, match="loader"):
        sparsity_curve(model, pruner, 1, lambda m: None, lambda m: {}, entropy=ActivationEntropy())
    with pytest.raises(ConfigError, match="capture"):
        sparsity_curve(
            model, pruner, 1, lambda m: None, lambda m: {}, rewinder=Rewinder("weight_rewind")
        )
    assert get_mask(model.classifier) is None  # nothing pruned
    with pytest.raises(ConfigError, match="mapping"):
        sparsity_curve(model, pruner, 1, lambda m: None, lambda m: [0.9])
    with pytest.raises(ConfigError, match="'sparsity'"):
        sparsity_curve(model, pruner, 1, lambda m: None, lambda m: {"sparsity": 0.1})
    with pytest.raises(ConfigError, match="numbers"):
        sparsity_curve(model, pruner, 1, lambda m: None, lambda m: {"acc": "high"})
