"""Packed-Ensembles layers (spec trust.md §1.2, §1.6 unit tests): each packed layer is M
independent small layers whose weights are the groups' blocks."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sobre.core.edits import edit_log, replay
from sobre.core.errors import ConfigError
from sobre.models import create
from sobre.uncertainty.packed import (
    PackedConv1d,
    PackedConv2d,
    PackedConv3d,
    PackedLayerNorm,
    PackedLinear,
    PackedSelfAttention,
    optimize_for_inference,
    packed_cat,
    split_members,
)
from sobre.uncertainty.packify import PackedEnsemble, packify, unpack_member

TOL = 1e-5
CONVS = {1: (PackedConv1d, nn.Conv1d), 2: (PackedConv2d, nn.Conv2d), 3: (PackedConv3d, nn.Conv3d)}


def _member_input(x: torch.Tensor, m: int, members: int, first: bool, dim: int) -> torch.Tensor:
    return x if first else x.chunk(members, dim)[m]


def _member_output(y: torch.Tensor, m: int, members: int, last: bool, dim: int) -> torch.Tensor:
    """Member m's rows ``m·B .. m·B+B-1`` after a last layer, else its channel block."""
    return y.chunk(members, 0 if last else dim)[m]


def _small_linear(layer: PackedLinear, m: int) -> nn.Linear:
    """Member m's ordinary Linear, built here from the weight blocks (independent of .member)."""
    members = layer.num_members
    out = layer.out_features // members
    rows = slice(m * out, (m + 1) * out)
    groups = 1 if layer.first else layer.groups // members
    blocks = layer.weight.detach()[rows].chunk(groups, 0)
    small = nn.Linear(sum(b.shape[1] for b in blocks), out)
    with torch.no_grad():
        small.weight.zero_()
        col = 0
        for j, block in enumerate(blocks):
            r = block.shape[0]
            small.weight[j * r : (j + 1) * r, col : col + block.shape[1]] = block
            col += block.shape[1]
        small.bias.copy_(layer.bias[rows])
    return small


@settings(max_examples=30, deadline=None)
@given(
    members=st.integers(1, 4),
    gamma=st.integers(1, 3),
    alpha=st.sampled_from([1, 2, 3, 0.5]),
    flags=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
    impl=st.sampled_from(["conv1d", "einsum", "dense"]),
    seed=st.integers(0, 100),
)
def test_packed_linear_equals_independent_members(members, gamma, alpha, flags, impl, seed):
    first, last = flags
    gamma = 1 if first or last else gamma
    torch.manual_seed(seed)
    in_f, out_f = 2 * members * gamma * 2, 2 * members * gamma * 3
    layer = PackedLinear(
        in_f,
        out_f,
        alpha=alpha,
        num_members=members,
        gamma=gamma,
        first=first,
        last=last,
        impl=impl,
    )
    x = torch.randn(5, 3, layer.in_features)
    y = layer(x)
    assert y.shape == ((members * 5, 3, out_f) if last else (5, 3, layer.out_features))
    for m in range(members):
        xm = _member_input(x, m, members, first, -1)
        expected = _small_linear(layer, m)(xm)
        got = _member_output(y, m, members, last, -1)
        assert (got - expected).abs().max() < TOL
        assert (layer.member(m)(xm) - expected).abs().max() < TOL


