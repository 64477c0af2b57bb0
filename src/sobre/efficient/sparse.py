"""Channel-sparse updates that save time and memory for real, not only in counted FLOPs.

Zeroing the gradient rows of frozen neurons (NEq's code, spec §0) still computes the whole
backward and keeps every activation. The layers here compute and keep less instead:

- :class:`ChannelSparseConv2d` / :class:`ChannelSparseLinear` hold exactly the parameters of the
  ``nn.Conv2d`` / ``nn.Linear`` they replace (same objects, same ``state_dict`` keys) plus two
  non-persistent bool buffers: ``trainable_out``, the output channels whose weight rows are
  updated (NEq's non-frozen neurons), and ``trainable_in``, the input channels whose weight
  columns are updated (TraDy's per-epoch sample S_l, spec §4; ``groups=1`` only). The backward
  computes the input gradient in full and the weight gradient only for the block ``W[out, in]``,
  in one weight-gradient kernel call on the sliced output gradient; the other entries of
  ``weight.grad`` are exactly zero (``weight.grad`` stays ``None`` when no entry is trainable),
  and ``bias.grad`` follows ``trainable_out``. Zero rows still move under momentum or weight
  decay: pair the layers with an optimizer that restores frozen rows (the package's masked
  optimizer) when they must stay bit-identical. The forward saves only what that
  needs: the input (``X[:, S_l]`` with an input selection; a grouped conv keeps the input
  channels of its trainable groups only) for the weight gradient, and the weight for the input
  gradient. The input gradient is skipped when the input needs none (the first layer, or
  everything below is frozen), as in ``nn.Conv2d``. With every channel trainable the layer runs
  the native op, unchanged.
- :func:`sparsify` swaps them in place, by class (parameters, hooks and optimizers stay valid),
  :func:`set_trainable` changes the selections between epochs without swapping again (writing
  into ``layer.trainable_out`` in place works too), :func:`densify` swaps everything back.
- :func:`fold_frozen_bn` folds eval-mode BatchNorm into the conv before it: BN saves its input
  even when frozen (spec §0), which keeps every conv output alive.
- :class:`BitMaskReLU` / :class:`BitMaskReLU6` save a bit-packed mask instead of their output;
  :func:`mask_relus` swaps them in only where the measured saved bytes fall (when the next
  layer keeps the same tensor anyway, a mask frees nothing and adds a little).

Measure with :func:`sobre.core.measure.saved_activation_bytes` (unique storages) and
:func:`sobre.core.measure.backward_flops` fed with :func:`trainable_fractions`; step times come
from ``benchmarks/sparse_update.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.autograd.function import FunctionCtx
from torch.nn.modules.batchnorm import _BatchNorm

from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.fx import third_party_leaves
from sobre.core.measure import saved_activation_bytes
from sobre.core.registry import suggest
from sobre.core.weights import bn_scale_shift

__all__ = [
    "BitMaskReLU",
    "BitMaskReLU6",
    "ChannelSparseConv2d",
    "ChannelSparseLinear",
    "densify",
    "fold_frozen_bn",
    "mask_relus",
    "set_trainable",
    "sparsify",
    "trainable_fractions",
]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)
#: Trainable channels of one layer: a 1-D bool mask, a 1-D tensor of indices, or None (all).
Selection = Tensor | None

_conv_backward = torch.ops.aten.convolution_backward
_CL = torch.channels_last


# --------------------------------------------------------------------------- selections


def _columns(m: Tensor, index: Tensor) -> Tensor:
    """``m[:, index]`` of a 2-D tensor; on a multi-threaded CPU as a ``gather`` with an expanded
    index, which runs in parallel (``index_select`` along dim 1 runs on one thread)."""
    if m.device.type == "cpu" and torch.get_num_threads() > 1:
        return m.gather(1, index.expand(m.shape[0], -1))
    return m.index_select(1, index)


def _select(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(1, index)``, keeping a 4-D channels-last tensor channels-last (as a 2-D
    ``(N*H*W, C)`` gather, which is far faster than indexing the 4-D view)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=_CL):
        n, c, h, w = t.shape
        rows = _columns(t.permute(0, 2, 3, 1).reshape(-1, c), index)
        return rows.view(n, h, w, -1).permute(0, 3, 1, 2)
    return t.index_select(1, index)


def _indices(mask: Tensor) -> Tensor | None:
    """The True positions of ``mask``; None when all are True."""
    return None if bool(mask.all()) else mask.nonzero().flatten()


def _as_mask(value: Selection, n: int, what: str, device: torch.device) -> Tensor:
    """A bool mask of length ``n`` from a bool mask, an index tensor, or None (all True)."""
    if value is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if not isinstance(value, Tensor) or value.dim() != 1:
        shape = f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else ""
        raise ConfigError(
            f"{what}: expected a 1-D bool mask of length {n} or a 1-D tensor of channel "
            f"indices, got {type(value).__name__}{shape}"
        )
    if value.dtype == torch.bool:
        if value.numel() != n:
            raise ConfigError(
                f"{what}: the mask has {value.numel()} entries but the layer has {n} channels; "
                "build the mask over this layer's channels"
            )
        return value.detach().to(device=device, copy=True)
    if value.is_floating_point() or value.is_complex():
        raise ConfigError(f"{what}: got a {value.dtype} tensor; pass a bool mask or int indices")
    if value.numel() and (int(value.min()) < 0 or int(value.max()) >= n):
        raise ConfigError(
            f"{what}: indices must lie in [0, {n}), got values from {int(value.min())} to "
            f"{int(value.max())}"
        )
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[value.to(device=device, dtype=torch.long)] = True
    return mask


@dataclass(frozen=True)
class _Plan:
    """What one channel-sparse backward computes and what its forward saves.

    Attributes:
        rows: weight rows (output channels) of the computed gradient block; None = all.
        keep: positions in ``rows`` that are trainable (a grouped conv computes whole groups);
            None = all.
        cols: weight columns (input channels) of the block; None = all.
        saved: input channels the forward saves; None = all.
        groups: groups of the block's weight-gradient conv.
        frozen_weight: no weight entry is trainable (no output or no input channel).
        frozen_bias: no bias entry is trainable (no output channel).
    """

    rows: Tensor | None
    keep: Tensor | None
    cols: Tensor | None
    saved: Tensor | None
    groups: int
    frozen_weight: bool
    frozen_bias: bool

    @property
    def dense(self) -> bool:
        return self.rows is None and self.cols is None


def _shape_only(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """An uninitialised tensor in ``like``'s layout, for an argument the convolution backward
    reads for its shape only (a stride-0 ``expand`` would be materialised by a copy)."""
    fmt = _CL if like.dim() == 4 and like.is_contiguous(memory_format=_CL) else None
    return torch.empty(
        shape, dtype=like.dtype, device=like.device, memory_format=fmt or torch.contiguous_format
    )


def _scatter(
    block: Tensor, shape: torch.Size, stride: tuple[int, ...], plan: _Plan, *, cols: bool
) -> Tensor:
    """The full gradient, in the parameter's layout (``shape``, ``stride``: ``.grad`` then takes
    it without a copy): ``block`` at the plan's trainable rows (and columns when ``cols``), exact
    zeros elsewhere."""
    rows = plan.rows
    if plan.keep is not None and rows is not None:
        rows, block = rows[plan.keep], block.index_select(0, plan.keep)
    columns = plan.cols if cols else None
    if rows is None and columns is None:
        return block
    full = block.new_empty_strided(shape, stride).zero_()  # 1.5x faster than index_fill_
    if columns is None:
        return full.index_copy_(0, rows, block)
    if rows is None:  # index_copy_ is several times faster than the indexed assignment
        return full.index_copy_(1, columns, block)
    full[rows[:, None], columns] = block
    return full


def _channels(layer: nn.Module) -> tuple[int, int, int]:
    """(weight rows, weight columns, groups) of a Conv2d or Linear."""
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels // layer.groups, layer.groups
    assert isinstance(layer, nn.Linear)
    return layer.out_features, layer.in_features, 1


def _layer_masks(layer: nn.Module, out: Selection, inp: Selection) -> tuple[Tensor, Tensor]:
    """Validated (output, input) masks of a Conv2d or Linear."""
    n_out, n_in, groups = _channels(layer)
    name = type(layer).__name__
    device = layer.weight.device
    out_mask = _as_mask(out, n_out, f"{name} trainable output channels", device)
    in_mask = _as_mask(inp, n_in, f"{name} trainable input channels", device)
    if groups > 1 and not bool(in_mask.all()):
        raise ConfigError(
            f"{name} has groups={groups}: input-channel selection is supported for groups=1 "
            "only; select output channels instead (a depthwise conv's are its inputs too)"
        )
    return out_mask, in_mask


class _ChannelSparse:
    """The selections and the cached plan shared by the channel-sparse layers."""

    trainable_out: Tensor
    trainable_in: Tensor
    _plan_cache: tuple[Tensor, int, Tensor, int, _Plan] | None

    def __init__(
        self,
        *args: Any,
        trainable_out: Selection = None,
        trainable_in: Selection = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # the torch layer next in the MRO
        self.set_trainable(trainable_out, trainable_in)

    def set_trainable(self, out: Selection = None, inp: Selection = None) -> None:
        """Select the output channels (weight rows) and input channels (weight columns, i.e.
        ``in_channels // groups`` of them) whose weight gradient is computed; None = all.

        Raises:
            ConfigError: a mask of the wrong length or dtype, an index out of range, or an input
                selection on a grouped conv.
        """
        self._store(*_layer_masks(self, out, inp))  # type: ignore[arg-type]

    def _store(self, out: Tensor, inp: Tensor) -> None:
        """Install validated masks as the non-persistent buffers."""
        layer: Any = self
        if "trainable_out" in layer._buffers:
            layer.trainable_out, layer.trainable_in = out, inp
        else:
            layer.register_buffer("trainable_out", out, persistent=False)
            layer.register_buffer("trainable_in", inp, persistent=False)
        layer._plan_cache = None

    @property
    def weight_fraction(self) -> float:
        """Fraction of the weight entries whose gradient the backward computes."""
        out, inp = self.trainable_out, self.trainable_in
        return int(out.sum()) * int(inp.sum()) / (out.numel() * inp.numel())

    def _plan(self) -> _Plan:
        """The plan of the current selections, rebuilt when either changes (in place too)."""
        out, inp = self.trainable_out, self.trainable_in
        cache = self._plan_cache
        # Same tensors (held by the cache) at the same versions (in-place writes bump them).
        fresh = cache and cache[0] is out and cache[2] is inp
        if fresh and (cache[1], cache[3]) == (out._version, inp._version):
            return cache[4]
        n_out, n_in, groups = _channels(self)  # type: ignore[arg-type]
        rows, cols = _indices(out), _indices(inp)
        keep, saved, block_groups = None, cols, 1
        if groups > 1:  # whole groups holding a trainable row; save only their input channels
            per_out = n_out // groups
            chosen = out.view(groups, per_out).any(1)
            block_groups = int(chosen.sum())
            if rows is not None:
                ids = chosen.nonzero()
                rows = (ids * per_out + torch.arange(per_out, device=out.device)).flatten()
                keep = _indices(out[rows])
                saved = (ids * n_in + torch.arange(n_in, device=out.device)).flatten()
        frozen_bias = not bool(out.any())
        frozen_weight = frozen_bias or not bool(inp.any())
        plan = _Plan(rows, keep, cols, saved, block_groups, frozen_weight, frozen_bias)
        self._plan_cache = (out, out._version, inp, inp._version, plan)
        return plan


@dataclass(frozen=True)
class _ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _grad_input(g: Tensor, weight: Tensor, x_shape: torch.Size, geom: _ConvGeometry) -> Tensor:
    """dL/dX of a conv, as the transposed conv of ``g``: the same FLOPs, as fast as the
    convolution backward on CPU and several times faster for strided depthwise convs, and no
    input-shaped placeholder to allocate. ``extra`` restores the rows a strided conv dropped."""
    extra: tuple[int, ...] = (0, 0)
    if geom.stride != (1, 1):
        extra = tuple(
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, s, p, d, k in zip(
                x_shape[2:],
                g.shape[2:],
                geom.stride,
                geom.padding,
                geom.dilation,
                weight.shape[2:],
                strict=True,
            )
        )
    return F.conv_transpose2d(
        g, weight, None, geom.stride, geom.padding, extra, geom.groups, geom.dilation
    )


def _needs(ctx: Any, plan: _Plan) -> tuple[bool, bool, bool]:
    """(input, weight, bias) gradients the backward computes."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return need_x, need_w and not plan.frozen_weight, need_b and not plan.frozen_bias


class _SparseConvFn(torch.autograd.Function):
    """Conv2d whose backward computes ``dW[rows, cols]`` only (the sparse update)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        geom: _ConvGeometry,
        plan: _Plan,
    ) -> Tensor:
        c: Any = ctx
        y = F.conv2d(x, weight, bias, geom.stride, geom.padding, geom.dilation, geom.groups)
        need_x, need_w, need_b = _needs(c, plan)
        c.geom, c.plan, c.x_shape, c.w_shape = geom, plan, x.shape, weight.shape
        c.w_stride, c.need_w, c.need_b = weight.stride(), need_w, need_b
        saved = None
        if need_w:
            saved = x if plan.saved is None else _select(x, plan.saved)
        c.save_for_backward(saved, weight if need_x else None)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        c: Any = ctx
        x, weight = c.saved_tensors
        geom, plan = c.geom, c.plan
        conv = (geom.stride, geom.padding, geom.dilation, False, (0, 0))
        grad_x = grad_w = grad_b = None
        if weight is not None:
            grad_x = _grad_input(g, weight, c.x_shape, geom)
        if c.need_w or c.need_b:
            g_rows = g if plan.rows is None else _select(g, plan.rows)
            if c.need_w:
                n_cols = c.w_shape[1] if plan.cols is None else plan.cols.numel()
                like_w = _shape_only((g_rows.shape[1], n_cols, *c.w_shape[2:]), g_rows)
                bias_sizes = [g_rows.shape[1]] if c.need_b else None
                mask = (False, True, c.need_b)
                _, dw, db = _conv_backward(g_rows, x, like_w, bias_sizes, *conv, plan.groups, mask)
                grad_w = _scatter(dw, c.w_shape, c.w_stride, plan, cols=True)
            else:
                db = g_rows.sum((0, 2, 3))
            if c.need_b:
                grad_b = _scatter(db, c.w_shape[:1], (1,), plan, cols=False)
        return grad_x, grad_w, grad_b, None, None


class _SparseLinearFn(torch.autograd.Function):
    """Linear whose backward computes ``dW[rows, cols]`` only (the sparse update)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan
    ) -> Tensor:
        c: Any = ctx
        y = F.linear(x, weight, bias)
        need_x, need_w, need_b = _needs(c, plan)
        c.plan, c.w_shape, c.w_stride = plan, weight.shape, weight.stride()
        c.need_w, c.need_b = need_w, need_b
        saved = None
        if need_w:
            saved = x if plan.cols is None else x.index_select(-1, plan.cols)
        c.save_for_backward(saved, weight if need_x else None)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        c: Any = ctx
        x, weight = c.saved_tensors
        plan = c.plan
        grad_x = grad_w = grad_b = None
        if weight is not None:
            grad_x = g.matmul(weight)
        if c.need_w or c.need_b:
            g2 = g.reshape(-1, g.shape[-1])
            g_rows = g2 if plan.rows is None else _columns(g2, plan.rows)
            if c.need_w:
                block = g_rows.t().mm(x.reshape(-1, x.shape[-1]))
                grad_w = _scatter(block, c.w_shape, c.w_stride, plan, cols=True)
            if c.need_b:
                grad_b = _scatter(g_rows.sum(0), c.w_shape[:1], (1,), plan, cols=False)
        return grad_x, grad_w, grad_b, None


