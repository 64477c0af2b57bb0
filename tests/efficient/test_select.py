"""Budgets and channel selectors: the realised cost never exceeds the budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sobre.core.errors import ConfigError
from sobre.efficient.masks import NeuronMask
from sobre.efficient.select import (
    Budget,
    ChannelSelector,
    ImportanceSampling,
    RandomSelector,
    StaticSelector,
    TopK,
)

SELECTORS = {
    "topk": TopK,
    "random": RandomSelector,
    "importance": ImportanceSampling,
    "static_last": StaticSelector,
    "static_first": lambda fill: StaticSelector("first_last", fill=fill),
}
"""Selector makers, called with ``fill=``."""


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_selectors_follow_the_protocol():
    for make in SELECTORS.values():
        assert isinstance(make(fill="stop"), ChannelSelector)


def test_topk_takes_the_highest_scores():
    scores = {"a": torch.tensor([0.1, 0.9, 0.5]), "b": torch.tensor([0.7, 0.2])}
    budget = Budget(3, {"a": [1, 1, 1], "b": [1, 1]})
    chosen = TopK().select(scores, budget, _rng())
    assert chosen["a"].tolist() == [False, True, True]
    assert chosen["b"].tolist() == [True, False]
    assert budget.realised(chosen) == 3


def test_stop_and_skip_fills():
    scores = {"a": torch.tensor([3.0, 2.0, 1.0])}
    budget = Budget(6, {"a": [5, 3, 1]})
    assert TopK(fill="stop").select(scores, budget, _rng())["a"].tolist() == [True, False, False]
    assert TopK(fill="skip").select(scores, budget, _rng())["a"].tolist() == [True, False, True]


def test_budget_below_the_cheapest_channel_names_both():
    budget = Budget(3, {"a": [5, 4], "b": [7]})
    scores = {"a": torch.ones(2), "b": torch.ones(1)}
    with pytest.raises(ConfigError, match=r"budget of 3 params .* costs 4 params \(layer 'a'"):
        RandomSelector().select(scores, budget, _rng())


def test_cost_table_errors():
    with pytest.raises(ConfigError, match="whole numbers"):
        Budget(10, {"a": [1.5, 2.0]}, unit="bytes")
    with pytest.raises(ConfigError, match="negative"):
        Budget(10, {"a": [-1, 2]})
    with pytest.raises(ConfigError, match=">= 0"):
        Budget(-1, {"a": [1]})
    budget = Budget(10, {"conv1": [1, 1]})
    with pytest.raises(ConfigError, match="did you mean 'conv1'"):
        TopK().select({"conv2": torch.ones(2)}, budget, _rng())
    with pytest.raises(ConfigError, match=r"'conv1' has 3 scores .* 2 entries"):
        TopK().select({"conv1": torch.ones(3)}, budget, _rng())
    with pytest.raises(ConfigError, match="NaN"):
        TopK().select({"conv1": torch.tensor([1.0, float("nan")])}, budget, _rng())
    with pytest.raises(ConfigError, match=">= 0"):
        ImportanceSampling().select({"conv1": torch.tensor([1.0, -1.0])}, budget, _rng())


def test_fraction_budget():
    budget = Budget.fraction(0.25, {"a": [10, 10], "b": [20]}, unit="bytes")
    assert budget.limit == 10
    assert budget.total() == 40


def test_random_and_importance_are_deterministic_given_the_rng():
    scores = {"a": torch.rand(50, generator=_rng(1)), "b": torch.rand(30, generator=_rng(2))}
    budget = Budget(20, {"a": torch.ones(50, dtype=torch.int64), "b": torch.ones(30)})
    for selector in (RandomSelector(), ImportanceSampling(), TopK()):
        first = selector.select(scores, budget, _rng(4))
        again = selector.select(scores, budget, _rng(4))
        assert all(torch.equal(first[n], again[n]) for n in scores)
    draws = [RandomSelector().select(scores, budget, _rng(s))["a"] for s in range(2)]
    assert not torch.equal(draws[0], draws[1])


def test_importance_sampling_draws_in_proportion_to_scores():
    scores = {"a": torch.tensor([1.0, 3.0, 0.0])}
    budget = Budget(1, {"a": [1, 1, 1]})
    rng = _rng(0)
    n = 2000
    picks = torch.stack([ImportanceSampling().select(scores, budget, rng)["a"] for _ in range(n)])
    freq = picks.double().mean(0)
    assert freq[1] == pytest.approx(0.75, abs=0.04)  # 4 sigma is 0.027
    assert freq[2] == 0  # a zero score comes after every positive one


def test_importance_with_uniform_scores_is_uniform():
    scores = {"a": torch.ones(4)}
    budget = Budget(1, {"a": [1, 1, 1, 1]})
    rng = _rng(3)
    picks = torch.stack(
        [ImportanceSampling().select(scores, budget, rng)["a"] for _ in range(2000)]
    )
    counts = picks.sum(0).double()
    chi2 = float(((counts - 500) ** 2 / 500).sum())
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_static_selector_orders_whole_layers():
    scores = {"first": torch.rand(3), "mid": torch.rand(2), "last": torch.rand(2)}
    budget = Budget(3, {"first": [1, 1, 1], "mid": [1, 1], "last": [1, 1]})
    chosen = StaticSelector().select(scores, budget, _rng())
    assert [int(chosen[n].sum()) for n in scores] == [0, 1, 2]
    assert chosen["mid"].tolist() == [True, False]
    chosen = StaticSelector(["mid"]).select(scores, budget, _rng())
    assert [int(chosen[n].sum()) for n in scores] == [0, 2, 0]
    with pytest.raises(ConfigError, match="did you mean 'last'"):
        StaticSelector(["lats"]).select(scores, budget, _rng())


@settings(max_examples=150, deadline=None)
@given(
    layers=st.lists(
        st.lists(st.tuples(st.integers(0, 30), st.floats(0.0, 10.0)), min_size=1, max_size=8),
        min_size=1,
        max_size=4,
    ),
    limit=st.integers(0, 120),
    selector=st.sampled_from(sorted(SELECTORS)),
    fill=st.sampled_from(["stop", "skip"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_realised_cost_never_exceeds_the_budget(layers, limit, selector, fill, seed):
    names = [f"layer{i}" for i in range(len(layers))]
    cost = {n: torch.tensor([c for c, _ in ch]) for n, ch in zip(names, layers, strict=True)}
    scores = {n: torch.tensor([s for _, s in ch]) for n, ch in zip(names, layers, strict=True)}
    budget = Budget(limit, cost, unit="bytes")
    make = SELECTORS[selector]
    cheapest = min(int(c.min()) for c in cost.values())
    if limit < cheapest:
        with pytest.raises(ConfigError, match="cheapest"):
            make(fill=fill).select(scores, budget, _rng(seed))
        return
    chosen = make(fill=fill).select(scores, budget, _rng(seed))
    assert list(chosen) == names
    assert all(chosen[n].shape == scores[n].shape and chosen[n].dtype == torch.bool for n in names)
    spent = budget.realised(chosen)
    assert spent <= limit
    again = make(fill=fill).select(scores, budget, _rng(seed))
    assert all(torch.equal(chosen[n], again[n]) for n in names)
    if fill == "skip" and not selector.startswith("static"):
        left = [int(c) for n in names for c, on in zip(cost[n], chosen[n], strict=True) if not on]
        assert all(c > limit - spent for c in left)  # nothing else fits: the fill is maximal


def test_selection_feeds_a_neuron_mask_within_a_parameter_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    template = NeuronMask.from_model(model, norms=True)
    budget = Budget.fraction(0.3, template.channel_params(model))
    velocity = {n: torch.rand(m.numel()) for n, m in template.items()}
    mask = template.replace(TopK().select(velocity, budget, _rng()))
    assert mask.norms == {"0": "1"}
    assert mask.count_params(model) <= budget.limit
    assert mask.count_params(model) == budget.realised(dict(mask))