@settings(max_examples=30, deadline=None)
@given(
    nd=st.sampled_from([1, 2, 3]),
    members=st.integers(1, 4),
    gamma=st.integers(1, 2),
    groups=st.sampled_from([1, 2, "depthwise"]),
    alpha=st.sampled_from([1, 2]),
    flags=st.sampled_from([(False, False), (True, False), (False, True)]),
    seed=st.integers(0, 100),
)
def test_packed_conv_equals_independent_members(nd, members, gamma, groups, alpha, flags, seed):
    first, last = flags
    packed_cls, base_cls = CONVS[nd]
    channels = 4 * members * gamma
    depthwise = groups == "depthwise" and not (first or last)
    groups = channels if depthwise else 1 if first or groups == "depthwise" else groups
    gamma = 1 if first or last or depthwise else gamma
    torch.manual_seed(seed)
    layer = packed_cls(
        channels,
        channels,
        3,
        alpha=alpha,
        num_members=members,
        gamma=gamma,
        groups=groups,
        first=first,
        last=last,
        padding=1,
        stride=2 if nd < 3 else 1,
    )
    x = torch.randn(2, layer.in_channels, *([5] * nd))
    y = layer(x)
    assert y.shape[:2] == ((2 * members, channels) if last else (2, alpha * channels))
    out = layer.out_channels // members
    for m in range(members):
        rows = slice(m * out, (m + 1) * out)
        small = base_cls(
            layer.in_channels if first else layer.in_channels // members,
            out,
            3,
            groups=1 if first else layer.groups // members,
            padding=1,
            stride=layer.stride,
        )
        with torch.no_grad():
            small.weight.copy_(layer.weight[rows])
            small.bias.copy_(layer.bias[rows])
        xm = _member_input(x, m, members, first, 1)
        got = _member_output(y, m, members, last, 1)
        assert (got - small(xm)).abs().max() < TOL
        member = layer.member(m)
        assert type(member) is base_cls
        assert (member(xm) - got).abs().max() < TOL


def test_group_structure_of_inner_first_last_and_depthwise_convs():
    inner = PackedConv2d(16, 32, 3, alpha=2, num_members=4, gamma=2)
    assert (inner.in_channels, inner.out_channels, inner.groups) == (32, 64, 8)
    first = PackedConv2d(3, 16, 3, alpha=2, num_members=4, first=True)
    assert (first.in_channels, first.out_channels, first.groups) == (3, 32, 1)
    last = PackedConv2d(16, 10, 1, alpha=2, num_members=4, last=True)
    assert (last.in_channels, last.out_channels, last.groups) == (32, 40, 4)
    depthwise = PackedConv2d(16, 16, 3, alpha=2, num_members=4, groups=16)
    assert (depthwise.in_channels, depthwise.groups) == (32, 32)
    linear = PackedLinear(16, 10, alpha=2, num_members=4, last=True)
    assert linear.weight.shape == (40, 8)


def test_parameters_follow_alpha_squared_over_m_gamma():
    base = nn.Conv2d(64, 64, 3).weight.numel()
    for alpha, members, gamma in [(2, 4, 1), (2, 4, 2), (3, 3, 1), (4, 2, 2)]:
        packed = PackedConv2d(64, 64, 3, alpha=alpha, num_members=members, gamma=gamma)
        assert packed.weight.numel() == base * alpha**2 // (members * gamma)


@pytest.mark.parametrize(
    "layer",
    [
        PackedLinear(64, 64, alpha=2, num_members=4),
        PackedLinear(64, 64, alpha=2, num_members=4, gamma=2, impl="dense"),
        PackedConv2d(64, 64, 3, alpha=2, num_members=4),
        PackedConv1d(64, 64, 3, alpha=2, num_members=2, gamma=4),
    ],
    ids=["linear", "linear-gamma2", "conv2d", "conv1d-gamma4"],
)
def test_init_uses_the_fan_in_of_one_group(layer):
    """torch's default init of the small member layer: U(±1/sqrt(fan_in of one group))."""
    per_group_in = layer.weight.shape[1] * math.prod(layer.weight.shape[2:])
    bound = 1 / math.sqrt(per_group_in)
    w = layer.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.95 * bound  # a dense fan-in would give a bound sqrt(groups) smaller
    assert layer.bias.abs().max() <= bound
    blocks = w.chunk(layer.num_members)
    assert not torch.equal(blocks[0], blocks[1])  # every member draws its own init