class ChannelSparseConv2d(_ChannelSparse, nn.Conv2d):
    """``nn.Conv2d`` whose backward updates only the selected channels (see the module doc).

    Args:
        *args: ``nn.Conv2d``'s arguments.
        trainable_out: trainable output channels (bool mask or indices; None = all).
        trainable_in: trainable input channels, over ``in_channels // groups`` (groups=1 only).
        **kwargs: ``nn.Conv2d``'s keyword arguments.
    """

    def forward(self, x: Tensor) -> Tensor:
        plan = self._plan()
        if plan.dense or not torch.is_grad_enabled():
            return super().forward(x)
        padding: Any = self.padding
        if self.padding_mode != "zeros" or padding == "same":
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        elif padding == "valid":
            padding = (0, 0)
        geom = _ConvGeometry(self.stride, padding, self.dilation, self.groups)  # type: ignore[arg-type]
        return _SparseConvFn.apply(x, self.weight, self.bias, geom, plan)


class ChannelSparseLinear(_ChannelSparse, nn.Linear):
    """``nn.Linear`` whose backward updates only the selected rows/columns (see the module doc).

    Args:
        *args: ``nn.Linear``'s arguments.
        trainable_out: trainable output features (bool mask or indices; None = all).
        trainable_in: trainable input features (None = all).
        **kwargs: ``nn.Linear``'s keyword arguments.
    """

    def forward(self, x: Tensor) -> Tensor:
        plan = self._plan()
        if plan.dense or not torch.is_grad_enabled():
            return super().forward(x)
        return _SparseLinearFn.apply(x, self.weight, self.bias, plan)


