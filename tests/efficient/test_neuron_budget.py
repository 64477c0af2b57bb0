"""Budgeted neuron selection (#33): the realised updated-parameter count never exceeds B."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sobre.core.errors import ConfigError
from sobre.efficient.budget import BudgetedNeuronSelector
from sobre.efficient.masks import NeuronMask
from sobre.efficient.sparse import sparsify

ROW = {"conv1": 3 * 9 + 1, "conv2": 8 * 9 + 1, "conv3": 6 * 9 + 1}  # weight row + bias
WIDTH = {"conv1": 8, "conv2": 6, "conv3": 5}
TOTAL = sum(ROW[n] * WIDTH[n] for n in ROW)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            bn1=nn.BatchNorm2d(8),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 6, 3, padding=1),
            relu2=nn.ReLU(),
            conv3=nn.Conv2d(6, 5, 3, padding=1),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(5, 4),
        )
    )


def probe() -> list[torch.Tensor]:
    return [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))]


def nudge(model: nn.Module, layer: str, rows: tuple[int, ...], by: float = 0.5) -> None:
    with torch.no_grad():
        weight = model.get_submodule(layer).weight
        for r in rows:
            weight[r] += by * torch.randn_like(weight[r])


def test_costs_and_fractional_budget():
    selector = BudgetedNeuronSelector(net(), budget_fraction=0.1, scorer="random")
    assert selector.names == ["conv1", "conv2", "conv3"]  # Conv2d neurons; fc is never one
    assert selector.budget.limit == int(0.1 * TOTAL)
    assert selector.budget.cost["conv2"].tolist() == [ROW["conv2"]] * 6
    assert selector.realised() == 0  # nothing trains before the first select
    mask = selector.select(0)
    assert 0 < selector.realised() <= selector.budget.limit
    assert selector.stats() == {
        "epoch": 0,
        "budget": selector.budget.limit,
        "realised": selector.realised(),
        "trained": mask.trainable_fraction(),
    }


@settings(max_examples=30, deadline=None)
@given(
    budget=st.integers(min_value=ROW["conv1"], max_value=TOTAL),
    scorer=st.sampled_from(["velocity", "random", "static"]),
    fill=st.sampled_from(["stop", "skip"]),
    seed=st.integers(0, 5),
)
def test_realised_budget_never_exceeds_b(budget, scorer, fill, seed):
    model = net()
    selector = BudgetedNeuronSelector(
        model, budget_params=budget, scorer=scorer, probe=probe(), seed=seed, fill=fill
    )
    for epoch in range(3):
        mask = selector.select(epoch)
        assert selector.realised() <= budget
        assert mask.count_params(model) == selector.realised()
        nudge(model, "conv2", (epoch,))


def test_velocity_ranks_least_equilibrated_first_per_parameter():
    model = net()
    selector = BudgetedNeuronSelector(
        model, budget_params=2 * ROW["conv3"], scorer="velocity", probe=probe()
    )
    selector.select(0)  # no velocity yet: a random fill
    nudge(model, "conv3", (1, 4), by=2.0)  # the only neurons that move
    mask = selector.select(1)
    assert mask["conv3"].tolist() == [False, True, False, False, True]
    assert not mask["conv1"].any() and not mask["conv2"].any()
    assert selector.realised() == 2 * ROW["conv3"]
    scores = selector.scores(2)
    velocity = selector.neq.velocities()
    for name, per in ROW.items():
        assert torch.allclose(scores[name], velocity[name].abs() / per)


def test_random_is_seeded_and_changes_every_epoch():
    def first(seed: int) -> NeuronMask:
        return BudgetedNeuronSelector(net(), budget_params=300, scorer="random", seed=seed).select(
            0
        )

    assert first(0) == first(0) and first(0) != first(1)
    selector = BudgetedNeuronSelector(net(), budget_params=300, scorer="random")
    assert selector.select(0) != selector.select(1)


def test_static_plans():
    default = BudgetedNeuronSelector(net(), budget_params=2 * ROW["conv3"], scorer="static")
    first = default.select(0)
    assert first["conv3"].tolist() == [True, True, False, False, False]  # last layer first
    assert not first["conv1"].any() and default.select(1) == first
    ordered = BudgetedNeuronSelector(
        net(),
        budget_params=ROW["conv1"] * 8 + ROW["conv2"],
        scorer="static",
        static_plan=["conv1", "conv2"],
    ).select(0)
    assert bool(ordered["conv1"].all()) and int(ordered["conv2"].sum()) == 1
    plan = NeuronMask(
        {"conv1": [True] * 8, "conv2": [False] * 6, "conv3": [False, True, False, False, False]}
    )
    fixed = BudgetedNeuronSelector(net(), budget_params=1000, scorer="static", static_plan=plan)
    assert fixed.select(0) == plan and fixed.select(1) == plan


def test_bad_input():
    model = net()
    with pytest.raises(ConfigError, match="exactly one of budget_params"):
        BudgetedNeuronSelector(model, scorer="random")
    with pytest.raises(ConfigError, match="exactly one of budget_params"):
        BudgetedNeuronSelector(model, budget_params=10, budget_fraction=0.1, scorer="random")
    with pytest.raises(
        ConfigError, match=r"scorer='speed' is unknown.*\['velocity', 'random', 'static'\]"
    ):
        BudgetedNeuronSelector(model, budget_params=100, scorer="speed")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a probe set"):
        BudgetedNeuronSelector(model, budget_params=100)
    with pytest.raises(
        ConfigError, match=r"budget of 20 params .* costs 28 params \(layer 'conv1'"
    ):
        BudgetedNeuronSelector(model, budget_params=20, scorer="random")
    with pytest.raises(ConfigError, match="static_plan is for scorer='static'"):
        BudgetedNeuronSelector(model, budget_params=100, scorer="random", static_plan=["conv1"])
    with pytest.raises(ConfigError, match="not a scored layer"):
        BudgetedNeuronSelector(model, budget_params=100, scorer="static", static_plan=["conv9"])
    wrong = NeuronMask({"conv1": [True] * 8, "conv2": [True] * 5, "conv3": [False] * 5})
    with pytest.raises(ConfigError, match=r"static_plan of layer 'conv2' has shape \(5,\)"):
        BudgetedNeuronSelector(model, budget_params=10_000, scorer="static", static_plan=wrong)
    over = NeuronMask({"conv1": [True] * 8, "conv2": [False] * 6, "conv3": [False] * 5})
    with pytest.raises(ConfigError, match="static_plan updates 224 params, over the budget of 100"):
        BudgetedNeuronSelector(model, budget_params=100, scorer="static", static_plan=over)


def test_masks_reach_the_optimizer_and_the_sparse_layers():
    model = sparsify(net(), dict.fromkeys(ROW))
    selector = BudgetedNeuronSelector(model, budget_params=300, scorer="random")
    opt = selector.wrap_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    )
    mask = selector.select(0)
    assert opt.masks is mask
    for name in ROW:
        assert torch.equal(model.get_submodule(name).trainable_out, mask[name])
    before = copy.deepcopy(model.state_dict())
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(
            model(torch.randn(4, 3, 6, 6, generator=g)), torch.tensor([0, 1, 2, 3])
        )
        loss.backward()
        opt.step()
    for name in ROW:
        frozen = ~mask[name]
        assert torch.equal(
            model.state_dict()[f"{name}.weight"][frozen], before[f"{name}.weight"][frozen]
        )


@pytest.mark.parametrize("scorer", ["velocity", "random"])
def test_state_dict_round_trip(scorer):
    model = net()
    selector = BudgetedNeuronSelector(
        model, budget_params=400, scorer=scorer, probe=probe(), seed=3
    )
    selector.select(0)
    nudge(model, "conv2", (0, 2))
    selector.select(1)
    state = selector.state_dict()
    nudge(model, "conv3", (1,))
    resumed = BudgetedNeuronSelector(model, budget_params=400, scorer=scorer, probe=probe())
    resumed.load_state_dict(state)
    assert resumed.mask == selector.mask
    assert resumed.select(2) == selector.select(2)
    with pytest.raises(ConfigError, match=r"keys .* missing"):
        resumed.load_state_dict({"epoch": 1})