@pytest.mark.parametrize("kind", ["linear", "conv", "conv-last"])
def test_member_loss_gives_zero_gradient_to_other_members(kind):
    members = 4
    if kind == "linear":
        layer: nn.Module = PackedLinear(8, 8, alpha=2, num_members=members, gamma=2)
        x = torch.randn(3, 16)
    else:
        last = kind == "conv-last"
        layer = PackedConv2d(
            8, 8, 3, alpha=2, num_members=members, gamma=1 if last else 2, last=last
        )
        x = torch.randn(3, 16, 5, 5)
    for m in range(members):
        layer.zero_grad()
        y = layer(x)
        out = y.chunk(members, 0 if kind == "conv-last" else 1)[m]
        out.square().sum().backward()
        for p in (layer.weight, layer.bias):
            grads = p.grad.chunk(members)
            assert grads[m].abs().sum() > 0
            assert all(torch.all(g == 0) for j, g in enumerate(grads) if j != m)


def test_last_layer_rows_are_member_major():
    members, batch, classes = 3, 4, 5
    layer = PackedLinear(6, classes, alpha=1, num_members=members, last=True)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.arange(members).repeat_interleave(classes).float())
    y = layer(torch.randn(batch, 6))
    assert y.shape == (members * batch, classes)
    for m in range(members):
        assert torch.all(y[m * batch : (m + 1) * batch] == m)
    split = split_members(y, members)
    assert split.shape == (batch, members, classes)
    assert torch.all(split[:, 2] == 2)


def test_split_members_layout_and_errors():
    y = torch.arange(12.0).reshape(6, 2)  # rows 0-2: member 0, rows 3-5: member 1
    split = split_members(y, 2)
    assert split.shape == (3, 2, 2)
    assert torch.equal(split[:, 1], y[3:])
    with pytest.raises(ConfigError, match="with M=4"):
        split_members(y, 4)
    with pytest.raises(ConfigError, match="num_members"):
        split_members(y, 0)


def test_packed_cat_keeps_each_members_blocks_together():
    a = torch.arange(4.0).reshape(1, 4)  # members 0, 1: [0, 1] and [2, 3]
    b = torch.arange(10.0, 16.0).reshape(1, 6)  # [10, 11, 12] and [13, 14, 15]
    out = packed_cat([a, b], 1, 2)
    assert out.tolist() == [[0, 1, 10, 11, 12, 2, 3, 13, 14, 15]]
    assert torch.equal(packed_cat([a, b], -1, 1), torch.cat([a, b], 1))


