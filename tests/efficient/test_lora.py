"""Minimal LoRA (WASI's peer arm): unchanged output at B = 0, merge equals the adapted output,
only the adapters train, reversible swap, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.efficient.lora import LoRALinear, add_lora, merge_lora
from sobre.models import create


def vit() -> nn.Module:
    torch.manual_seed(0)
    return create("vit_tiny28", num_classes=5, in_channels=1, dim=32, depth=1, heads=2)


def test_zero_b_keeps_the_output_and_the_keys() -> None:
    model = vit()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    keys = set(model.state_dict())
    add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 5 and layers[0].scale == 2.0
    assert layers[0].lora_a.shape == (4, 32) and layers[0].lora_b.shape == (96, 4)
    assert layers[0].lora_a.abs().sum() > 0 and not layers[0].lora_b.any()
    added = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert {k.rsplit(".", 1)[1] for k in added} == {"lora_a", "lora_b"}


def test_only_the_adapters_train() -> None:
    model = add_lora(vit(), rank=2, layers=["blocks.0.attn.qkv", "blocks.0.mlp.fc1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        f"blocks.0.{m}.{p}" for m in ("attn.qkv", "mlp.fc1") for p in ("weight", "bias")
    }
    assert {"blocks.0.attn.qkv.lora_a", "head.weight", "patch_embed.weight"} <= trainable
    for name, p in model.named_parameters():  # backbone frozen by hand, as a fine-tune would
        p.requires_grad_("lora_" in name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 1, 28, 28)).square().sum().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"blocks.0.{m}.lora_{ab}" for m in ("attn.qkv", "mlp.fc1") for ab in "ab"}


def test_merge_equals_the_adapted_output_and_swaps_back() -> None:
    model = add_lora(vit(), rank=3, alpha=6)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        adapted = model(x)
    params = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    merge_lora(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert dict(model.named_parameters()) == params
    assert all(p.requires_grad for p in model.parameters())  # flags of before add_lora
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-4)
    assert set(model.state_dict()) == set(vit().state_dict())


def test_lora_linear_built_directly_and_bad_input() -> None:
    layer = LoRALinear(6, 4, rank=2, bias=False)
    assert not layer.weight.requires_grad and layer(torch.randn(5, 6)).shape == (5, 4)
    base = nn.Linear(6, 4, bias=False)
    base.weight = copy.deepcopy(layer.weight)
    torch.testing.assert_close(layer(torch.ones(1, 6)), base(torch.ones(1, 6)))
    with pytest.raises(UnknownNameError, match="did you mean 'head'"):
        add_lora(vit(), layers=["haed"])
    with pytest.raises(ConfigError, match="rank=0 must be >= 1"):
        add_lora(vit(), rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        add_lora(vit(), dropout=1.0)
