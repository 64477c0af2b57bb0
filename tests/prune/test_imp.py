"""IMP: exact sparsity per round, global/local cuts, masks under training, rewinding, schedule."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.masks import attach_mask, bake, get_mask, restore_masks
from sobre.core.serialization import load_tree, save_tree
from sobre.models import MLP, create
from sobre.prune.imp import (
    IMPSchedule,
    MagnitudePruner,
    Rewinder,
    global_sparsity,
    target_modules,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return create("mlp", num_classes=5, in_channels=1, input_size=6, hidden=(16, 8))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return create("small_cnn", num_classes=4, in_channels=1, width=4)


def inputs(model: nn.Module, batch: int = 8, seed: int = 1) -> Tensor:
    side = 6 if isinstance(model, MLP) else 12
    return torch.randn(batch, 1, side, side, generator=torch.Generator().manual_seed(seed))


def expected_live(total: int, amount: float, rounds: int) -> int:
    """torch.nn.utils.prune's count: ``round(amount * live)`` of the live weights per round."""
    for _ in range(rounds):
        total -= round(amount * total)
    return total


def raw(module: nn.Module) -> Tensor:
    """The unmasked weight behind a (possibly) masked module."""
    return (
        module.parametrizations.weight.original
        if hasattr(module, "parametrizations")
        else module.weight
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, seed: int = 2) -> None:
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = inputs(model, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        y = torch.randint(0, 4, (x.shape[0],), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "small_cnn"])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_sparsity_after_r_rounds_is_exact(make, scope):
    model, amount = make(), 0.2
    pruner = MagnitudePruner(amount, scope=scope)
    sizes = {n: m.weight.numel() for n, m in pruner.modules(model).items()}
    total = sum(sizes.values())
    for r in range(1, 7):
        report = pruner.step(model)
        if scope == "global":
            assert report.live == expected_live(total, amount, r)
            slack = r * 0.5 / total
        else:
            assert {n: layer.live for n, layer in report.layers.items()} == {
                n: expected_live(size, amount, r) for n, size in sizes.items()
            }
            slack = r * 0.5 * len(sizes) / total
        assert report.total == total
        assert abs(report.sparsity - (1 - (1 - amount) ** r)) <= slack
        assert global_sparsity(model) == pytest.approx(report.sparsity, abs=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    amount=st.floats(0.05, 0.95),
    rounds=st.integers(1, 4),
    scope=st.sampled_from(["global", "local"]),
)
def test_live_count_follows_torch_prune_semantics(amount, rounds, scope):
    model = mlp()
    pruner = MagnitudePruner(amount, scope=scope)
    sizes = [m.weight.numel() for m in pruner.modules(model).values()]
    for _ in range(rounds):
        report = pruner.step(model)
    if scope == "global":
        assert report.live == expected_live(sum(sizes), amount, rounds)
    else:
        assert [layer.live for layer in report.layers.values()] == [
            expected_live(s, amount, rounds) for s in sizes
        ]
    for name, module in pruner.modules(model).items():  # the mask is what the report counts
        assert int((get_mask(module) != 0).sum()) == report.layers[name].live


@pytest.mark.parametrize("scope", ["global", "local"])
def test_masks_equal_torch_nn_utils_prune(scope):
    """Same decisions as torch's reference (used here only) over three rounds of 30 %."""
    from torch.nn.utils import prune

    ours, ref = mlp(), mlp()
    layers = [(m, "weight") for m in ref.modules() if isinstance(m, nn.Linear)]
    pruner = MagnitudePruner(0.3, scope=scope)
    for _ in range(3):
        pruner.step(ours)
        if scope == "global":
            prune.global_unstructured(layers, prune.L1Unstructured, amount=0.3)
        else:
            for module, name in layers:
                prune.l1_unstructured(module, name, amount=0.3)
    for name, module in pruner.modules(ours).items():
        assert torch.equal(get_mask(module), ref.get_submodule(name).weight_mask), name


def two_layers() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(
            torch.linspace(0.01, 0.16, 16).view(4, 4)
            * torch.tensor([1.0, -1.0]).repeat(8).view(4, 4)
        )
        net[2].weight.copy_(torch.linspace(1.0, 2.5, 16).flip(0).view(4, 4))
    return net


def test_global_threshold_prunes_the_smallest_magnitudes_across_layers():
    net = two_layers()
    report = MagnitudePruner(0.5, scope="global").step(net)
    assert report.pruned == 16
    assert int(get_mask(net[0]).sum()) == 0  # the small layer goes entirely
    assert int(get_mask(net[2]).sum()) == 16
    assert report.threshold == pytest.approx(0.16)
    assert torch.equal(net[0].weight, torch.zeros(4, 4))
    # On a random net: every pruned |w| is <= every live |w|, whatever layer it is in.
    model = cnn()
    pruner = MagnitudePruner(0.3)
    pruner.step(model)
    mags = [(raw(m).detach().abs(), get_mask(m).bool()) for m in pruner.modules(model).values()]
    pruned_max = max(float(w[~keep].max()) for w, keep in mags)
    live_min = min(float(w[keep].min()) for w, keep in mags)
    assert pruned_max <= live_min


