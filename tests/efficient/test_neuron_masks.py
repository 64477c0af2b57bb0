"""NeuronMask (per-layer channel masks) and MaskedOptimizer (frozen entries never move)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sobre.core.errors import ConfigError
from sobre.core.masks import attach_mask
from sobre.efficient.masks import MaskedOptimizer, NeuronMask

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _net(seed: int = 0) -> nn.Sequential:
    """conv-BN-ReLU, a grouped conv, a linear head: 8x8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        y = torch.randint(0, 5, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _frozen(model: nn.Module, mask: NeuronMask) -> list[tuple[str, torch.Tensor]]:
    """Test oracle, written out entry by entry: (parameter name, bool mask of frozen entries)."""
    out = []
    for name, m in mask.items():
        module = model.get_submodule(name)
        w = module.weight
        frozen_w = torch.zeros_like(w, dtype=torch.bool)
        if mask.dim == "out":
            for c in range(m.numel()):
                frozen_w[c] = not m[c]
        else:
            groups = getattr(module, "groups", 1)
            per_in, per_out = w.shape[1], w.shape[0] // groups
            for o in range(w.shape[0]):
                for j in range(per_in):
                    frozen_w[o, j] = not m[(o // per_out) * per_in + j]
        out.append((f"{name}.weight", frozen_w))
        if module.bias is not None:
            frozen_b = (
                ~m
                if mask.dim == "out"
                else torch.full_like(module.bias, mask.in_bias == "freeze", dtype=torch.bool)
            )
            out.append((f"{name}.bias", frozen_b))
        if name in mask.norms:
            out += [(f"{mask.norms[name]}.{p}", ~m) for p in ("weight", "bias")]
    return out


def _random_mask(model: nn.Module, dim: str, seed: int, **kw) -> NeuronMask:
    full = NeuronMask.from_model(model, dim=dim, **kw)
    gen = torch.Generator().manual_seed(seed)
    return full.replace({n: torch.rand(m.numel(), generator=gen) < 0.5 for n, m in full.items()})


# -- NeuronMask ------------------------------------------------------------------------------


def test_from_model_pairs_conv_with_following_norm():
    model = _net()
    mask = NeuronMask.from_model(model, norms=True)
    assert list(mask) == ["0", "3", "6"]
    assert mask.norms == {"0": "1"}
    assert [m.numel() for m in mask.values()] == [4, 6, 5]
    assert mask.trainable_fraction() == 1.0
    assert NeuronMask.from_model(model).norms == {}


def test_from_model_keys_norms_as_their_own_neurons_for_neq():
    mask = NeuronMask.from_model(_net(), (nn.Conv2d, nn.BatchNorm2d))
    assert list(mask) == ["0", "1", "3"]  # NEq: conv and BN neurons counted apart, head trained


def test_auto_pairing_skips_linear_then_layernorm_but_pairs_conv_then_layernorm():
    pre_norm = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert NeuronMask.from_model(pre_norm, norms=True).norms == {}
    conv_ln = nn.Sequential(nn.Conv1d(2, 4, 1), nn.LayerNorm([4, 3]))
    assert NeuronMask.from_model(conv_ln, norms=True).norms == {"0": "1"}
    mismatch = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(3))
    assert NeuronMask.from_model(mismatch, nn.Conv2d, norms=True).norms == {}


def test_count_params_follows_the_documented_convention():
    model = _net()
    mask = NeuronMask.from_model(model, norms=True).replace(
        {"0": [1, 0, 1, 1], "3": [0, 0, 1, 1, 1, 1], "6": [1, 0, 0, 0, 0]}
    )
    # conv rows 3 * (3*9 weights + 1 bias) + BN affine 3 * 2; grouped conv rows 4 * (2*9 + 1);
    # head rows 1 * (96 + 1)
    assert mask.count_params(model) == 3 * 28 + 3 * 2 + 4 * 19 + 97
    assert mask.channel_params(model)["0"].tolist() == [30] * 4
    assert mask.trainable_fraction() == pytest.approx(8 / 15)
    everything = NeuronMask.from_model(model, norms=True)
    assert everything.count_params(model) == sum(p.numel() for p in model.parameters())


def test_count_params_input_channels():
    model = _net()
    mask = NeuronMask.from_model(model, dim="in").replace(
        {"0": [1, 0, 0], "3": [1, 1, 0, 1], "6": torch.arange(96) < 10}
    )
    # conv column: 4 rows x 9; grouped conv column: 3 rows (its group) x 9; head column: 5
    expected = 1 * 36 + 3 * 27 + 10 * 5
    assert mask.count_params(model) == expected
    trained_bias = NeuronMask(dict(mask), dim="in", in_bias="train")
    assert trained_bias.count_params(model) == expected + 4 + 6 + 5


def test_state_dict_is_json_and_round_trips():
    model = _net()
    mask = _random_mask(model, "out", seed=3, norms=True)
    state = json.loads(json.dumps(mask.state_dict()))
    assert state["masks"]["0"] == "".join("1" if b else "0" for b in mask["0"].tolist())
    loaded = NeuronMask({})
    loaded.load_state_dict(state)
    assert loaded == mask
    assert loaded.norms == {"0": "1"}
    with pytest.raises(ConfigError, match="string of 0 and 1"):
        loaded.load_state_dict({**state, "masks": {"0": "10x1"}})


def test_wrong_size_names_the_layer_and_both_sizes():
    model = _net()
    with pytest.raises(ConfigError, match=r"'3' has 5 entries .* has 6 output channels"):
        NeuronMask({"3": [True] * 5}).check(model)
    with pytest.raises(ConfigError, match=r"'0' has 4 entries .* has 3 input channels"):
        NeuronMask({"0": [True] * 4}, dim="in").check(model)


def test_unknown_layer_suggests_close_names():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 2, 1))
    with pytest.raises(ConfigError, match=r"'conv2' is not a module .* did you mean 'conv1'"):
        NeuronMask({"conv2": [True, True]}).check(model)
    with pytest.raises(ConfigError, match="did you mean 'conv1'"):
        NeuronMask({"conv1": [True, True]})["conv"]


