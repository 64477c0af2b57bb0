"""EGP / NEPENTHE: entropy-weighted scores, layer -> site mapping, linearisation, errors."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sobre.core.edits import edit_log
from sobre.core.errors import ConfigError, SobreError
from sobre.core.masks import remove_masks
from sobre.models import create
from sobre.prune.egp import EntropyGuidedPruner, layer_sites
from sobre.prune.entropy import ActivationEntropy
from sobre.prune.imp import global_sparsity
from sobre.prune.sites import find_sites
from sobre.prune.surgery import ChannelGate


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


class TwoBranch(nn.Module):
    """``relu_a(a(x)) + relu_b(b(x))``: each layer feeds its own site."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.relu_a = nn.Linear(4, 4), nn.ReLU()
        self.b, self.relu_b = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_a(self.a(x)) + self.relu_b(self.b(x))


def _two_branch() -> tuple[TwoBranch, torch.Tensor]:
    """Site ``relu_a`` ON about 98 % of the time (low entropy), ``relu_b`` half the time;
    ``|w_a|`` lies in [1, 2] and ``w_b = w_a / 4``, so plain magnitude prunes ``b`` first."""
    torch.manual_seed(0)
    net, x = TwoBranch(), torch.randn(512, 4)
    with torch.no_grad():
        net.a.weight.copy_(torch.sign(torch.randn(4, 4)) * (1 + torch.rand(4, 4)))
        net.b.weight.copy_(net.a.weight / 4)
        net.a.bias.copy_(2.0 * net.a.weight.norm(dim=1))  # z > 0 unless 2 sigma below the mean
        net.b.bias.zero_()
    return net, x


def test_scores_favour_low_entropy_layers():
    net, x = _two_branch()
    model, report = EntropyGuidedPruner(amount=0.25).step(copy.deepcopy(net), [x])
    h = report.entropy
    assert 0.05 < h["relu_a"] < 0.4 and h["relu_b"] > 0.95
    assert report.linearized == []
    layers = report.layers
    assert layers["a"]["site"] == "relu_a" and layers["b"]["site"] == "relu_b"
    assert layers["b"]["factor"] == 1.0
    expected = torch.exp(torch.tensor((h["relu_a"] - h["relu_b"]) / 0.05)).item()
    assert layers["a"]["factor"] == pytest.approx(expected, rel=1e-6)
    assert report.pruned == 8  # 0.25 of the 32 weights
    assert (layers["a"]["sparsity"], layers["b"]["sparsity"]) == (0.5, 0.0)
    # plain magnitude (tau -> infinity) prunes the smaller weights of b instead
    _, plain = EntropyGuidedPruner(amount=0.25, tau=float("inf")).step(copy.deepcopy(net), [x])
    assert plain.layers["a"]["factor"] == plain.layers["b"]["factor"] == 1.0
    assert (plain.layers["a"]["sparsity"], plain.layers["b"]["sparsity"]) == (0.0, 0.5)
    assert model.a.weight.count_nonzero() == 8 and model.b.weight.count_nonzero() == 16


@settings(max_examples=12, deadline=None)
@given(amount=st.floats(0.05, 0.95), tau=st.floats(0.01, 10.0))
def test_round_prunes_amount_of_the_live_pool(amount, tau):
    net, x = _two_branch()
    model, report = EntropyGuidedPruner(amount=amount, tau=tau).step(net, [x])
    assert report.pruned == round(amount * 32)
    assert report.sparsity == pytest.approx(report.pruned / 32)
    assert 0 < report.layers["a"]["factor"] < report.layers["b"]["factor"] == 1.0
    _, second = EntropyGuidedPruner(amount=amount, tau=tau).step(model, [x])
    live = sum(round(16 * (1 - second.layers[n]["sparsity"])) for n in second.pool)
    assert second.pruned == round(amount * (live + second.pruned))


def test_layer_site_mapping_on_residual_mlp_and_small_cnn():
    x = torch.randn(2, 1, 28, 28)
    res = create("residual_mlp", num_classes=10, in_channels=1, width=8, blocks=3)
    mapping = layer_sites(res, x)
    assert mapping["stem"] is None and mapping["classifier"] is None  # read through a sum
    for i in range(3):  # fc1 feeds the block's ReLU, fc2 consumes it
        assert mapping[f"blocks.{i}.fc1"] == mapping[f"blocks.{i}.fc2"] == f"blocks.{i}.relu"
    post = create(
        "residual_mlp", in_channels=1, width=8, blocks=2, batch_norm=True, post_activation=True
    )
    assert layer_sites(post, x)["blocks.1.fc2"] == "blocks.1.relu"  # not the out_relu after +
    cnn = create("small_cnn", num_classes=10, in_channels=1, width=4)
    assert layer_sites(cnn, x) == {
        **{f"features.conv{i}": f"features.relu{i}" for i in range(1, 5)},  # through BN
        "classifier": "features.relu4",  # through adaptive pooling and flatten
    }
    assert layer_sites(cnn, x, exclude=["classifier"], sites=["features.relu2"]) == {
        "features.conv1": None,
        "features.conv2": "features.relu2",
        "features.conv3": "features.relu2",  # consumed, as nothing is fed
        "features.conv4": None,
    }
    with pytest.raises(ConfigError, match=r"features\.relu2"):
        layer_sites(cnn, x, sites=["features.relu9"])


