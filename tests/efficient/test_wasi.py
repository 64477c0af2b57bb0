"""WASI (#46): exact gradients at full ranks, error falling with the ranks, the power iteration,
the exported two-Linear module (outputs, FLOPs), ViTs (ours and timm), exact resume from a
state_dict, reversibility and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_compress import gradients, relative, smooth
from torch import Tensor, nn

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.masks import attach_mask
from sobre.core.measure import flops, saved_activation_bytes
from sobre.efficient.wasi import WASILinear, export_wasi, unwasi, wasi
from sobre.models import create


def low_rank_linear(n_in: int, n_out: int, rank: int, seed: int = 0) -> nn.Linear:
    """A Linear whose weight has a decaying spectrum: ``rank`` strong directions plus 1% noise."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        u = torch.randn(n_out, rank, generator=gen)
        v = torch.randn(rank, n_in, generator=gen)
        scale = torch.logspace(0, -1, rank)[:, None]
        layer.weight.copy_(u @ (scale * v) / n_in**0.5)
        layer.weight.add_(0.01 * torch.randn(n_out, n_in, generator=gen))
    return layer


def swapped(layer: nn.Linear, weight_var: float, ranks) -> WASILinear:
    """A WASI deep copy of ``layer``."""
    model = wasi(
        nn.Sequential(copy.deepcopy(layer)), weight_var, layers="0", activation_ranks=ranks
    )
    return model[0]


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create("vit_tiny28", num_classes=5, in_channels=1, dim=32, depth=1, heads=2)


def timm_vit(seed: int = 0) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        in_chans=3,
        num_classes=5,
        depth=1,
        embed_dim=32,
        num_heads=2,
    )


@pytest.mark.parametrize("shape", [(12, 10), (3, 5, 10)], ids=["2d", "tokens"])
def test_full_ranks_reproduce_vanilla_gradients(shape) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(10, 7)
    x = torch.randn(shape)
    gx, gw, gb = gradients(layer, x)
    wl = swapped(layer, 1.0, 10**6)
    assert wl.rank == 7
    for _ in range(2):  # Gaussian activation start, then the warm-started iteration
        wl.zero_grad(set_to_none=True)
        cx, cw, cb = gradients(wl, x)
        assert relative(cx, gx) < 1e-4
        assert relative(cw, gw) < 1e-4
        assert relative(cb, gb) < 1e-4


def test_gradient_error_falls_with_the_ranks() -> None:
    layer = low_rank_linear(24, 16, 8)
    x = smooth(6, 8, 24)
    gx, gw, _ = gradients(layer, x)
    w_errors, x_errors = [], []
    for ranks, weight_var in [(1, 0.5), (2, 0.8), (4, 0.95), (8, 0.999), (10**6, 1.0)]:
        wl = swapped(layer, weight_var, ranks)
        for _ in range(3):
            wl.zero_grad(set_to_none=True)
            cx, cw, _ = gradients(wl, x)
        w_errors.append(relative(cw, gw))
        x_errors.append(relative(cx, gx))
    assert w_errors == sorted(w_errors, reverse=True) and w_errors[-1] < 1e-4
    assert x_errors == sorted(x_errors, reverse=True) and x_errors[-1] < 1e-4