def test_bad_masks_are_refused():
    with pytest.raises(ConfigError, match="boolean"):
        NeuronMask({"0": [0, 2]})
    with pytest.raises(ConfigError, match="1-D"):
        NeuronMask({"0": torch.ones(2, 2)})
    with pytest.raises(ConfigError, match="dim='out'"):
        NeuronMask({"0": [1]}, dim="in", norms={"0": "1"})
    with pytest.raises(ConfigError, match="BatchNorm2d"):
        NeuronMask({"1": [True] * 4}, dim="in").check(_net())
    with pytest.raises(ConfigError, match="both a masked layer and paired"):
        NeuronMask({"0": [1] * 4, "1": [1] * 4}, norms={"0": "1"})
    with pytest.raises(ConfigError, match="has 6 channels but the layer has 4"):
        NeuronMask({"0": [1] * 4}, norms={"0": "3"}).check(
            nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.ReLU(), nn.BatchNorm2d(6))
        )


# -- MaskedOptimizer -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_entries_stay_bit_identical(name):
    model = _net()
    mask = _random_mask(model, "out", seed=5, norms=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedOptimizer(OPTIMIZERS[name](model.parameters()), mask, model)
    _train(model, opt, steps=4)
    after = dict(model.named_parameters())
    for pname, frozen in _frozen(model, mask):
        assert frozen.any() and (~frozen).any()  # the seed freezes some entries of each
        assert torch.equal(after[pname][frozen], before[pname][frozen]), pname
        assert not torch.equal(after[pname][~frozen], before[pname][~frozen]), pname


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trainable_entries_match_the_unwrapped_optimizer(name):
    plain, masked = _net(), _net()
    _train(plain, OPTIMIZERS[name](plain.parameters()), steps=3)
    everything = NeuronMask.from_model(masked, norms=True)
    _train(masked, MaskedOptimizer(OPTIMIZERS[name](masked.parameters()), everything, masked), 3)
    for (n, p), q in zip(plain.named_parameters(), masked.parameters(), strict=True):
        assert torch.equal(p, q), n

    # One step from the same weights and batch: trained rows get exactly the plain update.
    plain, masked = _net(), _net()
    mask = _random_mask(masked, "out", seed=7, norms=True)
    _train(plain, OPTIMIZERS[name](plain.parameters()), steps=1)
    _train(masked, MaskedOptimizer(OPTIMIZERS[name](masked.parameters()), mask, masked), 1)
    ref = dict(plain.named_parameters())
    got = dict(masked.named_parameters())
    for pname, frozen in _frozen(masked, mask):
        assert torch.equal(got[pname][~frozen], ref[pname][~frozen]), pname


@pytest.mark.parametrize("in_bias", ["freeze", "train"])
def test_input_channel_masks_freeze_columns_of_grouped_and_dense_layers(in_bias):
    model = _net()
    mask = _random_mask(model, "in", seed=11, in_bias=in_bias)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedOptimizer(OPTIMIZERS["sgd_momentum_wd"](model.parameters()), mask, model)
    _train(model, opt, steps=3)
    after = dict(model.named_parameters())
    for pname, frozen in _frozen(model, mask):
        assert torch.equal(after[pname][frozen], before[pname][frozen]), pname
        if (~frozen).any():
            assert not torch.equal(after[pname][~frozen], before[pname][~frozen]), pname
    moved = not torch.equal(after["6.bias"], before["6.bias"])
    assert moved == (in_bias == "train")


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    name=st.sampled_from(sorted(OPTIMIZERS)),
    dim=st.sampled_from(["out", "in"]),
    density=st.floats(0.0, 1.0),
)
def test_random_masks_leave_frozen_entries_bit_identical(seed, name, dim, density):
    model = _net(seed)
    full = NeuronMask.from_model(model, dim=dim, norms=dim == "out")
    gen = torch.Generator().manual_seed(seed)
    mask = full.replace(
        {n: torch.rand(m.numel(), generator=gen) < density for n, m in full.items()}
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, MaskedOptimizer(OPTIMIZERS[name](model.parameters()), mask, model), 2, seed)
    after = dict(model.named_parameters())
    for pname, frozen in _frozen(model, mask):
        assert torch.equal(after[pname][frozen], before[pname][frozen]), pname


