"""EASIER: entropy ranking of the remaining sites, removal, stage-transform report, errors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sobre.core.edits import edit_log, replay
from sobre.core.errors import ConfigError
from sobre.core.measure import depth
from sobre.models import create
from sobre.prune.easier import Easier, removed_sites
from sobre.prune.sites import find_sites, uniquify_activations
from sobre.prune.surgery import linearize, replace_activation

SITES = ["features.relu1", "features.relu2", "features.relu3"]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create("mlp", num_classes=3, in_features=6, hidden=(8, 8, 8))


def _batches(seed: int = 0, n: int = 3, size: int = 16, features: int = 6) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=g), torch.zeros(size)) for _ in range(n)]


def _crafted() -> nn.Module:
    """Site "1" sees the (random normal) input itself; site "3" is constant: ON, ON, OFF, OFF."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[0].bias.zero_()
        net[2].weight.zero_()
        net[2].bias.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0]))
    return net


def test_crafted_ranking_and_report():
    easier = Easier(estimator="dataset")
    ranking = easier.rank(_crafted(), _batches(features=4, n=4, size=64))
    assert [name for name, _ in ranking] == ["3", "1"]
    assert ranking[0][1] == 0.0
    assert ranking[1][1] > 0.9  # p(ON) about 1/2 per channel
    out = easier.apply(_crafted(), _batches(features=4, n=4, size=64))
    assert isinstance(out[3], nn.Identity) and isinstance(out[1], nn.ReLU)
    report = easier.report()
    assert report["removed"] == "3" and report["entropy"] == 0.0
    assert (report["always_on"], report["always_off"], report["neurons"]) == (2, 2, 4)
    assert report["ranking"] == [[name, h] for name, h in ranking]
    assert report["removed_so_far"] == ["3"] and report["remaining"] == 1


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), estimator=st.sampled_from(["batch_mean", "dataset"]))
def test_ranking_is_ascending_over_remaining_sites(seed, estimator):
    net, data = _mlp(seed), _batches(seed)
    easier = Easier(estimator=estimator)
    ranking = easier.rank(net, data)
    entropies = [h for _, h in ranking]
    assert sorted(name for name, _ in ranking) == SITES
    assert entropies == sorted(entropies)
    assert all(0.0 <= h <= 1.0 for h in entropies)
    lowest = ranking[0][0]
    reduced = easier.apply(net, data)
    again = easier.rank(reduced, data)
    assert sorted(name for name, _ in again) == sorted(set(SITES) - {lowest})
    # the remaining sites are measured on the same data: unaffected upstream of the removal
    before, after = dict(ranking), dict(again)
    upstream = SITES[: SITES.index(lowest)]
    assert all(after[s] == pytest.approx(before[s], abs=1e-12) for s in upstream)


