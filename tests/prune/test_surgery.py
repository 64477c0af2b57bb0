"""Depth surgery: exact, atomic, recorded and replayable edits (spec §0 "Depth surgery")."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn

from sobre.core.edits import edit_log, replay
from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.masks import attach_mask
from sobre.core.measure import depth, flops
from sobre.core.taps import FeatureTap
from sobre.models import create
from sobre.prune.surgery import (
    ChannelGate,
    fold_linear,
    get_module,
    linearize,
    remove_block,
    replace_activation,
    set_module,
)


def _rel(out: Tensor, ref: Tensor) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    return float((out - ref).abs().max() / ref.abs().max())


def _calibrate(model: nn.Module, x: Tensor) -> nn.Module:
    """Give every BN non-trivial running statistics and affine params, then switch to eval."""
    gen = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 1.5 + 0.3 + 0.1 * torch.randn(x.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return model.eval()


def _assert_replays(edited: nn.Module, fresh: nn.Module, x: Tensor) -> None:
    """The edit log rebuilds the structure on a fresh model; strict load gives equal outputs."""
    rebuilt = replay(fresh, edit_log(edited))
    rebuilt.load_state_dict(edited.state_dict(), strict=True)
    rebuilt.eval()
    edited.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), edited(x))
    assert edit_log(rebuilt) == edit_log(edited)


def _fresh(model: nn.Module) -> nn.Module:
    """The same (unedited) architecture with other weights, as a recipe would rebuild it."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    return fresh


def _small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create("small_cnn", num_classes=3, in_channels=1, width=4)


# --------------------------------------------------------------------------- module access


def test_get_and_set_module_with_clear_errors():
    net = _small_cnn()
    assert get_module(net, "features.relu1") is net.features.relu1
    assert get_module(net, "") is net
    old = net.features.relu1
    assert set_module(net, "features.relu1", nn.Identity()) is old
    assert isinstance(net.features.relu1, nn.Identity)
    with pytest.raises(UnknownNameError, match=r"did you mean 'features.relu2'"):
        get_module(net, "features.relu22")
    with pytest.raises(UnknownNameError, match=r"'features.rleu3' does not exist"):
        set_module(net, "features.rleu3", nn.Identity())
    with pytest.raises(ConfigError, match=r"model itself"):
        set_module(net, "", nn.Identity())


# --------------------------------------------------------------------------- activations


def test_replace_activation_lowers_depth_restores_and_replays():
    net, x = _calibrate(_small_cnn(), torch.randn(4, 1, 28, 28)), torch.randn(2, 1, 28, 28)
    cut = replace_activation(net, site="features.relu2")
    assert isinstance(cut.features.relu2, nn.Identity) and isinstance(net.features.relu2, nn.ReLU)
    assert (depth(net, x), depth(cut, x)) == (4, 3)
    assert edit_log(cut) == [
        {
            "op": "replace_activation",
            "module": "sobre.prune.surgery",
            "params": {"site": "features.relu2"},
        }
    ]
    _assert_replays(cut, _small_cnn(seed=5), x)
    back = replace_activation(cut, site="features.relu2", kind="relu")
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    assert [e["params"].get("kind") for e in edit_log(back)] == [None, "relu"]


def test_replace_activation_is_exact_when_no_neuron_is_off():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].bias.fill_(5.0)  # |W x| <= 2 on these inputs: every unit always ON
    x = torch.rand(32, 4) * 2 - 1
    cut = replace_activation(net, site="1")
    with torch.no_grad():
        assert _rel(cut(x), net(x)) < 1e-6


def test_replace_activation_refuses_bad_sites_and_kinds():
    net = _small_cnn()
    with pytest.raises(ConfigError, match=r"did you mean 'relu'"):
        replace_activation(net, site="features.relu1", kind="reul")
    with pytest.raises(ConfigError, match=r"'features.conv1' is a Conv2d, not an activation"):
        replace_activation(net, site="features.conv1")
    with pytest.raises(UnknownNameError, match=r"did you mean 'features.relu1'"):
        replace_activation(net, site="feature.relu1")
    resnet = create("resnet18", num_classes=10, in_channels=3)
    with pytest.raises(ConfigError, match=r"called at 2 places.*uniquify_activations"):
        replace_activation(resnet, site="layer1.0.relu")
    assert edit_log(net) == []


