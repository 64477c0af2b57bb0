"""Compressed activations (HOSVD_ε, #35): exact gradients at ε = 1, error falling with ε, a
reversible swap, and fewer saved bytes measured by autograd's saved-tensor hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.measure import saved_activation_bytes
from sobre.efficient.compress import (
    CompressedConv2d,
    CompressedLinear,
    compress_activations,
    decompress_activations,
    explained_rank,
    hosvd,
    svd_compress,
    svd_reconstruct,
    tucker_reconstruct,
)


def smooth(*shape: int, seed: int = 0) -> Tensor:
    """A low-rank-ish activation: a few separable sinusoids per (sample, channel) plus 5% noise;
    a 2-D shape (N, F) is read as N rows of F smooth samples, a 3-D one (B, N, F) as B·N rows."""
    if len(shape) == 3:
        return smooth(shape[0] * shape[1], shape[2], seed=seed).reshape(shape)
    gen = torch.Generator().manual_seed(seed)
    *lead, h, w = shape if len(shape) == 4 else (*shape[:1], 1, 1, shape[1])
    ys, xs = torch.linspace(0, 1, h), torch.linspace(0, 1, w)
    out = torch.zeros(*lead, h, w)
    for r in range(1, 4):
        amp = torch.randn(*lead, 1, 1, generator=gen)
        phase = torch.rand(2, generator=gen)
        out += (
            amp * torch.sin(3.0 * r * ys[:, None] + phase[0]) * torch.cos(2.0 * r * xs + phase[1])
        )
    out += 0.05 * torch.randn(out.shape, generator=gen)
    return out.reshape(shape)


def gradients(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(input, weight, bias) gradients of ``layer`` for a fixed random output gradient."""
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return x.grad, layer.weight.grad, layer.bias.grad  # type: ignore[return-value]


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def twin(layer: nn.Module, method: str, eps: float) -> nn.Module:
    """A compressed deep copy of ``layer`` (same parameter values), swapped by
    :func:`compress_activations`."""
    return compress_activations(
        nn.Sequential(copy.deepcopy(layer)), "0", method=method, explained_var=eps
    )[0]