_SPARSE: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: ChannelSparseConv2d,
    nn.Linear: ChannelSparseLinear,
}


# --------------------------------------------------------------------------- swapping


def _module(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule ``name``; unknown names list the closest ones."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise UnknownNameError(
            f"{type(model).__name__} has no module {name!r}{suggest(name, names)}; names are "
            "those of model.named_modules()"
        ) from None


def _resolve(
    model: nn.Module,
    trainable: Mapping[str, Selection] | None,
    trainable_in: Mapping[str, Selection] | None,
    *,
    swap: bool,
) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """The named layers with their validated masks; nothing is changed."""
    trainable, trainable_in = dict(trainable or {}), dict(trainable_in or {})
    resolved = []
    for name in dict.fromkeys([*trainable, *trainable_in]):
        module = _module(model, name)
        if not isinstance(module, _ChannelSparse):
            if not swap:
                raise ConfigError(
                    f"{name!r} is a {type(module).__name__}, not a channel-sparse layer; call "
                    "sparsify(model, ...) first, then set_trainable between epochs"
                )
            if type(module) not in _SPARSE:
                raise ConfigError(
                    f"{name!r} is a {type(module).__name__}; channel-sparse updates support "
                    "exactly nn.Conv2d and nn.Linear (remove parametrizations, e.g. masks, "
                    "with sobre.core.masks.bake first)"
                )
        out, inp = _layer_masks(module, trainable.get(name), trainable_in.get(name))
        resolved.append((module, out, inp))
    return resolved


