"""NEq (#11) and SCoTTi (#38): similarity, velocity, masks, optimizer and sparse-layer driving."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.efficient.masks import NeuronMask
from sobre.efficient.neq import (
    NEq,
    SCoTTi,
    _reduce,
    backward_saving,
    drive_sparse,
    shuffle_mask,
    similarity,
    tau_step,
    velocity_step,
)
from sobre.efficient.sparse import sparsify

CONVS = ["conv1", "conv2"]


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            bn1=nn.BatchNorm2d(8),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 6, 3, padding=1),
            bn2=nn.BatchNorm2d(6),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 4),
        )
    )


def probe() -> list[torch.Tensor]:
    return [torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))]


def nudge(model: nn.Sequential, rows: tuple[int, ...] = (0,), by: float = 0.5) -> None:
    """Change ``conv2``'s output channels ``rows`` only (so only they and ``bn2``'s move)."""
    with torch.no_grad():
        for r in rows:
            model.conv2.weight[r] += by * torch.randn_like(model.conv2.weight[r])


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# --------------------------------------------------------------------------- equations


def test_similarity_is_a_mean_of_per_sample_cosines():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # one channel, two samples, two positions
    b = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    assert torch.allclose(similarity(a, b), torch.tensor([0.5]))  # mean of cos 0 and cos 1


def test_similarity_is_scale_invariant_per_neuron():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 10, generator=g), torch.randn(4, 3, 10, generator=g)
    scale = torch.tensor([0.01, 1.0, 7.0, 300.0]).view(4, 1, 1)
    assert torch.allclose(similarity(a * scale, b), similarity(a, b), atol=1e-6)
    assert torch.allclose(similarity(a, b / scale), similarity(a, b), atol=1e-6)
    assert torch.allclose(similarity(-a, b), -similarity(a, b), atol=1e-6)


def test_zero_vectors():
    zero, one = torch.zeros(1, 1, 3), torch.ones(1, 1, 3)
    assert similarity(zero, zero).tolist() == [1.0]  # both zero: nothing changed
    assert similarity(zero, one).tolist() == [0.0]
    assert similarity(one, zero).tolist() == [0.0]
    with pytest.raises(ConfigError, match="cannot compare outputs of shape"):
        similarity(zero, torch.zeros(1, 2, 3))


def test_paper_and_code_velocity_rules_differ_as_specified():
    mu, deltas = 0.5, [torch.tensor([0.4]), torch.tensor([-0.1]), torch.tensor([0.05])]
    paper, code = [], []
    sp, sc = torch.zeros(1), torch.zeros(1)
    for d in deltas:
        v, sp = velocity_step(d, sp, mu, "paper")
        paper.append(float(v))
        v, sc = velocity_step(d, sc, mu, "code")
        code.append(float(v))
    # paper: v_t = Δφ_t - μ v_{t-1}
    assert paper == pytest.approx([0.4, -0.1 - 0.5 * 0.4, 0.05 - 0.5 * (-0.3)])
    # code: threshold s + Δφ, then s <- μ (s + Δφ) - Δφ
    s1 = 0.5 * 0.4 - 0.4
    s2 = 0.5 * (s1 - 0.1) + 0.1
    assert code == pytest.approx([0.4, s1 - 0.1, s2 + 0.05], abs=1e-6)
    assert paper[0] == code[0] and paper[1:] != pytest.approx(code[1:])


# --------------------------------------------------------------------------- masks


def test_unchanged_model_freezes_everything_after_warmup():
    model = net()
    neq = NEq(model, probe(), eps=1e-3, warmup=2)
    masks = [neq.update(epoch) for epoch in range(4)]
    assert list(masks[0]) == ["conv1", "bn1", "conv2", "bn2"]  # the final Linear is not a neuron
    assert all(bool(m.all()) for mask in masks[:2] for m in mask.values())  # epochs 0, 1: warm-up
    assert all(not bool(m.any()) for mask in masks[2:] for m in mask.values())
    assert all(float(v.abs().max()) < 1e-6 for v in neq.velocities().values())
    stats = neq.stats()
    assert stats["frozen"] == 1.0 and stats["epoch"] == 3 and stats["eps"] == 1e-3
    assert set(stats["frozen_per_layer"].values()) == {1.0}


def test_only_changed_neurons_keep_training():
    model = net()
    neq = NEq(model, probe(), eps=1e-4)
    neq.update(0)
    nudge(model, rows=(1, 4))
    mask = neq.update(1)
    assert mask["conv2"].tolist() == [False, True, False, False, True, False]
    assert mask["bn2"].tolist() == mask["conv2"].tolist()  # BN neurons are their own, same map
    assert not mask["conv1"].any() and not mask["bn1"].any()
    assert neq.stats()["frozen"] == pytest.approx(1 - 4 / 28)


def test_pooled_criterion_ignores_where_in_the_map():
    a = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(0))
    moved = a[:, :, torch.randperm(9, generator=torch.Generator().manual_seed(1))]
    assert _reduce(a, "pooled").shape == (2, 1, 4)  # one vector over the probe samples
    assert torch.allclose(similarity(_reduce(moved, "pooled"), _reduce(a, "pooled")), torch.ones(2))
    assert bool((similarity(_reduce(moved, "cosine"), _reduce(a, "cosine")) < 0.99).all())
    scalars = torch.randn(3, 4, 1)  # vector outputs: the cosine runs over the samples (code)
    assert _reduce(scalars, "cosine").shape == (3, 1, 4)


def test_targets_exclude_and_the_final_linear():
    model = net()
    neq = NEq(model, probe(), targets=(nn.Conv2d, nn.Linear), exclude="conv1")
    assert neq.names == ["conv2"]
    with pytest.raises(ConfigError, match="select no Conv, Linear or norm"):
        NEq(model, probe(), targets="fc")


def test_loader_probe_and_empty_loader():
    model = net()
    x = torch.randn(6, 3, 8, 8)
    neq = NEq(model, DataLoader(TensorDataset(x, torch.zeros(6)), batch_size=4))
    assert neq.probe.num_samples == 6
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0)), batch_size=4)
    with pytest.raises(ConfigError, match="yielded no samples"):
        NEq(model, empty)


def test_bad_arguments_name_the_choices():
    model = net()
    with pytest.raises(ConfigError, match="eps must be a finite number > 0"):
        NEq(model, probe(), eps=0.0)
    with pytest.raises(ConfigError, match="eps must be"):
        NEq(model, probe(), eps=-1e-3)
    with pytest.raises(ConfigError, match=r"criterion='cos' is unknown.*\['cosine', 'pooled'\]"):
        NEq(model, probe(), criterion="cos")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"velocity_rule='repo' is unknown.*\['paper', 'code'\]"):
        NEq(model, probe(), velocity_rule="repo")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"threshold='auto' is unknown.*\['fixed', 'learned'\]"):
        NEq(model, probe(), threshold="auto")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mu must lie in"):
        NEq(model, probe(), mu=1.0)
    with pytest.raises(ConfigError, match="warmup must be >= 0"):
        NEq(model, probe(), warmup=-1)
    with pytest.raises(ConfigError, match="temperature must be"):
        SCoTTi(model, probe(), temperature=0.0)
    with pytest.raises(ConfigError, match="always learns its threshold"):
        SCoTTi(model, probe(), threshold="fixed")
    neq = NEq(model, probe())
    neq.update(3)
    with pytest.raises(ConfigError, match=r"update\(3\) after update\(3\)"):
        neq.update(3)


def test_shuffle_mask_keeps_per_layer_counts_and_is_seeded():
    mask = NeuronMask({"a": [True, False, False, True, True], "b": [False] * 3})
    one = shuffle_mask(mask, torch.Generator().manual_seed(0))
    assert [int(m.sum()) for m in one.values()] == [3, 0]
    assert one == shuffle_mask(mask, torch.Generator().manual_seed(0))
    draws = {
        tuple(shuffle_mask(mask, torch.Generator().manual_seed(s))["a"].tolist()) for s in range(8)
    }
    assert len(draws) > 1


# --------------------------------------------------------------------------- optimizer


def test_frozen_rows_stay_bit_identical_with_momentum_and_weight_decay():
    model = net()
    neq = NEq(model, probe(), eps=1e-4)
    opt = neq.wrap_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    )
    step(model, opt, 0)  # every neuron trains before the first update: momentum everywhere
    neq.update(0)
    nudge(model, rows=(2,))
    mask = neq.update(1)  # set on opt too
    assert opt.masks is mask and mask["conv2"].tolist() == [False, False, True, False, False, False]
    before = copy.deepcopy(model.state_dict())
    for seed in range(1, 4):
        step(model, opt, seed)
    after = model.state_dict()
    frozen = ~mask["conv2"]
    assert torch.equal(after["conv2.weight"][frozen], before["conv2.weight"][frozen])
    assert torch.equal(after["conv2.bias"][frozen], before["conv2.bias"][frozen])
    assert torch.equal(after["bn2.weight"][frozen], before["bn2.weight"][frozen])
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(after["conv2.weight"][2], before["conv2.weight"][2])
    assert not torch.equal(after["fc.weight"], before["fc.weight"])  # the classifier trains


def test_all_trainable_mask_equals_plain_sgd():
    model = net()
    twin = copy.deepcopy(model)
    neq = NEq(model, probe())
    opt = neq.wrap_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    )
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert bool(neq.update(0)["conv1"].all())
    for seed in range(3):
        step(model, opt, seed)
        step(twin, plain, seed)
    for (name, p), q in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# --------------------------------------------------------------------------- state, sparse


@pytest.mark.parametrize("threshold", ["fixed", "learned"])
def test_state_dict_round_trip_gives_the_same_next_mask(threshold):
    model = net()
    neq = NEq(model, probe(), eps=1e-3, threshold=threshold, velocity_rule="code")
    neq.update(0)
    nudge(model, rows=(0, 1, 2), by=0.3)
    neq.update(1)
    nudge(model, rows=(0, 3), by=0.1)
    neq.update(2)
    state = neq.state_dict()
    assert all(
        isinstance(t, torch.Tensor)
        for key in ("outputs", "phi", "state")
        for t in state[key].values()
    )
    nudge(model, rows=(1,), by=0.05)
    resumed = NEq(model, probe(), eps=1e-3, threshold=threshold, velocity_rule="code")
    resumed.load_state_dict(state)
    assert resumed.mask == neq.mask
    expected = neq.update(3)
    assert resumed.update(3) == expected
    for name, v in neq.velocities().items():
        assert torch.equal(resumed.velocities()[name], v)
    assert resumed.stats() == neq.stats()


def test_state_of_another_model_is_rejected():
    neq = NEq(net(), probe())
    neq.update(0)
    state = neq.state_dict()
    other = net()
    other.conv2 = nn.Conv2d(8, 7, 3, padding=1)
    other.bn2 = nn.BatchNorm2d(7)
    with pytest.raises(ConfigError, match=r"mask of layer 'conv2' has shape \(6,\).*needs \(7,\)"):
        NEq(other, probe()).load_state_dict(state)
    with pytest.raises(ConfigError, match="not an NEq state"):
        NEq(net(), probe()).load_state_dict({"epoch": 0})


def test_masks_drive_the_channel_sparse_layers():
    model = sparsify(net(), dict.fromkeys(CONVS))
    neq = NEq(model, probe(), eps=1e-4)
    assert bool(neq.update(0)["conv2"].all()) and bool(model.conv2.trainable_out.all())
    nudge(model, rows=(3,))
    mask = neq.update(1)
    for name in CONVS:
        assert torch.equal(model.get_submodule(name).trainable_out, mask[name])
    assert model.conv2.trainable_out.tolist() == [False, False, False, True, False, False]
    assert drive_sparse(net(), mask) == []  # nothing swapped: nothing to drive


# --------------------------------------------------------------------------- SCoTTi


def test_tau_step_moves_towards_the_break_even_speed():
    kw = {"tradeoff": 20.0, "temperature": 0.01, "lr": 0.3}
    trained = torch.ones(4, dtype=torch.bool)
    slow = tau_step(0.05, torch.full((4,), 0.045), trained, **kw)  # below 1/λ: freeze more
    fast = tau_step(0.05, torch.full((4,), 0.055), trained, **kw)  # above 1/λ: freeze less
    assert fast < 0.05 < slow
    gate = torch.sigmoid(torch.tensor(-0.5))
    assert slow - 0.05 == pytest.approx(0.3 * float(gate * (1 - gate)) * (1 - 20 * 0.045))
    frozen = torch.zeros(4, dtype=torch.bool)  # frozen neurons do not move τ̂
    assert tau_step(0.05, torch.full((4,), 0.045), frozen, **kw) == 0.05
    assert tau_step(0.0, torch.full((4,), 5.0), trained, **kw) == 0.0  # clipped to [0, 1]


def test_scotti_freezes_neurons_that_stop_moving_without_an_eps():
    model = net()
    scotti = SCoTTi(model, probe())
    scotti.update(0)
    nudge(model, rows=(0, 1, 2, 3, 4, 5), by=1.0)
    assert bool(scotti.update(1)["conv2"].all())  # the moving layer trains
    stats = scotti.stats()
    assert stats["threshold"] == "learned" and "eps" not in stats
    state = scotti.state_dict()
    assert state["tau_rel"]["conv2"] == pytest.approx(1 / 20, rel=0.1)  # near the break-even
    assert stats["tau"]["conv2"] == pytest.approx(
        state["tau_rel"]["conv2"] * state["scale"]["conv2"]
    )
    for epoch in range(2, 12):  # nothing moves any more: |v| halves each epoch (μ = 0.5)
        scotti.update(epoch)
    assert not scotti.mask["conv2"].any() and not scotti.mask["bn2"].any()
    taus = [t["conv2"] for t in scotti.tau_history]
    assert len(taus) == 11
    assert abs(taus[-1] - taus[-3]) / taus[-1] < 0.05  # settles


def test_counted_backward_saving_is_the_frozen_weight_gradient_share():
    model = net()
    x = probe()[0]  # 5 samples of 3x8x8
    mask = NEq(model, probe()).mask
    assert backward_saving(model, x, mask) == 0.0
    conv1, conv2, fc = 2 * (5 * 8 * 64) * 3 * 9, 2 * (5 * 6 * 64) * 8 * 9, 2 * (5 * 6) * 4
    dense = conv1 + (conv2 + conv2) + (fc + fc)  # conv1's input needs no gradient
    frozen = mask.replace({n: torch.zeros_like(m) for n, m in mask.items()})
    assert backward_saving(model, x, frozen) == pytest.approx((conv1 + conv2) / dense)
    half = mask.replace({**dict(mask.items()), "conv2": torch.arange(6) < 3})
    assert backward_saving(model, x, half) == pytest.approx(conv2 / 2 / dense)
