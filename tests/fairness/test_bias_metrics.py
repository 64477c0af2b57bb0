"""Bias metrics over groups g = (y, b): hand-computed values, properties and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sobre.core.errors import ConfigError
from sobre.fairness import (
    BiasReport,
    aligned_accuracy,
    average_accuracy,
    conflicting_accuracy,
    group_accuracies,
    group_counts,
    group_proportions,
    select_checkpoint,
    unbiased_accuracy,
    worst_group_accuracy,
)

# 8 samples, groups (y, b): (0,0) x3, (0,1) x1, (1,1) x2, (1,0) x2; aligned_bias(y) = y.
Y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
B = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0])
P = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1])
# correct:         1  1  0  1  1  1  0  1 -> (0,0) 2/3, (0,1) 1/1, (1,1) 2/2, (1,0) 1/2


def test_group_accuracies_hand_computed():
    accs = group_accuracies(P, Y, B)
    assert accs == pytest.approx({(0, 0): 2 / 3, (0, 1): 1.0, (1, 0): 0.5, (1, 1): 1.0})
    assert list(accs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(type(v) is float for v in accs.values())
    assert group_counts(Y, B) == {(0, 0): 3, (0, 1): 1, (1, 0): 2, (1, 1): 2}


def test_unbiased_worst_aligned_conflicting_hand_computed():
    assert unbiased_accuracy(P, Y, B) == pytest.approx((2 / 3 + 1 + 0.5 + 1) / 4)
    assert worst_group_accuracy(P, Y, B) == pytest.approx(0.5)
    # aligned: (0,0) and (1,1) -> 4 correct of 5; conflicting: (0,1), (1,0) -> 2 of 3
    assert aligned_accuracy(P, Y, B) == pytest.approx(4 / 5)
    assert conflicting_accuracy(P, Y, B) == pytest.approx(2 / 3)


def test_numpy_inputs_give_the_same_floats():
    args = (P.numpy(), Y.numpy().astype(np.int32), B.numpy())
    assert unbiased_accuracy(*args) == unbiased_accuracy(P, Y, B)
    assert isinstance(aligned_accuracy(*args), float)


def test_aligned_mapping_and_callable():
    # aligned_bias(y) = 1 - y swaps the roles of aligned and conflicting samples
    swap = {0: 1, 1: 0}
    assert aligned_accuracy(P, Y, B, aligned=swap) == pytest.approx(2 / 3)
    assert conflicting_accuracy(P, Y, B, aligned=lambda c: 1 - c) == pytest.approx(4 / 5)


def test_average_accuracy_hand_computed_and_training_proportions():
    w = {(0, 0): 0.5, (0, 1): 0.0, (1, 0): 0.25, (1, 1): 0.25}
    assert average_accuracy(P, Y, B, w) == pytest.approx(0.5 * 2 / 3 + 0.25 * 0.5 + 0.25 * 1.0)
    y_train = torch.tensor([0, 0, 0, 1])
    b_train = torch.tensor([0, 0, 1, 1])
    props = group_proportions(y_train, b_train)
    assert props == pytest.approx({(0, 0): 0.5, (0, 1): 0.25, (1, 1): 0.25})
    # (1, 0) absent from training weighs 0
    assert average_accuracy(P, Y, B, props) == pytest.approx(0.5 * 2 / 3 + 0.25 + 0.25)


def test_bias_report_bundles_metrics_and_serialises():
    w = {(0, 0): 0.5, (1, 1): 0.5}
    report = BiasReport.from_predictions(P, Y, B, train_weights=w)
    assert report.accuracy == pytest.approx(6 / 8)
    assert report.unbiased == pytest.approx(unbiased_accuracy(P, Y, B))
    assert report.aligned == pytest.approx(4 / 5)
    assert report.conflicting == pytest.approx(2 / 3)
    assert report.worst_group == pytest.approx(0.5)
    assert report.average == pytest.approx(0.5 * 2 / 3 + 0.5)
    assert report.group_count[(0, 0)] == 3
    d = json.loads(json.dumps(report.to_dict()))
    assert d["group_accuracy"]["y=1,b=0"] == pytest.approx(0.5)
    assert d["group_count"] == {"y=0,b=0": 3, "y=0,b=1": 1, "y=1,b=0": 2, "y=1,b=1": 2}
    assert BiasReport.from_predictions(P, Y, B).average is None


def test_bias_report_without_conflicting_samples_says_none():
    y = torch.tensor([0, 1, 1])
    report = BiasReport.from_predictions(torch.tensor([0, 1, 0]), y, y)
    assert report.conflicting is None
    assert report.aligned == pytest.approx(2 / 3)
    assert report.to_dict()["conflicting"] is None


def test_missing_aligned_group_names_the_groups_present():
    y, b = torch.tensor([0, 1]), torch.tensor([1, 0])
    with pytest.raises(
        ConfigError,
        match=r"no bias-aligned sample .*groups present: "
        r"\(y=0, b=1\), \(y=1, b=0\)",
    ):
        aligned_accuracy(y, y, b)
    with pytest.raises(ConfigError, match="no bias-conflicting sample"):
        conflicting_accuracy(y, y, y)


@pytest.mark.parametrize(
    ("pred", "y", "b", "match"),
    [
        ([0, 1], [0, 1, 1], [0, 1, 1], r"lengths differ \(pred: 2, y: 3, b: 3\)"),
        ([0.0, 1.0], [0, 1], [0, 1], "integer classes.*argmax"),
        ([[0.2, 0.8]], [1], [1], "1-D.*not logits"),
        ([], [], [], "empty input"),
    ],
)
def test_bad_input_raises_with_fix(pred, y, b, match):
    with pytest.raises(ConfigError, match=match):
        unbiased_accuracy(torch.tensor(pred), torch.tensor(y), torch.tensor(b))


def test_average_accuracy_bad_weights():
    with pytest.raises(ConfigError, match=r"groups \[\(2, 2\)\] have positive weight"):
        average_accuracy(P, Y, B, {(0, 0): 0.5, (2, 2): 0.5})
    with pytest.raises(ConfigError, match="non-negative"):
        average_accuracy(P, Y, B, {(0, 0): -1.0})
    with pytest.raises(ConfigError, match="aligned has no entry for classes"):
        aligned_accuracy(P, Y, B, aligned={0: 0})


def test_select_checkpoint_is_explicit():
    history = [
        {"val_unbiased": 0.4, "val_worst_group": 0.1},
        {"val_unbiased": 0.7, "val_worst_group": 0.3},
        {"val_unbiased": 0.7, "val_worst_group": 0.2},
        {"val_unbiased": float("nan")},
        {"val_unbiased": 0.5, "val_worst_group": 0.25},
    ]
    assert select_checkpoint(history, "val_unbiased") == 1  # earliest on ties, NaN skipped
    assert select_checkpoint(history, "val_worst_group") == 1
    assert select_checkpoint(history, "last") == 4
    with pytest.raises(ConfigError, match=r"choose one of \['val_unbiased', 'val_worst_group'"):
        select_checkpoint(history, "val_acc")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"no epoch has 'val_worst_group'.*select_by='last'"):
        select_checkpoint([{"loss": 1.0}], "val_worst_group")
    with pytest.raises(ConfigError, match="empty history"):
        select_checkpoint([], "last")


samples = st.integers(1, 40).flatmap(
    lambda n: st.tuples(*(st.lists(st.integers(0, 2), min_size=n, max_size=n) for _ in range(3)))
)


@settings(max_examples=60, deadline=None)
@given(samples)
def test_worst_group_is_below_every_group_and_the_mean(data):
    pred, y, b = (torch.tensor(v) for v in data)
    accs = group_accuracies(pred, y, b)
    worst = worst_group_accuracy(pred, y, b)
    assert all(worst <= a for a in accs.values())
    assert worst <= unbiased_accuracy(pred, y, b) <= max(accs.values())
    assert 0.0 <= worst <= 1.0


@settings(max_examples=60, deadline=None)
@given(samples)
def test_average_with_own_proportions_is_plain_accuracy(data):
    pred, y, b = (torch.tensor(v) for v in data)
    plain = (pred == y).double().mean().item()
    assert average_accuracy(pred, y, b, group_proportions(y, b)) == pytest.approx(plain)
    assert BiasReport.from_predictions(pred, y, b).accuracy == pytest.approx(plain)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 6),
    st.randoms(use_true_random=False),
)
def test_unbiased_equals_plain_accuracy_for_equal_group_sizes(n_y, n_b, size, rng):
    y = torch.arange(n_y).repeat_interleave(n_b * size)
    b = torch.arange(n_b).repeat_interleave(size).repeat(n_y)
    pred = torch.tensor([rng.randrange(n_y) for _ in range(len(y))])
    plain = (pred == y).double().mean().item()
    assert set(group_counts(y, b).values()) == {size}
    assert unbiased_accuracy(pred, y, b) == pytest.approx(plain)