def test_remove_makes_identity_and_depth_drops_by_one():
    net = _mlp()
    x = torch.randn(4, 6)
    out = Easier().remove(net, "features.relu2")
    assert isinstance(out.features.relu2, nn.Identity)
    assert isinstance(net.features.relu2, nn.ReLU)  # the caller's model is untouched
    assert (depth(net, x), depth(out, x)) == (3, 2)
    assert [s.name for s in find_sites(out)] == ["features.relu1", "features.relu3"]
    fresh = replay(_mlp(seed=1), edit_log(out))
    fresh.load_state_dict(out.state_dict(), strict=True)
    with torch.no_grad():
        ref = out(x)
        assert (fresh(x) - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_removing_an_always_on_site_is_exact():
    net = _mlp()
    with torch.no_grad():
        net.features.fc2.bias.fill_(100.0)  # relu2 always ON on these inputs
    data = _batches()
    easier = Easier()
    out = easier.apply(net, data)
    report = easier.report()
    assert report["removed"] == "features.relu2" and report["entropy"] == 0.0
    assert report["always_on"] == report["neurons"] == 8
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        ref = net(x)
        assert (out(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_apply_report_is_json_and_cumulative():
    easier = Easier(max_batches=2)
    assert easier.report()["removed"] is None
    json.dumps(easier.report())
    net, data = _mlp(), _batches()
    reports = []
    for _ in range(3):
        net = easier.apply(net, data)
        reports.append(json.loads(json.dumps(easier.report())))
    assert [len(r["ranking"]) for r in reports] == [3, 2, 1]
    assert [r["remaining"] for r in reports] == [2, 1, 0]
    assert [r["removed"] for r in reports] == reports[-1]["removed_so_far"]
    assert sorted(reports[-1]["removed_so_far"]) == SITES
    assert reports[-1]["estimator"] == "batch_mean" and reports[-1]["max_batches"] == 2
    assert easier.entropy(_mlp(), data).batches == 2
    # a new object (a later stage, a resumed run) reads what was removed from the edit log
    assert Easier().remaining(replace_activation(_mlp(), site="features.relu3")) == SITES[:2]
    with pytest.raises(ConfigError, match=r"no activation site .* left to remove"):
        easier.rank(net, data)


def test_removed_sites_follows_restores():
    net = replace_activation(_mlp(), site="features.relu1")
    net = replace_activation(net, site="features.relu3")
    assert removed_sites(net) == ["features.relu1", "features.relu3"]
    net = replace_activation(net, site="features.relu1", kind="relu")
    assert removed_sites(net) == ["features.relu3"]
    assert Easier().remaining(net) == ["features.relu1", "features.relu2"]


def test_listed_sites_skip_linear_ones():
    net = linearize(_mlp(), site="features.relu1", keep=[1] * 8)  # Identity: all kept
    gated = linearize(_mlp(), site="features.relu1", keep=[1, 0] * 4)  # a ChannelGate
    easier = Easier(sites=["features.relu1", "features.relu3"])
    for model in (net, gated):
        assert [name for name, _ in easier.rank(model, _batches())] == ["features.relu3"]


def test_train_mode_uses_batch_statistics_and_restores_buffers():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[0].bias.zero_()
    net.eval()
    data = [(x + 5.0, y) for x, y in _batches(features=4, size=64)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    (_, h_eval), *_ = Easier(mode="eval").rank(net, data)
    (_, h_train), *_ = Easier(mode="train").rank(net, data)
    assert h_eval == 0.0  # running stats (0, 1): z = x + 5 > 0 always
    assert h_train > 0.9  # batch statistics: z normalised, ON about half the time
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m.training for m in net.modules())


def test_unknown_or_removed_site_errors():
    net, easier = _mlp(), Easier()
    with pytest.raises(ConfigError, match=r"'features\.relu9' does not exist.*features\.relu"):
        easier.remove(net, "features.relu9")
    with pytest.raises(ConfigError, match=r"'features\.relu4' does not exist"):
        Easier(sites=["features.relu1", "features.relu4"]).rank(net, _batches())
    once = easier.remove(net, "features.relu1")
    with pytest.raises(ConfigError, match=r"already linear.*features\.relu2"):
        easier.remove(once, "features.relu1")
    with pytest.raises(
        ConfigError, match=r"mode='test' is unknown; choose one of \['eval', 'train'\]"
    ):
        Easier(mode="test")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="estimator"):
        Easier(estimator="mean")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_batches"):
        Easier(max_batches=0)
    with pytest.raises(ConfigError, match="sites must be 'auto'"):
        Easier(sites="features.relu1")


class _Shared(nn.Module):
    """One ReLU module called at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_non_unique_sites_ask_for_uniquify():
    net, easier = _Shared(), Easier()
    with pytest.raises(ConfigError, match="uniquify_activations"):
        easier.rank(net, _batches())
    with pytest.raises(ConfigError, match="uniquify_activations"):
        easier.remove(net, "relu")
    unique = uniquify_activations(net)
    assert sorted(name for name, _ in easier.rank(unique, _batches())) == ["relu", "relu_1"]
    out = easier.apply(unique, _batches())
    x = torch.randn(2, 6)
    assert depth(unique, x) - depth(out, x) == 1
