"""packify / unpack_member (spec trust.md §1.2 "Conversion"): any traceable model becomes M
members that never exchange information, and each member can be copied out as an ordinary net."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sobre.core.edits import edit_log, replay
from sobre.core.errors import ConfigError
from sobre.core.members import num_members
from sobre.models import create
from sobre.uncertainty.packed import (
    PackedConv2d,
    PackedLayerNorm,
    PackedLinear,
    PackedSelfAttention,
    packed_cat,
    split_members,
)
from sobre.uncertainty.packify import PackedEnsemble, packify, unpack_member

M, ALPHA, BATCH, CLASSES = 4, 2, 3, 10
# name -> (create kwargs, input shape without batch)
MODELS = {
    "lenet5": ({"in_channels": 1}, (1, 28, 28)),
    "small_cnn": ({"in_channels": 1, "width": 8}, (1, 28, 28)),
    "resnet20": ({"in_channels": 3}, (3, 16, 16)),
    "mlp": ({"in_channels": 1, "input_size": 8, "hidden": (16, 8)}, (1, 8, 8)),
    "vit_tiny28": ({"in_channels": 1, "depth": 2}, (1, 28, 28)),
    "resnet18": ({}, (3, 32, 32)),
    "resnet18_cifar": ({}, (3, 16, 16)),
    "mobilenet_v2": ({}, (3, 32, 32)),
    "vit_tiny_patch16_224": ({"depth": 2, "input_size": 32}, (3, 32, 32)),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs, shape = MODELS[name]
    return create(name, num_classes=CLASSES, **kwargs), torch.randn(BATCH, *shape)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fit_norm_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """One training forward moves BatchNorm running statistics off their defaults."""
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_packify_output_and_unpack_member_oracle(name):
    torch.manual_seed(0)
    base, x = _build(name)
    packed = packify(base, num_members=M, alpha=ALPHA)
    assert isinstance(packed, PackedEnsemble) and num_members(packed) == M
    _fit_norm_statistics(packed, x)
    with torch.no_grad():
        y = packed(x)
        assert y.shape == (M * BATCH, CLASSES)
        members = split_members(y, M)
        for m in range(M):
            member = unpack_member(packed, m).eval()
            assert (member(x) - members[:, m]).abs().max() < 1e-5
        assert not torch.allclose(members[:, 0], members[:, 1])  # independent initialisations
    # same parameter names as the base model, every one split into members
    assert {n for n, _ in packed.named_parameters()} == {n for n, _ in base.named_parameters()}
    assert {n for n, _ in packed.named_parameters()} <= set(packed.packing.axes)


def test_packify_layer_roles_and_widths_on_resnet18():
    base, _ = _build("resnet18")
    packed = packify(base, num_members=M, alpha=ALPHA)
    roles = packed.packing.roles
    assert roles["conv1"] == "first" and roles["fc"] == "last" and roles["bn1"] == "norm"
    first = packed.get_submodule("conv1")
    assert isinstance(first, PackedConv2d) and (first.in_channels, first.groups) == (3, 1)
    assert first.out_channels == ALPHA * 64
    shortcut = packed.get_submodule("layer2.0.downsample.0")
    assert isinstance(shortcut, PackedConv2d) and shortcut.groups == M
    assert packed.get_submodule("layer4.1.bn2").num_features == ALPHA * 512
    fc = packed.get_submodule("fc")
    assert isinstance(fc, PackedLinear) and fc.last and fc.weight.shape == (M * CLASSES, 256)
    assert "Packed" in type(packed).__name__ and base.fc.__class__ is nn.Linear  # base untouched


@pytest.mark.parametrize("gamma", [1, 2])
def test_inner_layers_have_alpha_squared_over_m_gamma_parameters(gamma):
    base, _ = _build("resnet18")
    packed = packify(base, num_members=M, alpha=ALPHA, gamma=gamma)
    inner = [p for p, r in packed.packing.roles.items() if r == "inner"]
    assert len(inner) == 19  # 16 block convs + 3 shortcuts
    for path in inner:
        ratio = packed.get_submodule(path).weight.numel() / base.get_submodule(path).weight.numel()
        assert ratio == ALPHA**2 / (M * gamma)
    # α = √M, γ = 1: about the single model's size (first/last layers and norms grow by α)
    total = _params(packed) / _params(base)
    assert total == pytest.approx(1.0 if gamma == 1 else 0.5, abs=0.01)


def test_depthwise_convs_stay_depthwise_per_member_on_mobilenet_v2():
    base, x = _build("mobilenet_v2")
    packed = packify(base, num_members=M, alpha=ALPHA, gamma=2)
    depthwise = [
        p for p, mod in base.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1
    ]
    assert depthwise
    for path in depthwise:
        conv = packed.get_submodule(path)
        assert conv.groups == conv.in_channels == ALPHA * base.get_submodule(path).in_channels
        assert conv.gamma == 1
        member = unpack_member(packed, 1).get_submodule(path)
        assert member.groups == member.in_channels == conv.in_channels // M
    _fit_norm_statistics(packed, x)
    assert (unpack_member(packed, 2)(x) - split_members(packed(x), M)[:, 2]).abs().max() < 1e-5


def test_vit_attention_is_packed_with_heads_per_member():
    base, _ = _build("vit_tiny_patch16_224")
    packed = packify(base, num_members=M, alpha=ALPHA)
    attn = packed.get_submodule("blocks.0.attn")
    assert isinstance(attn, PackedSelfAttention)
    assert (attn.num_heads, attn.head_dim) == (3, ALPHA * 192 // (M * 3))
    assert isinstance(packed.get_submodule("blocks.0.norm1"), PackedLayerNorm)
    assert packed.pos_embed.shape == (1, 5, ALPHA * 192)
    assert packed.packing.widened == {"cls_token": 2, "pos_embed": 2}
    member = unpack_member(packed, 0)
    original = type(base.blocks[0].attn)
    assert isinstance(member.get_submodule("blocks.0.attn"), original)
    assert member.get_submodule("blocks.0.attn").head_dim == ALPHA * 192 // (M * 3)


@pytest.mark.parametrize("name", ["lenet5", "vit_tiny28"])
def test_member_loss_gives_zero_gradient_to_other_members(name):
    torch.manual_seed(0)
    base, x = _build(name)
    packed = packify(base, num_members=M, alpha=ALPHA)
    axes = packed.packing.axes
    for m in (0, 3):
        packed.zero_grad()
        split_members(packed(x), M)[:, m].square().sum().backward()
        for pname, p in packed.named_parameters():
            blocks = p.grad.chunk(M, axes[pname])
            assert all(torch.all(b == 0) for j, b in enumerate(blocks) if j != m), pname
        assert packed.get_parameter(next(iter(axes))).grad.chunk(M)[m].abs().sum() > 0


def test_resnet20_option_b_shortcut_is_a_packed_conv():
    base, _ = _build("resnet20")
    packed = packify(base, num_members=M, alpha=ALPHA)
    assert packed.packing.roles["features.layer2.0.shortcut.conv"] == "inner"
    assert packed.packing.roles["features.layer2.0.shortcut.bn"] == "norm"


def test_shared_stem_with_named_first_layers():
    torch.manual_seed(0)
    base, x = _build("resnet18")
    firsts = ("layer2.0.conv1", "layer2.0.downsample.0")
    packed = packify(base, num_members=M, alpha=ALPHA, first=firsts)
    roles = packed.packing.roles
    assert all(roles[f] == "first" for f in firsts) and "conv1" not in roles
    assert "conv1.weight" not in packed.packing.axes  # the stem is shared by all members
    assert torch.equal(packed.conv1.weight, base.conv1.weight)
    _fit_norm_statistics(packed, x)
    assert (unpack_member(packed, 1)(x) - split_members(packed(x), M)[:, 1]).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="combines the shared input with member channels"):
        packify(base, num_members=M, alpha=ALPHA, first="layer2.0.conv1")


def test_last_none_keeps_packed_channels_and_deepcopy_keeps_packing():
    base, x = _build("lenet5")
    features = packify(base, num_members=M, alpha=ALPHA, last=None)
    assert features(x).shape == (BATCH, ALPHA * CLASSES)
    clone = copy.deepcopy(features)
    assert clone.packing.roles == features.packing.roles
    assert (unpack_member(clone, 0)(x) - features(x).chunk(M, 1)[0]).abs().max() < 1e-5


def test_packify_is_a_replayable_structure_edit():
    torch.manual_seed(0)
    base, x = _build("vit_tiny28")
    packed = packify(base, num_members=M, alpha=ALPHA, first="patch_embed")
    log = edit_log(copy.deepcopy(packed))
    assert log == [
        {
            "op": "packify",
            "module": "sobre.uncertainty.packify",
            "params": {"num_members": M, "alpha": ALPHA, "first": "patch_embed"},
        }
    ]
    rebuilt = replay(_build("vit_tiny28")[0], log)
    rebuilt.load_state_dict(packed.state_dict())
    packed.eval()
    rebuilt.eval()
    assert torch.equal(rebuilt(x), packed(x))
    assert not hasattr(base, "packing")  # the base model is left as it was


def test_packify_rejects_bad_arguments():
    base, _ = _build("lenet5")
    with pytest.raises(ConfigError, match=r"inner layer 'features.conv2'.*num_members·gamma"):
        packify(base, num_members=4, alpha=2, gamma=4)
    with pytest.raises(ConfigError, match="num_members"):
        packify(base, num_members=0, alpha=2)
    with pytest.raises(
        ConfigError, match="must name a Conv/Linear module the model calls exactly once"
    ):
        packify(base, num_members=2, alpha=2, last="classifier.nope")
    with pytest.raises(ConfigError, match=r"first=\['nope'\]"):
        packify(base, num_members=2, alpha=2, first="nope")
    packed = packify(base, num_members=2, alpha=2)
    with pytest.raises(ConfigError, match="already packed"):
        packify(packed, num_members=2, alpha=2)
    with pytest.raises(ConfigError, match="out of range"):
        unpack_member(packed, 2)
    with pytest.raises(ConfigError, match="needs a model returned by packify"):
        unpack_member(base, 0)


class _ChannelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(x.mean((2, 3)))


class _ChannelSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(4, 5)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.fc((a * b).mean((2, 3)))


class _DenseCatConvHead(nn.Module):
    """DenseNet-style channel concatenation and a SqueezeNet-style conv classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        a = self.conv1(x)
        x = self.bn(torch.cat([a, self.conv2(a).relu()], dim=1))
        return torch.flatten(F.adaptive_avg_pool2d(self.head(x).relu(), 1), 1)