def test_linear_implementations_agree():
    torch.manual_seed(0)
    layer = PackedLinear(12, 18, alpha=2, num_members=3, gamma=2)
    x = torch.randn(4, 7, 24)
    outs = []
    for impl in ("conv1d", "einsum", "dense"):
        layer.impl = impl
        outs.append(layer(x))
    assert (outs[0] - outs[1]).abs().max() < TOL
    assert (outs[0] - outs[2]).abs().max() < TOL


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: PackedConv2d(6, 8, 3, alpha=1, num_members=4), r"alpha·in_channels = 6 .*= 4"),
        (lambda: PackedConv2d(8, 6, 3, alpha=1, num_members=4), r"alpha·out_channels = 6"),
        (lambda: PackedConv2d(8, 8, 3, alpha=2, num_members=4, gamma=3), r"num_members·gamma"),
        (lambda: PackedLinear(6, 8, alpha=1, num_members=4), r"alpha·in_features = 6"),
        (lambda: PackedLinear(8, 6, alpha=1, num_members=4), r"alpha·out_features = 6"),
        (lambda: PackedLinear(8, 8, alpha=1.5, num_members=8), r"alpha·in_features = 12"),
        (lambda: PackedLinear(5, 8, alpha=0.5, num_members=1), r"not a whole number"),
        (lambda: PackedLayerNorm(6, alpha=1, num_members=4), r"alpha·dim = 6"),
        (lambda: PackedConv2d(3, 8, 3, alpha=2, num_members=3, first=True), "out_channels = 16"),
        (lambda: PackedLinear(8, 8, alpha=2, num_members=0), "num_members must be"),
        (lambda: PackedLinear(8, 8, alpha=0, num_members=2), "alpha must be"),
        (lambda: PackedLinear(8, 8, alpha=-1, num_members=2), "alpha must be"),
        (lambda: PackedLinear(8, 8, alpha=2, num_members=2, gamma=0), "gamma must be"),
        (lambda: PackedLinear(8, 8, alpha=2, num_members=2, gamma=2, last=True), "pass gamma=1"),
        (lambda: PackedConv2d(8, 8, 3, alpha=2, num_members=2, groups=8, gamma=2), "depthwise"),
        (lambda: PackedConv2d(4, 8, 3, alpha=2, num_members=2, groups=2, first=True), "first"),
        (
            lambda: PackedLinear(8, 8, alpha=2, num_members=2, impl="sparse"),
            "impl='sparse' is unknown",
        ),
        (lambda: PackedSelfAttention(16, 3, alpha=2, num_members=4), "num_heads=3"),
    ],
)
def test_bad_shapes_and_hparams_raise_naming_the_argument(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_min_channels_per_group_lowers_gamma_with_a_warning(caplog):
    strict = PackedConv2d(32, 32, 3, alpha=2, num_members=2, gamma=4)
    assert strict.groups == 8 and strict.gamma == 4  # None: gamma is never changed
    with caplog.at_level(logging.WARNING, logger="sobre.uncertainty.packed"):
        lowered = PackedConv2d(
            32, 32, 3, alpha=2, num_members=2, gamma=4, min_channels_per_group=16
        )
    assert (lowered.gamma, lowered.groups) == (2, 4)  # 64 / (2·2) = 16 inputs per group
    assert "gamma lowered from 4 to 2" in caplog.text


def test_packed_layer_norm_is_one_layer_norm_per_member():
    torch.manual_seed(0)
    norm = PackedLayerNorm(6, alpha=2, num_members=3, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 12) * 3 + 1
    y = norm(x)
    for m, (xm, ym) in enumerate(zip(x.chunk(3, -1), y.chunk(3, -1), strict=True)):
        w, b = norm.weight.chunk(3)[m], norm.bias.chunk(3)[m]
        assert (F.layer_norm(xm, (4,), w, b, 1e-6) - ym).abs().max() < TOL
        assert (norm.member(m)(xm) - ym).abs().max() < TOL
    assert set(dict(norm.named_parameters())) == {"weight", "bias"}


@pytest.mark.parametrize("gamma", [1, 2])
def test_packed_self_attention_equals_independent_members(gamma):
    torch.manual_seed(0)
    members, heads = 2, 2
    attn = PackedSelfAttention(8, heads, alpha=2, num_members=members, gamma=gamma).eval()
    x = torch.randn(3, 5, 16)
    y = attn(x)
    for m in range(members):
        qkv, proj = attn.qkv.member(m), attn.proj.member(m)
        q, k, v = qkv(x.chunk(members, -1)[m]).reshape(3, 5, 3, heads, 4).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / 2.0).softmax(-1)  # head_dim 4: scale 1/2
        expected = proj((weights @ v).transpose(1, 2).reshape(3, 5, 8))
        assert (y.chunk(members, -1)[m] - expected).abs().max() < TOL
        assert (attn.member(m)(x.chunk(members, -1)[m]) - expected).abs().max() < TOL


# torch-uncertainty 0.13 cross-checks: same weights copied in, same outputs.
@pytest.fixture
def tu():
    return pytest.importorskip("torch_uncertainty.layers")


