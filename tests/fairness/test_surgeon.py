"""Debiasing surgeon (#44) and BISE (#9): masks over frozen weights, ST gradient, compaction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.masks import get_mask
from sobre.core.measure import count_params
from sobre.fairness.surgeon import (
    BISE,
    FantasticWeights,
    GroupBalancedCE,
    MaskedSubnetwork,
    confusion_mi,
    entropy_mi,
    group_weight_table,
    reestimate_bn,
)
from sobre.models import create


def _data(n: int = 32, classes: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 28, 28, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    b = torch.where(torch.rand(n, generator=gen) < 0.8, y, (y + 1) % classes)
    return TensorDataset(x, y, b)


def _model(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create("simple_conv_s", num_classes=classes, in_channels=3)


def test_fit_leaves_the_weights_bit_identical():
    model, data = _model(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = FantasticWeights("embedding", lr=0.5).fit(model, DataLoader(data, batch_size=8), 1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    masked = result.apply(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for name, p in masked.named_parameters():
        assert torch.equal(p, before[name.replace(".parametrizations.weight.original", ".weight")])
    assert 0.0 <= result.sparsity < 1.0
    assert len(result.history) == 1 and set(result.history[0]) >= {"task", "mi", "kept"}


def test_straight_through_gradient_is_dloss_dmask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net = MaskedSubnetwork(model, "weight", exclude=())
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    F.cross_entropy(net(x), y).backward()
    net.straight_through()
    # reference: dL/dM = dL/dW_eff ⊙ W at M = 1
    ref = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    w1, b1, w2, b2 = ref
    F.cross_entropy(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), y).backward()
    assert torch.allclose(net.scores[0].grad, w1.grad * w1, atol=1e-6)
    assert torch.allclose(net.scores[1].grad, w2.grad * w2, atol=1e-6)
    assert all(p.grad is None for p in net.model.parameters())


def test_scores_drive_the_core_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    net = MaskedSubnetwork(model, "weight", exclude=("2",))
    with torch.no_grad():
        net.scores[0][0] = -1.0
    net.refresh()
    mask = get_mask(net.model[0])
    assert mask is not None and mask[0].sum() == 0 and mask[1:].sum() == mask[1:].numel()
    assert get_mask(net.model[2]) is None


def test_keep_ratio_keeps_ceil_kappa_n_per_site():
    model = _model()
    x = torch.randn(2, 3, 28, 28)
    net = MaskedSubnetwork(model, "channel", example_inputs=x, keep_ratio=0.3)
    for i, site in enumerate(net.sites):
        assert int(net.hard(i).sum()) == math.ceil(0.3 * site.size[0])


def test_channel_mask_compacts_to_a_smaller_equal_model():
    model, data = _model(), _data()
    loader = DataLoader(data, batch_size=8)
    bise = BISE("embedding", keep_ratio=0.5, finetune_epochs=1)
    result = bise.fit(model, loader, 1)
    gated = result.apply(model).eval()
    pruned = result.apply(model, physically_prune=True).eval()
    x = data.tensors[0]
    with torch.no_grad():
        assert (gated(x) - pruned(x)).abs().max() < 1e-5
    assert count_params(pruned)[0] <= 0.6 * count_params(model)[0]
    tuned = bise.finetune(pruned, loader)
    assert count_params(tuned)[0] == count_params(pruned)[0]
    assert not all(
        torch.equal(a, b) for a, b in zip(tuned.parameters(), pruned.parameters(), strict=True)
    )


def test_missing_bias_labels_point_at_unsupervised_labels():
    model, data = _model(), _data()
    pairs = DataLoader(TensorDataset(*data.tensors[:2]), batch_size=8)
    with pytest.raises(ConfigError, match=r"FantasticWeights.*pseudo bias labels"):
        FantasticWeights("embedding").fit(model, pairs, 1)
    x, y, b = data.tensors
    unknown = DataLoader(TensorDataset(x, y, torch.full_like(b, -1)), batch_size=8)
    with pytest.raises(ConfigError, match=r"BISE.*unknown bias label"):
        BISE("embedding").fit(model, unknown, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FantasticWeights("embedding", granularity="neuron"),
        lambda: MaskedSubnetwork(nn.Linear(2, 2), "filter"),
        lambda: BISE("embedding", finetune_epochs=-1),
        lambda: FantasticWeights("embedding", mi="kl"),
        lambda: FantasticWeights("embedding", keep_ratio=1.5),
        lambda: BISE("embedding", reweight="lff"),
    ],
)
def test_bad_options_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_unknown_feature_layer_and_empty_mask_raise():
    model, data = _model(), _data()
    with pytest.raises(ConfigError):
        FantasticWeights("nope").fit(model, DataLoader(data, batch_size=8), 1)
    with pytest.raises(ConfigError, match="no layer to mask"):
        MaskedSubnetwork(nn.Sequential(nn.Linear(2, 2)), "weight", exclude=("0",))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5))
def test_confusion_mi_is_between_zero_and_the_bias_entropy(seed, k):
    gen = torch.Generator().manual_seed(seed)
    b = torch.randint(0, k, (40,), generator=gen)
    probs = torch.rand(40, k, generator=gen).softmax(1)
    w = torch.rand(40, generator=gen) + 0.1
    mi = float(confusion_mi(b, probs, w))
    prior = torch.zeros(k).index_add(0, b, w) / w.sum()
    entropy = float(-(prior * torch.log(prior.clamp_min(1e-12))).sum())
    assert -1e-6 <= mi <= entropy + 1e-5


def test_confusion_mi_extremes():
    b = torch.arange(4).repeat(5)
    assert float(confusion_mi(b, F.one_hot(b, 4).float())) == pytest.approx(math.log(4), abs=1e-5)
    assert float(confusion_mi(b, torch.full((20, 4), 0.25))) == pytest.approx(0.0, abs=1e-6)


def test_entropy_mi_is_entropy_minus_cross_entropy():
    b = torch.tensor([0, 0, 1, 2])
    logits = torch.randn(4, 3)
    h = -(torch.tensor([0.5, 0.25, 0.25]) * torch.tensor([0.5, 0.25, 0.25]).log()).sum()
    assert torch.allclose(entropy_mi(b, logits), h - F.cross_entropy(logits, b), atol=1e-6)


def test_group_weights_balance_the_groups():
    data = _data(60)
    table = group_weight_table(DataLoader(data, batch_size=16))
    _, y, b = data.tensors
    w = GroupBalancedCE(table).weights(y, b)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-5)
    groups = set(zip(y.tolist(), b.tolist(), strict=True))
    totals = {float(w[(y == g0) & (b == g1)].sum()) for g0, g1 in groups}
    assert max(totals) == pytest.approx(min(totals), rel=1e-5)


def test_reestimate_bn_gives_the_population_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x = torch.randn(30, 3) * 2 + 1
    reestimate_bn(model.eval(), DataLoader(TensorDataset(x), batch_size=10))
    h = model[0](x).detach()
    assert torch.allclose(model[1].running_mean, h.mean(0), atol=1e-5)
    assert not model.training and model[1].momentum == 0.1


def test_stage_transform_searches_on_the_loader_and_reports():
    model, data = _model(), _data()
    ffw = FantasticWeights("embedding", granularity="channel", epochs=1, physically_prune=True)
    assert ffw.report() == {}
    pruned = ffw.apply(model, DataLoader(data, batch_size=8))
    report = ffw.report()
    assert set(report) >= {"sparsity", "task", "mi", "kept"} and 0 <= report["sparsity"] <= 1
    assert count_params(pruned)[0] <= count_params(model)[0]
