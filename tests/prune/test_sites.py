"""Activation call sites: torch.fx discovery and uniquification (outputs, structure, replay)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sobre.core.edits import edit_log, replay
from sobre.core.errors import ConfigError
from sobre.models import create
from sobre.prune.sites import activation_kind, find_sites, uniquify_activations


def _calibrated(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """BN statistics from a few train-mode batches (fresh BN hides bugs), then eval mode."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


def _assert_same_output(ref: torch.Tensor, out: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def _structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


# (name, create kwargs, input shape, sites, sites already unique); counts derived by hand:
# small_cnn relu1..4; resnet20 stem + 2 per block x 9 blocks; vit_tiny28 one GELU per block
# (depth 4); resnet18 stem + 2 calls of each BasicBlock's one relu x 8 blocks (only the stem's is
# unique); mobilenet_v2 stem + 1 (first block, t=1) + 2 x 16 blocks + last conv = 35 ReLU6;
# timm vit_tiny one GELU per block (depth 12).
CASES = [
    ("small_cnn", {"in_channels": 1, "width": 4}, (2, 1, 28, 28), 4, 4),
    ("resnet20", {"width": 0.5}, (2, 3, 32, 32), 19, 19),
    ("vit_tiny28", {"in_channels": 1}, (2, 1, 28, 28), 4, 4),
    ("resnet18", {}, (2, 3, 32, 32), 17, 1),
    ("mobilenet_v2", {}, (2, 3, 32, 32), 35, 35),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, (2, 3, 32, 32), 12, 12),
]


