"""``vit_tiny28``: a small Vision Transformer for 28x28 (or 32x32) images, from plain nn modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.models.registry import MODELS


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``.

    Args:
        dim: Token width.
        heads: Number of heads (must divide ``dim``).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"vit dim {dim} is not divisible by heads={heads}: pick a divisor")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the tokens of ``x`` of shape ``(B, N, dim)``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLPBlock(nn.Module):
    """``fc1`` - GELU - ``fc2``, the transformer feed-forward layer."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Feed-forward of each token."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, round(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """Update the tokens ``(B, N, dim)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@MODELS.register("vit_tiny28")
class ViTTiny28(nn.Module):
    """A tiny Vision Transformer (Dosovitskiy et al., 2021, "An image is worth 16x16 words").

    Non-overlapping patches are embedded by a strided conv (``patch_embed``), a class token and
    learned positional embeddings are added, ``depth`` pre-norm blocks (``blocks.<i>.attn``,
    ``blocks.<i>.mlp.fc1/act/fc2``) follow, and ``head`` reads the normed class token.
    Defaults: patch 4 (49 tokens on 28x28), dim 64, depth 4, 4 heads, MLP ratio 2.

    Args:
        num_classes: Number of outputs.
        in_channels: Number of input channels.
        input_size: Height (= width) of the inputs; a multiple of ``patch_size``.
        patch_size: Side of a patch.
        dim: Token width.
        depth: Number of transformer blocks.
        heads: Attention heads per block.
        mlp_ratio: Hidden width of the feed-forward layers, relative to ``dim``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(
                f"vit_tiny28 input_size {input_size} is not a multiple of patch_size {patch_size}: "
                "pick a patch size that divides it (4 or 7 for 28x28, 4 for 32x32)"
            )
        tokens = (input_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The model's init scheme: truncated-normal (std 0.02) tokens and Linear weights, zero
        Linear biases; :func:`~sobre.core.weights.fresh_weights` re-applies it."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(B, num_classes)``."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])