class _OptionAShortcut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv1(x)
        y = self.conv2(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class _TorchAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Linear(4, 8), nn.Linear(8, 5)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.embed(x)
        return self.fc(self.attn(x, x, x, need_weights=False)[0][:, 0])


class _TokenMixing(nn.Module):
    """MLP-Mixer style: a Linear over the token dim mixes every channel's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.fc = nn.Linear(4, 8), nn.Linear(6, 6), nn.Linear(8, 5)

    def forward(self, x):
        x = self.embed(x.flatten(2).transpose(1, 2))  # (B, 6 tokens, 8 channels)
        return self.fc(self.mix(x.transpose(1, 2)).transpose(1, 2).mean(1))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(-x if x.sum() > 0 else x)


class _Conv(nn.Module):
    """conv -> ``op`` -> mean over space -> linear."""

    def __init__(self, op: nn.Module, features: int = 8) -> None:
        super().__init__()
        self.conv, self.op, self.fc = nn.Conv2d(3, 8, 3), op, nn.Linear(features, 5)

    def forward(self, x):
        return self.fc(self.op(self.conv(x)).mean((2, 3)))


class _ChannelMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(36, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean(1).flatten(1))


class _InputNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv, self.fc = nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(self.bn(x)).mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_ChannelShuffle(), r"node 'view' \(Tensor.view\).*reshapes"),
        (_ChannelSplit(), r"node 'chunk' \(Tensor.chunk\) is an operation packify cannot"),
        (_OptionAShortcut(), r"node 'pad'.*option A"),
        (_TorchAttention(), r"module 'attn' \(MultiheadAttention\).*Supported attentions"),
        (_TokenMixing(), r"module 'mix' \(Linear\)\) needs packed features in the last dim"),
        (_DataDependent(), r"cannot trace _DataDependent"),
        (_Conv(nn.LayerNorm((8, 6, 6))), r"module 'op' \(LayerNorm\)"),
        (_Conv(nn.LocalResponseNorm(2)), r"module 'op' \(LocalResponseNorm\).*cannot prove"),
        (_Conv(nn.PReLU()), r"module 'op' \(PReLU\)\) is a PReLU with one slope shared"),
        (_ChannelMean(), r"node 'mean' \(Tensor.mean\) reduces over dim 1"),
        (_InputNorm(), r"module 'bn' \(BatchNorm2d\).*shared input"),
    ],
    ids=[
        "shuffle",
        "channel-split",
        "option-a",
        "torch-mha",
        "token-mixing",
        "untraceable",
        "layernorm-chw",
        "lrn",
        "shared-prelu",
        "channel-mean",
        "input-norm",
    ],
)
def test_unsupported_ops_raise_naming_the_node(model, match):
    with pytest.raises(ConfigError, match=match):
        packify(model, num_members=2, alpha=2)


def test_channel_cat_keeps_member_blocks_and_conv_classifier_is_last():
    torch.manual_seed(0)
    packed = packify(_DenseCatConvHead(), num_members=2, alpha=2)
    assert packed.packing.roles["head"] == "last" and packed.bn.num_features == 20
    assert any(n.target is packed_cat for n in packed.graph.nodes)
    x = torch.randn(3, 3, 8, 8)
    _fit_norm_statistics(packed, x)
    y = packed(x)
    assert y.shape == (2 * 3, 5)
    for m in range(2):
        assert (unpack_member(packed, m)(x) - split_members(y, 2)[:, m]).abs().max() < 1e-5


@pytest.mark.parametrize(
    "op", [nn.GroupNorm(2, 8), nn.InstanceNorm2d(8, affine=True), nn.PReLU(8)], ids=str
)
def test_per_channel_modules_are_widened_per_member(op):
    torch.manual_seed(0)
    packed = packify(_Conv(op), num_members=2, alpha=2)
    x = torch.randn(2, 3, 8, 8)
    assert packed.packing.roles["op"] == "norm"
    y = split_members(packed(x), 2)
    for m in range(2):
        assert (unpack_member(packed, m)(x) - y[:, m]).abs().max() < 1e-5