def sparsify(
    model: M,
    trainable: Mapping[str, Selection] | None = None,
    trainable_in: Mapping[str, Selection] | None = None,
) -> M:
    """Swap the named ``nn.Conv2d`` / ``nn.Linear`` layers for channel-sparse ones, in place.

    The swapped layers keep their parameters (same objects: an optimizer built before still
    works), hooks and ``state_dict`` keys; outputs are unchanged. A layer named in only one of
    the mappings trains every channel on the other axis. Layers not named stay as they are.

    Args:
        model: the model, edited in place.
        trainable: layer name -> trainable output channels (bool mask or indices; None = all).
        trainable_in: layer name -> trainable input channels (TraDy's S_l; groups=1 only).

    Returns:
        ``model``.

    Raises:
        UnknownNameError: no module of that name (closest names listed).
        ConfigError: a layer of another type, or a bad mask; the model is then left unchanged.
    """
    for module, out, inp in _resolve(model, trainable, trainable_in, swap=True):
        if not isinstance(module, _ChannelSparse):
            module.__class__ = _SPARSE[type(module)]
        module._store(out, inp)  # type: ignore[operator]
    return model


def set_trainable(
    model: nn.Module,
    trainable: Mapping[str, Selection] | None = None,
    trainable_in: Mapping[str, Selection] | None = None,
) -> None:
    """Change the selections of layers already swapped in by :func:`sparsify` (e.g. each
    epoch, for NEq's or TraDy's new masks); layers not named keep theirs.

    Raises:
        ConfigError: a named layer is not channel-sparse, or a bad mask (nothing is changed).
    """
    for module, out, inp in _resolve(model, trainable, trainable_in, swap=False):
        module._store(out, inp)  # type: ignore[operator]


