"""Tests of sobre.uncertainty.metrics: definitions, properties, references, wrappers, bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from sobre.core.errors import ConfigError
from sobre.uncertainty import metrics as um


def make_probs(
    seed: int, b: int, m: int, k: int, scale: float = 2.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B, M, K), their softmax and random labels."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, m, k, generator=g) * scale).to(dtype)
    return logits, logits.softmax(-1), torch.randint(0, k, (b,), generator=g)


shapes = st.tuples(
    st.integers(0, 2**16),  # seed
    st.integers(1, 40),  # B
    st.integers(1, 5),  # M
    st.integers(2, 8),  # K
    st.floats(0.1, 20.0),  # logit scale: near-uniform to near-one-hot
)


# ----------------------------------------------------------------------- definitions by hand


def test_hand_computed_values() -> None:
    # Two members, two samples, three classes.
    probs = torch.tensor(
        [
            [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]],  # p̄ = (0.6, 0.25, 0.15), both predict 0
            [[0.1, 0.8, 0.1], [0.6, 0.2, 0.2]],  # p̄ = (0.35, 0.5, 0.15), members disagree
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 2])
    assert um.accuracy(probs, labels).item() == pytest.approx(0.5)
    assert um.nll(probs, labels).item() == pytest.approx(-(math.log(0.6) + math.log(0.15)) / 2)
    b0 = 0.4**2 + 0.25**2 + 0.15**2
    b1 = 0.35**2 + 0.5**2 + 0.85**2
    assert um.brier(probs, labels).item() == pytest.approx((b0 + b1) / 2)
    assert um.brier(probs, labels, top_class=True).item() == pytest.approx((0.4**2 + 0.5**2) / 2)
    # ECE with 2 bins: 0.6 -> bin [0.5, 1] (correct), 0.5 -> bin [0.5, 1] (wrong).
    assert um.ece(probs, labels, n_bins=2).item() == pytest.approx(abs(0.5 - 0.55))
    # 15 bins: separate bins, gaps |1 - 0.6| and |0 - 0.5|.
    assert um.ece(probs, labels).item() == pytest.approx((0.4 + 0.5) / 2)
    assert um.ece(probs, labels, norm="max").item() == pytest.approx(0.5)
    assert um.ece(probs, labels, norm="l2").item() == pytest.approx(math.sqrt((0.16 + 0.25) / 2))
    assert um.disagreement(probs, reduction="none").tolist() == [0.0, 1.0]

    def h(p: list[float]) -> float:
        return -sum(x * math.log(x) for x in p)

    ent = um.predictive_entropy(probs, reduction="none")
    expected_ent = [h([0.6, 0.25, 0.15]), h([0.35, 0.5, 0.15])]
    torch.testing.assert_close(ent, torch.tensor(expected_ent, dtype=torch.float64))
    mi = um.mutual_information(probs, reduction="none")
    expected_mi = [
        h([0.6, 0.25, 0.15]) - (h([0.7, 0.2, 0.1]) + h([0.5, 0.3, 0.2])) / 2,
        h([0.35, 0.5, 0.15]) - (h([0.1, 0.8, 0.1]) + h([0.6, 0.2, 0.2])) / 2,
    ]
    torch.testing.assert_close(mi, torch.tensor(expected_mi, dtype=torch.float64))
    torch.testing.assert_close(um.ood_scores(probs, "msp"), torch.tensor([-0.6, -0.5]).double())


def test_disagreement_counts_pairs() -> None:
    # Three members: predictions (0, 0, 0) and (1, 0, 1) -> 0 and 2/3 of the pairs differ.
    probs = torch.tensor(
        [
            [[0.7, 0.3], [0.6, 0.4], [0.8, 0.2]],
            [[0.4, 0.6], [0.6, 0.4], [0.3, 0.7]],
        ]
    )
    torch.testing.assert_close(um.disagreement(probs, "none"), torch.tensor([0.0, 2 / 3]))
    assert um.disagreement(probs[:, :1]).item() == 0.0  # M = 1: no pair, not NaN


def test_nll_clips_zero_probability(tu) -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0])
    value = um.nll(probs, labels, reduction="none")
    torch.testing.assert_close(value, torch.tensor([-math.log(1e-12), math.log(2)]))
    assert math.isinf(tu.CategoricalNLL()(probs, labels).item())  # theirs does not clip


def test_two_dim_probs_are_one_member_when_labels_fix_the_layout() -> None:
    _, probs, labels = make_probs(0, 30, 1, 5)
    for fn in (um.accuracy, um.nll, um.brier, um.ece):
        torch.testing.assert_close(fn(probs[:, 0], labels), fn(probs, labels))


def test_half_precision_inputs() -> None:
    _, probs, labels = make_probs(1, 64, 2, 10)
    for fn in (um.nll, um.brier, um.ece):
        torch.testing.assert_close(fn(probs.half(), labels), fn(probs, labels), atol=3e-3, rtol=0)


def test_reliability_diagram_bins() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.55, 0.45], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 0, 0])
    d = um.reliability_diagram(probs, labels, n_bins=4)
    assert d["count"].tolist() == [0, 0, 2, 2]
    torch.testing.assert_close(d["lower"], torch.tensor([0.0, 0.25, 0.5, 0.75]))
    torch.testing.assert_close(d["confidence"][2:], torch.tensor([0.575, 0.85]))
    torch.testing.assert_close(d["accuracy"][2:], torch.tensor([1.0, 0.5]))
    assert torch.isnan(d["confidence"][:2]).all()
    a = um.reliability_diagram(probs, labels, n_bins=3, adaptive=True)  # sizes 2, 1, 1
    assert a["count"].tolist() == [2, 1, 1]
    torch.testing.assert_close(a["lower"], torch.tensor([0.55, 0.8, 0.9]))
    torch.testing.assert_close(a["upper"], torch.tensor([0.6, 0.8, 0.9]))
    torch.testing.assert_close(a["accuracy"], torch.tensor([1.0, 0.0, 1.0]))


# ------------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 20), st.sampled_from(um.NORMS), st.booleans())
def test_bounded_metrics(shape, n_bins, norm, adaptive) -> None:
    seed, b, m, k, scale = shape
    _, probs, labels = make_probs(seed, b, m, k, scale)
    value = um.ece(probs, labels, n_bins=n_bins, norm=norm, adaptive=adaptive).item()
    assert 0.0 <= value <= 1.0
    assert 0.0 <= um.brier(probs, labels).item() <= 2.0
    assert 0.0 <= um.brier(probs, labels, top_class=True).item() <= 1.0
    assert 0.0 <= um.disagreement(probs).item() <= 1.0
    assert 0.0 <= um.accuracy(probs, labels).item() <= 1.0
    ent = um.predictive_entropy(probs, "none")
    assert (ent >= 0).all()
    assert (ent <= math.log(k) + 1e-5).all()
    mi = um.mutual_information(probs, "none")
    assert (mi >= 0).all()
    assert (mi <= ent + 1e-6).all()


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_mutual_information_and_disagreement_vanish_when_members_agree(shape) -> None:
    seed, b, m, k, scale = shape
    _, probs, _ = make_probs(seed, b, 1, k, scale)
    same = probs.expand(b, m, k)
    assert um.mutual_information(same, "none").abs().max().item() < 1e-6
    assert um.disagreement(same).item() == 0.0
    torch.testing.assert_close(um.predictive_entropy(same), um.predictive_entropy(probs))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 10), st.integers(1, 4), st.booleans())
def test_calibrated_predictor_has_small_ece(seed, k, m, adaptive) -> None:
    """Labels drawn from p̄ itself: the top label is right with probability max p̄ exactly."""
    g = torch.Generator().manual_seed(seed)
    _, probs, _ = make_probs(seed, 50_000, m, k, scale=1.5)
    labels = torch.multinomial(probs.mean(1), 1, generator=g).squeeze(1)
    assert um.ece(probs, labels, adaptive=adaptive).item() < 0.02


def _sklearn_fpr(id_s: np.ndarray, ood_s: np.ndarray, positive: str) -> float:
    scores = np.concatenate([id_s, ood_s])
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    if positive == "id":
        fpr, tpr, _ = roc_curve(1 - is_ood, -scores, drop_intermediate=False)
    else:
        fpr, tpr, _ = roc_curve(is_ood, scores, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


score_sets = st.tuples(
    st.lists(st.integers(-6, 6), min_size=1, max_size=40),  # small range: many ties
    st.lists(st.integers(-6, 6), min_size=1, max_size=40),
    st.sampled_from([1.0, 0.37, 1e3]),
)


@settings(max_examples=60, deadline=None)
@given(score_sets)
def test_ood_metrics_match_sklearn_with_ties(sets) -> None:
    id_list, ood_list, unit = sets
    id_s = torch.tensor(id_list, dtype=torch.float64) * unit
    ood_s = torch.tensor(ood_list, dtype=torch.float64) * unit
    scores = np.r_[id_s.numpy(), ood_s.numpy()]
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    for positive in um.POSITIVES:
        r = um.ood_metrics(id_s, ood_s, positive=positive)
        assert r["auroc"].item() == pytest.approx(roc_auc_score(is_ood, scores))
        # The score direction flips with the positive class: the same area.
        assert r["auroc"].item() == pytest.approx(roc_auc_score(1 - is_ood, -scores))
        assert r["aupr_out"].item() == pytest.approx(average_precision_score(is_ood, scores))
        assert r["aupr_in"].item() == pytest.approx(average_precision_score(1 - is_ood, -scores))
        expected = _sklearn_fpr(id_s.numpy(), ood_s.numpy(), positive)
        assert r["fpr95"].item() == pytest.approx(expected)
        assert um.fpr_at_tpr(id_s, ood_s, 0.95, positive).item() == pytest.approx(expected)


@settings(max_examples=40, deadline=None)
@given(score_sets)
def test_ood_metrics_role_swap(sets) -> None:
    """Swapping ID and OOD and negating the scores swaps 'in' and 'out' and the FPR95 sides."""
    id_list, ood_list, unit = sets
    id_s = torch.tensor(id_list, dtype=torch.float64) * unit
    ood_s = torch.tensor(ood_list, dtype=torch.float64) * unit
    r_id = um.ood_metrics(id_s, ood_s, positive="id")
    r_ood = um.ood_metrics(id_s, ood_s, positive="ood")
    swapped = um.ood_metrics(-ood_s, -id_s, positive="ood")
    for key in ("auroc", "aupr_in", "aupr_out"):
        assert r_id[key] == r_ood[key]  # only fpr95 depends on `positive`
    assert swapped["auroc"].item() == pytest.approx(r_id["auroc"].item())
    assert swapped["aupr_in"].item() == pytest.approx(r_id["aupr_out"].item())
    assert swapped["aupr_out"].item() == pytest.approx(r_id["aupr_in"].item())
    assert swapped["fpr95"].item() == pytest.approx(r_id["fpr95"].item())


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-100, 0), min_size=1, max_size=30),
    st.lists(st.floats(0.001, 100), min_size=1, max_size=30),
)
def test_perfectly_separated_scores(id_list, ood_list) -> None:
    r = um.ood_metrics(torch.tensor(id_list), torch.tensor(ood_list))
    assert [r[key].item() for key in ("auroc", "aupr_in", "aupr_out", "fpr95")] == [1, 1, 1, 0]
    reverse = um.ood_metrics(torch.tensor(ood_list), torch.tensor(id_list))
    assert reverse["auroc"].item() == 0.0
    assert reverse["fpr95"].item() == 1.0


def test_large_scores_are_not_squashed() -> None:
    """Energy-like scores far from [0, 1] keep their order (no float32 sigmoid ties)."""
    id_s, ood_s = torch.tensor([30.0, 31.0, 32.0]), torch.tensor([31.5, 32.5, 33.0])
    assert um.ood_metrics(id_s, ood_s)["auroc"].item() == pytest.approx(8 / 9)


# ------------------------------------------------------------------------- torchmetrics classes


def _classes_and_functions():
    ece_kw = {"n_bins": 7, "norm": "l2"}
    return [
        (um.Accuracy(), um.accuracy, {}, True),
        (um.NLL(), um.nll, {}, True),
        (um.Brier(), um.brier, {}, True),
        (um.Brier(top_class=True), um.brier, {"top_class": True}, True),
        (um.ECE(), um.ece, {}, True),
        (um.ECE(**ece_kw), um.ece, ece_kw, True),
        (um.ECE(n_bins=5, adaptive=True), um.ece, {"n_bins": 5, "adaptive": True}, True),
        (um.ReliabilityDiagram(n_bins=6), um.reliability_diagram, {"n_bins": 6}, True),
        (um.PredictiveEntropy(), um.predictive_entropy, {}, False),
        (um.MutualInformation(), um.mutual_information, {}, False),
        (um.Disagreement(), um.disagreement, {}, False),
    ]


def assert_same(got, expected) -> None:
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same(got[key], expected[key])
        return
    torch.testing.assert_close(got, expected, check_dtype=False, equal_nan=True)


@settings(max_examples=15, deadline=None)
@given(shapes, st.lists(st.integers(1, 39), max_size=4))
def test_classes_accumulate_like_the_function_on_the_concatenation(shape, cuts) -> None:
    seed, b, m, k, scale = shape
    _, probs, labels = make_probs(seed, b, max(m, 2), k, scale)
    bounds = sorted({0, b, *(c for c in cuts if c < b)})
    for metric, fn, kwargs, labelled in _classes_and_functions():
        args = (labels,) if labelled else ()
        for lo, hi in itertools.pairwise(bounds):
            metric.update(probs[lo:hi], *(a[lo:hi] for a in args))
        assert_same(metric.compute(), fn(probs, *args, **kwargs))


def test_merged_states_equal_the_whole() -> None:
    """Merging the states of two shards (what DDP sync does) gives the whole-data value."""
    logits, probs, labels = make_probs(3, 90, 3, 6)
    for (left, fn, kwargs, labelled), (right, *_) in zip(
        _classes_and_functions(), _classes_and_functions(), strict=True
    ):
        args = (labels,) if labelled else ()
        left.update(probs[:50], *(a[:50] for a in args))
        right.update(probs[50:], *(a[50:] for a in args))
        left.merge_state(right)
        assert_same(left.compute(), fn(probs, *args, **kwargs))
    scores = um.ood_scores(logits, "energy")
    left, right = um.OODMetrics(positive="ood"), um.OODMetrics(positive="ood")
    left.update(scores[:40], False)
    right.update(scores[40:60], False)
    right.update(scores[60:], torch.ones(30, dtype=torch.bool))
    left.merge_state(right)
    assert_same(left.compute(), um.ood_metrics(scores[:60], scores[60:], positive="ood"))


def test_ood_metrics_class_with_mixed_flags_and_key_names() -> None:
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.7])
    flags = torch.tensor([False, True, False, True, True])
    metric = um.OODMetrics()
    metric.update(scores, flags)
    assert_same(metric.compute(), um.ood_metrics(scores[~flags], scores[flags]))
    assert [um.ECE().key, um.ECE(10, adaptive=True).key, um.ECE(norm="max").key] == [
        "ece15",
        "aece10",
        "ece15_max",
    ]


# --------------------------------------------------------------------- torch-uncertainty 0.13


@pytest.fixture(scope="module")
def tu():
    return pytest.importorskip("torch_uncertainty.metrics")


@pytest.mark.parametrize("m", [1, 4])
def test_matches_torch_uncertainty(tu, m) -> None:
    _, probs, labels = make_probs(11, 400, m, 7)
    mean = probs.mean(1)
    k = probs.shape[-1]
    pairs = [
        (um.nll(probs, labels), tu.CategoricalNLL()(mean, labels)),
        (um.brier(probs, labels), tu.BrierScore(num_classes=k)(mean, labels)),
        (
            um.brier(probs, labels, top_class=True),
            tu.BrierScore(num_classes=k, top_class=True)(mean, labels),
        ),
        (um.predictive_entropy(probs), tu.Entropy()(mean)),
        (um.mutual_information(probs), tu.MutualInformation()(probs)),
    ]
    for norm in um.NORMS:
        for adaptive in (False, True):
            reference = tu.CalibrationError(
                task="multiclass", num_classes=k, num_bins=15, norm=norm, adaptive=adaptive
            )
            pairs.append((um.ece(probs, labels, 15, norm, adaptive), reference(mean, labels)))
    if m > 1:
        pairs += [
            (um.disagreement(probs), tu.Disagreement()(probs)),
            # Their Entropy on (B, M, K) is the expected member entropy = H(p̄) − MI.
            (
                um.predictive_entropy(probs) - um.mutual_information(probs),
                tu.Entropy()(probs),
            ),
        ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_brier_of_an_ensemble_differs_from_torch_uncertainty(tu) -> None:
    """Theirs averages member Brier scores on (B, M, K); ours scores the mean prediction."""
    _, probs, labels = make_probs(12, 200, 4, 5)
    theirs = tu.BrierScore(num_classes=5)(probs, labels)
    assert um.brier(probs, labels).item() < theirs.item() - 1e-3


def test_ece_confidence_one_differs_from_torchmetrics(tu) -> None:
    """torchmetrics bins confidence == 1 alone; here it joins the last bin [14/15, 1]."""
    probs = torch.tensor([[0.95, 0.05], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    theirs = tu.CalibrationError(task="multiclass", num_classes=2, num_bins=15)(probs, labels)
    assert theirs.item() == pytest.approx((0.05 + 1.0) / 2)
    assert um.ece(probs, labels).item() == pytest.approx(abs(0.5 - 0.975))


def test_ood_scores_match_torch_uncertainty_criteria(tu) -> None:
    from torch_uncertainty import ood_criteria as oc

    logits, probs, _ = make_probs(13, 100, 3, 6)
    pairs = [
        ("msp", probs, oc.MaxSoftmaxCriterion()(probs.mean(1))),
        ("maxlogit", logits, oc.MaxLogitCriterion()(logits)),
        ("energy", logits, oc.EnergyCriterion()(logits)),
        ("mi", probs, oc.MutualInformationCriterion()(probs)),
        ("entropy", probs[:, :1], oc.EntropyCriterion()(probs[:, :1])),
    ]
    for criterion, inputs, theirs in pairs:
        torch.testing.assert_close(um.ood_scores(inputs, criterion), theirs)


@pytest.mark.filterwarnings("ignore:Metric `FPR95` will save")
def test_ood_metrics_match_torch_uncertainty_with_ood_positive(tu) -> None:
    from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

    _, probs, _ = make_probs(14, 300, 3, 5)
    scores = um.ood_scores(probs, "msp")  # in [-1, 0]: torchmetrics' sigmoid keeps the order
    targets = (torch.arange(300) >= 200).long()
    ours = um.ood_metrics(scores[:200], scores[200:], positive="ood")
    torch.testing.assert_close(ours["auroc"], BinaryAUROC()(scores, targets))
    torch.testing.assert_close(ours["aupr_out"], BinaryAveragePrecision()(scores, targets))
    fpr95 = tu.FPR95(pos_label=1)
    fpr95.update(scores, targets)
    torch.testing.assert_close(ours["fpr95"], fpr95.compute())


@pytest.mark.filterwarnings("ignore:Metric `FPR95` will save")
def test_fpr95_conventions_differ_on_an_asymmetric_example(tu) -> None:
    """ID scores 0..19; OOD: 19 scores >= 20 and one at 10.

    positive="ood" (torch-uncertainty): catch 19/20 OOD with s >= 20 -> no ID flagged: 0.
    positive="id" (Hendrycks & Gimpel): accept 19/20 ID with s <= 18 -> the OOD sample at 10
    is accepted: 1/20.
    """
    id_s = torch.arange(20.0)
    ood_s = torch.cat([torch.arange(20.0, 39.0), torch.tensor([10.0])])
    fpr95 = tu.FPR95(pos_label=1)
    fpr95.update(torch.cat([id_s, ood_s]), torch.cat([torch.zeros(20), torch.ones(20)]).long())
    assert um.ood_metrics(id_s, ood_s, positive="ood")["fpr95"].item() == fpr95.compute().item()
    assert fpr95.compute().item() == 0.0
    assert um.ood_metrics(id_s, ood_s, positive="id")["fpr95"].item() == pytest.approx(0.05)
    assert um.ood_metrics(id_s, ood_s)["fpr95"].item() == pytest.approx(0.05)  # default "id"


# -------------------------------------------------------------------------------- bad input

_, P, Y = make_probs(5, 8, 2, 4)
LOGITS = torch.randn(8, 2, 4)


def _flat_packed() -> torch.Tensor:
    """Member-major (M·B, K) rows as a packed model outputs them."""
    return P.transpose(0, 1).reshape(16, 4)


BAD = [
    (lambda: um.nll(LOGITS, Y), ["probs", ">= 0", "not logits"]),
    (lambda: um.nll(P * 2, Y), ["probs", "sum to 1", "found a row off by 1"]),
    (lambda: um.nll(P.masked_fill(P > 0.5, float("nan")), Y), ["probs", "NaN"]),
    (lambda: um.brier(P.masked_fill(P > 0.5, float("inf")), Y), ["probs", "inf"]),
    (lambda: um.ece(P * torch.tensor([1.0, 1, 1, -1]), Y), ["probs", ">= 0"]),
    (lambda: um.accuracy(P.long(), Y), ["probs", "floating-point"]),
    (lambda: um.ece(_flat_packed(), Y), ["16 = 2 × 8", "split_members"]),
    (lambda: um.nll(_flat_packed().unsqueeze(1), Y), ["labels", "(16,)"]),
    (lambda: um.accuracy(P.transpose(0, 1), Y), ["member-first", "transpose(0, 1)"]),
    (lambda: um.nll(P, Y + 4), ["labels", "[0, 3]", "found"]),
    (lambda: um.nll(P, -Y - 1), ["labels", "[0, 3]"]),
    (lambda: um.nll(P, Y.float()), ["labels", "integer"]),
    (lambda: um.nll(P, torch.nn.functional.one_hot(Y, 4)), ["labels", "(B,)", "argmax"]),
    (lambda: um.ece(P, Y, n_bins=0), ["n_bins", ">= 1"]),
    (lambda: um.ece(P, Y, n_bins=True), ["n_bins", ">= 1"]),
    (lambda: um.reliability_diagram(P, Y, n_bins=2.5), ["n_bins"]),
    (lambda: um.ECE(n_bins=-1), ["n_bins"]),
    (lambda: um.ece(P, Y, norm="L1"), ["norm", "'l1'", "did you mean"]),
    (lambda: um.nll(P, Y, reduction="sum"), ["reduction", "'mean'"]),
    (lambda: um.mutual_information(P[:, 0]), ["(B, M, K)", "unsqueeze(1)", "split_members"]),
    (lambda: um.disagreement(_flat_packed()), ["(B, M, K)", "split_members"]),
    (lambda: um.predictive_entropy(P[0, 0]), ["(B, M, K)"]),
    (lambda: um.ood_scores(P, "max_logit"), ["criterion", "did you mean 'maxlogit'"]),
    (lambda: um.ood_scores(P, "energy"), ["takes logits", "'msp'"]),
    (lambda: um.ood_scores(LOGITS, "msp"), ["criterion='msp'", "not logits"]),
    (lambda: um.ood_scores(LOGITS[:, 0], "energy"), ["(B, M, K)", "split_members"]),
    (lambda: um.ood_scores(P[:, :1], "mi"), ["M >= 2"]),
    (lambda: um.ood_metrics(Y.float(), Y.float(), positive="OOD"), ["positive", "'ood'"]),
    (lambda: um.ood_metrics(P[:, 0, 0], P[:, :, 0]), ["ood_scores", "(N,)", "ood_scores(...)"]),
    (lambda: um.ood_metrics(torch.tensor([]), Y.float()), ["id_scores", "N >= 1"]),
    (lambda: um.ood_metrics(torch.tensor([0.0, math.nan]), Y.float()), ["id_scores", "NaN"]),
    (lambda: um.fpr_at_tpr(Y.float(), Y.float(), tpr=95), ["tpr", "(0, 1]"]),
    (lambda: um.OODMetrics().update(Y.float(), torch.ones(3, dtype=torch.bool)), ["is_ood"]),
    (lambda: um.OODMetrics().update(Y.float(), 1), ["is_ood", "bool"]),
]


@pytest.mark.parametrize(("call", "fragments"), BAD)
def test_bad_input_raises_a_config_error_naming_the_problem(call, fragments) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value)


def test_ood_metrics_class_needs_both_sets() -> None:
    metric = um.OODMetrics()
    metric.update(torch.tensor([0.1, 0.2]), False)
    with pytest.raises(ConfigError, match="needs both ID and OOD"):
        metric.compute()


def test_tolerates_rounding_in_probabilities() -> None:
    noisy = P * (1 + 1e-6)
    assert um.nll(noisy, Y).item() == pytest.approx(um.nll(P, Y).item(), abs=1e-5)
