"""Compressed activations: layers that save a truncated HOSVD/SVD of their input (HOSVD_ε, #35).

A trained conv or linear layer keeps its whole input alive for the weight gradient. HOSVD_ε
(Nguyen et al., NeurIPS 2024, paper #35) keeps instead a truncated Tucker decomposition of it:

- :func:`explained_rank`: the smallest K with ``Σ_{k≤K} σ_k² / Σ_k σ_k² ≥ ε``.
- :func:`hosvd`: per mode n, the SVD of the mode-n unfolding ``A_(n)`` truncated to that rank
  (factor ``U_n``), and the core ``S = A ×_0 U_0ᵀ ×_1 U_1ᵀ … ×_{N-1} U_{N-1}ᵀ``;
  :func:`tucker_reconstruct` gives ``S ×_0 U_0 … ×_{N-1} U_{N-1}``.
- :func:`svd_compress` / :func:`svd_reconstruct`: the paper's SVD_ε baseline, one truncated SVD
  of the channel unfolding, ``(B·H·W, C)`` for a conv input and ``(N, features)`` for a linear one.
- :class:`CompressedConv2d` / :class:`CompressedLinear`: the forward runs on the exact input and
  saves only the factors (and the weight). The input and bias gradients are exact; the weight
  gradient is that of the reconstructed input, so ``explained_var = 1`` reproduces the exact
  gradient and the error shrinks with the discarded energy (the paper's bound). This first
  version reconstructs the input inside ``backward``; the paper's contraction of the output
  gradient with the factors, which never rebuilds ``A``, is a later optimisation (it changes
  compute, not the saved bytes).
- :func:`compress_activations` swaps named (or the last N) ``nn.Conv2d`` / ``nn.Linear`` layers
  in place, keeping their parameters and ``state_dict`` keys; :func:`decompress_activations`
  swaps them back.

Compressing a layer frees nothing when a neighbour saves the same tensor (a ReLU saves its output,
BatchNorm its input, spec §0): pair these layers with ``sobre.efficient.sparse.mask_relus`` and
``fold_frozen_bn``, and measure with :func:`sobre.core.measure.saved_activation_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.registry import suggest

__all__ = [
    "METHODS",
    "CompressedConv2d",
    "CompressedLinear",
    "compress_activations",
    "decompress_activations",
    "explained_rank",
    "hosvd",
    "svd_compress",
    "svd_reconstruct",
    "tucker_reconstruct",
]

M = TypeVar("M", bound=nn.Module)

#: The compression methods of the compressed layers.
METHODS = ("hosvd", "svd")


def _check(eps: float, method: str = "hosvd") -> None:
    """Raise a ConfigError for an explained variance outside (0, 1] or an unknown method."""
    if not 0 < eps <= 1:
        raise ConfigError(
            f"explained variance must lie in (0, 1], got {eps}; use e.g. 0.8 (1 keeps everything)"
        )
    if method not in METHODS:
        raise ConfigError(
            f"unknown compression method {method!r}{suggest(method, METHODS)}; "
            f"choose one of {list(METHODS)}"
        )


def explained_rank(singular_values: Tensor, eps: float) -> int:
    """The smallest K with ``Σ_{k≤K} σ_k² / Σ_k σ_k² ≥ eps`` (σ in descending order).

    ``eps = 1`` keeps every singular value (no round-off truncation); an all-zero spectrum gives 1.

    Raises:
        ConfigError: ``eps`` outside (0, 1].
    """
    _check(eps)
    n = singular_values.numel()
    energy = singular_values.double().square()
    total = energy.sum()
    if eps == 1 or n == 0:
        return n
    if total == 0:
        return 1
    ratio = energy.cumsum(0) / total
    return min(int((ratio < eps).sum()) + 1, n)


def _factor(matrix: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``U_K, σ_K, V_Kᵀ`` of ``matrix``'s SVD truncated to its explained rank (own storages)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = explained_rank(s, eps)
    return u[:, :k].clone(), s[:k].clone(), vh[:k].clone()


def hosvd(a: Tensor, eps: float) -> tuple[Tensor, list[Tensor]]:
    """Truncated HOSVD of ``a``: the core ``S`` and one factor ``U_n`` (I_n x K_n) per mode.

    ``U_n`` holds the left singular vectors of the mode-n unfolding ``A_(n)`` up to its
    :func:`explained_rank` for ``eps``; ``S = A ×_0 U_0ᵀ … ×_{N-1} U_{N-1}ᵀ``.

    Raises:
        ConfigError: ``eps`` outside (0, 1].
    """
    factors = [_factor(a.movedim(n, 0).reshape(a.shape[n], -1), eps)[0] for n in range(a.ndim)]
    core = a
    for u in factors:  # each product moves the contracted mode last, so the order is kept
        core = torch.tensordot(core, u, dims=([0], [0]))
    return core, factors


def tucker_reconstruct(core: Tensor, factors: list[Tensor]) -> Tensor:
    """``S ×_0 U_0 … ×_{N-1} U_{N-1}``: the tensor a Tucker decomposition stands for."""
    out = core
    for u in factors:
        out = torch.tensordot(out, u, dims=([0], [1]))
    return out


def _channel_last(a: Tensor) -> Tensor:
    """``a`` with its channel axis last: axis 1 of a 4-D (B, C, H, W) tensor, else the last."""
    return a.movedim(1, -1) if a.ndim == 4 else a


def svd_compress(a: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Truncated SVD of the channel unfolding of ``a`` (SVD_ε): ``(U_K diag σ_K, V_Kᵀ)``.

    The unfolding is ``(B·H·W, C)`` for a 4-D conv input and ``(N, features)`` otherwise
    (every leading axis of a linear input is flattened).

    Raises:
        ConfigError: ``eps`` outside (0, 1].
    """
    last = _channel_last(a)
    u, s, vh = _factor(last.reshape(-1, last.shape[-1]), eps)
    return u * s, vh