@pytest.mark.parametrize("impl", ["conv1d", "einsum"])
@pytest.mark.parametrize(
    "flags",
    [{}, {"gamma": 2}, {"first": True}, {"last": True}],
    ids=["inner", "g2", "first", "last"],
)
def test_linear_matches_torch_uncertainty(tu, impl, flags):
    torch.manual_seed(0)
    theirs = tu.PackedLinear(16, 8, alpha=2, num_estimators=4, implementation=impl, **flags)
    ours = PackedLinear(16, 8, alpha=2, num_members=4, impl=impl, **flags)
    with torch.no_grad():
        ours.weight.copy_(theirs.weight.reshape(ours.weight.shape))  # (G, o, i) blocks
        ours.bias.copy_(theirs.bias)
    x = torch.randn(3, ours.in_features)
    assert (ours(x) - theirs(x)).abs().max() < TOL


@pytest.mark.parametrize(
    "flags",
    [
        {"gamma": 2},  # 2·128 / (2·2) = 64 channels per group: they keep gamma=2
        {"first": True},
        {"last": True},
    ],
    ids=["g2", "first", "last"],
)
def test_conv2d_matches_torch_uncertainty(tu, flags):
    torch.manual_seed(0)
    kwargs = {"alpha": 2, "padding": 1, **flags}
    theirs = tu.PackedConv2d(128, 64, 3, num_estimators=2, **kwargs)
    ours = PackedConv2d(128, 64, 3, num_members=2, **kwargs)
    assert ours.groups == theirs.conv.groups
    with torch.no_grad():
        ours.weight.copy_(theirs.conv.weight)
        ours.bias.copy_(theirs.conv.bias)
    x = torch.randn(2, ours.in_channels, 6, 6)
    assert (ours(x) - theirs(x)).abs().max() < TOL


def test_gamma_lowering_matches_torch_uncertainty_only_when_asked(tu):
    """Theirs lowers gamma silently below 64 channels per group; ours only on request."""
    theirs = tu.PackedConv2d(32, 32, 3, alpha=2, num_estimators=2, gamma=2)
    assert PackedConv2d(32, 32, 3, alpha=2, num_members=2, gamma=2).groups == 4
    asked = PackedConv2d(32, 32, 3, alpha=2, num_members=2, gamma=2, min_channels_per_group=64)
    assert asked.groups == theirs.conv.groups == 2


def test_layer_norm_matches_torch_uncertainty_with_member_groups(tu):
    """Ours equals theirs with ``first=True`` (M groups); their default (one group) normalises
    all members together, which is not member-separable."""
    torch.manual_seed(0)
    ours = PackedLayerNorm(6, alpha=2, num_members=3)
    x = torch.randn(2, 5, 12)
    member_groups = tu.PackedLayerNorm(6, num_estimators=3, alpha=2, first=True)
    assert (ours(x) - member_groups(x)).abs().max() < TOL
    assert tu.PackedLayerNorm(6, num_estimators=3, alpha=2).num_groups == 1