CASES = [
    pytest.param(lambda: nn.Conv2d(6, 4, 3, padding=1), (4, 6, 8, 8), id="conv"),
    pytest.param(lambda: nn.Conv2d(6, 4, 3, stride=2, dilation=2), (4, 6, 9, 9), id="strided"),
    pytest.param(
        lambda: nn.Conv2d(6, 4, 3, padding="same", padding_mode="reflect"),
        (4, 6, 8, 8),
        id="reflect",
    ),
    pytest.param(lambda: nn.Linear(12, 5), (16, 12), id="linear"),
    pytest.param(lambda: nn.Linear(12, 5), (3, 7, 12), id="tokens"),
]


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize(("make", "shape"), CASES)
def test_factor_space_weight_gradient_equals_the_rebuilt_input_gradient(
    method: str, make, shape
) -> None:
    """The contraction of the output gradient with the factors is the gradient of the
    reconstructed input, at a truncating ε (no reconstruction inside backward)."""
    torch.manual_seed(0)
    layer = make()
    x = smooth(*shape)
    compressed = twin(layer, method, 0.6)
    _, gw, _ = gradients(compressed, x)
    if isinstance(layer, nn.Conv2d):
        padded = compressed._reversed_padding_repeated_twice
        if compressed.padding_mode != "zeros":
            x = torch.nn.functional.pad(x, padded, mode=compressed.padding_mode)
        padding = (0, 0) if compressed.padding_mode != "zeros" else compressed.padding
    if method == "hosvd":
        rebuilt = tucker_reconstruct(*hosvd(x, 0.6))
    else:
        rebuilt = svd_reconstruct(*svd_compress(x, 0.6), x.shape)
    reference = nn.Sequential(copy.deepcopy(layer))[0]
    if isinstance(layer, nn.Conv2d):
        reference.padding, reference.padding_mode = padding, "zeros"
    _, expected, _ = gradients(reference, rebuilt)
    assert relative(gw, expected) < 1e-4 and relative(gw, gradients(layer, x)[1]) > 1e-3


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize(("make", "shape"), CASES)
def test_eps_one_reproduces_exact_gradients(method: str, make, shape) -> None:
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    gx, gw, gb = gradients(layer, x)
    cx, cw, cb = gradients(twin(layer, method, 1.0), x)
    torch.testing.assert_close(cx, gx)
    torch.testing.assert_close(cb, gb)
    assert relative(cw, gw) < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(twin(layer, method, 0.5)(x), layer(x))


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize(("make", "shape"), CASES)
def test_weight_gradient_error_falls_as_eps_rises(method: str, make, shape) -> None:
    torch.manual_seed(0)
    layer = make()
    x = smooth(*shape)
    _, exact, _ = gradients(layer, x)
    errors = [
        relative(gradients(twin(layer, method, e), x)[1], exact) for e in (0.5, 0.7, 0.9, 1.0)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[0] > errors[-1]


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_full_rank_decompositions_reconstruct(shape: list[int], seed: int) -> None:
    a = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(tucker_reconstruct(*hosvd(a, 1.0)), a, atol=1e-4, rtol=1e-4)
    if a.ndim >= 2:
        torch.testing.assert_close(
            svd_reconstruct(*svd_compress(a, 1.0), a.shape), a, atol=1e-4, rtol=1e-4
        )


def test_explained_rank() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14
    assert [explained_rank(s, e) for e in (0.5, 9 / 14, 0.9, 0.99, 1.0)] == [1, 1, 2, 3, 4]
    assert explained_rank(torch.zeros(3), 0.8) == 1
    for eps in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            explained_rank(s, eps)


def test_bad_settings_raise() -> None:
    with pytest.raises(ConfigError, match="groups=1"):
        CompressedConv2d(4, 4, 3, groups=4)
    with pytest.raises(ConfigError, match="did you mean 'svd'"):
        CompressedLinear(3, 2, method="svdd")
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="grouped"):
        compress_activations(model, "last:2")
    assert type(model[2]) is nn.Linear  # left unchanged
    with pytest.raises(UnknownNameError, match="did you mean '2'"):
        compress_activations(model, ["2x"])
    with pytest.raises(ConfigError, match="N must be an integer"):
        compress_activations(model, "last:9")
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        compress_activations(model, "last:1", explained_var=0.0)


def test_swap_is_reversible() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3)
    )
    x = torch.randn(2, 3, 6, 6)
    keys, out, params = list(model.state_dict()), model(x), list(model.parameters())
    compress_activations(model, "last:2", method="svd", explained_var=0.9)
    assert [type(m) for m in model] == [
        nn.Conv2d,
        nn.ReLU,
        CompressedConv2d,
        nn.Flatten,
        CompressedLinear,
    ]
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    torch.testing.assert_close(model(x), out)
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    decompress_activations(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Flatten, nn.Linear]
    assert not hasattr(model[2], "explained_var")
    torch.testing.assert_close(model(x), out)


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_compressing_second_conv_saves_measured_bytes(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    x = smooth(8, 3, 16, 16)
    before = saved_activation_bytes(model, x).activations
    compress_activations(model, "1", method=method, explained_var=0.8)
    after = saved_activation_bytes(model, x).activations
    assert after < before
    # what remains is the first conv's input plus less than the second conv's full input
    assert x.nbytes <= after < x.nbytes + (before - x.nbytes) // 2


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_saved_factors_own_their_storage(method: str) -> None:
    """A rank-1 factor is a copy, not a one-column view keeping the whole eigenvector matrix
    (I_n x I_n) alive: the measured bytes equal the analytic ones."""
    x = torch.ones(4, 64, 3, 3) + 1e-3 * smooth(4, 64, 3, 3)  # nearly rank 1 in every mode
    layer = compress_activations(nn.Sequential(nn.Conv2d(64, 2, 1)), "0", method=method)[0]
    measured = saved_activation_bytes(nn.Sequential(layer), x).activations
    assert measured == layer.saved_bytes