def densify(model: M) -> M:
    """Swap every channel-sparse layer and bit-mask ReLU of ``model`` back, in place."""
    for module in model.modules():
        if isinstance(module, _ChannelSparse):
            del module.trainable_out, module.trainable_in, module._plan_cache
            module.__class__ = next(d for d, s in _SPARSE.items() if isinstance(module, s))
        elif isinstance(module, BitMaskReLU | BitMaskReLU6):
            del module.packed
            module.__class__ = nn.ReLU if isinstance(module, BitMaskReLU) else nn.ReLU6
    return model


def trainable_fractions(model: nn.Module) -> dict[str, float]:
    """Layer name -> fraction of its weight gradient computed, for every channel-sparse layer
    (the ``trainable`` argument of :func:`sobre.core.measure.backward_flops`)."""
    return {
        name: module.weight_fraction
        for name, module in model.named_modules()
        if isinstance(module, _ChannelSparse)
    }


# --------------------------------------------------------------------------- BN folding


class _Tracer(fx.Tracer):
    """Keeps sobre's swapped layers and timm's no-trace modules as leaves."""

    def __init__(self) -> None:
        leaves, functions = third_party_leaves()
        super().__init__(autowrap_functions=functions)
        self.leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ChannelSparse, BitMaskReLU, BitMaskReLU6, *self.leaves)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _conv_bn_pairs(model: nn.Module) -> list[list[str]]:
    """(conv, bn) names where a Conv2d's output feeds only a BatchNorm2d, each called once."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many types on untraceable code
        raise ConfigError(
            f"fold_frozen_bn: {type(model).__name__} cannot be traced by torch.fx ({err}); pass "
            "pairs=[(conv_name, bn_name), ...] explicitly"
        ) from None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(
            model.get_submodule(node.target), nn.BatchNorm2d
        ):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(model.get_submodule(src.target), nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == calls[node.target] == 1
        ):
            pairs.append([str(src.target), str(node.target)])
    return pairs


def fold_frozen_bn(model: M, pairs: Sequence[Sequence[str]] | None = None) -> M:
    """Fold each BatchNorm2d into the Conv2d that feeds it, with the BN's running statistics.

    ``bn(conv(x))`` in eval mode equals a conv with weight ``W * s`` and bias
    ``(b - mu) * s + beta``, ``s = gamma / sqrt(var + eps)``; the BN becomes ``nn.Identity``.
    This is exact in eval mode and is what fine-tuning with frozen BN (statistics and affine)
    computes; in train mode the BN would normalise with batch statistics instead. Frozen BN
    still saves its input for backward (spec §0), so folding it is what lets a sparse conv's
    output be freed. A new conv bias is trainable iff the BN's affine weight was.

    The edit is atomic and recorded (:mod:`sobre.core.edits`): the caller's model is left as it
    was and a folded copy is returned, whose checkpoints replay the fold on load.

    Args:
        model: the model.
        pairs: ``(conv, bn)`` module names; by default found with ``torch.fx``: every BN whose
            input is the output of a conv that feeds nothing else, each called once.

    Returns:
        The folded copy.

    Raises:
        ConfigError: untraceable model without ``pairs``, a BN without running statistics, a
            channel-count mismatch, or a pair that is not (Conv2d, BatchNorm2d).
    """
    found = _conv_bn_pairs(model) if pairs is None else [[str(a), str(b)] for a, b in pairs]
    return _fold_edit(model, pairs=found)


@structural_edit("fold_frozen_bn")
def _fold_edit(model: nn.Module, pairs: list[list[str]]) -> nn.Module:
    """The recorded part of :func:`fold_frozen_bn`."""
    for conv_name, bn_name in pairs:
        conv, bn = _module(model, conv_name), _module(model, bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, _BatchNorm):
            raise ConfigError(
                f"fold_frozen_bn: ({conv_name!r}, {bn_name!r}) is ({type(conv).__name__}, "
                f"{type(bn).__name__}); pairs must be (Conv2d, BatchNorm2d)"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ConfigError(
                f"fold_frozen_bn: {bn_name!r} keeps no running statistics "
                "(track_running_stats=False); only eval-mode BatchNorm folds into a conv"
            )
        if bn.num_features != conv.out_channels:
            raise ConfigError(
                f"fold_frozen_bn: {bn_name!r} has {bn.num_features} features but {conv_name!r} "
                f"has {conv.out_channels} output channels"
            )
        with torch.no_grad():
            scale, shift = bn_scale_shift(bn)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
            new_bias = (bias * scale + shift).to(conv.weight.dtype)
        trainable = bn.weight is not None and bn.weight.requires_grad
        conv.bias = nn.Parameter(new_bias, requires_grad=trainable)
        parent, _, child = bn_name.rpartition(".")
        setattr(_module(model, parent) if parent else model, child, nn.Identity())
    return model


# --------------------------------------------------------------------------- bit-mask ReLU


def _pack_torch(flat: Tensor) -> Tensor:
    """A 1-D bool tensor as bytes of 8 little-endian bits, with torch ops (any device)."""
    eights = F.pad(flat.view(torch.uint8), (0, -flat.numel() % 8)).view(-1, 8)
    bits = eights[:, 0].clone()
    for j in range(1, 8):
        bits |= eights[:, j] << j
    return bits


def _unpack_torch(bits: Tensor, n: int) -> Tensor:
    """The first ``n`` bits of :func:`_pack_torch`'s bytes, as 0/1 bytes."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).flatten()[:n]


