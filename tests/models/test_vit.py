"""Tests of sobre.models.vit: shapes, token counts, module names and the attention maths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sobre.core.errors import ConfigError
from sobre.models import ViTTiny28, create
from sobre.models.vit import Attention


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize(("size", "patch", "tokens"), [(28, 4, 49), (28, 7, 16), (32, 4, 64)])
def test_output_shape_and_tokens(in_channels: int, size: int, patch: int, tokens: int) -> None:
    model = create(
        "vit_tiny28", num_classes=10, in_channels=in_channels, input_size=size, patch_size=patch
    )
    assert model.pos_embed.shape == (1, tokens + 1, 64)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)


def test_blocks_expose_mlp_submodules() -> None:
    names = {name for name, _ in ViTTiny28().named_modules()}
    assert {f"blocks.{i}.mlp.fc1" for i in range(4)} <= names
    assert {"patch_embed", "blocks.3.mlp.act", "blocks.0.attn.qkv", "norm", "head"} <= names
    assert ViTTiny28().blocks[0].mlp.fc1.out_features == 128


def test_attention_matches_softmax_formula() -> None:
    torch.manual_seed(0)
    attn, x = Attention(dim=8, heads=2), torch.randn(3, 5, 8)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    heads = [
        torch.softmax(q[..., h] @ k[..., h].transpose(1, 2) / math.sqrt(4), -1) @ v[..., h]
        for h in (slice(0, 4), slice(4, 8))
    ]
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_activations_are_separate_modules() -> None:
    gelus = [m for m in ViTTiny28().modules() if isinstance(m, nn.GELU)]
    assert len({id(m) for m in gelus}) == 4


def test_patch_size_must_divide_input() -> None:
    with pytest.raises(ConfigError, match="patch_size"):
        ViTTiny28(input_size=28, patch_size=5)


def test_heads_must_divide_dim() -> None:
    with pytest.raises(ConfigError, match="heads"):
        ViTTiny28(dim=30, heads=4)
