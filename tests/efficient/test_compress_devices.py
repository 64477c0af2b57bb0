"""Compressed activations, WASI and LoRA on every available device (CPU always, CUDA when
present): full ranks reproduce the exact gradients and every tensor stays on the input's device
(no hard-coded ``cuda``, none forgotten on the CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sobre.efficient import add_lora, compress_activations, merge_lora, wasi

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), device=x.device).reshape(out.shape))
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["hosvd", "svd", "asi"])
def test_full_rank_compression_is_exact_on_the_device(device: str, method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4)
    ).to(device)
    x = torch.randn(5, 3, 6, 6, device=device)
    exact = _grads(model, x)
    compress_activations(model, ["0", "3"], method=method, explained_var=1.0, ranks=10**6)
    for _ in range(2):  # ASI: the Gaussian start, then the warm start
        for a, b in zip(_grads(model, x), exact, strict=True):
            assert a.device == x.device
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    if method == "asi":
        assert all(u.device == x.device for u in model[0].asi_state.factors)


@pytest.mark.parametrize("device", DEVICES)
def test_wasi_and_lora_run_on_the_device(device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)).to(device)
    x = torch.randn(4, 7, 8, device=device)
    exact = _grads(model, x)
    twin = wasi(copy.deepcopy(model), weight_var=1.0, activation_ranks=10**6)
    for a, b in zip(_grads(twin, x), exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert twin[0].left.device == x.device
    lora = add_lora(copy.deepcopy(model), rank=2)
    assert all(g.device == x.device for g in _grads(lora, x))
    torch.testing.assert_close(merge_lora(lora)(x), lora(x))
