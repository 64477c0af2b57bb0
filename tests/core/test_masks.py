"""Tests of sobre.core.masks: weight, channel and gradient masks, baking, state-dict round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.masks import (
    MaskInfo,
    attach_mask,
    bake,
    get_mask,
    iter_masks,
    remove_masks,
    restore_masks,
    sparsity,
)
from sobre.core.taps import FeatureTap


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )


def layer_and_input(kind: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 4), torch.randn(3, 6)
    if kind == "conv1d":
        return nn.Conv1d(3, 4, 3), torch.randn(2, 3, 7)
    return nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6)


def binary(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


@pytest.fixture
def x() -> Tensor:
    return torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d"])
def test_weight_mask_forward_and_zero_gradient(layer: str) -> None:
    module, inp = layer_and_input(layer)
    weight = module.weight.detach().clone()
    mask = binary(tuple(weight.shape))
    live = attach_mask(module, mask=mask)
    torch.testing.assert_close(module.weight, weight * mask)
    module(inp).square().sum().backward()
    original = module.parametrizations.weight.original
    assert original.grad is not None
    assert bool((original.grad[mask == 0] == 0).all())
    assert original.grad[mask == 1].abs().sum() > 0
    assert live is get_mask(module)
    torch.testing.assert_close(original, weight)  # the stored weight is untouched


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d"])
def test_channel_mask_zeroes_whole_channels_and_bias(layer: str) -> None:
    module, inp = layer_and_input(layer)
    mask = attach_mask(module, kind="channel")
    assert mask.shape == (4,)
    mask[torch.tensor([1, 3])] = 0.0
    out = module(inp)
    assert bool((out[:, 1] == 0).all())
    assert bool((out[:, 3] == 0).all())
    assert out[:, 0].abs().sum() > 0
    torch.testing.assert_close(module.bias, module.parametrizations.bias.original * mask)
    assert "parametrizations.bias.0.channel_mask" not in module.state_dict()


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d"])
def test_grad_mask_zeroes_gradient_not_weight(layer: str) -> None:
    module, inp = layer_and_input(layer)
    plain = copy.deepcopy(module)
    mask = binary(tuple(module.weight.shape), seed=3)
    attach_mask(module, mask=mask, target="grad")
    out = module(inp)
    torch.testing.assert_close(out, plain(inp))  # forward unchanged
    out.square().sum().backward()
    plain(inp).square().sum().backward()
    assert module.weight.grad is not None
    assert plain.weight.grad is not None
    torch.testing.assert_close(module.weight.grad, plain.weight.grad * mask)
    torch.testing.assert_close(module.bias.grad, plain.bias.grad)
    assert "weight_grad_mask" in module.state_dict()


def test_channel_grad_mask_masks_bias_gradient() -> None:
    module, inp = layer_and_input("conv2d")
    attach_mask(module, mask=torch.tensor([1.0, 0.0, 1.0, 0.0]), kind="channel", target="grad")
    module(inp).sum().backward()
    assert module.weight.grad is not None
    assert module.bias.grad is not None
    assert bool((module.weight.grad[[1, 3]] == 0).all())
    assert bool((module.bias.grad[[1, 3]] == 0).all())
    assert module.bias.grad[0] != 0


def test_soft_mask_scales_weights() -> None:
    module, _ = layer_and_input("linear")
    weight = module.weight.detach().clone()
    soft = torch.linspace(0, 1, 4)
    attach_mask(module, mask=soft, kind="channel")
    torch.testing.assert_close(module.weight, weight * soft[:, None])


def test_attach_twice_replaces_values() -> None:
    module, _ = layer_and_input("conv2d")
    first = attach_mask(module, kind="channel")
    second = attach_mask(module, mask=torch.tensor([0.0, 1.0, 1.0, 1.0]), kind="channel")
    assert second is first
    assert len(module.parametrizations.weight) == 1
    assert first.tolist() == [0.0, 1.0, 1.0, 1.0]
    grad_a = attach_mask(module, target="grad")
    grad_b = attach_mask(module, mask=torch.zeros_like(module.weight), target="grad")
    assert grad_b is grad_a
    assert len(list(iter_masks(module))) == 2
    assert float(grad_a.sum()) == 0.0


def test_errors_name_problem_and_fix() -> None:
    module, _ = layer_and_input("conv2d")
    with pytest.raises(ConfigError, match=r"\(4, 3, 3, 3\)"):
        attach_mask(module, mask=torch.ones(4))
    with pytest.raises(ConfigError, match=r"\(4,\)"):
        attach_mask(module, mask=torch.ones(4, 3), kind="channel")
    with pytest.raises(ConfigError, match="'weight'"):
        attach_mask(module, "weights")
    with pytest.raises(ConfigError, match="kind"):
        attach_mask(module, kind="row")  # type: ignore[arg-type]
    attach_mask(module, kind="channel")
    with pytest.raises(ConfigError, match="remove_masks"):
        attach_mask(module, kind="weight")


def test_user_mask_is_copied_not_aliased() -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    shared = torch.ones(2)
    attach_mask(a, mask=shared, kind="channel")
    attach_mask(b, mask=shared, kind="channel")
    shared.zero_()
    assert float(get_mask(a).sum()) == 2.0  # type: ignore[union-attr]
    model = nn.Sequential(a, b)
    tensors = load(save(model.state_dict()))  # safetensors refuses aliasing tensors
    assert set(tensors) == set(model.state_dict())


def test_get_iter_and_sparsity() -> None:
    net = make_net()
    assert get_mask(net[0]) is None
    assert sparsity(net) == 0.0
    attach_mask(net[0], mask=torch.tensor([1.0, 0.0, 0.0, 1.0]), kind="channel")
    attach_mask(net[4], mask=torch.zeros(5, 36), target="grad")
    lin = attach_mask(net[4])
    lin[:2] = 0.0
    infos = list(iter_masks(net))
    assert [(i.module, i.param, i.target, i.kind) for i in infos] == [
        ("0", "weight", "weight", "channel"),
        ("4", "weight", "weight", "weight"),
        ("4", "weight", "grad", "weight"),
    ]
    assert isinstance(infos[0], MaskInfo)
    assert infos[1].mask is lin
    # conv: 2 of 4 channels off -> 2*18 weights + 2 biases; linear: 2 of 5 rows -> 72 weights
    masked_out = 2 * 18 + 2 + 72
    total = 4 * 18 + 4 + 5 * 36
    assert sparsity(net) == pytest.approx(masked_out / total)


def test_state_dict_round_trip_with_restore(x: Tensor) -> None:
    net = make_net()
    attach_mask(net[0], mask=torch.tensor([1.0, 0.0, 1.0, 0.5]), kind="channel")
    attach_mask(net[1], mask=torch.tensor([1.0, 1.0, 0.0, 1.0]), kind="channel")  # 1-D weight
    attach_mask(net[4], mask=binary((5, 36)))
    attach_mask(net[4], "bias", mask=torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]), target="grad")
    net.eval()
    sd = net.state_dict()
    assert "0.parametrizations.weight.0.channel_mask" in sd
    assert "4.parametrizations.weight.0.mask" in sd
    assert "4.bias_grad_mask" in sd

    fresh = make_net()
    torch.nn.init.normal_(fresh[0].weight)  # different values before loading
    restore_masks(fresh, sd)
    fresh.load_state_dict(sd, strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), net(x))
    old = {(i.module, i.param, i.target, i.kind): i.mask for i in iter_masks(net)}
    new = {(i.module, i.param, i.target, i.kind): i.mask for i in iter_masks(fresh)}
    assert old.keys() == new.keys()
    for key, mask in old.items():
        torch.testing.assert_close(new[key], mask)
    assert restore_masks(fresh, sd) is fresh  # already masked: keys exist, nothing changes
    assert len(list(iter_masks(fresh))) == 4


def test_restore_unknown_module_raises() -> None:
    with pytest.raises(ConfigError, match="same architecture"):
        restore_masks(make_net(), {"9.parametrizations.weight.0.mask": torch.ones(2)})


def test_deepcopy_keeps_independent_working_masks(x: Tensor) -> None:
    net = make_net()
    attach_mask(net[0], kind="channel")
    attach_mask(net[4], mask=torch.zeros(5, 36), target="grad")
    twin = copy.deepcopy(net)
    get_mask(twin[0]).zero_()  # type: ignore[union-attr]
    assert float(get_mask(net[0]).sum()) == 4.0  # type: ignore[union-attr]
    bias_source = twin[0].parametrizations.bias[0].source
    assert bias_source is twin[0].parametrizations.weight[0]
    assert float(twin[0].bias.detach().abs().sum()) == 0.0
    twin(x).sum().backward()  # the grad mask is re-installed on the copy's parameter
    assert twin[4].weight.grad is not None
    assert float(twin[4].weight.grad.abs().sum()) == 0.0
    assert twin[4].bias.grad is not None
    assert float(twin[4].bias.grad.abs().sum()) > 0


def test_bake_and_remove_give_plain_modules(x: Tensor) -> None:
    net = make_net()
    weight = net[0].weight.detach().clone()
    attach_mask(net[0], mask=torch.tensor([0.0, 1.0, 1.0, 1.0]), kind="channel")
    attach_mask(net[4], target="grad")
    plain_keys = set(make_net().state_dict())
    net.eval()
    twin = copy.deepcopy(net)

    opt_param = net[0].parametrizations.weight.original
    expected = net(x)
    assert bake(net) is net
    assert set(net.state_dict()) == plain_keys
    assert net[0].weight is opt_param  # same Parameter: optimizers keep working
    assert type(net[0]) is nn.Conv2d
    assert float(net[0].weight[0].detach().abs().sum()) == 0.0
    assert float(net[0].bias[0].detach()) == 0.0
    torch.testing.assert_close(net(x), expected)
    assert list(iter_masks(net)) == []
    assert len(net[4]._forward_pre_hooks) == 0
    bake(net)  # idempotent
    assert set(net.state_dict()) == plain_keys

    torch.testing.assert_close(twin(x), expected)  # baking the original left the copy intact
    remove_masks(twin)
    assert set(twin.state_dict()) == plain_keys
    torch.testing.assert_close(twin[0].weight, weight)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    conv_kind=st.sampled_from(["weight", "channel"]),
    lin_kind=st.sampled_from(["weight", "channel"]),
    soft=st.booleans(),
)
def test_baked_forward_equals_masked_forward(
    seed: int, conv_kind: str, lin_kind: str, soft: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    net = make_net().eval()
    for module, kind in ((net[0], conv_kind), (net[4], lin_kind)):
        shape = tuple(module.weight.shape) if kind == "weight" else (module.weight.shape[0],)
        values = torch.rand(shape, generator=gen)
        mask = values if soft else (values > 0.5).float()
        attach_mask(module, mask=mask, kind=kind)  # type: ignore[arg-type]
    inp = torch.randn(2, 2, 5, 5, generator=gen)
    expected = net(inp)
    bake(net)
    torch.testing.assert_close(net(inp), expected)


def test_mask_follows_module_to_dtype() -> None:
    module, inp = layer_and_input("linear")
    attach_mask(module, mask=torch.tensor([1.0, 0.0, 1.0, 1.0]), kind="channel")
    module.double()
    mask = get_mask(module)
    assert mask is not None
    assert mask.dtype == torch.float64
    out = module(inp.double())
    assert bool((out[:, 1] == 0).all())


def _reference(module: nn.Module, x: Tensor, w: Tensor, b: Tensor, m: Tensor) -> Tensor:
    """The layer's output with weight and bias multiplied by channel mask ``m``."""
    view = (-1,) + (1,) * (w.ndim - 1)
    if isinstance(module, nn.Linear):
        return nn.functional.linear(x, w * m.view(view), b * m)
    conv = nn.functional.conv1d if isinstance(module, nn.Conv1d) else nn.functional.conv2d
    return conv(x, w * m.view(view), b * m)