def test_power_iteration_tracks_the_best_rank_k_weight() -> None:
    layer = low_rank_linear(20, 12, 6, seed=1)
    wl = swapped(layer, 0.9, 2)
    with torch.no_grad():  # a drifted weight: the tracked subspace must follow it
        wl.weight.add_(0.05 * torch.randn(wl.weight.shape))
    for _ in range(30):
        wl.power_iteration()
    u, s, vh = torch.linalg.svd(wl.weight.detach())
    best = (u[:, : wl.rank] * s[: wl.rank]) @ vh[: wl.rank]
    torch.testing.assert_close(wl.left @ wl.right, best, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(wl.left.t() @ wl.left, torch.eye(wl.rank), atol=1e-5, rtol=0)


def test_training_forward_runs_one_iteration_eval_forward_none() -> None:
    wl = swapped(low_rank_linear(16, 8, 4), 0.8, 3)
    x = torch.randn(5, 16)
    with torch.no_grad():
        wl.weight.add_(0.1)
    left, right = wl.left.clone(), wl.right.clone()
    with torch.no_grad():
        out = wl(x)
    torch.testing.assert_close(out, (x @ right.t()) @ left.t() + wl.bias)
    assert torch.equal(wl.left, left)  # no-grad forward leaves the subspace alone
    wl(x)
    q = torch.linalg.qr(wl.weight @ (wl.weight.t() @ left)).Q
    torch.testing.assert_close(wl.left, q.detach())
    torch.testing.assert_close(wl.right, (q.t() @ wl.weight).detach())


def test_saves_the_compressed_input_and_counts_left_right_as_buffers() -> None:
    layer = low_rank_linear(32, 32, 4)
    x = smooth(8, 16, 32)
    dense = saved_activation_bytes(layer, x)
    wl = swapped(layer, 0.8, (2, 2, 2))
    compressed = saved_activation_bytes(wl, x)
    assert dense.activations == x.numel() * 4
    assert compressed.activations == 4 * (8 + 2 * (8 + 16 + 32))  # core + factors
    assert compressed.parameters == 4 * (wl.left.numel() + wl.right.numel())


@settings(max_examples=15, deadline=None)
@given(
    n_in=st.integers(2, 24),
    n_out=st.integers(2, 24),
    weight_var=st.floats(0.1, 1.0),
    bias=st.booleans(),
)
def test_export_matches_the_eval_forward(n_in, n_out, weight_var, bias) -> None:
    torch.manual_seed(0)
    wl = swapped(nn.Linear(n_in, n_out, bias=bias), weight_var, 2)
    wl(torch.randn(3, n_in))  # one training step of the subspace
    exported = wl.export()
    assert [type(m) for m in exported] == [nn.Linear, nn.Linear]
    x = torch.randn(4, 5, n_in)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), wl(x))


def test_export_has_fewer_flops_below_the_break_even_rank() -> None:
    layer = low_rank_linear(48, 32, 4)
    wl = swapped(layer, 0.9, 2)
    assert wl.rank < 48 * 32 / (48 + 32)
    x = torch.randn(10, 48)
    dense = flops(layer, x)
    assert flops(wl.export(), x) == flops(wl, x) == 2 * 10 * wl.rank * (48 + 32) < dense
    full = swapped(layer, 1.0, 2)  # k = 32 > break-even: the factorised form costs more
    assert flops(full.export(), x) > dense


@pytest.mark.parametrize("make", [vit, timm_vit], ids=["vit_tiny28", "timm"])
def test_vits_train_export_and_swap_back(make) -> None:
    model = make()
    channels = model.patch_embed.proj.in_channels if hasattr(model.patch_embed, "proj") else 1
    size = 16 if channels == 3 else 28
    x = torch.randn(4, channels, size, size)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    wasi(model, 0.8, activation_budget_bytes=40_000, batch=x)
    layers = [m for m in model.modules() if isinstance(m, WASILinear)]
    assert len(layers) == 5  # qkv, proj, fc1, fc2, head
    token_layer = layers[0]
    assert len(token_layer.activation_ranks) == 3  # (B, N, D)
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert dict(model.named_parameters()) == params
    new = set(model.state_dict()) - set(keys)
    assert new and all(
        k.rsplit(".", 2)[-2] in {"qkv", "proj", "fc1", "fc2", "head", "asi_state"} for k in new
    )
    model.eval()
    with torch.no_grad():
        expected = model(x)
        deployed = export_wasi(copy.deepcopy(model))
        torch.testing.assert_close(deployed(x), expected)
    assert not any(isinstance(m, WASILinear) for m in deployed.modules())
    assert flops(deployed, x) == flops(model, x)
    unwasi(model)
    assert list(model.state_dict()) == keys and dict(model.named_parameters()) == params
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Tensor]) -> None:
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_state_dict_resumes_exactly() -> None:
    batches = [
        torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    model = wasi(vit(0), 0.7, activation_ranks=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, batches[:2])
    saved, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, batches[2:])

    fresh = wasi(vit(1), 0.3, activation_ranks=4)  # other weights: other ranks k
    assert fresh.blocks[0].mlp.fc1.rank != model.blocks[0].mlp.fc1.rank
    fresh.load_state_dict(saved)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_opt.load_state_dict(saved_opt)
    train_steps(fresh, fresh_opt, batches[2:])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_rewasi_reconfigures_already_swapped_layers() -> None:
    model = wasi(vit(), 1.0, activation_ranks=4)
    qkv = model.blocks[0].attn.qkv
    full = qkv.rank
    wasi(model, 0.5, activation_budget_bytes=20_000, batch=torch.randn(4, 1, 28, 28))
    assert model.blocks[0].attn.qkv is qkv and qkv.rank < full and qkv.weight_var == 0.5


