"""Tests of sobre.efficient.dynamic (TraDy #41, MeDyate #45): exact sparse gradients through
ChannelBudget.apply, the hard memory bound, the samplers' distributions, deterministic resampling,
state round trips, frozen parameters, and bad input."""

from __future__ import annotations

import copy
import itertools
from collections import Counter, OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chi2
from torch import nn

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.efficient.dynamic import SCORERS, ChannelBudget, LayerStats, lara_score, rgn_score
from sobre.efficient.masks import MaskedOptimizer
from sobre.efficient.sparse import fold_frozen_bn
from sobre.models import create

X = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
BATCHES = [(X, Y), (X.flip(-1), Y)]


def resnet() -> nn.Module:
    """A half-width ResNet-8 (8/16/32 channels) with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = create("resnet8", num_classes=3, in_channels=1, width=0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def small() -> nn.Sequential:
    """conv - BN - ReLU - conv - BN - ReLU - pool - linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 6, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(6),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(6, 5, 3, padding=1),
            bn2=nn.BatchNorm2d(5),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(5, 3),
        )
    )
    with torch.no_grad():
        model.bn2.running_var.uniform_(0.5, 2.0)
        model.bn2.running_mean.uniform_(-0.5, 0.5)
    return model.eval()


def budget(model: nn.Module | None = None, **kwargs: object) -> ChannelBudget:
    """A ranked ChannelBudget over ``model`` (default: the half-width ResNet-8, head trained)."""
    if "budget_bytes" not in kwargs:
        kwargs.setdefault("budget_fraction", 0.1)
    kwargs.setdefault("train_fully", ["classifier"])
    cb = ChannelBudget(resnet() if model is None else model, example_input=X, **kwargs)  # type: ignore[arg-type]
    cb.rank_layers(BATCHES)
    return cb


# --------------------------------------------------------------------------- gradients


def test_all_channels_selected_gives_the_conv2d_gradients():
    model = small()
    cb = budget(model, budget_fraction=1.0, train_fully=[], layers=["conv2"], max_layers=1)
    assert cb.plan().channels == {"conv2": 6}
    net = cb.apply()
    assert type(net.conv2).__name__ == "ChannelSparseConv2d"
    ref = fold_frozen_bn(model)
    g = torch.randn(8, 3)
    net(X).backward(g)
    ref(X).backward(g)
    torch.testing.assert_close(net.conv2.weight.grad, ref.conv2.weight.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.conv2.bias.grad, ref.conv2.bias.grad, atol=1e-5, rtol=0)
    assert net.conv1.weight.grad is None and net.fc.weight.grad is None  # frozen


def test_partial_selection_computes_exactly_the_selected_columns():
    model = small()
    probe = budget(model, budget_fraction=1.0, train_fully=["fc"], layers=["conv2"]).plan()
    three = probe.saved_bytes + probe.fixed_grad_bytes + 3 * probe.channel_bytes["conv2"]
    cb = budget(model, budget_bytes=three, train_fully=["fc"], layers=["conv2"])
    assert cb.plan().channels == {"conv2": 3}
    net = cb.apply()
    keep = cb.selection()["conv2"]
    dense = fold_frozen_bn(model)
    g = torch.randn(8, 3)
    net(X).backward(g)
    dense(X).backward(g)
    expected = dense.conv2.weight.grad * keep.view(1, -1, 1, 1)
    torch.testing.assert_close(net.conv2.weight.grad, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.fc.weight.grad, dense.fc.weight.grad, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- memory bound


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.1, 0.3, 1.0])
@pytest.mark.parametrize(
    ("sampler", "allocation"),
    [("uniform", "layer"), ("importance", "layer"), ("static", "layer"), ("uniform", "pooled")],
)
def test_measured_saved_bytes_never_exceed_the_budget(fraction, sampler, allocation):
    cb = budget(budget_fraction=fraction, channel_sampler=sampler, allocation=allocation)
    plan = cb.plan()
    assert plan.total_bytes <= cb.budget_bytes == plan.budget_bytes
    cb.apply()
    for epoch in range(3):
        chosen = cb.resample(epoch)
        measured = cb.measured_bytes()
        assert measured.activations <= cb.budget_bytes, (epoch, measured, cb.budget_bytes)
        cost = sum(int(s.sum()) * plan.channel_bytes[n] for n, s in chosen.items())
        assert cost <= plan.channel_limit
        assert measured.activations <= plan.saved_bytes + cost


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget_bytes=st.integers(60_000, 2_000_000), scorer=st.sampled_from(["rgn", "lara"]))
def test_any_budget_either_fits_or_is_refused(budget_bytes, scorer):
    cb = ChannelBudget(
        resnet(),
        budget_bytes=budget_bytes,
        example_input=X,
        layer_scorer=scorer,
        train_fully=["classifier"],
    )
    cb.rank_layers(BATCHES)
    refused = ""
    try:
        cb.apply()
    except ConfigError as err:
        refused = str(err)
    if refused:
        assert "smallest trainable unit" in refused
    else:
        assert cb.measured_bytes().activations <= cb.plan().total_bytes <= budget_bytes


