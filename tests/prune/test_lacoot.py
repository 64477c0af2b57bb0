"""LaCoOT: the max-sliced W2 distance against POT, block pairs, the penalty and block ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sobre.core.errors import ConfigError
from sobre.core.methods import StepContext
from sobre.core.taps import FeatureTap
from sobre.models import create
from sobre.prune.lacoot import (
    CollapseBlocks,
    LaCoOT,
    auto_pairs,
    disjoint_blocks,
    max_sliced_w2,
    rank_blocks,
    remove_blocks,
)


def test_max_sliced_w2_matches_pot_with_the_same_directions():
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 5, dtype=torch.float64) * 2
    ours = max_sliced_w2(x, y, n_projections=30, generator=torch.Generator().manual_seed(1))
    theta = torch.randn(5, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    ref = ot.max_sliced_wasserstein_distance(x.numpy(), y.numpy(), projections=theta.numpy())
    assert float(ours) == pytest.approx(float(ref), rel=1e-9)
    del gen


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 20), d=st.integers(1, 6), seed=st.integers(0, 1000))
def test_distance_properties(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    perm = torch.randperm(n, generator=gen)
    assert float(max_sliced_w2(x, x[perm], 10, torch.Generator().manual_seed(0))) == pytest.approx(
        0.0, abs=1e-6
    )  # a distance between distributions: sample order does not matter
    shifted = max_sliced_w2(x, x + 3.0, 200, torch.Generator().manual_seed(0))
    assert float(shifted) <= 3.0 * np.sqrt(d) + 1e-4  # |θ·shift| <= |shift|
    assert float(shifted) > 0


def test_distance_is_differentiable_and_checks_shapes():
    x = torch.randn(8, 3, requires_grad=True)
    max_sliced_w2(x, torch.zeros(8, 3)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="shape-preserving"):
        max_sliced_w2(torch.zeros(4, 3), torch.zeros(4, 2))


def test_auto_pairs_finds_every_shape_preserving_block():
    net = create(
        "residual_mlp",
        num_classes=10,
        in_channels=1,
        width=16,
        blocks=4,
        batch_norm=True,
        post_activation=True,
    )
    pairs = auto_pairs(net, torch.randn(2, 1, 28, 28))
    assert pairs == [
        ("stem", "blocks.0"),
        ("blocks.0", "blocks.1"),
        ("blocks.1", "blocks.2"),
        ("blocks.2", "blocks.3"),
    ]
    resnet = create("resnet18", num_classes=10, in_channels=3)
    blocks = [b for _, b in auto_pairs(resnet, torch.randn(2, 3, 32, 32))]
    assert blocks == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    with pytest.raises(ConfigError, match="pairs="):
        auto_pairs(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(2, 3))


def test_penalty_is_zero_for_identity_blocks_and_pulls_blocks_towards_identity():
    torch.manual_seed(0)
    net = create("residual_mlp", num_classes=10, in_channels=1, width=16, blocks=2)
    pairs = auto_pairs(net, torch.randn(2, 1, 28, 28))
    reg = LaCoOT(pairs, lam=2.0, n_projections=20)
    assert set(reg.needs_features) == {"stem", "blocks.0", "blocks.1"}
    x = torch.randn(32, 1, 28, 28)
    with FeatureTap(net, list(reg.needs_features), detach=False) as tap:
        out = net(x)
    before = reg(StepContext(net, x, None, out, tap.features))
    assert before > 0
    for block in net.blocks:  # f(x) = 0: every block is the identity
        torch.nn.init.zeros_(block.fc2.weight)
        torch.nn.init.zeros_(block.fc2.bias)
    with FeatureTap(net, list(reg.needs_features), detach=False) as tap:
        out = net(x)
    penalty = reg(StepContext(net, x, None, out, tap.features)).detach()
    assert float(penalty) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="pairs='auto' or a list"):
        LaCoOT([])
    with pytest.raises(ConfigError, match="input_shape"):
        LaCoOT("auto")
    auto = LaCoOT("auto", input_shape=[1, 28, 28])
    with pytest.raises(ConfigError, match="set up first"):
        auto(StepContext(net, x, None, out, tap.features))
    auto.setup(net)
    assert auto.pairs == [tuple(p) for p in pairs]


def test_rank_blocks_puts_the_identity_block_first():
    torch.manual_seed(0)
    net = create("residual_mlp", num_classes=10, in_channels=1, width=16, blocks=3)
    torch.nn.init.zeros_(net.blocks[1].fc2.weight)
    torch.nn.init.zeros_(net.blocks[1].fc2.bias)
    data = [(torch.randn(16, 1, 28, 28), torch.zeros(16)) for _ in range(3)]
    ranked = rank_blocks(net, data, auto_pairs(net, data[0][0]), n_projections=10)
    assert ranked[0].block == "blocks.1" and ranked[0].distance == pytest.approx(0.0, abs=1e-6)
    assert [d.distance for d in ranked] == sorted(d.distance for d in ranked)
    assert net.training  # mode restored


def test_collapse_blocks_removes_the_identity_block_and_reports():
    torch.manual_seed(0)
    net = create("residual_mlp", num_classes=10, in_channels=1, width=16, blocks=3)
    torch.nn.init.zeros_(net.blocks[2].fc2.weight)
    torch.nn.init.zeros_(net.blocks[2].fc2.bias)
    data = [(torch.randn(16, 1, 28, 28), torch.zeros(16)) for _ in range(2)]
    collapse = CollapseBlocks(k=1, n_projections=10)
    out = collapse.apply(net, data)
    assert isinstance(out.blocks[2], torch.nn.Identity) and not isinstance(
        net.blocks[2], torch.nn.Identity
    )
    report = collapse.report()
    assert report["removed"] == ["blocks.2"] and set(report["distances"]) == {
        "blocks.0",
        "blocks.1",
        "blocks.2",
    }
    x = data[0][0]
    assert torch.allclose(out.eval()(x), net.eval()(x), atol=1e-6)  # that block was the identity
    with pytest.raises(ConfigError, match="only 3 disjoint removable"):
        CollapseBlocks(k=4).apply(net, data)


def test_nested_blocks_are_never_removed_together():
    ranked = ["features.3.conv.1", "features.3", "features.30", "features.2", "features.2.conv"]
    assert disjoint_blocks(ranked, 3) == ["features.3.conv.1", "features.30", "features.2"]
    assert disjoint_blocks(ranked, 9) == ["features.3.conv.1", "features.30", "features.2"]
    net = create("mobilenet_v2", num_classes=10, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="nested"):
        remove_blocks(net, ["features.3", "features.3.conv.1"], example_inputs=x)
    assert not isinstance(net.features[3], torch.nn.Identity)  # left untouched
    pairs = auto_pairs(net, x)
    assert any(b == "features.3" for _, b in pairs) and any(
        b.startswith("features.3.") for _, b in pairs
    )  # MobileNetV2 offers both an inverted residual and its depthwise unit
    out = CollapseBlocks(k=6, n_projections=4).apply(net, [(x, torch.zeros(2))])
    removed = [n for n, m in out.named_modules() if isinstance(m, torch.nn.Identity)]
    assert len(removed) >= 6