def test_mapping_sees_functional_ops_and_masks():
    """torchvision's ResNet: flatten is a function, downsample reads the previous block's
    output; masked (parametrized) layers are mapped like plain ones."""
    net = torchvision.models.resnet18(num_classes=10)
    pruned, _ = EntropyGuidedPruner().step(net, [torch.randn(2, 3, 32, 32)])
    mapping = layer_sites(pruned, torch.randn(2, 3, 32, 32))
    assert mapping["conv1"] == "relu"
    assert mapping["layer1.0.conv2"] == "layer1.0.relu"
    assert mapping["layer2.0.downsample.0"] == "layer1.1.relu_1"
    assert mapping["fc"] == "layer4.1.relu_1"


def _zero_entropy_block() -> tuple[nn.Module, torch.Tensor, list[int]]:
    """A residual MLP whose first block's ReLU is always ON (6 neurons) or dead (2 neurons)."""
    torch.manual_seed(1)
    net = create("residual_mlp", num_classes=3, in_features=5, width=8, blocks=2)
    keep = [1, 0, 1, 1, 1, 0, 1, 1]
    with torch.no_grad():
        net.blocks[0].fc1.bias.copy_(torch.tensor([3.0 if k else -3.0 for k in keep]))
    return net, torch.randn(64, 5), keep


def test_zero_entropy_site_is_linearised_exactly_and_leaves_the_pool(caplog):
    net, x, keep = _zero_entropy_block()
    dense = net(x).detach()
    pruner = EntropyGuidedPruner(amount=0.3)
    with caplog.at_level(logging.INFO, logger="sobre.prune.egp"):
        model, report = pruner.step(net, [(x[:32], 0), (x[32:], 0)])
    assert report.entropy["blocks.0.relu"] == 0.0 and report.entropy["blocks.1.relu"] > 0.1
    assert report.linearized == report.linearized_total == ["blocks.0.relu"]
    assert report.inexact == {"blocks.0.relu": 0}
    gate = model.blocks[0].relu
    assert isinstance(gate, ChannelGate) and gate.keep.tolist() == keep
    assert isinstance(net.blocks[0].relu, nn.ReLU)  # the caller's model is untouched
    assert [e["op"] for e in edit_log(model)] == ["linearize"]
    for name in ("blocks.0.fc1", "blocks.0.fc2"):
        assert report.layers[name]["factor"] is None and report.layers[name]["sparsity"] == 0.0
    assert report.pool == ["stem", "blocks.1.fc1", "blocks.1.fc2", "classifier"]
    assert report.layers["blocks.1.fc1"]["sparsity"] > 0
    # the linearisation alone is exact on the data: without the new masks, outputs are unchanged
    assert _close(remove_masks(copy.deepcopy(model))(x).detach(), dense)
    # next round: the site stays out (read back from the edit log), its layers stay dense
    model, second = pruner.step(model, [x])
    assert second.round == 2 and second.linearized == []
    assert second.linearized_total == ["blocks.0.relu"]
    assert "blocks.0.relu" not in second.entropy
    assert second.layers["blocks.0.fc1"]["factor"] is None
    assert global_sparsity(model) == pytest.approx(second.sparsity)


def test_conv_site_is_gated_per_channel():
    torch.manual_seed(4)
    net = create("small_cnn", num_classes=10, in_channels=1, width=4)
    x = torch.randn(16, 1, 28, 28)
    net.train()
    with torch.no_grad():
        for _ in range(3):  # calibrate the BN statistics
            net(x)
        net.features.bn2.bias.copy_(torch.tensor([40.0, -40.0, 40.0, 40.0]))
    net.eval()
    dense = net(x).detach()
    model, report = EntropyGuidedPruner(amount=0.5).step(net, [x[:8], x[8:]])
    assert report.linearized == ["features.relu2"]
    gate = model.features.relu2
    assert gate.channel_dim == 1 and gate.keep.tolist() == [1, 0, 1, 1]
    assert report.layers["features.conv2"]["factor"] is None
    assert report.pool == ["features.conv1", "features.conv3", "features.conv4", "classifier"]
    assert _close(remove_masks(copy.deepcopy(model))(x).detach(), dense)