@pytest.mark.parametrize(("name", "kwargs", "shape", "n_sites", "n_unique"), CASES)
def test_uniquify_keeps_outputs_and_replays(name, kwargs, shape, n_sites, n_unique):
    torch.manual_seed(0)
    model = _calibrated(create(name, num_classes=10, **kwargs), shape)
    sites = find_sites(model)
    assert len(sites) == n_sites
    assert sum(s.unique for s in sites) == n_unique
    assert all(s.traced for s in sites)  # timm's ViT traces with timm's leaf registry
    uniq = uniquify_activations(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        _assert_same_output(model(x), uniq(x))
    after = find_sites(uniq)
    assert [s.name for s in after] == [s.name for s in sites]  # names are planned ahead
    assert all(s.unique for s in after)
    modules = [uniq.get_submodule(s.name) for s in after]
    assert len({id(m) for m in modules}) == n_sites
    assert not any(getattr(m, "inplace", False) for m in modules)
    if n_unique == n_sites:  # nothing to split: same modules, same classes
        assert _structure(uniq) == _structure(model)
    fresh = replay(create(name, num_classes=10, **kwargs), edit_log(uniq))
    assert sorted(fresh.state_dict()) == sorted(uniq.state_dict())
    fresh.load_state_dict(uniq.state_dict(), strict=True)
    assert _structure(fresh) == _structure(uniq)
    with torch.no_grad():
        _assert_same_output(uniq(x), fresh.eval()(x))


def test_resnet18_double_relu_becomes_two_modules_and_the_original_is_untouched():
    from torchvision.models.resnet import BasicBlock

    model = create("resnet18", num_classes=10)
    sites = find_sites(model)
    assert [s.name for s in sites[:5]] == [
        "relu",
        "layer1.0.relu",
        "layer1.0.relu_1",
        "layer1.1.relu",
        "layer1.1.relu_1",
    ]
    assert sites[2].source == "layer1.0.relu" and sites[1].shared and sites[2].shared
    assert {s.kind for s in sites} == {"relu"}
    uniq = uniquify_activations(model)
    block = uniq.layer1[0]
    assert isinstance(block, BasicBlock) and type(block).__name__ == "BasicBlock"
    assert block.relu is not block.relu_1
    assert not hasattr(model.layer1[0], "relu_1") and model.layer1[0].relu.inplace
    assert type(model.layer1[0]) is BasicBlock
    assert sorted(uniq.state_dict()) == sorted(model.state_dict())
    again = uniquify_activations(uniq)  # idempotent
    assert _structure(again) == _structure(uniq)
    assert [e["op"] for e in edit_log(again)] == ["uniquify_activations"] * 2


class Inner(nn.Module):
    """A shared PReLU, functional GELU/leaky ReLU and defaults that change the traced branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.PReLU(6)

    def forward(self, x, mask=None, flip: bool = False):
        y = self.act(self.fc(x))
        if mask is not None:
            y = y * mask
        if flip:
            y = -y
        y = F.gelu(y, approximate="tanh")
        return self.act(y) + F.leaky_relu(y, 0.2)


class Functional(nn.Module):
    """A Sequential reusing one ReLU, an inner owner, and functional calls in the root."""

    def __init__(self) -> None:
        super().__init__()
        act = nn.ReLU(inplace=True)
        self.seq = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 6), act)
        self.inner = Inner()
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        z = self.inner(self.seq(x)) - 0.5 + torch.tensor(0.25)
        a = F.relu(z, inplace=True)  # z is read again below: it holds relu(z) by then
        b = z + 1
        return self.out(torch.relu(a) + b.relu() + F.silu(b))


def test_functional_and_shared_calls_become_named_modules():
    torch.manual_seed(0)
    model = Functional()
    sites = find_sites(model)
    assert [(s.name, s.kind, s.source) for s in sites] == [
        ("seq.1", "relu", "seq.1"),
        ("seq.3", "relu", "seq.3"),
        ("inner.act", "prelu", "inner.act"),
        ("inner.gelu", "gelu", "F.gelu"),
        ("inner.act_1", "prelu", "inner.act"),
        ("inner.leaky_relu", "leaky_relu", "F.leaky_relu"),
        ("relu", "relu", "F.relu"),
        ("relu_1", "relu", "torch.relu"),
        ("relu_2", "relu", "Tensor.relu"),
        ("silu", "silu", "F.silu"),
    ]
    assert [s.unique for s in sites] == [False] * 3 + [False] * 7
    assert not hasattr(model, "_tensor_constant0")  # tracing leaves the model alone
    uniq = uniquify_activations(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        ref = model(x)
        _assert_same_output(ref, uniq(x))
        _assert_same_output(model.inner(x[:, :3].repeat(1, 2)), uniq.inner(x[:, :3].repeat(1, 2)))
    after = find_sites(uniq)
    assert [s.name for s in after] == [s.name for s in sites] and all(s.unique for s in after)
    assert type(uniq.seq) is nn.Sequential and len(uniq.seq) == 4 and uniq.seq[1] is not uniq.seq[3]
    assert isinstance(uniq.inner, Inner)
    assert uniq.inner.gelu.approximate == "tanh" and uniq.inner.leaky_relu.negative_slope == 0.2
    assert torch.equal(uniq.inner.act_1.weight, uniq.inner.act.weight)
    assert isinstance(uniq.silu, nn.SiLU) and isinstance(uniq.relu_2, nn.ReLU)
    with pytest.raises(AssertionError, match="specialized to have value None"):
        uniq.inner(torch.randn(2, 6), mask=torch.ones(6))  # never passed in the model: frozen
    fresh = replay(Functional(), edit_log(uniq))
    fresh.load_state_dict(uniq.state_dict(), strict=True)  # the PReLU copy's weight included
    with torch.no_grad():
        _assert_same_output(ref, fresh(x))


class Twice(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(self.block(x))


class ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = F.relu(self.fc(x))
        return x * 2 if self.training else x


class Escapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seq = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4))

    def forward(self, x):
        h = self.fc(x)
        return self.seq(h) + h  # h was changed in place by seq's ReLU


def test_unsplittable_sites_raise_and_leave_the_model_untouched():
    model = Escapes()
    assert [s.name for s in find_sites(model)] == ["seq.0"]
    with pytest.raises(ConfigError, match="reads later outside the forward of seq"):
        uniquify_activations(model)
    assert model.seq[0].inplace
    model = Twice(Inner())
    with pytest.raises(ConfigError, match=r"'block' \(Inner\) is called 2 times"):
        uniquify_activations(model)
    assert not hasattr(model.block, "gelu") and edit_log(model) == []
    act = nn.ReLU()
    model = Twice(nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act))
    assert sum(s.shared for s in find_sites(model)) == 4
    with pytest.raises(ConfigError, match=r"'block' \(Sequential\) is called 2 times"):
        uniquify_activations(model)
    assert model.block[1] is model.block[3]
    with pytest.raises(ConfigError, match=r"depends on self\.training"):
        uniquify_activations(ModeDependent())


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = -x
        return self.act(self.fc(self.act(x)))


def test_untraceable_models_fall_back_to_module_discovery(caplog):
    model = Untraceable()
    with caplog.at_level(logging.WARNING, logger="sobre.prune.sites"):
        sites = find_sites(model)
    assert "falling back to module discovery" in caplog.text
    assert [(s.name, s.traced, s.unique) for s in sites] == [
        ("act", False, True)
    ]  # 2 calls, 1 seen
    uniq = uniquify_activations(model)
    assert not uniq.act.inplace and model.act.inplace
    assert _structure(uniq) == _structure(model)


def test_activations_inside_timm_leaf_modules_are_listed_untraced():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.GELU())
    sites = find_sites(model)
    assert [(s.name, s.kind, s.traced) for s in sites] == [
        ("1.act", "relu", False),
        ("2", "gelu", True),
    ]
    assert all(s.unique for s in sites)


def test_activation_kinds():
    from timm.layers.activations import GELU, GELUTanh, Swish

    assert [activation_kind(m) for m in (nn.ReLU6(), nn.Hardswish(), nn.SiLU(), nn.PReLU())] == [
        "relu6",
        "hardswish",
        "silu",
        "prelu",
    ]
    assert [activation_kind(m) for m in (GELU(), GELUTanh(), Swish())] == ["gelu", "gelu", "silu"]
    assert activation_kind(nn.Linear(2, 2)) is None and activation_kind(nn.Sigmoid()) is None
    site = find_sites(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))[0]
    assert site.is_on(torch.tensor([-1.0, 0.0, 2.0])).tolist() == [False, False, True]
