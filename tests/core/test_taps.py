"""Tests of sobre.core.taps: selection, capture modes, hook lifetime and running statistics."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from sobre.core.errors import ConfigError, SobreError
from sobre.core.taps import FeatureTap, RunningStats, resolve_modules


class Net(nn.Module):
    """Tiny CNN whose ``relu`` runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.block(x))
        return self.fc(self.pool(x).flatten(1))


class PairOut(nn.Module):
    """Returns a tuple whose first element is not a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> tuple[str, Tensor, Tensor]:
        y = self.lin(x)
        return ("tag", y, -y)


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def x() -> Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_select_by_exact_name(net: Net, x: Tensor) -> None:
    with FeatureTap(net, "conv1") as tap:
        net(x)
    assert tap.names == ["conv1"]
    assert list(tap.features) == ["conv1"]
    torch.testing.assert_close(tap.features["conv1"], net.conv1(x))


def test_select_by_glob_excludes_root(net: Net) -> None:
    assert FeatureTap(net, "block.*").names == ["block.0", "block.1"]
    everything = FeatureTap(net, "*").names
    assert "" not in everything
    assert everything == [name for name, _ in net.named_modules() if name]


def test_select_by_type_tuple_and_mixed(net: Net) -> None:
    assert FeatureTap(net, nn.Conv2d).names == ["conv1", "block.0"]
    assert FeatureTap(net, (nn.Conv2d, nn.Linear)).names == ["conv1", "block.0", "fc"]
    mixed = FeatureTap(net, ["fc", nn.ReLU, "block.*", "conv1"]).names
    assert mixed == ["conv1", "relu", "block.0", "block.1", "fc"]  # named_modules order, no dup


def test_empty_selection_taps_nothing(net: Net, x: Tensor) -> None:
    with FeatureTap(net, ()) as tap:
        net(x)
    assert tap.names == []
    assert tap.features == {}


def test_bad_selector_names_close_module(net: Net) -> None:
    with pytest.raises(ConfigError, match="conv1") as info:
        FeatureTap(net, "conv_1")
    assert "'conv_1'" in str(info.value)
    with pytest.raises(ConfigError, match="Conv2d"):
        FeatureTap(net, nn.Conv3d)
    with pytest.raises(ConfigError, match="layer9"):
        FeatureTap(net, ["fc", "layer9.*"])
    with pytest.raises(ConfigError, match="bad feature selector"):
        FeatureTap(net, [3])  # type: ignore[list-item]


def test_bad_mode_and_capture(net: Net) -> None:
    with pytest.raises(ConfigError, match="mode"):
        FeatureTap(net, "fc", mode="some")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="capture"):
        FeatureTap(net, "fc", capture="grad")  # type: ignore[arg-type]


def test_input_vs_output_capture(net: Net, x: Tensor) -> None:
    with FeatureTap(net, "fc", capture="input") as inp, FeatureTap(net, "fc") as out:
        y = net(x)
    pooled = net.pool(net.relu(net.block(net.relu(net.conv1(x))))).flatten(1)
    torch.testing.assert_close(inp.features["fc"], pooled)
    torch.testing.assert_close(out.features["fc"], y)


def test_tuple_output_takes_first_tensor() -> None:
    model = nn.Sequential(PairOut())
    x = torch.randn(4, 3)
    with FeatureTap(model, "0") as tap:
        model(x)
    torch.testing.assert_close(tap.features["0"], model[0].lin(x))


def test_module_called_twice_full_keeps_last_stats_keep_all(net: Net, x: Tensor) -> None:
    with FeatureTap(net, "relu") as full, FeatureTap(net, "relu", mode="stats") as stats:
        net(x)
    first = net.relu(net.conv1(x))
    last = net.relu(net.block(first))
    torch.testing.assert_close(full.features["relu"], last)
    both = torch.cat([first, last])
    s = stats.stats["relu"]
    assert s.count == both.numel() // 4
    torch.testing.assert_close(s.mean, both.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(s.max, both.amax(dim=(0, 2, 3)))


def test_detach_false_lets_gradients_flow(net: Net, x: Tensor) -> None:
    with FeatureTap(net, "block.0", detach=False) as tap:
        net(x)
    feat = tap.features["block.0"]
    assert feat.requires_grad
    feat.square().mean().backward()
    expected = torch.autograd.grad(
        net.block[0](net.relu(net.conv1(x))).square().mean(), net.conv1.weight
    )[0]
    assert net.conv1.weight.grad is not None
    assert net.conv1.weight.grad.abs().sum() > 0
    torch.testing.assert_close(net.conv1.weight.grad, expected)


def test_detach_true_stores_graph_free_tensors(net: Net, x: Tensor) -> None:
    with FeatureTap(net, "block.0") as tap:
        net(x)
    assert not tap.features["block.0"].requires_grad
    assert tap.features["block.0"].grad_fn is None


def test_hooks_removed_after_exit_and_attach_idempotent(net: Net, x: Tensor) -> None:
    tap = FeatureTap(net, ["conv1", "fc"], mode="stats")
    with tap:
        assert len(net.conv1._forward_hooks) == 1
        net(x)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    tap.attach()
    tap.attach()
    assert len(net.fc._forward_hooks) == 1
    assert tap.attached
    net(x)  # long-lived use: statistics accumulate across attachments
    assert tap.stats["fc"].count == 4
    tap.remove()
    tap.remove()
    assert not tap.attached
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    net(x)
    assert tap.stats["fc"].count == 4
    tap.clear()
    assert tap.stats == {}
    assert tap.features == {}


def test_resnet18_globs() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with (
        FeatureTap(model, "layer*.0.relu") as tap,
        FeatureTap(model, "layer?", mode="stats") as stats,
    ):
        out = model(x)
    assert out.shape == (2, 10)
    assert tap.names == [f"layer{i}.0.relu" for i in range(1, 5)]
    shapes = {name: tuple(t.shape) for name, t in tap.features.items()}
    assert shapes == {
        "layer1.0.relu": (2, 64, 8, 8),
        "layer2.0.relu": (2, 128, 4, 4),
        "layer3.0.relu": (2, 256, 2, 2),
        "layer4.0.relu": (2, 512, 1, 1),
    }
    assert all(bool((t >= 0).all()) for t in tap.features.values())
    assert [s.mean.shape[0] for s in stats.stats.values()] == [64, 128, 256, 512]
    assert stats.stats["layer4"].count == 2


def _reference(full: Tensor, cdim: int) -> dict[str, Tensor]:
    dims = tuple(d for d in range(full.ndim) if d != cdim % full.ndim)
    f = full.double()
    return {
        "mean": f.mean(dims),
        "var": f.var(dims, correction=0),
        "min": f.amin(dims),
        "max": f.amax(dims),
        "frac_positive": (f > 0).double().mean(dims),
    }


def assert_stats_match(s: RunningStats, full: Tensor, cdim: int) -> None:
    ref = _reference(full, cdim)
    assert s.count == full.numel() // full.shape[cdim]
    for key, expected in ref.items():
        torch.testing.assert_close(getattr(s, key).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.std.double(), ref["var"].sqrt(), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    shift=st.floats(-3.0, 3.0),
)
def test_running_stats_equal_concatenated_capture(
    sizes: list[int], seed: int, shift: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    with FeatureTap(model, "0") as full, FeatureTap(model, "0", mode="stats") as stats:
        captured = []
        for n in sizes:
            model(torch.randn(n, 2, 5, 4, generator=gen) + shift)
            captured.append(full.features["0"])
    assert_stats_match(stats.stats["0"], torch.cat(captured), 1)
    folded = RunningStats()
    folded.FOLD_EVERY = 2  # fold the pending batch summaries often
    for batch in captured:
        folded.update(batch)
    assert_stats_match(folded, torch.cat(captured), 1)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_running_stats_tokens_channel_last(sizes: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6))
    with FeatureTap(model, "0", mode="stats", channel_dim=-1) as tap:
        batches = []
        for n in sizes:
            batch = torch.randn(n, 7, 5, generator=gen)
            model(batch)
            batches.append(model(batch).detach())
    s = tap.stats["0"]
    # every batch went through the tapped module twice
    assert_stats_match(s, torch.cat(batches + batches), -1)
    assert s.mean.shape == (6,)


def test_running_stats_merge_and_shapes() -> None:
    a, b = torch.randn(10, 3), torch.randn(7, 3) * 2 + 1
    merged = RunningStats().update(a).merge(RunningStats().update(b))
    assert_stats_match(merged, torch.cat([a, b]), 1)
    assert RunningStats().merge(RunningStats().update(a)).count == 10
    assert RunningStats().update(a).merge(RunningStats()).count == 10
    one = RunningStats().update(torch.tensor([1.0, -2.0, 3.0, 0.0]))
    assert one.count == 4
    torch.testing.assert_close(one.frac_positive, torch.tensor([0.5]))
    torch.testing.assert_close(one.min, torch.tensor([-2.0]))
    assert RunningStats().update(torch.empty(0, 3)).count == 0
    ints = RunningStats().update(torch.tensor([[1, 2], [3, 4]]))
    torch.testing.assert_close(ints.mean, torch.tensor([2.0, 3.0]))


def test_running_stats_errors() -> None:
    with pytest.raises(SobreError, match="empty"):
        _ = RunningStats().mean
    with pytest.raises(ConfigError, match="channels"):
        RunningStats().update(torch.randn(4, 3)).update(torch.randn(4, 5))
    with pytest.raises(ConfigError, match="channel_dim=3"):
        RunningStats(channel_dim=3).update(torch.randn(4, 3))


def test_all_reduce_is_noop_in_one_process() -> None:
    x = torch.randn(6, 4, 3)
    s = RunningStats().update(x)
    before = (s.count, s.mean.clone(), s.var.clone(), s.max.clone())
    assert s.all_reduce() is s
    assert s.count == before[0]
    torch.testing.assert_close(s.mean, before[1])
    torch.testing.assert_close(s.var, before[2])
    torch.testing.assert_close(s.max, before[3])


def test_resolve_modules_returns_modules(net: Net) -> None:
    pairs = resolve_modules(net, ["fc", nn.BatchNorm2d])
    assert [name for name, _ in pairs] == ["block.1", "fc"]
    assert pairs[1][1] is net.fc