@pytest.mark.parametrize(
    ("layer", "small", "large"),
    [
        ("linear", (3, 6), (20, 6)),
        ("conv1d", (1, 3, 5), (2, 3, 7)),
        ("conv2d", (1, 3, 4, 4), (2, 3, 6, 6)),
    ],
)
def test_channel_mask_output_and_weight_paths_agree(
    layer: str, small: tuple[int, ...], large: tuple[int, ...]
) -> None:
    module, _ = layer_and_input(layer)
    w = module.weight.detach().clone()
    b = module.bias.detach().clone()
    m = torch.tensor([0.0, 0.3, 1.0, 0.0])
    attach_mask(module, mask=m, kind="channel")
    holder = module.parametrizations.weight[0]
    seen: list[bool] = []
    module.register_forward_pre_hook(lambda mod, args: seen.append(holder.bypass))
    for shape, output_side in ((small, True), (large, False)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        module.zero_grad()
        out = module(x)
        assert seen[-1] is output_side  # the smaller of output and weight gets masked
        assert holder.bypass is False
        torch.testing.assert_close(module.weight, w * m.view((-1,) + (1,) * (w.ndim - 1)))
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        ref = _reference(module, x, wr, br, m)
        torch.testing.assert_close(out, ref)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
        (out * g).sum().backward()
        (ref * g).sum().backward()
        torch.testing.assert_close(module.parametrizations.weight.original.grad, wr.grad)
        torch.testing.assert_close(module.parametrizations.bias.original.grad, br.grad)


def test_failed_forward_leaves_weight_masked() -> None:
    module = nn.Linear(6, 4)
    attach_mask(module, mask=torch.tensor([1.0, 0.0, 1.0, 1.0]), kind="channel")
    with pytest.raises(RuntimeError):
        module(torch.randn(2, 5))  # wrong width: forward raises after the pre-hook ran
    assert module.parametrizations.weight[0].bypass is False
    assert float(module.weight[1].detach().abs().sum()) == 0.0


def test_tap_attached_before_mask_sees_masked_output() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(2, 6)
    with FeatureTap(model, "0") as tap:
        attach_mask(model[0], mask=torch.tensor([1.0, 0.0, 1.0, 0.0]), kind="channel")
        out = model(x)
    torch.testing.assert_close(tap.features["0"], out)
    assert bool((tap.features["0"][:, [1, 3]] == 0).all())


def test_parametrize_cached_does_not_mask_twice() -> None:
    module = nn.Linear(6, 4)
    w, b = module.weight.detach().clone(), module.bias.detach().clone()
    soft = torch.tensor([0.5, 0.5, 1.0, 0.0])
    attach_mask(module, mask=soft, kind="channel")
    x = torch.randn(2, 6)
    with torch.no_grad(), torch.nn.utils.parametrize.cached():
        out = module(x)
        again = module(x)
    expected = nn.functional.linear(x, w * soft[:, None], b * soft)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)