def test_bad_input_names_the_fix() -> None:
    model = vit()
    batch = torch.randn(2, 1, 28, 28)
    with pytest.raises(UnknownNameError, match=r"did you mean 'blocks\.0\.attn\.qkv'"):
        wasi(model, layers=["blocks.0.attn.qvk"], activation_ranks=2)
    with pytest.raises(UnknownNameError, match=r"nn\.Linear"):
        wasi(model, layers="patch_embed", activation_ranks=2)
    with pytest.raises(ConfigError, match="exactly one of activation_ranks"):
        wasi(model)
    with pytest.raises(ConfigError, match="exactly one of activation_ranks"):
        wasi(model, activation_ranks=2, activation_budget_bytes=10**6, batch=batch)
    with pytest.raises(ConfigError, match="pass batch="):
        wasi(model, activation_budget_bytes=10**6)
    with pytest.raises(ConfigError, match="below the minimum"):
        wasi(model, activation_budget_bytes=10, batch=batch)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            wasi(model, weight_var=bad, activation_ranks=2)
    with pytest.raises(ConfigError, match="no entry for layer"):
        wasi(model, layers="last:2", activation_ranks={"head": 2})
    with pytest.raises(ConfigError, match="last:2"):
        wasi(model, layers="last:0", activation_ranks=2)
    assert not any(isinstance(m, WASILinear) for m in model.modules())  # left unchanged


def test_forwards_before_one_backward_share_the_subspace_until_the_weight_steps() -> None:
    torch.manual_seed(0)
    wl = swapped(low_rank_linear(16, 8, 4), 0.8, 3)
    apart = copy.deepcopy(wl)
    x1, x2 = torch.randn(5, 16), torch.randn(5, 16)
    (wl(x1).square().sum() + wl(x2).square().sum()).backward()  # a siamese loss
    apart(x1).square().sum().backward()
    apart(x2).square().sum().backward()
    torch.testing.assert_close(wl.weight.grad, apart.weight.grad)  # same L, R for both
    opt = torch.optim.SGD(wl.parameters(), lr=0.5)
    left = wl.left.clone()
    opt.step()
    wl(x1)
    q = torch.linalg.qr(wl.weight @ (wl.weight.t() @ left)).Q
    torch.testing.assert_close(wl.left, q.detach())  # the step moved W: one iteration


def test_a_masked_weight_still_drives_the_power_iteration() -> None:
    wl = swapped(low_rank_linear(16, 8, 4), 0.8, 3)
    attach_mask(wl, kind="weight")
    left = wl.left.clone()
    with torch.no_grad():
        wl.parametrizations.weight.original.add_(0.1)
    wl(torch.randn(5, 16))
    assert not torch.equal(wl.left, left)