def test_the_plan_keeps_the_best_layers_that_fit():
    cb = budget(budget_fraction=0.1, max_layers=2, min_fraction=0.0)
    plan = cb.plan()
    order = list(cb.scores)
    assert 1 <= len(plan.layers) <= 2
    assert [order.index(n) for n in plan.layers] == sorted(order.index(n) for n in plan.layers)
    assert plan.channels is not None and plan.channels.keys() == set(plan.layers)
    assert plan.channel_limit == sum(plan.layer_bytes.values())
    assert plan.total_bytes <= plan.budget_bytes < plan.full_bytes
    for name in plan.layers:
        assert 1 <= plan.channels[name] <= cb.stats[name].channels
        assert plan.channel_bytes[name] == cb.stats[name].channel_bytes
    # Any further channel of a kept layer would break the budget (the fill is maximal).
    spare = plan.budget_bytes - plan.total_bytes
    assert all(
        spare < plan.channel_bytes[n] or plan.channels[n] == cb.stats[n].channels
        for n in plan.layers
    )


def test_min_fraction_keeps_fewer_layers_each_with_more_channels():
    loose = budget(budget_fraction=0.1, min_fraction=0.0).plan()
    strict_budget = budget(budget_fraction=0.1, min_fraction=0.5)
    strict = strict_budget.plan()
    assert len(strict.layers) < len(loose.layers)
    assert strict.channels is not None
    fractions = [k / strict_budget.stats[n].channels for n, k in strict.channels.items()]
    assert min(fractions) >= 0.5 or len(strict.layers) == 1