# optimize_for_inference: BN folded into the (grouped) convs, channels_last; same logits as the
# reference grouped convs.
def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics (so folding is not the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(generator=gen)
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model.eval()


def _norm_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


@pytest.mark.parametrize("gamma", [1, 2])
def test_optimize_for_inference_equals_the_reference_grouped_convs(gamma):
    torch.manual_seed(0)
    base = create("resnet20", num_classes=10, in_channels=3)
    packed = _randomise_norms(packify(base, num_members=4, alpha=2, gamma=gamma))
    fast = optimize_for_inference(packed)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = packed(x)
        assert (fast(x) - ref).abs().max() < TOL
        assert (fast(x.contiguous(memory_format=torch.channels_last)) - ref).abs().max() < TOL
    assert not _norm_names(fast)
    assert _norm_names(packed)  # the model passed in is left as it was
    groups = {n: m.groups for n, m in packed.named_modules() if isinstance(m, PackedConv2d)}
    folded = {n: m for n, m in fast.named_modules() if isinstance(m, PackedConv2d)}
    assert {n: m.groups for n, m in folded.items()} == groups
    assert max(groups.values()) == 4 * gamma
    for conv in folded.values():
        assert conv.bias is not None
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(fast, PackedEnsemble)
    assert fast.num_members == 4
    assert not fast.training
    state = fast.state_dict()
    assert set(fast.packing.axes) <= set(state)  # the folded BNs left packify's description
    assert {f"{n}.bias" for n in folded} <= set(fast.packing.axes)
    assert not any(r == "norm" for r in fast.packing.roles.values())
    assert any(r == "norm" for r in packed.packing.roles.values())
    member = unpack_member(fast, 1)  # the oracle still works on the folded model
    with torch.no_grad():
        assert (member(x) - split_members(ref, 4)[:, 1]).abs().max() < TOL


class _FoldOnlyWhereExact(nn.Module):
    """One foldable conv -> BN pair among pairs that must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        pack = {"alpha": 2, "num_members": 2}
        self.stem = PackedConv2d(3, 8, 3, padding=1, first=True, **pack)
        self.bn = nn.BatchNorm2d(16)  # the stem's output is also read by the residual
        self.shared = PackedConv2d(8, 8, 1, **pack)  # called twice
        self.bn_a, self.bn_b = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
        self.conv = PackedConv2d(8, 8, 3, padding=1, gamma=2, **pack)
        self.folded = nn.BatchNorm2d(16)  # the only foldable one
        self.conv2 = PackedConv2d(8, 8, 1, **pack)
        self.batch_stats = nn.BatchNorm2d(16, track_running_stats=False)  # no running stats
        self.head = PackedConv2d(8, 4, 1, last=True, **pack)
        self.after = nn.BatchNorm2d(4)  # reads member rows (M·B, K, ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = F.relu(self.bn(h) + h)
        h = self.bn_b(self.shared(self.bn_a(self.shared(h))))
        h = self.batch_stats(self.conv2(F.relu(self.folded(self.conv(h)))))
        return self.after(self.head(h))


def test_optimize_for_inference_folds_only_exact_pairs_of_a_traced_model():
    torch.manual_seed(0)
    model = _randomise_norms(_FoldOnlyWhereExact())
    fast = optimize_for_inference(model, channels_last=False)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() < TOL
    assert _norm_names(fast) == _norm_names(model) - {"folded"}
    assert fast.conv.groups == 4
    assert fast.conv.weight.is_contiguous()  # channels_last=False keeps NCHW


def test_optimize_for_inference_of_3d_convs_uses_channels_last_3d():
    torch.manual_seed(0)
    pack = {"alpha": 2, "num_members": 2}
    model = nn.Sequential(
        PackedConv3d(2, 4, 3, padding=1, first=True, **pack),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        PackedConv3d(4, 4, 3, padding=1, **pack),
        nn.BatchNorm3d(8),
    )
    model = _randomise_norms(model)
    fast = optimize_for_inference(model)
    x = torch.randn(2, 2, 4, 4, 4)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() < TOL
    assert not _norm_names(fast)
    assert fast.get_submodule("3").weight.is_contiguous(memory_format=torch.channels_last_3d)


class _DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


def test_optimize_for_inference_rejects_untraceable_models():
    with pytest.raises(ConfigError, match="cannot trace _DataDependentBranch"):
        optimize_for_inference(_DataDependentBranch())


def test_optimize_for_inference_is_a_replayable_structure_edit():
    torch.manual_seed(0)
    packed = _randomise_norms(
        packify(create("resnet20", num_classes=10, in_channels=3), num_members=2, alpha=2)
    )
    fast = optimize_for_inference(packed, channels_last=False)
    log = edit_log(fast)
    assert [entry["op"] for entry in log] == ["packify", "packed_optimize_for_inference"]
    assert log[-1]["params"] == {"channels_last": False}
    rebuilt = replay(create("resnet20", num_classes=10, in_channels=3), log)
    rebuilt.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), fast(x))