def test_local_scope_gives_equal_per_layer_sparsity():
    net = two_layers()
    report = MagnitudePruner(0.5, scope="local").step(net)
    assert report.threshold is None
    assert [layer.live for layer in report.layers.values()] == [8, 8]
    assert report.layers["0"].threshold == pytest.approx(0.08)
    model = cnn()
    report = MagnitudePruner(0.25, scope="local").step(model)
    for name, layer in report.layers.items():
        assert layer.sparsity == pytest.approx(0.25, abs=0.5 / layer.total), name


def test_ties_are_broken_by_position_identically_every_time():
    masks = []
    for _ in range(2):
        net = nn.Sequential(nn.Linear(4, 4, bias=False))
        nn.init.ones_(net[0].weight)
        report = MagnitudePruner(0.25).step(net)
        masks.append(get_mask(net[0]).clone())
        assert report.pruned == 4
    assert torch.equal(masks[0], masks[1])
    assert masks[0].flatten()[:4].sum() == 0 and masks[0].flatten()[4:].all()


def test_exclude_keeps_the_classifier_dense():
    model = cnn()
    before = model.classifier.weight.detach().clone()
    report = MagnitudePruner(0.5, exclude=["classifier"]).step(model)
    assert "classifier" not in report.layers
    assert get_mask(model.classifier) is None
    assert torch.equal(model.classifier.weight, before)
    model = cnn()
    report = MagnitudePruner(0.5, exclude=("features.conv[12]",)).step(model)
    assert sorted(report.layers) == ["classifier", "features.conv3", "features.conv4"]
    assert get_mask(model.features.conv1) is None
    # A container's name excludes everything under it.
    assert list(target_modules(model, exclude=["features"])) == ["classifier"]