def test_apply_freezes_the_rest_and_swaps_the_layers():
    cb = budget(budget_fraction=0.1)
    net = cb.apply()
    plan = cb.plan()
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    expected = {f"{layer}.{p}" for layer in plan.layers for p in ("weight", "bias")}
    assert trained == expected | {"classifier.weight", "classifier.bias"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # folded
    assert any(type(m).__name__ == "BitMaskReLU" for m in net.modules())
    for name in plan.layers:
        assert torch.equal(net.get_submodule(name).trainable_in, cb.selection()[name])
    assert cb.apply() is net


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", ["uniform", "importance"])
def test_uniform_importance_reproduces_the_uniform_subset_distribution(sampler):
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(6, 5)
    batches = [(x, torch.randint(0, 3, (6,)))]
    kwargs = {"example_input": x, "layers": ["0"], "channel_sampler": sampler, "fold_bn": False}
    probe = ChannelBudget(model, budget_bytes=10**6, **kwargs)
    probe.rank_layers(batches)
    plan = probe.plan()
    two = plan.saved_bytes + plan.fixed_grad_bytes + 2 * plan.channel_bytes["0"]
    cb = ChannelBudget(model, budget_bytes=two, **kwargs)  # |S| = 2 of 5: 10 subsets
    cb.rank_layers(batches)
    cb.importance["0"] = torch.full((5,), 0.3)  # uniform pi
    assert cb.plan().channels == {"0": 2}
    cb.apply()
    draws = 2000
    counts = Counter(
        tuple(cb.resample(epoch)["0"].nonzero().flatten().tolist()) for epoch in range(draws)
    )
    subsets = list(itertools.combinations(range(5), 2))
    assert set(counts) == set(subsets)
    expected = draws / len(subsets)
    stat = sum((counts[s] - expected) ** 2 / expected for s in subsets)
    assert stat < chi2.ppf(0.999, len(subsets) - 1), stat


def test_importance_sampling_follows_pi():
    cb = budget(budget_fraction=0.05, channel_sampler="importance", max_layers=1)
    cb.apply()
    (name,) = cb.plan().layers
    pi = torch.zeros_like(cb.importance[name])
    pi[:3] = 1.0
    cb.importance[name] = pi
    k = cb.plan().channels[name]
    for epoch in range(20):
        chosen = cb.resample(epoch)[name]
        assert int(chosen.sum()) == k
        assert bool(chosen[: min(k, 3)].all())  # positive-weight channels come first


def test_resample_changes_the_channels_each_epoch_and_is_deterministic():
    a, b, c = (budget(budget_fraction=0.05, seed=s) for s in (0, 0, 1))
    for cb in (a, b, c):
        cb.apply()
    draws_a = [a.resample(e) for e in range(4)]
    draws_b = [b.resample(e) for e in range(4)]
    draws_c = [c.resample(e) for e in range(4)]
    same = [all(torch.equal(x[n], y[n]) for n in x) for x, y in zip(draws_a, draws_b, strict=True)]
    assert all(same)
    changed = [any(not torch.equal(x[n], y[n]) for n in x) for x, y in itertools.pairwise(draws_a)]
    assert all(changed)
    assert any(not torch.equal(draws_a[1][n], draws_c[1][n]) for n in draws_a[1])
    assert all(torch.equal(a.resample(2)[n], draws_a[2][n]) for n in draws_a[2])  # pure in epoch


def test_static_and_never_keep_the_first_draw():
    for kwargs in ({"channel_sampler": "static"}, {"resample": "never"}):
        cb = budget(budget_fraction=0.05, **kwargs)
        cb.apply()
        first = cb.resample(0)
        assert all(torch.equal(cb.resample(e)[n], first[n]) for e in (1, 5) for n in first)
    static = budget(budget_fraction=0.05, channel_sampler="static")
    static.apply()
    (name, chosen), *_ = static.selection().items()
    top = static.channel_rgn[name].argsort(descending=True)[: int(chosen.sum())]
    assert bool(chosen[top].all())


# --------------------------------------------------------------------------- training


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(X + 0.1 * i), Y).backward()
        opt.step()


def test_frozen_parameters_do_not_change_during_training():
    cb = budget(budget_fraction=0.05)
    net = cb.apply()
    before = copy.deepcopy(net.state_dict())
    params = [p for p in net.parameters() if p.requires_grad]
    _train(net, torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3))
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    for key, value in net.state_dict().items():
        if key in trained:
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key


def test_masked_optimizer_keeps_unselected_columns_bit_identical():
    cb = budget(budget_fraction=0.05)
    net = cb.apply()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = MaskedOptimizer(
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3), cb.neuron_mask(), net
    )
    for epoch in range(2):
        chosen = cb.resample(epoch)
        opt.set_masks(cb.neuron_mask())
        before = {n: net.get_submodule(n).weight.detach().clone() for n in chosen}
        _train(net, opt, steps=2)
        for name, keep in chosen.items():
            after = net.get_submodule(name).weight
            assert torch.equal(after[:, ~keep], before[name][:, ~keep])
            assert not torch.equal(after[:, keep], before[name][:, keep])


def test_state_dict_round_trip_resumes_identically():
    kwargs = {"budget_fraction": 0.05, "channel_sampler": "importance", "refresh_every": 1}
    a = budget(**kwargs)
    net = a.apply()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    for epoch in (0, 1):
        a.resample(epoch)
        _train(net, opt)
    state = a.state_dict()
    # Resume from the pretrained model: the ranking comes from the state, not from a new pass.
    b = ChannelBudget(resnet(), example_input=X, train_fully=["classifier"], **kwargs)
    b.load_state_dict(state)
    other = b.apply()
    assert b.plan() == a.plan()
    for name, chosen in a.selection().items():
        assert torch.equal(other.get_submodule(name).trainable_in, chosen)
    for epoch in (2, 3):
        da, db = a.resample(epoch), b.resample(epoch)
        assert all(torch.equal(da[n], db[n]) for n in da)
        assert all(torch.equal(a.importance[n], b.importance[n]) for n in a.importance)


