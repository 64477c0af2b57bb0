"""Tests of sobre.efficient.sparse: exact sparse gradients, real saved-byte savings, reversible
swaps, exact BN folding, bit-mask ReLUs, and bad input."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from sobre.core.edits import edit_log, replay
from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.measure import backward_flops, flops, saved_activation_bytes
from sobre.efficient.sparse import (
    BitMaskReLU,
    BitMaskReLU6,
    ChannelSparseConv2d,
    ChannelSparseLinear,
    _columns,
    _pack,
    _pack_torch,
    _unpack_torch,
    densify,
    fold_frozen_bn,
    mask_relus,
    set_trainable,
    sparsify,
    trainable_fractions,
)

CL = torch.channels_last


def net() -> nn.Sequential:
    """conv - BN - ReLU - conv - BN - ReLU - pool - linear, with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(8),
            relu1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(8, 6, 3, stride=2, padding=1),
            bn2=nn.BatchNorm2d(6),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 4),
        )
    )
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def grads(model: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, dict[str, Tensor | None]]:
    """The input gradient and every parameter gradient of ``model(x)`` against ``g``."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    model(x).backward(g)
    assert x.grad is not None
    return x.grad, {n: p.grad for n, p in model.named_parameters()}


def expected(dense: Tensor | None, keep: Tensor) -> Tensor:
    """The dense gradient with the non-trainable entries zeroed."""
    assert dense is not None
    return dense * keep.reshape(keep.shape + (1,) * (dense.dim() - keep.dim()))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("groups", "bias", "channels_last"),
    [(1, False, False), (1, True, True), (2, True, False), (8, True, True)],
)
def test_conv_weight_gradient_only_for_trainable_channels(
    groups: int, bias: bool, channels_last: bool
) -> None:
    torch.manual_seed(1)
    dense = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups, bias=bias)
    x = torch.randn(3, 8, 9, 9)
    if channels_last:
        dense, x = dense.to(memory_format=CL), x.contiguous(memory_format=CL)
    g = torch.randn_like(dense(x))
    gx_ref, ref = grads(dense, x, g)
    out = torch.tensor([True, False, False, True, True, False, False, True])
    inp = torch.tensor([0, 2, 3, 7]) if groups == 1 else None  # indices work as well as masks
    model = sparsify(nn.Sequential(copy.deepcopy(dense)), {"0": out}, {"0": inp})
    gx, got = grads(model, x, g)
    keep = out[:, None].clone()
    if inp is not None:
        cols = torch.zeros(8, dtype=torch.bool)
        cols[inp] = True
        keep = keep & cols[None, :]
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["0.weight"], expected(ref["weight"], keep), atol=1e-5, rtol=0)
    assert torch.all(got["0.weight"][~out] == 0)  # frozen rows exactly zero
    if bias:
        torch.testing.assert_close(got["0.bias"], expected(ref["bias"], out), atol=1e-5, rtol=0)
    if channels_last:
        assert gx.is_contiguous(memory_format=CL)


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [
        (dict(kernel_size=3, stride=2, padding=1), 8),  # even input: the grad-input gains a row
        (dict(kernel_size=3, stride=3, padding=0, dilation=2), 11),
        (dict(kernel_size=3, padding="same", padding_mode="reflect"), 7),
        (dict(kernel_size=3, stride=2, padding=1, groups=8), 8),  # strided depthwise
        (dict(kernel_size=1, stride=2), 8),
    ],
)
def test_conv_geometries_give_native_input_gradient(kwargs: dict, size: int) -> None:
    torch.manual_seed(5)
    dense = nn.Conv2d(8, 8, **kwargs).to(memory_format=CL)
    x = torch.randn(2, 8, size, size).contiguous(memory_format=CL)
    g = torch.randn_like(dense(x))
    gx_ref, ref = grads(dense, x, g)
    out = torch.tensor([True, False, True, True, False, False, True, False])
    model = sparsify(nn.Sequential(copy.deepcopy(dense)), {"0": out})
    gx, got = grads(model, x, g)
    assert gx.shape == x.shape and gx.is_contiguous(memory_format=CL)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["0.weight"], expected(ref["weight"], out), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["0.bias"], expected(ref["bias"], out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_gradients_take_the_parameter_layout_and_accumulate(channels_last: bool) -> None:
    torch.manual_seed(6)
    dense = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    if channels_last:
        dense, x = dense.to(memory_format=CL), x.contiguous(memory_format=CL)
    keep = torch.tensor([False, True, True, False, True, False])
    model = sparsify(nn.Sequential(dense), {"0": keep})
    model(x).sum().backward()
    grad = dense.weight.grad
    assert grad is not None and grad.stride() == dense.weight.stride()  # .grad took it, no copy
    once = grad.clone()
    model(x).sum().backward()  # accumulates into .grad
    assert torch.all(dense.weight.grad[~keep] == 0) and torch.all(dense.bias.grad[~keep] == 0)
    torch.testing.assert_close(dense.weight.grad, 2 * once)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 12),
    picks=st.lists(st.integers(0, 11), min_size=1, max_size=12),
    threads=st.sampled_from([1, 2]),
)
def test_column_gather_equals_indexing(
    rows: int, cols: int, picks: list[int], threads: int
) -> None:
    m = torch.randn(rows, cols)
    index = torch.tensor(sorted({p % cols for p in picks}))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # more than one thread takes the parallel gather
    try:
        got = _columns(m, index)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, m[:, index])


def test_linear_rows_and_columns_on_3d_input() -> None:
    torch.manual_seed(2)
    dense = nn.Linear(5, 7)
    x, g = torch.randn(2, 3, 5), torch.randn(2, 3, 7)
    gx_ref, ref = grads(dense, x, g)
    out = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    inp = torch.tensor([0, 3])
    model = sparsify(nn.Sequential(copy.deepcopy(dense)), {"0": out}, {"0": inp})
    assert isinstance(model[0], ChannelSparseLinear)
    gx, got = grads(model, x, g)
    cols = torch.zeros(5, dtype=torch.bool)
    cols[inp] = True
    torch.testing.assert_close(gx, gx_ref)
    keep = out[:, None] & cols[None, :]
    torch.testing.assert_close(got["0.weight"], expected(ref["weight"], keep))
    torch.testing.assert_close(got["0.bias"], expected(ref["bias"], out))


def test_all_channels_selected_equals_native_layer() -> None:
    dense = net()
    model = sparsify(copy.deepcopy(dense), {"conv1": None, "conv2": torch.arange(6)})
    x = torch.randn(2, 3, 8, 8)
    g = torch.randn(2, 4)
    gx_ref, ref = grads(dense.train(), x, g)
    gx, got = grads(model.train(), x, g)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5)


def test_nothing_trainable_gives_no_gradient_and_saves_only_the_weight() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1))
    x = torch.randn(2, 3, 6, 6)
    dense = saved_activation_bytes(model, x)
    assert dense.activations == x.nbytes + 2 * 4 * 6 * 6 * 4  # input + first conv's output
    sparsify(model, {"1": torch.zeros(5, dtype=torch.bool)})
    saved = saved_activation_bytes(model, x)
    assert saved.activations == x.nbytes  # the second conv keeps no activation
    # its weight (for the input gradient) beside the first conv's: nothing else
    assert saved.parameters == model[0].weight.nbytes + model[1].weight.nbytes
    model(x).sum().backward()
    assert model[1].weight.grad is None and model[1].bias.grad is None
    assert model[0].weight.grad is not None


def test_no_input_channel_leaves_the_bias_of_the_trainable_outputs() -> None:
    dense = nn.Conv2d(3, 4, 3)
    x, g = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3)
    _, ref = grads(dense, x, g)
    out = torch.tensor([True, False, True, True])
    model = sparsify(nn.Sequential(dense), {"0": out}, {"0": torch.zeros(3, dtype=torch.bool)})
    _, got = grads(model, x, g)
    assert got["0.weight"] is None
    torch.testing.assert_close(got["0.bias"], expected(ref["bias"], out))


def test_input_selection_saves_only_the_selected_input_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 6, 6)
    before = saved_activation_bytes(model, x).activations
    _, ref = grads(model, x, torch.ones(2, 4, 6, 6))
    sparsify(model, trainable_in={"1": torch.tensor([1, 5])})
    after = saved_activation_bytes(model, x).activations
    hidden = 2 * 8 * 6 * 6 * 4
    assert before - after == hidden - hidden * 2 // 8  # X[:, S] instead of X
    _, got = grads(model, x, torch.ones(2, 4, 6, 6))
    cols = torch.zeros(8, dtype=torch.bool)
    cols[[1, 5]] = True
    torch.testing.assert_close(got["1.weight"], expected(ref["1.weight"], cols[None, :]))
    torch.testing.assert_close(got["1.bias"], ref["1.bias"])  # every output channel trains
    torch.testing.assert_close(got["0.weight"], ref["0.weight"])


def test_first_layer_skips_the_input_gradient() -> None:
    model = sparsify(nn.Sequential(nn.Conv2d(3, 4, 3)), {"0": torch.tensor([0, 1])})
    saved = saved_activation_bytes(model, torch.randn(2, 3, 5, 5))
    assert saved.parameters == 0  # the input needs no gradient: the weight is not kept


def test_counted_flops_equal_the_kernels_actually_run() -> None:
    model = sparsify(
        net(), {"conv1": torch.tensor([0, 1]), "conv2": torch.tensor([2])}, {"fc": torch.arange(3)}
    )
    x = torch.randn(2, 3, 8, 8)
    counted = backward_flops(model, x, trainable_fractions(model))
    assert counted.step == flops(model, x, train_step=True)
    assert trainable_fractions(model) == {"conv1": 0.25, "conv2": 1 / 6, "fc": 0.5}


# --------------------------------------------------------------------------- swapping


def test_sparsify_and_densify_keep_outputs_keys_and_parameters() -> None:
    model = net().eval()
    x = torch.randn(2, 3, 8, 8)
    ref, keys = model(x), list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    sparsify(model, {"conv1": torch.tensor([1, 2]), "fc": None}, {"conv2": torch.tensor([0])})
    assert isinstance(model.conv1, ChannelSparseConv2d)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    torch.testing.assert_close(model(x), ref)
    torch.testing.assert_close(copy.deepcopy(model).train()(x), net().train()(x))  # train too
    densify(model)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert not hasattr(model.conv1, "trainable_out")
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model.eval()(x), ref)


def test_optimizer_built_before_the_swap_keeps_frozen_rows() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.conv2.weight.detach().clone()
    keep = torch.tensor([True, False, True, False, False, False])
    sparsify(model, {"conv2": keep})
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert torch.equal(model.conv2.weight[~keep], before[~keep])
    assert not torch.equal(model.conv2.weight[keep], before[keep])


def test_selection_changes_between_epochs_without_a_new_swap() -> None:
    model = sparsify(net(), {"conv2": torch.tensor([0])})
    x = torch.randn(2, 3, 8, 8)
    layer = model.conv2
    set_trainable(model, {"conv2": torch.tensor([4, 5])})
    assert model.conv2 is layer
    model(x).sum().backward()
    assert layer.weight.grad is not None
    assert layer.weight.grad[:4].abs().sum() == 0 and layer.weight.grad[4:].abs().sum() > 0
    layer.trainable_out[:] = False  # an in-place write is seen too
    layer.trainable_out[0] = True
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert layer.weight.grad is not None
    assert layer.weight.grad[1:].abs().sum() == 0 and layer.weight.grad[0].abs().sum() > 0
    assert layer.weight_fraction == pytest.approx(1 / 6)


# --------------------------------------------------------------------------- BN folding


def test_fold_frozen_bn_is_exact_in_eval_mode_and_recorded() -> None:
    model = net().eval()
    x = torch.randn(4, 3, 8, 8)
    folded = fold_frozen_bn(model)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(model.bn1, nn.BatchNorm2d)  # atomic edit: the caller's model unchanged
    torch.testing.assert_close(folded.eval()(x), model(x), atol=1e-5, rtol=1e-5)
    assert folded.conv1.bias is not None and folded.conv1.bias.requires_grad
    assert edit_log(folded)[-1]["params"] == {"pairs": [["conv1", "bn1"], ["conv2", "bn2"]]}
    rebuilt = replay(net(), edit_log(folded))  # what loading a checkpoint does
    rebuilt.load_state_dict(folded.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_skips_a_conv_whose_output_feeds_more_than_its_bn() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    assert isinstance(fold_frozen_bn(Branch()).bn, nn.BatchNorm2d)


def test_folded_frozen_bn_frees_the_conv_output() -> None:
    model = net()
    model.bn1.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    before = saved_activation_bytes(model, x).activations
    after = saved_activation_bytes(fold_frozen_bn(model), x).activations
    assert before - after >= 2 * 8 * 8 * 8 * 4  # bn1 kept its 8x8x8 input per sample


# --------------------------------------------------------------------------- bit-mask ReLU


@pytest.mark.parametrize(
    ("relu", "cls"),
    [(nn.ReLU(), BitMaskReLU), (nn.ReLU(inplace=True), BitMaskReLU), (nn.ReLU6(), BitMaskReLU6)],
)
@pytest.mark.parametrize("packed", [True, False])
def test_bit_mask_relu_matches_relu(relu: nn.Module, cls: type, packed: bool) -> None:
    torch.manual_seed(4)
    x = (torch.randn(2, 3, 5, 7) * 5).contiguous(memory_format=CL)  # odd size, channels-last
    g = torch.randn_like(x)
    masked = cls(inplace=relu.inplace, packed=packed)
    refs = []
    for layer in (relu, masked):
        leaf = x.clone().requires_grad_()
        out = layer(leaf * 1.0)  # non-leaf input, so in-place works
        out.backward(g)
        refs.append((out.detach(), leaf.grad))
    torch.testing.assert_close(refs[1][0], refs[0][0], atol=0, rtol=0)
    torch.testing.assert_close(refs[1][1], refs[0][1], atol=0, rtol=0)


def test_bit_packing_on_other_devices_matches_numpy() -> None:
    flat = torch.rand(8 * 5 + 3) > 0.5  # not a multiple of 8
    packed = _pack(flat)
    assert torch.equal(_pack_torch(flat), packed)
    assert torch.equal(_unpack_torch(packed, flat.numel()).bool(), flat)


def test_bit_mask_relu_saves_one_bit_per_entry() -> None:
    x = torch.randn(2, 3, 5, 7)
    model = nn.Sequential(nn.Linear(7, 7), BitMaskReLU())
    saved = saved_activation_bytes(model, x)
    assert saved.activations == x.nbytes + -(-x.numel() // 8)  # Linear input + packed mask


def test_mask_relus_swaps_only_where_bytes_fall() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = fold_frozen_bn(net())
    sparsify(model, trainable_in={"conv2": torch.tensor([0, 1])})
    before = saved_activation_bytes(model, x).activations
    mask_relus(model, x)
    assert isinstance(model.relu1, BitMaskReLU)  # conv2 keeps X[:, S] only: the mask frees
    assert isinstance(model.relu2, BitMaskReLU)  # average pooling keeps no activation
    assert saved_activation_bytes(model, x).activations < before
    dense = fold_frozen_bn(net())
    mask_relus(dense, x)  # a dense conv2 keeps relu1's output: nothing to free
    assert type(dense.relu1) is nn.ReLU
    densify(model)
    assert type(model.relu1) is nn.ReLU and not hasattr(model.relu1, "packed")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("trainable", "trainable_in", "error", "match"),
    [
        ({"conv2": torch.ones(5, dtype=torch.bool)}, None, ConfigError, "has 6 channels"),
        ({"conv2": torch.ones(6)}, None, ConfigError, "bool mask or int indices"),
        ({"conv2": torch.tensor([0, 6])}, None, ConfigError, r"\[0, 6\)"),
        ({"conv2": torch.ones(2, 3, dtype=torch.bool)}, None, ConfigError, "1-D"),
        ({"conv3": None}, None, UnknownNameError, "did you mean 'conv2'"),
        ({"bn1": None}, None, ConfigError, "exactly nn.Conv2d and nn.Linear"),
    ],
)
def test_bad_input_explains_fix_and_leaves_model_unchanged(
    trainable: dict, trainable_in: dict | None, error: type, match: str
) -> None:
    model = net()
    with pytest.raises(error, match=match):
        sparsify(model, {"conv1": torch.tensor([0]), **trainable}, trainable_in)
    assert type(model.conv1) is nn.Conv2d  # validated before any swap


def test_input_selection_on_grouped_conv_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=1 only"):
        sparsify(model, trainable_in={"0": torch.tensor([0])})


def test_set_trainable_needs_a_swapped_layer() -> None:
    with pytest.raises(ConfigError, match="call sparsify"):
        set_trainable(net(), {"conv1": None})


def test_fold_refuses_bn_without_running_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ConfigError, match="running statistics"):
        fold_frozen_bn(model)