def test_pruned_weights_get_zero_gradient_and_stay_zero_under_training():
    for make_opt in (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    ):
        model = cnn()
        opt = make_opt(model.parameters())
        train(model, opt)  # momentum / moment buffers are non-zero where weights will be pruned
        pruner = MagnitudePruner(0.5)
        pruner.step(model)
        train(model, opt, steps=4)
        for name, module in pruner.modules(model).items():
            off = get_mask(module) == 0
            assert torch.equal(module.weight[off], torch.zeros(int(off.sum()))), name
            assert float(raw(module).grad[off].abs().max()) == 0.0, name
            assert float(raw(module).grad[~off].abs().max()) > 0.0, name
        assert global_sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_masks_survive_state_dict_and_restore_on_a_fresh_model(tmp_path):
    model = cnn()
    train(model, torch.optim.SGD(model.parameters(), lr=0.05))  # calibrates BN statistics
    pruner = MagnitudePruner(0.4)
    pruner.step(model)
    save_tree(model.state_dict(), tmp_path / "m.safetensors")
    state, _ = load_tree(tmp_path / "m.safetensors")
    fresh = restore_masks(cnn(), state)
    fresh.load_state_dict(state)  # strict
    model.eval(), fresh.eval()
    with torch.no_grad():
        x = inputs(model)
        ref = model(x)
        assert float((fresh(x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert global_sparsity(fresh) == global_sparsity(model)
    # The next round decides the same on both (masks, not stale state, carry the history).
    a, b = pruner.step(model), pruner.step(fresh)
    assert a.to_dict() == b.to_dict()
    for name, module in pruner.modules(model).items():
        assert torch.equal(get_mask(module), get_mask(fresh.get_submodule(name)))


def test_score_hook_reweights_and_pruned_weights_never_come_back():
    model = mlp()
    pruner = MagnitudePruner(0.2)
    first = pruner.step(model)
    seen: dict[str, Tensor] = {}

    def inverted(name: str, weight: Tensor) -> Tensor:  # prefers the largest magnitudes
        seen[name] = weight.clone()
        return -weight.abs()

    before = {n: get_mask(m).clone() for n, m in pruner.modules(model).items()}
    report = MagnitudePruner(0.2, score=inverted).step(model)
    assert report.pruned == round(0.2 * first.live)
    for name, module in pruner.modules(model).items():
        mask = get_mask(module)
        assert not mask[before[name] == 0].any()  # still pruned
        assert torch.equal(
            seen[name][before[name] == 0], torch.zeros(int((before[name] == 0).sum()))
        )
    # A layer scored very high is left alone by the global threshold.
    model = mlp()
    boost = MagnitudePruner(0.5, score=lambda n, w: w.abs() * (1e6 if n == "classifier" else 1.0))
    assert boost.step(model).layers["classifier"].live == model.classifier.weight.numel()


def test_report_is_json_able():
    report = MagnitudePruner(0.3, scope="local").step(cnn())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["scope"] == "local" and data["pruned"] == report.pruned
    assert data["sparsity"] == pytest.approx(report.sparsity)
    assert data["layers"]["classifier"]["total"] == report.layers["classifier"].total


def test_weight_rewind_restores_captured_values_and_keeps_pruned_weights_zero():
    model = cnn()
    rewinder = Rewinder("weight_rewind")
    rewinder.capture(model)  # epoch-0 rewind point, before any mask exists
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    pruner = MagnitudePruner(0.5)
    pruner.step(model)
    masks = {n: get_mask(m).clone() for n, m in pruner.modules(model).items()}
    assert rewinder.apply(model) is True
    for name, module in pruner.modules(model).items():
        keep = masks[name].bool()
        assert torch.equal(get_mask(module), masks[name])
        assert torch.equal(module.weight[keep], start[f"{name}.weight"][keep])
        assert not module.weight[~keep].any()
    assert torch.equal(model.features.bn1.running_mean, start["features.bn1.running_mean"])
    assert torch.equal(model.features.bn1.weight, start["features.bn1.weight"])
    state = rewinder.state_dict()
    other = Rewinder("weight_rewind")
    other.load_state_dict(state)
    assert other.captured


def test_reinit_is_deterministic_under_its_seed_and_keeps_masks():
    drawn = []
    for seed in (1, 1, 2):  # mlp() is built under seed 0: reinit with 0 would redraw its init
        model = mlp()
        pruner = MagnitudePruner(0.5)
        pruner.step(model)
        masks = {n: get_mask(m).clone() for n, m in pruner.modules(model).items()}
        old = raw(model.features.fc1).detach().clone()
        rng = torch.get_rng_state()
        assert Rewinder("reinit", seed=seed).apply(model) is True
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
        assert not torch.equal(raw(model.features.fc1), old)
        for name, module in pruner.modules(model).items():
            assert torch.equal(get_mask(module), masks[name])
            assert not module.weight[masks[name] == 0].any()
        drawn.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(drawn[0], drawn[1])
    assert not torch.equal(drawn[0], drawn[2])


def test_finetune_changes_nothing_and_lr_rewind_only_asks_for_a_fresh_optimizer():
    for mode, reset in (("finetune", False), ("lr_rewind", True)):
        model = mlp()
        MagnitudePruner(0.3).step(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rewinder = Rewinder(mode)
        rewinder.capture(model)
        assert not rewinder.captured
        assert rewinder.apply(model) is reset
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def epochs(schedule: IMPSchedule, model: nn.Module, first: int, last: int) -> None:
    for epoch in range(first, last):
        with torch.no_grad():  # stands for a training epoch: every weight moves
            for p in model.parameters():
                p.add_(0.01 * (epoch + 1))
        schedule.on_epoch_end(model, epoch, {"val/acc": 0.5})


def test_schedule_prunes_at_the_right_epochs_and_resumes_from_its_state():
    model = mlp()
    schedule = IMPSchedule(MagnitudePruner(0.2), every_n_epochs=2, rounds=3)
    schedule.setup(model)
    epochs(schedule, model, 0, 4)
    assert [h["epoch"] for h in schedule.history] == [1, 3]
    state = json.loads(json.dumps(schedule.state_dict()))  # JSON-able without a rewinder
    resumed = IMPSchedule(MagnitudePruner(0.2), every_n_epochs=2, rounds=3)
    resumed.load_state_dict(state)
    copy_model = restore_masks(mlp(), model.state_dict())
    copy_model.load_state_dict(model.state_dict())
    epochs(resumed, copy_model, 4, 10)
    assert [h["epoch"] for h in resumed.history] == [1, 3, 5]
    assert [h["round"] for h in resumed.history] == [1, 2, 3]
    assert resumed.rounds_done == 3
    total = resumed.history[-1]["total"]
    assert resumed.history[-1]["live"] == expected_live(total, 0.2, 3)
    assert all(h["reset_optimizer"] is False for h in resumed.history)


def test_schedule_weight_rewinds_to_the_chosen_epoch():
    model = mlp()
    schedule = IMPSchedule(
        MagnitudePruner(0.5),
        every_n_epochs=3,
        rounds=2,
        rewinder=Rewinder("weight_rewind"),
        rewind_epoch=1,
    )
    schedule.setup(model)
    assert not schedule.rewinder.captured  # captured after epoch 1, not at setup
    assert get_mask(model.features.fc1).all()  # all-ones masks from the start
    epochs(schedule, model, 0, 1)
    after_one = {
        "features.fc1.weight": model.features.fc1.weight.detach().clone(),
        "classifier.bias": model.classifier.bias.detach().clone(),
    }
    epochs(schedule, model, 1, 3)
    assert schedule.history[-1]["reset_optimizer"] is True
    keep = get_mask(model.features.fc1).bool()
    assert torch.equal(model.features.fc1.weight[keep], after_one["features.fc1.weight"][keep])
    assert torch.equal(model.classifier.bias, after_one["classifier.bias"])
    state = schedule.state_dict()
    resumed = IMPSchedule(
        MagnitudePruner(0.5),
        every_n_epochs=3,
        rounds=2,
        rewinder=Rewinder("weight_rewind"),
        rewind_epoch=1,
    )
    resumed.setup(mlp())  # a resumed run sets up a fresh model, then loads the state
    resumed.load_state_dict(state)
    epochs(resumed, model, 3, 6)
    assert torch.equal(model.classifier.bias, after_one["classifier.bias"])
    assert resumed.rounds_done == 2


def test_resnet18_global_half_of_the_convs():
    torch.manual_seed(0)
    net = create("resnet18", num_classes=10, in_channels=3)
    report = MagnitudePruner(0.5, targets=(nn.Conv2d,)).step(net)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(report.layers) == len(convs) == 20
    total = sum(m.weight.numel() for m in convs)
    assert report.live == total - round(0.5 * total)
    assert global_sparsity(net, targets=(nn.Conv2d,)) == pytest.approx(0.5, abs=1 / total)
    assert get_mask(net.fc) is None
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    bake(net)  # zeros stay countable once the masks are gone
    assert global_sparsity(net, targets=(nn.Conv2d,)) == pytest.approx(0.5, abs=1 / total)


@pytest.mark.parametrize("amount", [0, 1, 1.5, -0.1, True, "0.2"])
def test_amount_outside_the_open_interval_is_refused(amount):
    with pytest.raises(ConfigError, match=r"amount must be a fraction in \(0, 1\)"):
        MagnitudePruner(amount)


def test_bad_configuration_errors_name_the_problem():
    with pytest.raises(ConfigError, match="did you mean 'global'"):
        MagnitudePruner(scope="globl")
    with pytest.raises(ConfigError, match=r"nn\.Module classes"):
        MagnitudePruner(targets=("conv",))
    with pytest.raises(ConfigError, match=r"no Conv2d module.*'Linear'"):
        MagnitudePruner(targets=(nn.Conv2d,)).step(mlp())
    with pytest.raises(ConfigError, match=r"'clasifier' matches no.*did you mean 'classifier'"):
        MagnitudePruner(exclude=["clasifier"]).step(mlp())
    with pytest.raises(ConfigError, match="removes every"):
        MagnitudePruner(exclude=["*"]).step(mlp())
    with pytest.raises(ConfigError, match=r"score\('features.fc1', weight\) returned shape"):
        MagnitudePruner(score=lambda n, w: w.abs().sum(1)).step(mlp())
    model = mlp()
    attach_mask(model.features.fc2, kind="channel")
    with pytest.raises(ConfigError, match=r"'features\.fc2' has a channel mask"):
        MagnitudePruner().step(model)
    with pytest.raises(
        ConfigError, match=r"Rewinder: mode='rewind' is unknown; choose one of \['finetune'"
    ):
        Rewinder("rewind")
    with pytest.raises(ConfigError, match=r"capture\(model\)"):
        Rewinder("weight_rewind").apply(mlp())
    rewinder = Rewinder("weight_rewind")
    rewinder.capture(mlp())
    with pytest.raises(ConfigError, match="cannot rewind"):
        rewinder.apply(cnn())
    with pytest.raises(ConfigError, match="every_n_epochs must be an integer >= 1"):
        IMPSchedule(MagnitudePruner(), every_n_epochs=0, rounds=2)
    with pytest.raises(ConfigError, match="rounds must be an integer >= 1"):
        IMPSchedule(MagnitudePruner(), every_n_epochs=1, rounds=0)
    with pytest.raises(ConfigError, match="rewind_epoch must be in"):
        IMPSchedule(MagnitudePruner(), every_n_epochs=2, rounds=1, rewind_epoch=3)
    saved = IMPSchedule(MagnitudePruner(), 1, 1, rewinder=Rewinder("lr_rewind")).state_dict()
    with pytest.raises(ConfigError, match="rewinder"):
        IMPSchedule(MagnitudePruner(), 1, 1).load_state_dict(saved)