def test_refresh_updates_pi_of_the_observed_channels_only():
    cb = budget(budget_fraction=0.05, channel_sampler="importance", refresh_every=1)
    net = cb.apply()
    chosen = cb.resample(0)
    before = {n: t.clone() for n, t in cb.importance.items()}
    _train(net, torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05))
    cb.resample(1)
    for name, keep in chosen.items():
        assert torch.equal(cb.importance[name][~keep], before[name][~keep])
        assert not torch.equal(cb.importance[name][keep], before[name][keep])


# --------------------------------------------------------------------------- scorers


def test_scorers_registry_and_lara_is_rgn_per_channel_byte():
    assert {"rgn", "lara", "random"} <= set(SCORERS)
    stats = LayerStats("l", grad_norm=2.0, weight_norm=4.0, channels=8, channel_bytes=1000)
    gen = torch.Generator().manual_seed(0)
    assert rgn_score(stats, gen) == 0.5
    assert lara_score(stats, gen) == pytest.approx(0.5 / 1000)
    lara = budget(layer_scorer="lara")
    for name, score in lara.scores.items():
        assert score == pytest.approx(lara.stats[name].rgn / lara.stats[name].channel_bytes)


def test_callable_scorer_orders_the_layers():
    last = "features.layer3.0.conv2"
    cb = budget(layer_scorer=lambda s, rng: float(s.name == last), max_layers=1)
    assert next(iter(cb.scores)) == last
    assert cb.plan().layers == (last,)


# --------------------------------------------------------------------------- bad input


def test_budget_below_the_smallest_unit_names_the_layer_and_the_bytes():
    cb = budget(budget_bytes=1000)
    with pytest.raises(
        ConfigError, match=r"smallest trainable unit: layer 'features\.[\w.]+' needs \d+ bytes"
    ):
        cb.plan()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"layer_scorer": "rgm"},
            r"unknown layer scorer 'rgm'; did you mean 'rgn'.*lara, random, rgn",
        ),
        (
            {"channel_sampler": "uniformly"},
            r"channel_sampler='uniformly' is unknown.*'importance', 'topk', 'static'\]; "
            r"did you mean 'uniform'",
        ),
        (
            {"layers": ["features.layer3.0.conv3"]},
            r"no module 'features\.layer3\.0\.conv3'; did you mean",
        ),
        ({"train_fully": ["classifer"]}, r"did you mean 'classifier'"),
        ({"layers": ["features.layer3.0.bn1"]}, r"BatchNorm2d|Identity"),
        ({"budget_fraction": 1.5}, r"budget_fraction must lie in \(0, 1\]"),
        ({"budget_bytes": 1000, "budget_fraction": 0.1}, r"exactly one of budget_bytes"),
        ({"allocation": "global"}, r"allocation='global' is unknown; choose one of \['layer'"),
        ({"layers": ["classifier"], "train_fully": ["classifier"]}, r"both candidates and"),
    ],
)
def test_bad_configuration(kwargs, match):
    kwargs.setdefault("budget_fraction", 0.1)
    with pytest.raises((ConfigError, UnknownNameError), match=match):
        ChannelBudget(resnet(), example_input=X, **kwargs)


def test_empty_ranking_loader_and_wrong_example_input():
    cb = ChannelBudget(resnet(), budget_fraction=0.1, example_input=X)
    with pytest.raises(ConfigError, match="got no batch: the loader is empty"):
        cb.rank_layers([])
    with pytest.raises(ConfigError, match="before plan"):
        cb.plan()
    with pytest.raises(ConfigError, match=r"example_input of shape \(8, 3, 16, 16\) does not run"):
        ChannelBudget(resnet(), budget_fraction=0.1, example_input=torch.randn(8, 3, 16, 16))


def test_resample_before_apply_and_mismatched_state():
    cb = budget(budget_fraction=0.05)
    with pytest.raises(ConfigError, match="apply"):
        cb.resample(0)
    cb.apply()
    state = cb.state_dict()
    state["selection"] = {"features.layer1.0.conv1": torch.ones(8, dtype=torch.bool)}
    with pytest.raises(ConfigError, match="this plan keeps"):
        cb.load_state_dict(state)
    del state["scores"]
    with pytest.raises(ConfigError, match=r"state lacks \['scores'\]"):
        cb.load_state_dict(state)