def svd_reconstruct(left: Tensor, right: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The tensor of ``shape`` whose channel unfolding is ``left @ right`` (see
    :func:`svd_compress`)."""
    flat = left @ right
    if len(shape) == 4:
        b, c, h, w = shape
        return flat.reshape(b, h, w, c).movedim(-1, 1)
    return flat.reshape(shape)


@dataclass(frozen=True)
class _Spec:
    """How a compressed layer compresses its input and, for a conv, its geometry."""

    method: str
    eps: float
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def conv(self) -> bool:
        return bool(self.stride)


def _compress(x: Tensor, spec: _Spec) -> list[Tensor]:
    """The tensors saved for ``x``: the core then the factors (HOSVD), or the two SVD factors."""
    if spec.method == "hosvd":
        core, factors = hosvd(x, spec.eps)
        return [core, *factors]
    return list(svd_compress(x, spec.eps))


def _reconstruct(saved: tuple[Tensor, ...], spec: _Spec, shape: torch.Size) -> Tensor:
    """The input rebuilt from what :func:`_compress` saved."""
    if spec.method == "hosvd":
        return tucker_reconstruct(saved[0], list(saved[1:]))
    return svd_reconstruct(saved[0], saved[1], shape)


class _CompressedFn(torch.autograd.Function):
    """Exact forward of a conv/linear layer that saves a compression of its input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, spec: _Spec
    ) -> Tensor:
        if spec.conv:
            out = F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation)
        else:
            out = F.linear(x, weight, bias)
        saved = _compress(x.detach(), spec) if ctx.needs_input_grad[1] else []
        ctx.save_for_backward(weight, *saved)
        ctx.spec, ctx.shape = spec, x.shape
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        spec: _Spec = ctx.spec  # type: ignore[attr-defined]
        shape: torch.Size = ctx.shape  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        gx = gw = gb = None
        if spec.conv:
            geometry = (spec.stride, spec.padding, spec.dilation)
            if need_x:
                gx = torch.nn.grad.conv2d_input(shape, weight, g, *geometry)
            if need_w:
                x = _reconstruct(tuple(saved), spec, shape)
                gw = torch.nn.grad.conv2d_weight(x, weight.shape, g, *geometry)
            if need_b:
                gb = g.sum((0, 2, 3))
        else:
            g2 = g.reshape(-1, g.shape[-1])
            if need_x:
                gx = g @ weight
            if need_w:
                x = _reconstruct(tuple(saved), spec, shape)
                gw = g2.t() @ x.reshape(-1, x.shape[-1])
            if need_b:
                gb = g2.sum(0)
        return gx, gw, gb, None


class _Compressed:
    """Settings shared by the compressed layers: ``method`` and ``explained_var`` (ε)."""

    method: str
    explained_var: float

    def _configure(self, method: str, explained_var: float) -> None:
        _check(explained_var, method)
        self.method, self.explained_var = method, float(explained_var)