def test_deepcopy_of_output_masked_linear_is_independent() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    attach_mask(model[0], kind="channel")
    twin = copy.deepcopy(model)
    get_mask(twin[0]).copy_(torch.tensor([0.0, 1.0, 1.0, 0.0]))  # type: ignore[union-attr]
    x = torch.randn(2, 6)  # output (2x4) smaller than weight (4x6): output-side masking
    out, out_twin = model(x), twin(x)
    torch.testing.assert_close(out_twin[:, 1:3], out[:, 1:3])
    assert bool((out_twin[:, [0, 3]] == 0).all())
    assert bool((out[:, [0, 3]] != 0).all())
    bake(twin)
    torch.testing.assert_close(twin(x), out_twin)
    assert len(twin[0]._forward_pre_hooks) == 0
    assert len(twin[0]._forward_hooks) == 0
    torch.testing.assert_close(model(x), out)  # the original still masks through its hooks


def test_channel_mask_on_a_1d_parameter_masks_only_it() -> None:
    module = nn.Linear(3, 4)
    weight = module.weight.detach().clone()
    attach_mask(module, "bias", mask=torch.tensor([0.0, 1.0, 1.0, 1.0]), kind="channel")
    x = torch.randn(2, 3)
    out = module(x)
    torch.testing.assert_close(out[:, 0], x @ weight[0])  # bias of channel 0 masked only
    assert len(module._forward_hooks) == 0  # no output-side masking for a bias mask