def _on_off_mlp() -> tuple[nn.Module, Tensor]:
    """Linear-ReLU-Linear whose hidden units are each always ON or always OFF on ``x``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.mul_(0.5)  # |W x| < 1.2 on inputs in [-1, 1]
        net[0].bias.copy_(torch.tensor([3.0, -3, 3, 3, -3, 3, -3, 3]))
    return net, torch.rand(64, 5) * 2 - 1


def test_linearize_is_exact_on_on_off_data_and_lowers_depth():
    net, x = _on_off_mlp()
    with FeatureTap(net, "1", mode="stats") as tap:
        net(x)
    p_on = tap.stats["1"].frac_positive
    assert set(p_on.tolist()) == {0.0, 1.0}  # zero entropy: every neuron always ON or OFF
    keep = p_on.int().tolist()
    lin = linearize(net, site="1", keep=keep)
    assert isinstance(lin[1], ChannelGate) and lin[1].keep.tolist() == keep
    assert "1.keep" in lin.state_dict()
    with torch.no_grad():
        assert _rel(lin(x), net(x)) < 1e-6
    assert (depth(net, x), depth(lin, x)) == (2, 1)
    assert edit_log(lin)[0]["params"] == {"site": "1", "keep": keep}
    _assert_replays(lin, _fresh(net), x)


def test_linearize_per_channel_and_per_unit_conv_maps():
    torch.manual_seed(0)
    base = torch.where(torch.rand(1, 1, 6, 6) > 0.5, 1.0, -1.0)
    x = base + (torch.rand(16, 1, 6, 6) - 0.5)  # each position keeps its sign
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0, 0.1]).reshape(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 0.0, -2.0]))  # channel 2 always OFF
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    with torch.no_grad():
        pre = conv(x)
    always_on, always_off = (pre > 0).all(0), (pre <= 0).all(0)
    assert bool((always_on | always_off).all())
    unit = linearize(net, site="1", keep=always_on.int().tolist())
    channel_net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        channel_net[0].bias.copy_(torch.tensor([9.0, -9.0, 9.0]))
    channel = linearize(channel_net, site="1", keep=[1, 0, 1])
    with torch.no_grad():
        assert _rel(unit(x), net(x)) < 1e-6
        assert _rel(channel(x), channel_net(x)) < 1e-6
        traced = fx.symbolic_trace(unit)  # the gate stays traceable for other tools
        assert torch.equal(traced(x), unit(x))
    assert unit[1].keep.shape == (3, 6, 6) and channel[1].keep.shape == (3,)


def test_linearize_tokens_channels_last_and_all_on():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight.mul_(0.2)
        net[0].bias.copy_(torch.tensor([4.0, -4, 4, -4, 4, 4]))
    x = torch.rand(3, 7, 4) * 2 - 1  # (batch, tokens, features)
    lin = linearize(net, site="1", keep=[1, 0, 1, 0, 1, 1], channel_dim=-1)
    with torch.no_grad():
        assert _rel(lin(x), net(x)) < 1e-6
    ones = linearize(net, site="1", keep=[1] * 6, channel_dim=-1)
    assert isinstance(ones[1], nn.Identity)
    _assert_replays(ones, nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), x)


def test_linearize_refuses_bad_keep_and_sites():
    net, _ = _on_off_mlp()
    with pytest.raises(ConfigError, match=r"0/1"):
        linearize(net, site="1", keep=[0, 2, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ConfigError, match=r"rectangular"):
        linearize(net, site="1", keep=[[1], [1, 0]])
    with pytest.raises(ConfigError, match=r"channel_dim must be 1 or -1"):
        linearize(net, site="1", keep=[1, 0], channel_dim=2)
    with pytest.raises(ConfigError, match=r"'0' is a Linear; linearize needs one of"):
        linearize(net, site="0", keep=[1, 0])
    tanh = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    with pytest.raises(ConfigError, match=r"Tanh"):
        linearize(tanh, site="1", keep=[1, 0])


# --------------------------------------------------------------------------- folding


def _convs(draw: st.DrawFn) -> tuple[nn.Module, nn.Module, tuple[int, int]]:
    """Two conv layers whose composition one conv reproduces exactly (three families)."""
    c0, c1, c2 = 2, draw(st.sampled_from([2, 4])), 3
    family = draw(st.sampled_from(["kxk-1x1", "1x1-kxk", "kxk-valid"]))
    k1, k2 = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 3]))
    bias1, bias2 = draw(st.booleans()), draw(st.booleans())
    if family == "kxk-1x1":
        first = nn.Conv2d(
            c0,
            c1,
            k1,
            stride=draw(st.sampled_from([1, 2])),
            padding=draw(st.sampled_from([0, 1])),
            groups=draw(st.sampled_from([1, c0])),
            bias=bias1,
        )
        second = nn.Conv2d(c1, c2, 1, stride=draw(st.sampled_from([1, 2])), bias=bias2)
        kernel = k1
    elif family == "1x1-kxk":
        pad = draw(st.sampled_from([0, 1]))
        first = nn.Conv2d(c0, c1, 1, bias=bias1 and pad == 0)
        groups = draw(st.sampled_from([1, c1]))
        stride = draw(st.sampled_from([1, 2]))
        out = c1 * 2 if groups > 1 else c2
        second = nn.Conv2d(c1, out, k2, stride, pad, groups=groups, bias=bias2)
        kernel = k2
    else:
        first = nn.Conv2d(c0, c1, k1, padding=draw(st.sampled_from([0, 1])), bias=bias1)
        second = nn.Conv2d(c1, c2, k2, stride=draw(st.sampled_from([1, 2])), bias=bias2)
        kernel = k1 + k2 - 1
    return first, second, (kernel, kernel)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), seed=st.integers(0, 1000), gated=st.booleans())
def test_fold_conv_pairs_is_exact(data, seed, gated):
    torch.manual_seed(seed)
    first, second, kernel = _convs(data.draw)
    keep = (torch.arange(first.out_channels) == 0) | (torch.rand(first.out_channels) > 0.3)
    middle = ChannelGate(keep.float()) if gated else nn.Identity()
    net = nn.Sequential(first, middle, second).eval()
    x = torch.randn(2, 2, 9, 9)
    folded = fold_linear(net, "0", "2", only_cheaper=False)
    assert isinstance(folded[2], nn.Identity) and isinstance(folded[1], nn.Identity)
    assert tuple(folded[0].kernel_size) == kernel and folded[0].groups == 1
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-5
    assert edit_log(folded)[0]["params"]["between"] == ["1"]
    _assert_replays(folded, _fresh(net), x)
    default = fold_linear(net, "0", "2")  # merged only when the merged conv is cheaper
    pair, merged = edit_log(default)[0]["params"]["macs"]
    assert edit_log(default)[0]["params"]["folded"] is (merged < pair)
    assert isinstance(default[2], nn.Identity) is (merged < pair)
    with torch.no_grad():
        assert _rel(default(x), net(x)) < 1e-5


def test_fold_batchnorm_into_conv_and_linear_is_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    conv_bn = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False), nn.BatchNorm2d(6))
    gated = nn.Sequential(
        nn.Conv2d(3, 4, 3), ChannelGate(torch.tensor([1.0, 0, 1, 1])), nn.BatchNorm2d(4)
    )
    lin_bn = nn.Sequential(nn.Flatten(), nn.Linear(192, 5), nn.Dropout(0.3), nn.BatchNorm1d(5))
    for net, first, second in ((conv_bn, "0", "1"), (gated, "0", "2"), (lin_bn, "1", "3")):
        _calibrate(net, x)
        folded = fold_linear(net, first, second)
        assert isinstance(get_module(folded, second), nn.Identity)
        assert get_module(folded, first).bias is not None
        with torch.no_grad():
            assert _rel(folded(x), net(x)) < 1e-5
    assert isinstance(folded[2], nn.Dropout)  # dropout stays (identity in eval)
    signal = torch.randn(4, 3, 10)
    conv1d = _calibrate(nn.Sequential(nn.Conv1d(3, 4, 3, stride=2), nn.BatchNorm1d(4)), signal)
    with torch.no_grad():
        assert _rel(fold_linear(conv1d, "0", "1")(signal), conv1d(signal)) < 1e-5


def test_fold_linear_pairs_and_our_nets():
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 4)
    gate = ChannelGate(torch.tensor([1.0, 0, 1, 1, 0, 1]), channel_dim=-1)
    net = nn.Sequential(nn.Linear(4, 6), gate, nn.Linear(6, 3, bias=False)).eval()
    folded = fold_linear(net, "0", "2")
    assert folded[0].weight.shape == (3, 4) and isinstance(folded[1], nn.Identity)
    with torch.no_grad():
        assert _rel(folded(tokens), net(tokens)) < 1e-5
    x = torch.randn(2, 3, 16, 16)
    resnet = _calibrate(create("resnet20", num_classes=10, in_channels=3), x)
    folded = fold_linear(resnet, "features.conv1", "features.bn1")
    folded = fold_linear(folded, "features.layer1.0.conv1", "features.layer1.0.bn1")
    with torch.no_grad():
        assert _rel(folded(x), resnet(x)) < 1e-5
    fresh = create("resnet20", num_classes=10, in_channels=3)
    _assert_replays(folded, fresh, x)


def test_fold_skips_a_bottleneck_pair_that_would_grow_unless_forced(caplog):
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    net = nn.Sequential(nn.Linear(64, 8), nn.Identity(), nn.Linear(8, 64)).eval()
    with caplog.at_level(logging.WARNING, logger="sobre.prune.surgery"):
        kept = fold_linear(net, "0", "2")  # 64 * 64 MACs merged > 64 * 8 + 8 * 64
    assert [type(m) for m in kept] == [nn.Linear, nn.Identity, nn.Linear]
    assert kept[0].out_features == 8
    assert "'0' and '2' not merged" in caplog.text and "4096" in caplog.text
    assert edit_log(kept)[0]["params"] == {
        "first": "0",
        "second": "2",
        "between": ["1"],
        "allow_approximate": False,
        "macs": [1024, 4096],
        "folded": False,
    }
    forced = fold_linear(net, "0", "2", only_cheaper=False)
    assert forced[0].weight.shape == (64, 64) and isinstance(forced[2], nn.Identity)
    assert edit_log(forced)[0]["params"]["folded"] is True
    with torch.no_grad():
        ref = net(x)
        assert torch.equal(kept(x), ref)
        assert _rel(forced(x), ref) < 1e-5
    for edited in (kept, forced):
        _assert_replays(edited, _fresh(net), x)  # replay takes the recorded decision
    widening = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 8)).eval()
    folded = fold_linear(widening, "0", "1")  # 8 * 8 < 8 * 64 + 64 * 8
    assert isinstance(folded[1], nn.Identity) and folded[0].weight.shape == (8, 8)
    assert edit_log(folded)[0]["params"]["macs"] == [1024, 64]


def test_fold_costs_conv_pairs_per_output_position_as_measured():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 16, 16)
    depthwise = nn.Sequential(  # a MobileNet depthwise 3x3 then a 1x1: dense 3x3 when merged
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.Conv2d(16, 32, 1, stride=2)
    ).eval()
    kept = fold_linear(depthwise, "0", "1")
    assert isinstance(kept[1], nn.Conv2d) and kept[0].groups == 16
    pair, merged = edit_log(kept)[0]["params"]["macs"]
    assert (pair, merged) == (16 * 9 * 4 + 16 * 32, 32 * 16 * 9)
    forced = fold_linear(depthwise, "0", "1", only_cheaper=False)
    assert forced[0].stride == (4, 4)
    assert flops(forced, x) / flops(depthwise, x) == pytest.approx(merged / pair)
    with torch.no_grad():
        assert _rel(forced(x), depthwise(x)) < 1e-5
    pointwise = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 8, 1)).eval()
    folded = fold_linear(pointwise, "0", "1")
    assert isinstance(folded[1], nn.Identity)
    pair, merged = edit_log(folded)[0]["params"]["macs"]
    assert flops(folded, x) / flops(pointwise, x) == pytest.approx(merged / pair)


def test_fold_kxk_pair_that_pads_is_refused_unless_approximate():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)).eval()
    with pytest.raises(ConfigError, match=r"exact only away from the borders.*allow_approximate"):
        fold_linear(net, "0", "1")
    approx = fold_linear(net, "0", "1", allow_approximate=True)
    assert approx[0].kernel_size == (5, 5) and approx[0].padding == (2, 2)
    x = torch.randn(2, 2, 10, 10)
    with torch.no_grad():
        out, ref = approx(x), net(x)
    assert _rel(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2]) < 1e-5
    assert _rel(out, ref) > 1e-3  # the borders differ
    _assert_replays(
        approx, nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, 1, 1)), x
    )


class _Fan(nn.Module):
    """A conv whose output also feeds a residual sum (not foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(h) + h


class _Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it); ``mode`` picks what sits between."""

    def __init__(self, mode: str = "plain") -> None:
        super().__init__()
        self.mode = mode
        self.conv, self.drop, self.bn = nn.Conv2d(2, 4, 3), nn.Dropout(0.2), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > float("-inf"):
            x = x + 0
        h = self.drop(self.conv(x))
        if self.mode == "relu":
            h = torch.relu(h)
        out = self.bn(h)
        return self.head(out) + (h.mean() if self.mode == "fan" else 0)


def test_fold_refuses_what_is_not_adjacent_or_supported():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"between '0' and '2' sits module '1'"):
        fold_linear(net, "0", "2")
    with pytest.raises(ConfigError, match=r"between '2' and '1' sits module '3'"):
        fold_linear(net, "2", "1")
    with pytest.raises(ConfigError, match=r"cannot merge '2' \(Conv2d\) with '3' \(Linear\)"):
        fold_linear(net, "2", "3")
    with pytest.raises(ConfigError, match=r"supported pairs: Conv"):
        fold_linear(net, "2", "3")
    with pytest.raises(ConfigError, match=r"feeds module 'b', call_function 'add'"):
        fold_linear(_Fan(), "a", "b")
    with pytest.raises(UnknownNameError, match=r"did you mean '2'"):
        fold_linear(net, "0", "22")
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, nn.Linear(3, 3), shared)
    with pytest.raises(ConfigError, match=r"called 2 times"):
        fold_linear(twice, "0", "1")
    masked = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    attach_mask(masked[0])
    with pytest.raises(ConfigError, match=r"bake them first"):
        fold_linear(masked, "0", "1")


def test_fold_probes_untraceable_models_on_example_inputs():
    x = torch.randn(4, 2, 6, 6)
    net = _calibrate(_Untraceable(), x)
    with pytest.raises(ConfigError, match=r"cannot be traced by torch.fx.*pass example_inputs"):
        fold_linear(net, "conv", "bn")
    folded = fold_linear(net, "conv", "bn", example_inputs=x)
    assert edit_log(folded)[0]["params"]["between"] == ["drop"]
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-5
    _assert_replays(folded, _Untraceable(), x)  # replay needs neither tracing nor inputs
    for mode, reader in (("relu", "op 'relu'"), ("fan", "op 'mean'")):
        bad = _calibrate(_Untraceable(mode), x)
        with pytest.raises(ConfigError, match=f"read by {reader}"):
            fold_linear(bad, "conv", "bn", example_inputs=x)
    with pytest.raises(ConfigError, match=r"read by bn"):
        fold_linear(net, "conv", "head", example_inputs=x)


# --------------------------------------------------------------------------- blocks


def test_remove_block_from_resnet20():
    x = torch.randn(2, 3, 16, 16)
    net = _calibrate(create("resnet20", num_classes=10, in_channels=3, width=0.5), x)
    cut = remove_block(net, "features.layer1.1", example_inputs=x)
    assert isinstance(cut.features.layer1[1], nn.Identity)
    with torch.no_grad():
        out, ref = cut(x), net(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    assert depth(cut, x) == depth(net, x) - 2  # relu1 and relu2 of the block
    assert edit_log(cut) == [
        {
            "op": "remove_block",
            "module": "sobre.prune.surgery",
            "params": {"block": "features.layer1.1"},
        }
    ]
    _assert_replays(cut, create("resnet20", num_classes=10, in_channels=3, width=0.5), x)
    with pytest.raises(
        ConfigError, match=r"'features.layer2.0'.*\(2, 8, 16, 16\).*\(2, 16, 8, 8\)"
    ):
        remove_block(net, "features.layer2.0", example_inputs=x)
    with pytest.raises(UnknownNameError, match=r"did you mean 'features.layer1.2'"):
        remove_block(net, "features.layer1.7", example_inputs=x)


def test_remove_block_from_torchvision_resnet18_and_vit():
    x = torch.randn(2, 3, 32, 32)
    resnet = _calibrate(create("resnet18", num_classes=10, in_channels=3), x)
    cut = remove_block(resnet, "layer1.1", example_inputs=x)
    assert isinstance(cut.layer1[1], nn.Identity) and depth(cut, x) < depth(resnet, x)
    _assert_replays(cut, create("resnet18", num_classes=10, in_channels=3), x)
    with pytest.raises(ConfigError, match=r"not shape-preserving"):
        remove_block(resnet, "layer3.0", example_inputs=x)
    img = torch.randn(2, 1, 28, 28)
    vit = create("vit_tiny28", num_classes=10, in_channels=1, dim=16, depth=2, heads=2).eval()
    cut = remove_block(vit, "blocks.1", example_inputs=img)
    assert depth(cut, img) == depth(vit, img) - 1 and len(cut.blocks) == 2
    _assert_replays(cut, _fresh(vit), img)
    fan = _Fan()
    fan.unused = nn.Conv2d(2, 2, 1)
    with pytest.raises(ConfigError, match=r"'unused' did not run"):
        remove_block(fan, "unused", example_inputs=torch.randn(1, 2, 4, 4))


# --------------------------------------------------------------------------- atomicity


def test_failed_edits_leave_model_and_log_untouched():
    x = torch.randn(2, 1, 28, 28)
    cnn = _calibrate(_small_cnn(), torch.randn(4, 1, 28, 28))
    convs = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1))
    cases = [
        (cnn, "features.relu1", lambda m: linearize(m, site="features.relu2", keep=[1, 5, 0, 1])),
        (cnn, "features.relu1", lambda m: fold_linear(m, "features.conv2", "features.conv3")),
        (cnn, "features.relu1", lambda m: remove_block(m, "features.pool1", example_inputs=x)),
        (convs, "0", lambda m: fold_linear(m, "1", "2")),  # refused inside the recorded edit
    ]
    for model, site, edit in cases:
        net = replace_activation(model, site=site)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        types, log = [type(m) for m in net.modules()], edit_log(net)
        with pytest.raises(ConfigError):
            edit(net)
        assert edit_log(net) == log and len(log) == 1
        assert [type(m) for m in net.modules()] == types
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_chain_of_edits_replays_on_a_fresh_model():
    x = torch.randn(2, 1, 28, 28)
    net = _calibrate(_small_cnn(), torch.randn(4, 1, 28, 28))
    edited = fold_linear(net, "features.conv1", "features.bn1")
    edited = linearize(edited, site="features.relu3", keep=[1, 0, 1, 1, 0, 1, 1, 1])
    edited = replace_activation(edited, site="features.relu4")
    edited = fold_linear(edited, "features.conv3", "features.bn3")
    assert [e["op"] for e in edit_log(edited)] == [
        "fold_linear",
        "linearize",
        "replace_activation",
        "fold_linear",
    ]
    assert edit_log(edited)[3]["params"]["between"] == []
    _assert_replays(edited, _small_cnn(seed=9), x)