def test_token_sites_are_gated_per_channel_last():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([50.0, -50.0, 50.0, 50.0, -50.0, 50.0]))
    x = torch.randn(8, 5, 4)  # (batch, tokens, channels)
    model, report = EntropyGuidedPruner(amount=0.2).step(net, [x])
    assert report.linearized == ["1"]
    assert model[1].channel_dim == -1 and model[1].keep.tolist() == [1, 0, 1, 1, 0, 1]
    assert report.pool == []  # both layers belong to the linearised site
    assert report.pruned == 0
    assert _close(model(x).detach(), net(x).detach())


def test_inexact_neurons_are_counted_and_kept_in_their_majority_state():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(400, 2)
    with torch.no_grad():  # neuron 2 is ON unless its input is 2 sigma low
        net[0].bias.copy_(torch.tensor([60.0, -60.0, 2.0 * net[0].weight[2].norm()]))
    report = ActivationEntropy().compute(net, [x])
    assert 0 < report.layer_entropy["1"] < 0.2
    model, egp = EntropyGuidedPruner(eps=0.2).step(net, [x])
    assert egp.linearized == ["1"] and egp.inexact == {"1": 1}
    assert model[1].keep.tolist() == [1, 0, 1]


def test_shared_activations_are_uniquified(caplog):
    net = torchvision.models.resnet18(num_classes=10)
    with caplog.at_level(logging.INFO, logger="sobre.prune.egp"):
        model, report = EntropyGuidedPruner().step(net, [torch.randn(2, 3, 32, 32)])
    assert "uniquify_activations" in caplog.text
    assert all(s.unique for s in find_sites(model))
    assert "layer1.0.relu_1" in report.entropy and len(report.entropy) == 17
    assert not any(s.unique for s in find_sites(net) if s.name == "layer1.0.relu")


def test_report_is_json_able_and_the_stage_transform_interface():
    net, x, _ = _zero_entropy_block()
    pruner = EntropyGuidedPruner(variant="nepenthe", exclude=("stem", "classifier"))
    assert pruner.report() == {}
    model = pruner.apply(net, loader=[x])
    data = json.loads(json.dumps(pruner.report()))
    assert data["round"] == 1 and data["variant"] == "nepenthe"
    assert data["linearized"] == ["blocks.0.relu"] and data["removed"] == 1
    assert data["pool"] == ["blocks.1.fc1", "blocks.1.fc2"]
    assert set(data["layers"]) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    assert data["sparsity"] == pytest.approx(global_sparsity(model, exclude=("stem", "classifier")))


def test_nepenthe_tolerance():
    pruner = EntropyGuidedPruner(variant="nepenthe", delta=1.0)
    assert not pruner.should_stop(0.936, 0.945)  # 0.9 points below
    assert not pruner.should_stop(0.935, 0.945)  # exactly delta is inside
    assert pruner.should_stop(0.934, 0.945)
    assert not pruner.should_stop(0.96, 0.945)
    assert pruner.select([0.95, 0.94, 0.93, 0.95], 0.945) == 2  # stops at the first drop
    assert pruner.select([0.95, 0.94], 0.945) == 2
    assert pruner.select([0.90], 0.945) == 0  # keep the dense model
    with pytest.raises(ConfigError, match="fraction"):
        pruner.should_stop(93.5, 94.5)
    with pytest.raises(ConfigError, match="variant='nepenthe'"):
        EntropyGuidedPruner().should_stop(0.9, 0.95)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"amount": 0.0}, "amount"),
        ({"amount": 1.0}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"tau": 0.0}, "tau must be a number > 0"),
        ({"tau": -1.0}, "tau"),
        ({"eps": -1e-3}, "eps must be a number >= 0"),
        ({"delta": -1.0}, "delta"),
        ({"variant": "nepenth"}, "nepenthe"),
        ({"neuron": "layer"}, "neuron"),
        ({"estimator": "mean"}, "estimator"),
        ({"max_batches": 0}, "max_batches"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EntropyGuidedPruner(**kwargs)


def test_bad_models_and_loaders():
    net, x, _ = _zero_entropy_block()
    with pytest.raises(ConfigError, match=r"blocks\.0\.fc1"):
        EntropyGuidedPruner(exclude=["blocks.0.fc"]).step(net, [x])
    with pytest.raises(SobreError, match="no batch"):
        EntropyGuidedPruner().step(net, [])
    with pytest.raises(ConfigError, match="Conv2d"):
        EntropyGuidedPruner(targets=(nn.Conv2d,)).step(net, [x])
