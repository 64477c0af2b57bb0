"""Activation entropy: exact values on built inputs, estimators, neuron shapes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sobre.core.errors import ConfigError, SobreError
from sobre.models import create
from sobre.prune import entropy as entropy_mod
from sobre.prune.entropy import ActivationEntropy, EntropyReport, binary_entropy
from sobre.prune.sites import uniquify_activations


def _probe() -> nn.Module:
    """The ReLU (site "1") sees the input itself."""
    return nn.Sequential(nn.Identity(), nn.ReLU())


def _three_channels(batch: int = 4) -> torch.Tensor:
    """Channel 0 always > 0, channel 1 always < 0, channel 2 > 0 at half of the positions."""
    x = torch.empty(batch, 3, 2, 2)
    x[:, 0] = 1.0
    x[:, 1] = -1.0
    x[:, 2] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    return x


def test_exact_entropies_of_built_channels():
    x = _three_channels()
    report = ActivationEntropy().compute(_probe(), [(x[:2], 0), (x[2:], 0)])
    assert report.p_on["1"].tolist() == [1.0, 0.0, 0.5]
    assert report.neuron_entropy["1"].tolist() == [0.0, 0.0, 1.0]
    assert report.layer_entropy["1"] == pytest.approx(1 / 3, abs=1e-12)
    assert report.always_on("1").tolist() == [True, False, False]
    assert report.always_off("1").tolist() == [False, True, False]
    assert (report.samples, report.batches) == (4, 2)
    unit = ActivationEntropy(neuron="unit").compute(_probe(), [x])
    assert unit.p_on["1"].shape == (3, 2, 2)
    assert unit.neuron_entropy["1"].sum().item() == 0.0  # each unit is constant over the batch
    assert unit.p_on["1"][2].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_batch_mean_is_biased_low():
    on, off = torch.ones(4, 2), -torch.ones(4, 2)  # ON in the first batch, OFF in the second
    dataset = ActivationEntropy(estimator="dataset").compute(_probe(), [on, off])
    batch_mean = ActivationEntropy(estimator="batch_mean").compute(_probe(), [on, off])
    assert dataset.neuron_entropy["1"].tolist() == [1.0, 1.0]
    assert batch_mean.neuron_entropy["1"].tolist() == [0.0, 0.0]
    assert torch.equal(batch_mean.p_on["1"], dataset.p_on["1"])  # same counts, other estimator


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batches=st.integers(1, 4),
    shift=st.floats(-2.0, 2.0),
    neuron=st.sampled_from(["channel", "unit"]),
)
def test_entropy_bounds_and_jensen(seed, batches, shift, neuron):
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(3, 4, 2, generator=gen) + shift for _ in range(batches)]
    dataset = ActivationEntropy(neuron=neuron).compute(_probe(), data)
    batch_mean = ActivationEntropy(neuron=neuron, estimator="batch_mean").compute(_probe(), data)
    for report in (dataset, batch_mean):
        h = report.neuron_entropy["1"]
        assert h.min() >= 0.0 and h.max() <= 1.0
        assert 0.0 <= report.layer_entropy["1"] <= 1.0
    # equal batch sizes: the mean of H over batches is at most H of the mean (concavity)
    assert torch.all(batch_mean.neuron_entropy["1"] <= dataset.neuron_entropy["1"] + 1e-12)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_binary_entropy_bounds(ps):
    h = binary_entropy(torch.tensor(ps))
    assert h.dtype == torch.float64 and h.min() >= 0.0 and h.max() <= 1.0
    assert binary_entropy(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 1.0, 0.0]


def test_tokens_have_channels_last():
    tokens = _three_channels(batch=2).flatten(2).transpose(1, 2)  # (N, L=4, C=3)
    model = nn.Sequential(nn.Identity(), nn.GELU())
    report = ActivationEntropy().compute(model, [tokens])
    assert report.p_on["1"].tolist() == [1.0, 0.0, 0.5]
    assert report.neuron_entropy["1"].tolist() == [0.0, 0.0, 1.0]
    assert ActivationEntropy(neuron="unit").compute(model, [tokens]).p_on["1"].shape == (4, 3)
    per_token = ActivationEntropy(channel_dim=1).compute(model, [tokens])
    assert per_token.p_on["1"].tolist() == [2 / 3, 1 / 3, 1 / 3, 2 / 3]


def test_constant_negative_bias_gives_a_dead_zero_entropy_site():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU())
    nn.init.zeros_(model[0].weight)
    nn.init.constant_(model[0].bias, -1.0)
    report = ActivationEntropy().compute(model, [torch.randn(8, 3) for _ in range(3)])
    assert report.layer_entropy["1"] == 0.0
    assert report.always_off("1").all() and not report.always_on("1").any()
    assert report.zero_entropy_sites() == ["1", "3"]  # site 3 only ever sees relu(-1) = 0 -> b
    assert report.ranking()[0][1] == 0.0


def test_auto_sites_on_small_cnn_and_report_helpers():
    torch.manual_seed(0)
    model = create("small_cnn", num_classes=10, in_channels=1, width=4)
    model.train()
    model.features.bn1.eval()
    data = [(torch.randn(4, 1, 28, 28), torch.zeros(4)) for _ in range(3)]
    report = ActivationEntropy().compute(model, data, max_batches=2)
    assert list(report.layer_entropy) == [f"features.relu{i}" for i in range(1, 5)]
    assert report.batches == 2 and report.samples == 8
    assert report.p_on["features.relu3"].shape == (8,)
    assert model.training and not model.features.bn1.training and model.features.bn2.training
    ranking = report.ranking()
    assert [h for _, h in ranking] == sorted(report.layer_entropy.values())
    assert report.max_entropy_site() == ranking[-1][0]
    summary = json.loads(json.dumps(report.to_dict()))
    site = summary["sites"]["features.relu1"]
    assert site["neurons"] == 4 and len(site["p_on"]) == 4
    assert site["layer_entropy"] == pytest.approx(report.layer_entropy["features.relu1"])
    chosen = ActivationEntropy(sites=["features.relu2"]).compute(model, data)
    assert list(chosen.layer_entropy) == ["features.relu2"]


def test_counts_are_all_reduced(monkeypatch):
    calls = []

    def fake_sum(t):  # two identical ranks
        calls.append(t.numel())
        return t * 2

    monkeypatch.setattr(entropy_mod.dist, "all_reduce_sum", fake_sum)
    report = ActivationEntropy().compute(_probe(), [_three_channels()])
    assert len(calls) == 1  # one collective for every site
    assert report.p_on["1"].tolist() == [1.0, 0.0, 0.5]
    assert (report.samples, report.batches) == (8, 2)


def _rank_data(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7 + rank)
    return [torch.randn(3 + rank, 4, 2, 2, generator=gen) + 0.5 * rank for _ in range(2)]


def _entropy_worker(rank: int, port: int, out_dir: str) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        report = ActivationEntropy().compute(_probe(), _rank_data(rank))
        torch.save(
            {"p": report.p_on["1"], "h": report.neuron_entropy["1"], "n": report.samples},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        tdist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_decide_on_the_pooled_counts(gloo_ranks):
    ranks = gloo_ranks(_entropy_worker)
    pooled = ActivationEntropy().compute(_probe(), _rank_data(0) + _rank_data(1))
    for out in ranks:
        assert out["n"] == 14
        assert torch.equal(out["p"], pooled.p_on["1"]) and torch.equal(out["h"], ranks[0]["h"])
        torch.testing.assert_close(out["h"], pooled.neuron_entropy["1"], rtol=0, atol=1e-12)


def test_shared_sites_need_uniquify_first():
    model = create("resnet18", num_classes=10)
    with pytest.raises(ConfigError, match="uniquify_activations"):
        ActivationEntropy().compute(model, [torch.randn(2, 3, 32, 32)])
    uniq = uniquify_activations(model)
    report = ActivationEntropy().compute(uniq, [torch.randn(2, 3, 32, 32)])
    assert len(report.layer_entropy) == 17 and "layer4.1.relu_1" in report.layer_entropy


def test_bad_input_is_named():
    with pytest.raises(
        ConfigError, match=r"neuron='layer' is unknown; choose one of \['channel', 'unit'\]"
    ):
        ActivationEntropy(neuron="layer")
    with pytest.raises(
        ConfigError, match=r"estimator='mean' is unknown; choose one of \['dataset', 'batch_mean'\]"
    ):
        ActivationEntropy(estimator="mean")
    with pytest.raises(ConfigError, match=r"pass \['relu'\]"):
        ActivationEntropy(sites="relu")
    with pytest.raises(ConfigError, match=r"did you mean 'features\.relu2'"):
        ActivationEntropy(sites=["features.relu_2"]).resolve(create("small_cnn", width=4))
    with pytest.raises(ConfigError, match="no activation site"):
        ActivationEntropy().resolve(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="max_batches"):
        ActivationEntropy().compute(_probe(), [torch.ones(1, 2)], max_batches=0)
    with pytest.raises(SobreError, match="no batch"):
        ActivationEntropy().compute(_probe(), [])
    report = EntropyReport({"a": torch.ones(2)}, {"a": torch.zeros(2)}, {"a": 0.0})
    with pytest.raises(ConfigError, match="did you mean 'a'"):
        report.always_on("A")