def _pack(keep: Tensor) -> Tensor:
    """``keep`` (a dense bool tensor) as 1 bit per entry, in storage order (little-endian bits)."""
    flat = keep.as_strided((keep.numel(),), (1,))
    if flat.device.type == "cpu":  # one C pass, ~7x faster than torch shifts
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_torch(flat)


def _unpack(bits: Tensor, like: tuple[torch.Size, tuple[int, ...]]) -> Tensor:
    """The bool tensor :func:`_pack` packed, with shape and strides ``like``."""
    shape, stride = like
    n = shape.numel()
    if bits.device.type == "cpu":
        flat = torch.from_numpy(np.unpackbits(bits.numpy(), count=n, bitorder="little"))
    else:
        flat = _unpack_torch(bits, n)
    return flat.view(torch.bool).as_strided(shape, stride)


class _MaskReLUFn(torch.autograd.Function):
    """``clamp(x, 0, upper)`` saving which entries pass the gradient (``0 < x < upper``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, upper: float | None, inplace: bool, packed: bool
    ) -> Tensor:
        c: Any = ctx
        keep = x > 0 if upper is None else (x > 0) & (x < upper)
        if inplace:
            y = x.clamp_(0, upper)
            c.mark_dirty(x)
        else:
            y = x.clamp(0, upper)
        c.like = (keep.shape, keep.stride()) if packed else None
        c.save_for_backward(_pack(keep) if packed else keep)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        c: Any = ctx
        (saved,) = c.saved_tensors
        keep = saved if c.like is None else _unpack(saved, c.like)
        return g * keep, None, None, None


class _SavesMask:
    """Shared by the bit-mask activations: the constructor flag and the masked forward (the cap
    is ReLU6's ``max_val``, none for ReLU)."""

    packed: bool
    inplace: bool

    def __init__(self, inplace: bool = False, packed: bool = True) -> None:
        super().__init__(inplace)  # type: ignore[call-arg]
        self.packed = packed

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)  # type: ignore[misc]
        return _MaskReLUFn.apply(x, getattr(self, "max_val", None), self.inplace, self.packed)


