"""Packed-Ensembles layers (Laurent et al., ICLR 2023, "Packed-Ensembles for efficient uncertainty
estimation"; spec trust.md §1.2): M members side by side in one network of α-times wider layers.

Layout. Inside a packed network an activation is ``(B, α·C, ...)`` (conv) or ``(B, ..., α·C)``
(linear): the batch is NOT replicated, and member m owns the contiguous channel block
``[m·α·C/M, (m+1)·α·C/M)`` (member-major). Every layer keeps that layout:

- inner layers are ordinary grouped layers with ``groups = M·γ·g`` on ``α·C`` channels (g: the base
  layer's own groups): weight (o, i) exists iff ⌊o·Mγg/(αC_out)⌋ = ⌊i·Mγg/(αC_in)⌋, so a member
  never reads another member's channels; parameters ≈ α²/(Mγ) × the base layer's;
- a ``first=True`` layer reads the shared, un-widened input densely (``groups = 1``): the
  concatenation of M independent first layers, so the input needs no replication;
- a ``last=True`` layer is grouped by members only (``groups = M·g``, γ = 1) with ``M·K``
  outputs, rearranged from ``(B, M·K)`` to member-major rows ``(M·B, K)``: rows ``m·B .. m·B+B-1``
  are member m's (``"b (m k) -> (m b) k"``). ``split_members`` (from :mod:`sobre.core.members`,
  re-exported here) turns ``(M·B, K)`` into ``(B, M, K)``.

Each group is initialised like the small layer it stands for: torch's default Kaiming-uniform
init with the fan-in of one group (``in/groups · kernel``), i.e. member m's weights are drawn as
if member m were built alone. Non-divisible shapes raise :class:`ConfigError`; nothing is padded
and γ is never changed silently (``min_channels_per_group`` lowers it with a logged warning).
Every packed layer has ``member(m)``: member m as an ordinary torch layer (the test oracle).

Speed (``benchmarks/packed_speed.py``). A packed layer is one grouped torch layer; on CPU the
grouped oneDNN convolutions are much faster in ``channels_last`` memory format, and at inference
every per-channel BatchNorm after a conv folds exactly into it (a packed model's BN is per member
channel). :func:`optimize_for_inference` does both; for training,
``model.to(memory_format=torch.channels_last)`` alone is the measured gain. With glibc's
allocator, activations of 32 MiB or more (a PE ResNet-18's first stage at batch 64 of 32x32)
are fresh mmaps whose pages fault at every call: smaller batches avoid that cost.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError
from sobre.core.members import split_members
from sobre.core.registry import check_choice

log = logging.getLogger(__name__)

__all__ = [
    "PackedConv1d",
    "PackedConv2d",
    "PackedConv3d",
    "PackedLayerNorm",
    "PackedLinear",
    "PackedSelfAttention",
    "optimize_for_inference",
    "packed_cat",
    "split_members",
]

LinearImpl = Literal["conv1d", "einsum", "dense"]
LINEAR_IMPLS: tuple[str, ...] = ("conv1d", "einsum", "dense")


def _check_hparams(alpha: float, num_members: int, gamma: int) -> None:
    """Raise on ``num_members < 1``, ``alpha <= 0``, ``gamma < 1`` (and non-integer counts)."""
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
        raise ConfigError(f"num_members must be an integer >= 1, got {num_members!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ConfigError(f"alpha must be a number > 0, got {alpha!r}: the paper uses alpha=2")
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ConfigError(f"gamma must be an integer >= 1, got {gamma!r}: use 1 for no sub-groups")


def _widen(channels: int, alpha: float, arg: str, layer: str) -> int:
    """``alpha · channels`` as an integer, or a ConfigError naming ``arg``."""
    width = channels * alpha
    if abs(width - round(width)) > 1e-9 or round(width) < 1:
        raise ConfigError(
            f"{layer}: alpha·{arg} = {alpha}·{channels} = {width:g} is not a whole number of "
            f"channels: choose alpha so that alpha·{arg} is a positive integer"
        )
    return round(width)


def _require_divisible(value: int, what: str, divisor: int, by: str, layer: str) -> None:
    if value % divisor:
        raise ConfigError(
            f"{layer}: {what} = {value} is not divisible by {by} = {divisor}: choose the layer "
            "sizes, alpha, num_members and gamma so that it is (sobre never pads channels or "
            "lowers gamma silently)"
        )


def _members_to_batch(x: Tensor, num_members: int, dim: int) -> Tensor:
    """``(B, ..., M·K at dim, ...)`` -> ``(M·B, ..., K, ...)`` with member-major rows."""
    dim = dim % x.ndim
    return x.unflatten(dim, (num_members, -1)).movedim(dim, 0).flatten(0, 1)


def packed_cat(tensors: Sequence[Tensor], dim: int, num_members: int) -> Tensor:
    """``torch.cat`` of member-split tensors along their member-major channel dim ``dim``.

    Member m's block of the result is the concatenation of member m's blocks of the inputs, so
    the result stays member-major (a plain ``torch.cat`` would put all of the first tensor's
    members before the second's). With ``num_members=1`` it is ``torch.cat``.
    """
    dim = dim % tensors[0].ndim
    blocks = [t.unflatten(dim, (num_members, -1)) for t in tensors]
    return torch.cat(blocks, dim + 1).flatten(dim, dim + 1)


class PackedLinear(nn.Module):
    """A linear layer holding M members, block-diagonal with ``M·γ`` blocks (spec §1.2).

    ``weight`` has shape ``(out_features, in_features // groups)`` like a grouped kernel-1 conv:
    block j maps input block j to output block j. ``impl`` picks how the product is computed
    (same function, same ``state_dict``; switch it at any time): ``"conv1d"`` (grouped kernel-1
    conv, the reference ResNet's choice), ``"einsum"`` (batched per-block product) or
    ``"dense"`` (the block-diagonal matrix built explicitly, then ``F.linear``).

    Args:
        in_features: Input features of the base (single-model) layer.
        out_features: Output features of the base layer (the number of classes K if ``last``).
        alpha: Width factor α: the packed layer has ``α·in`` inputs and ``α·out`` outputs.
        num_members: Number of members M.
        gamma: Sub-groups per member γ of inner layers (``first``/``last`` layers take 1).
        first: Read the shared un-widened input densely (``in_features`` inputs, one group).
        last: Emit ``M·out_features`` logits grouped by member, rearranged to ``(M·B, ..., K)``.
        bias: Learn an additive bias.
        impl: ``"conv1d"``, ``"einsum"`` or ``"dense"``.

    Shape:
        ``(B, ..., in)`` -> ``(B, ..., out)`` with the widened sizes; ``(M·B, ..., K)`` if ``last``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        alpha: float,
        num_members: int,
        gamma: int = 1,
        first: bool = False,
        last: bool = False,
        bias: bool = True,
        impl: LinearImpl = "conv1d",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_hparams(alpha, num_members, gamma)
        name = type(self).__name__
        check_choice("impl", impl, LINEAR_IMPLS, name)
        if gamma != 1 and (first or last):
            raise ConfigError(
                f"{name}: gamma={gamma} with first={first}, last={last}: the first layer is dense "
                "and the last is grouped by members only, so gamma applies to inner layers: "
                "pass gamma=1"
            )
        self.num_members, self.alpha, self.gamma = num_members, alpha, gamma
        self.first, self.last, self.impl = first, last, impl
        self.in_features = in_features if first else _widen(in_features, alpha, "in_features", name)
        self.out_features = (
            num_members * out_features
            if last
            else _widen(out_features, alpha, "out_features", name)
        )
        self.groups = 1 if first else num_members * gamma
        by = "num_members·gamma" if gamma > 1 else "num_members"
        _require_divisible(self.in_features, "alpha·in_features", self.groups, by, name)
        what = "num_members·out_features" if last else "alpha·out_features"
        _require_divisible(self.out_features, what, max(self.groups, num_members), by, name)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(self.out_features, self.in_features // self.groups, **factory)
        )
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init with the fan-in of one group (``in_features // groups``)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def _blocks(self) -> Tensor:
        """The weight as ``(groups, out // groups, in // groups)`` blocks."""
        return self.weight.unflatten(0, (self.groups, -1))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block-diagonal map on the last dim; rearrange to member rows if ``last``."""
        if self.impl == "conv1d":
            lead = x.shape[:-1]
            out = F.conv1d(
                x.reshape(-1, self.in_features, 1),
                self.weight.unsqueeze(-1),
                self.bias,
                groups=self.groups,
            ).reshape(*lead, self.out_features)
        elif self.impl == "einsum":
            out = torch.einsum(
                "...gi,goi->...go", x.unflatten(-1, (self.groups, -1)), self._blocks()
            ).flatten(-2)
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(x, torch.block_diag(*self._blocks()), self.bias)
        return _members_to_batch(out, self.num_members, -1) if self.last else out

    def member(self, m: int) -> nn.Linear:
        """Member m as an ordinary ``nn.Linear`` (its γ blocks on the diagonal, zeros elsewhere)."""
        rows = _member_rows(self, m, self.out_features)
        groups = 1 if self.first else self.groups // self.num_members
        blocks = self.weight[rows].detach().unflatten(0, (groups, -1))
        weight = torch.block_diag(*blocks)
        layer = nn.Linear(
            weight.shape[1],
            weight.shape[0],
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None and layer.bias is not None:
                layer.bias.copy_(self.bias[rows])
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"groups={self.groups}, {_packing_repr(self)}, impl={self.impl!r}, "
            f"bias={self.bias is not None}"
        )


def _member_rows(layer: nn.Module, m: int, out: int) -> slice:
    members = layer.num_members
    if not 0 <= m < members:
        raise ConfigError(f"member index {m} is out of range for num_members={members}")
    size = out // members
    return slice(m * size, (m + 1) * size)


def _packing_repr(layer: nn.Module) -> str:
    return (
        f"num_members={layer.num_members}, alpha={layer.alpha}, gamma={layer.gamma}, "
        f"first={layer.first}, last={layer.last}"
    )


class _PackedConvNd:
    """Shared construction of :class:`PackedConv1d`, :class:`PackedConv2d`, :class:`PackedConv3d`.

    Groups of the underlying ordinary conv: ``1`` if ``first``; ``M·g`` if ``last``; ``α·C_in``
    for a depthwise base conv (``groups == in_channels > 1``: each member stays depthwise, with
    ``α·C_in/M`` groups; γ does not apply); ``M·γ·g`` otherwise.
    """

    _base: type[nn.Conv1d | nn.Conv2d | nn.Conv3d]
    num_members: int
    alpha: float
    gamma: int
    first: bool
    last: bool
    in_channels: int
    out_channels: int
    kernel_size: Any
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    padding_mode: str
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        alpha: float,
        num_members: int,
        gamma: int = 1,
        groups: int = 1,
        first: bool = False,
        last: bool = False,
        min_channels_per_group: int | None = None,
        **conv_kwargs: Any,
    ) -> None:
        _check_hparams(alpha, num_members, gamma)
        name = type(self).__name__
        depthwise = groups == in_channels and groups > 1
        if gamma != 1 and (first or last or depthwise):
            where = (
                "a depthwise conv has one channel per group"
                if depthwise
                else "the first layer is dense and the last is grouped by members only"
            )
            raise ConfigError(f"{name}: gamma={gamma} does not apply here ({where}): pass gamma=1")
        if first and groups != 1:
            raise ConfigError(
                f"{name}: first=True with groups={groups}: a first layer is dense over the shared "
                "input, which a grouped base conv cannot be in the member-major layout; make the "
                "first conv ungrouped or start packing after it"
            )
        wide_in = in_channels if first else _widen(in_channels, alpha, "in_channels", name)
        wide_out = (
            num_members * out_channels
            if last
            else _widen(out_channels, alpha, "out_channels", name)
        )
        if first:
            packed_groups, by = 1, "num_members"
        elif last:
            packed_groups, by = num_members * groups, "num_members·groups"
        elif depthwise:
            packed_groups, by = wide_in, "alpha·in_channels (depthwise)"
            _require_divisible(wide_in, "alpha·in_channels", num_members, "num_members", name)
        else:
            gamma = _lower_gamma(wide_in, num_members * groups, gamma, min_channels_per_group, name)
            packed_groups, by = num_members * gamma * groups, "num_members·gamma·groups"
        _require_divisible(wide_in, "alpha·in_channels", packed_groups, by, name)
        what = "num_members·out_channels" if last else "alpha·out_channels"
        _require_divisible(wide_out, what, max(packed_groups, num_members), by, name)
        super().__init__(  # type: ignore[call-arg]
            wide_in, wide_out, kernel_size, groups=packed_groups, **conv_kwargs
        )
        self.num_members, self.alpha, self.gamma = num_members, alpha, gamma
        self.first, self.last = first, last

    def forward(self, x: Tensor) -> Tensor:
        """The grouped conv; member-major rows ``(M·B, K, ...)`` if ``last``."""
        out = super().forward(x)  # type: ignore[misc]
        return _members_to_batch(out, self.num_members, 1) if self.last else out

    def member(self, m: int) -> nn.Module:
        """Member m as an ordinary conv of the base class (weights copied out of its groups)."""
        rows = _member_rows(self, m, self.out_channels)
        members = self.num_members
        conv = self._base(
            self.in_channels if self.first else self.in_channels // members,
            self.out_channels // members,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=1 if self.first else self.groups // members,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight[rows])
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias[rows])
        return conv

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_packing_repr(self)}"  # type: ignore[misc]


def _lower_gamma(wide_in: int, base_groups: int, gamma: int, minimum: int | None, name: str) -> int:
    """γ, lowered (with a warning) while a group would get fewer than ``minimum`` inputs."""
    if minimum is None or gamma == 1:
        return gamma
    lowered = gamma
    while lowered > 1 and wide_in / (base_groups * lowered) < minimum:
        lowered -= 1
    if lowered != gamma:
        log.warning(
            "%s: gamma lowered from %d to %d so that each group has >= %d input channels "
            "(min_channels_per_group)",
            name,
            gamma,
            lowered,
            minimum,
        )
    return lowered


class PackedConv1d(_PackedConvNd, nn.Conv1d):
    """A 1-d conv holding M members (see :class:`_PackedConvNd` and the module docstring).

    Args:
        in_channels: Input channels of the base conv.
        out_channels: Output channels of the base conv (K if ``last``).
        kernel_size: Kernel size.
        alpha: Width factor α.
        num_members: Number of members M.
        gamma: Sub-groups per member of inner convs.
        groups: The base conv's own groups g (``groups == in_channels``: depthwise).
        first: Dense on the shared un-widened input.
        last: ``M·out_channels`` outputs rearranged to ``(M·B, K, ...)``.
        min_channels_per_group: If set, γ is lowered (with a logged warning) until every group
            has at least this many input channels; ``None`` (default) never changes γ.
        **conv_kwargs: ``stride``, ``padding``, ``dilation``, ``bias``, ``padding_mode``,
            ``device``, ``dtype`` of ``nn.Conv1d``.
    """

    _base = nn.Conv1d


class PackedConv2d(_PackedConvNd, nn.Conv2d):
    """A 2-d conv holding M members; arguments as :class:`PackedConv1d` (``nn.Conv2d`` kwargs)."""

    _base = nn.Conv2d


class PackedConv3d(_PackedConvNd, nn.Conv3d):
    """A 3-d conv holding M members; arguments as :class:`PackedConv1d` (``nn.Conv3d`` kwargs)."""

    _base = nn.Conv3d


class PackedLayerNorm(nn.GroupNorm):
    """LayerNorm of M members over the last dim: ``GroupNorm`` with M groups of ``α·dim/M``.

    Each member's ``α·dim/M`` features are normalised with their own statistics (a LayerNorm per
    member), the affine parameters are per feature. Same ``weight``/``bias`` keys as
    ``nn.LayerNorm``.

    Args:
        dim: Normalised size of the base ``nn.LayerNorm``.
        alpha: Width factor α.
        num_members: Number of members M.
        eps: Added to the variance.
        elementwise_affine: Learn a per-feature scale (and shift).
        bias: Learn the shift (with ``elementwise_affine``).
    """

    def __init__(
        self,
        dim: int,
        *,
        alpha: float,
        num_members: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_hparams(alpha, num_members, 1)
        name = type(self).__name__
        width = _widen(dim, alpha, "dim", name)
        _require_divisible(width, "alpha·dim", num_members, "num_members", name)
        super().__init__(
            num_members, width, eps=eps, affine=elementwise_affine, device=device, dtype=dtype
        )
        if elementwise_affine and not bias:
            self.bias = None
        self.num_members, self.alpha = num_members, alpha

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each member's block of the last dim of ``(..., α·dim)``."""
        flat = x.reshape(-1, self.num_channels)
        out = F.group_norm(flat, self.num_groups, self.weight, self.bias, self.eps)
        return out.reshape(x.shape)

    def member(self, m: int) -> nn.LayerNorm:
        """Member m as an ordinary ``nn.LayerNorm``."""
        rows = _member_rows(self, m, self.num_channels)
        norm = nn.LayerNorm(
            self.num_channels // self.num_members,
            eps=self.eps,
            elementwise_affine=self.affine,
            bias=self.bias is not None,
            device=self.weight.device if self.weight is not None else None,
            dtype=self.weight.dtype if self.weight is not None else None,
        )
        with torch.no_grad():
            if self.weight is not None:
                norm.weight.copy_(self.weight[rows])
            if self.bias is not None:
                norm.bias.copy_(self.bias[rows])
        return norm

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_members={self.num_members}, alpha={self.alpha}"


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention of M members, each with ``num_heads`` heads of its own.

    ``qkv`` and ``proj`` are :class:`PackedLinear`; member m's ``qkv`` block is laid out
    ``(3, num_heads, head_dim)`` like an ordinary fused projection, so the heads are regrouped
    to ``(B, M·num_heads, N, head_dim)`` (member-major) and attended independently: no head
    sees another member's channels. ``head_dim = α·attn_dim / (M·num_heads)``.

    Args:
        dim: Token width of the base attention.
        num_heads: Heads of the base attention, kept per member.
        alpha: Width factor α.
        num_members: Number of members M.
        gamma: Sub-groups per member of the two projections.
        attn_dim: Width of the base attention's heads together (``dim`` if ``None``).
        qkv_bias: Bias of the fused projection.
        proj_bias: Bias of the output projection.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
        impl: :class:`PackedLinear` implementation of both projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        alpha: float,
        num_members: int,
        gamma: int = 1,
        attn_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: LinearImpl = "conv1d",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        attn_dim = dim if attn_dim is None else attn_dim
        pack: dict[str, Any] = {
            "alpha": alpha,
            "num_members": num_members,
            "gamma": gamma,
            "impl": impl,
            "device": device,
            "dtype": dtype,
        }
        self.qkv = PackedLinear(dim, 3 * attn_dim, bias=qkv_bias, **pack)
        self.proj = PackedLinear(attn_dim, dim, bias=proj_bias, **pack)
        width = self.proj.in_features // num_members
        if width % num_heads:
            raise ConfigError(
                f"{type(self).__name__}: a member's attention width alpha·attn_dim/num_members = "
                f"{width} is not divisible by num_heads={num_heads}: choose alpha and "
                "num_members so that it is"
            )
        self.num_members, self.num_heads, self.head_dim = num_members, num_heads, width // num_heads
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """Attend over the tokens of ``x`` ``(B, N, α·dim)``; ``attn_mask`` must broadcast over
        ``(B, M·num_heads, N, N)``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, self.num_members, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).flatten(2, 3).unbind(0)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))

    def member(self, m: int) -> PackedSelfAttention:
        """Member m: the same attention with ``num_members=1`` and ordinary ``nn.Linear``s."""
        one = copy.deepcopy(self)
        one.qkv, one.proj, one.num_members = self.qkv.member(m), self.proj.member(m), 1
        return one

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, num_heads={self.num_heads} per member, "
            f"head_dim={self.head_dim}, attn_drop={self.attn_drop}"
        )


class _LeafTracer(fx.Tracer):
    """torch.nn modules and the packed layers are leaves (so a BN follows a conv *module*)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        packed = (_PackedConvNd, PackedLinear, PackedLayerNorm, PackedSelfAttention)
        return isinstance(m, packed) or super().is_leaf_module(m, module_qualified_name)


def _channels_last(t: Tensor) -> Tensor:
    """4-d tensors in ``channels_last``, 5-d in ``channels_last_3d``, others unchanged."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@structural_edit("packed_optimize_for_inference")
def optimize_for_inference(model: nn.Module, *, channels_last: bool = True) -> fx.GraphModule:
    """A copy of ``model`` for fast eval-mode inference, with the same outputs (float rounding).

    - **BatchNorm folding.** Every ``BatchNorm1d/2d/3d`` with running statistics that reads the
      output of a ``Conv1d/2d/3d`` (packed or not; not a ``last=True`` packed conv, whose output
      is rearranged into member rows) used by nothing else, each module called once, is folded
      into the conv: ``W' = W·γ/√(σ²+ε)``, ``b' = (b − μ)·γ/√(σ²+ε) + β`` per output channel
      (``torch.nn.utils.fusion.fuse_conv_bn_eval``). A packed model's BN is per channel, so
      this is exact per member and grouped weights keep their groups.
    - **Memory format** (``channels_last=True``): 4-d weights in ``channels_last`` (5-d in
      ``channels_last_3d``); oneDNN then runs the convolutions, grouped ones included, in NHWC,
      converting an NCHW input at the first conv.

    The result is an ``fx.GraphModule`` (a :class:`~sobre.uncertainty.packify.PackedEnsemble`
    stays one) in eval mode, for inference only: the folded BNs are gone, so do not train it. A
    recorded structure edit: a checkpoint of it reloads by replaying the fold.

    Args:
        model: A ``torch.fx.GraphModule`` (e.g. from ``packify``) or a model ``torch.fx`` can
            trace symbolically (torch.nn and the packed layers are kept as leaves).
        channels_last: Also convert the weights to ``channels_last``.

    Raises:
        ConfigError: ``model`` is not a GraphModule and cannot be traced.
    """
    model.eval()
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        try:
            graph = _LeafTracer().trace(model)
        except Exception as err:  # tracing runs arbitrary user code: any failure means untraceable
            raise ConfigError(
                f"optimize_for_inference: torch.fx cannot trace {type(model).__name__} "
                f"({type(err).__name__}: {err}); pass a torch.fx.GraphModule (packify returns "
                "one) or fold the BatchNorms with torch.nn.utils.fusion.fuse_conv_bn_eval"
            ) from err
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded: dict[str, str] = {}  # BN path -> conv path
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args or calls[node.target] != 1:
            continue
        bn, src = modules[node.target], node.args[0]
        if not (isinstance(bn, _BatchNorm) and bn.running_mean is not None):
            continue
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = modules[src.target]
        if (
            not isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            or getattr(conv, "last", False)
            or calls[src.target] != 1
        ):
            continue
        _set_module(gm, src.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded[node.target] = src.target
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    packing = gm.meta.get("packing")  # packify's description: drop the BNs, add the conv biases
    if packing is not None:
        axes = {k: a for k, a in packing.axes.items() if k.rpartition(".")[0] not in folded}
        axes.update({f"{c}.bias": 0 for c in folded.values() if f"{c}.weight" in axes})
        roles = {k: r for k, r in packing.roles.items() if k not in folded}
        gm.meta["packing"] = dataclasses.replace(packing, roles=roles, axes=axes)
    if channels_last:
        gm._apply(_channels_last)
    return gm.eval()