def test_optimizer_missing_a_masked_layer_is_refused():
    model = _net()
    mask = NeuronMask.from_model(model)
    head_only = torch.optim.SGD(model[6].parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"does not hold '0.weight'.* layer '0'"):
        MaskedOptimizer(head_only, mask, model)


def test_parameter_the_mask_does_not_cover_is_refused():
    class ScaledConv(nn.Conv2d):
        def __init__(self) -> None:
            super().__init__(1, 2, 1)
            self.scale = nn.Parameter(torch.ones(1))

    model = nn.Sequential(ScaledConv())
    mask = NeuronMask.from_model(model)
    with pytest.raises(ConfigError, match=r"updates 0.scale, a parameter of masked layer '0'"):
        MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mask, model)
    # Left out of the optimizer, the extra parameter is fine.
    opt = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)
    assert MaskedOptimizer(opt, mask, model).masks is mask


def test_wraps_a_core_masked_layer():
    model = _net()
    channel_mask = attach_mask(model[0], kind="channel")  # a pruning mask (parametrization)
    channel_mask[2] = 0.0
    mask = NeuronMask.from_model(model).replace({"0": [False, True, True, True], "3": [1] * 6})
    original = model[0].parametrizations.weight.original
    before = original.detach().clone()
    _train(model, MaskedOptimizer(OPTIMIZERS["adamw"](model.parameters()), mask, model), 2)
    assert torch.equal(original[0], before[0])
    assert not torch.equal(original[1], before[1])


def test_passes_through_to_the_wrapped_optimizer():
    model = _net()
    base = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
    opt = MaskedOptimizer(base, NeuronMask.from_model(model), model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, steps=1)
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.state is base.state
    assert opt.state_dict()["state"].keys() == base.state_dict()["state"].keys()
    other = _net()
    twin = MaskedOptimizer(
        OPTIMIZERS["sgd_momentum_wd"](other.parameters()), NeuronMask.from_model(other), other
    )
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(
        twin.state[other[0].weight]["momentum_buffer"],
        base.state[model[0].weight]["momentum_buffer"],
    )
    assert twin.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_set_masks_changes_what_is_frozen():
    model = _net()
    everything = NeuronMask.from_model(model)
    opt = MaskedOptimizer(OPTIMIZERS["sgd_momentum_wd"](model.parameters()), everything, model)
    _train(model, opt, steps=1)
    frozen_head = everything.replace({**everything, "6": torch.zeros(5, dtype=torch.bool)})
    opt.set_masks(frozen_head)
    assert opt.masks is frozen_head
    head = model[6].weight.detach().clone()
    conv = model[0].weight.detach().clone()
    _train(model, opt, steps=2)
    assert torch.equal(model[6].weight, head)
    assert not torch.equal(model[0].weight, conv)