class BitMaskReLU(_SavesMask, nn.ReLU):
    """``nn.ReLU`` that saves a bit mask (``packed``, 1 bit per entry) or a bool mask (1 byte)
    for backward instead of its 4-byte output.

    This frees memory only where no other layer keeps the same tensor (a conv that trains on
    this output saves it anyway); :func:`mask_relus` swaps it in where it does.
    """


class BitMaskReLU6(_SavesMask, nn.ReLU6):
    """``nn.ReLU6`` saving a mask instead of its output, as :class:`BitMaskReLU`."""


_MASK_RELU: dict[type[nn.Module], type[nn.Module]] = {
    nn.ReLU: BitMaskReLU,
    nn.ReLU6: BitMaskReLU6,
}


def mask_relus(model: M, inputs: Tensor | tuple[Any, ...], *, packed: bool = True) -> M:
    """Swap each ``nn.ReLU`` / ``nn.ReLU6`` for its bit-mask version where that lowers the
    saved-activation bytes measured on ``inputs``, in place.

    One module at a time, in registration order: swapped, measured with
    :func:`~sobre.core.measure.saved_activation_bytes` (unique storages, one training forward),
    kept only if the bytes fell. Call it after :func:`sparsify` / :func:`fold_frozen_bn`, which
    decide which neighbours still keep the ReLU outputs; a small batch suffices.

    Args:
        model: the model, edited in place.
        inputs: example inputs of ``forward`` (a tensor or a tuple).
        packed: 1 bit per entry (default) instead of a 1-byte bool mask.

    Returns:
        ``model``.
    """
    current = saved_activation_bytes(model, inputs).activations
    for name, module in model.named_modules():
        dense = type(module)
        if dense not in _MASK_RELU:
            continue
        module.__class__ = _MASK_RELU[dense]
        module.packed = packed  # type: ignore[assignment]
        after = saved_activation_bytes(model, inputs).activations
        if after < current:
            log.info("mask_relus: %s saves %d fewer bytes", name, current - after)
            current = after
        else:
            del module.packed
            module.__class__ = dense
    return model