class CompressedLinear(_Compressed, nn.Linear):
    """``nn.Linear`` that saves a truncated HOSVD/SVD of its input for backward (see module doc).

    Args:
        *args: ``nn.Linear``'s arguments.
        method: ``"hosvd"`` (HOSVD_ε) or ``"svd"`` (SVD_ε of the ``(N, features)`` unfolding).
        explained_var: ε, the fraction of energy kept per mode, in (0, 1].
        **kwargs: ``nn.Linear``'s keyword arguments.
    """

    def __init__(
        self, *args: Any, method: str = "hosvd", explained_var: float = 0.8, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._configure(method, explained_var)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return _CompressedFn.apply(
            x, self.weight, self.bias, _Spec(self.method, self.explained_var)
        )


class CompressedConv2d(_Compressed, nn.Conv2d):
    """``nn.Conv2d`` (``groups=1``) that saves a truncated HOSVD/SVD of its input (module doc).

    A non-zero padding mode or string padding pads the input first, and the padded input is
    what gets compressed.

    Args:
        *args: ``nn.Conv2d``'s arguments.
        method: ``"hosvd"`` (HOSVD_ε over B, C, H, W) or ``"svd"`` (of the ``(B·H·W, C)``
            unfolding).
        explained_var: ε, the fraction of energy kept per mode, in (0, 1].
        **kwargs: ``nn.Conv2d``'s keyword arguments.

    Raises:
        ConfigError: a grouped or depthwise conv.
    """

    def __init__(
        self, *args: Any, method: str = "hosvd", explained_var: float = 0.8, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_groups(self, type(self).__name__)
        self._configure(method, explained_var)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        padding: Any = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        spec = _Spec(self.method, self.explained_var, self.stride, padding, self.dilation)
        return _CompressedFn.apply(x, self.weight, self.bias, spec)


def _check_groups(conv: nn.Conv2d, name: str) -> None:
    """Raise a ConfigError for a grouped (or depthwise) conv."""
    if conv.groups != 1:
        raise ConfigError(
            f"{name!r} is a grouped conv (groups={conv.groups}); activation compression supports "
            "groups=1 only: leave depthwise/grouped convs out of `layers`"
        )


_COMPRESSED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: CompressedConv2d,
    nn.Linear: CompressedLinear,
}


def _layer_names(model: nn.Module, layers: list[str] | str) -> list[str]:
    """The names ``layers`` selects: ``"last:N"`` is the last N conv/linear modules in
    ``named_modules`` order, any other string one module name."""
    candidates = [
        name
        for name, m in model.named_modules()
        if name and (type(m) in _COMPRESSED or isinstance(m, _Compressed))
    ]
    if isinstance(layers, str) and layers.startswith("last:"):
        count = layers.removeprefix("last:")
        if not count.isdigit() or not 1 <= int(count) <= len(candidates):
            raise ConfigError(
                f"layers={layers!r}: N must be an integer in [1, {len(candidates)}] (the "
                f"Conv2d/Linear modules of {type(model).__name__}); e.g. 'last:2'"
            )
        return candidates[-int(count) :]
    names = [layers] if isinstance(layers, str) else list(layers)
    for name in names:
        if name not in candidates:
            raise UnknownNameError(
                f"{name!r} is not a Conv2d/Linear module of {type(model).__name__}"
                f"{suggest(name, candidates)}; pass names from model.named_modules() or 'last:N'"
            )
    return names


def compress_activations(
    model: M,
    layers: list[str] | str = "last:2",
    method: str = "hosvd",
    explained_var: float = 0.8,
) -> M:
    """Swap the selected ``nn.Conv2d`` / ``nn.Linear`` layers for compressed ones, in place.

    The swapped layers keep their parameters (same objects), hooks and ``state_dict`` keys, and
    their outputs; layers already compressed take the new settings.

    Args:
        model: the model, edited in place.
        layers: ``"last:N"`` (the last N Conv2d/Linear modules of ``named_modules``), one module
            name or a list of names.
        method: ``"hosvd"`` or ``"svd"``.
        explained_var: ε in (0, 1].

    Returns:
        ``model``.

    Raises:
        UnknownNameError: a name that is not a Conv2d/Linear module (closest names listed).
        ConfigError: bad ε or method, a grouped conv; the model is then left unchanged.
    """
    _check(explained_var, method)
    names = _layer_names(model, layers)
    modules = [model.get_submodule(name) for name in names]
    for name, module in zip(names, modules, strict=True):
        if isinstance(module, nn.Conv2d):
            _check_groups(module, name)
    for module in modules:
        if not isinstance(module, _Compressed):
            module.__class__ = _COMPRESSED[type(module)]
        module._configure(method, explained_var)  # type: ignore[operator]
    return model


def decompress_activations(model: M) -> M:
    """Swap every compressed layer of ``model`` back to ``nn.Conv2d`` / ``nn.Linear``, in place
    (same parameter objects)."""
    for module in model.modules():
        if isinstance(module, _Compressed):
            del module.method, module.explained_var
            module.__class__ = next(d for d, c in _COMPRESSED.items() if isinstance(module, c))
    return model
