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
  gradient is that of the reconstructed input, computed in factor space without rebuilding it
  (:func:`conv_weight_grad`, :func:`linear_weight_grad`: the output gradient is contracted with
  the factors, so the weight-gradient conv runs at batch ``K_0`` and ``K_1`` channels), so
  ``explained_var = 1`` reproduces the exact gradient and the error shrinks with the discarded
  energy (the paper's bound).
- :func:`compress_activations` swaps named (or the last N) ``nn.Conv2d`` / ``nn.Linear`` layers
  in place, keeping their parameters and ``state_dict`` keys; :func:`decompress_activations`
  swaps them back.

ASI (Nguyen et al., ICML 2025, paper #37), ``method="asi"``: HOSVD's four SVDs per step cost more
than they save, and activation subspaces drift slowly, so the ranks ``K_n`` are fixed once
(:func:`select_ranks`, under a byte budget) and each step runs ONE warm-started subspace
iteration per mode, ``V = A_(n)ᵀ U_n^prev``, ``U_n = QR(A_(n) V)`` (i.e.
``U_n ← orth(A_(n) A_(n)ᵀ U_n^prev)``; first step ``V`` Gaussian), then the HOSVD core
``S = A ×_0 U_0ᵀ …``. The factors ``U_n^prev`` live in :class:`ASIState`, a submodule
``asi_state`` of the layer whose buffers are in ``state_dict`` (a resume continues exactly). A
conv input has 4 modes (B, C, H, W); a linear input keeps its own axes (2 for ``(N, D)``, 3 for
a transformer's ``(B, N, D)`` tokens, as in the paper).

Compressing a layer frees nothing when a neighbour saves the same tensor (a ReLU saves its output,
BatchNorm its input, spec §0): pair these layers with ``sobre.efficient.sparse.mask_relus`` and
``fold_frozen_bn``, and measure with :func:`sobre.core.measure.saved_activation_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.registry import check_choice, suggest
from sobre.core.taps import FeatureTap

__all__ = [
    "METHODS",
    "ASIState",
    "CompressedConv2d",
    "CompressedLinear",
    "compress_activations",
    "compress_recorded",
    "conv_weight_grad",
    "decompress_activations",
    "decompress_recorded",
    "explained_rank",
    "hosvd",
    "layer_names",
    "linear_weight_grad",
    "select_ranks",
    "svd_compress",
    "svd_reconstruct",
    "tucker_reconstruct",
]

M = TypeVar("M", bound=nn.Module)

#: The compression methods of the compressed layers.
METHODS = ("hosvd", "svd", "asi")

Ranks = int | Sequence[int]
"""ASI ranks of one layer: one int for every mode, or one per mode (4 for a conv, 2 for a
linear layer)."""


def _check(eps: float, method: str = "hosvd") -> None:
    """Raise a ConfigError for an explained variance outside (0, 1] or an unknown method."""
    if not 0 < eps <= 1:
        raise ConfigError(
            f"explained variance must lie in (0, 1], got {eps}; use e.g. 0.8 (1 keeps everything)"
        )
    check_choice("method", method, METHODS, "activation compression")


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


def _short_gram(matrix: Tensor) -> Tensor:
    """The Gram matrix of ``matrix``'s short side (``M Mᵀ`` when wide, ``Mᵀ M`` when tall), in
    float32 at least: its eigenvalues are the squared singular values of ``M``.

    Decomposing it instead of ``M`` gives the SVD's spectrum and subspace at a fraction of the
    cost, with no iterative SVD that may fail to converge (cuSOLVER's gesvd on wide, nearly
    rank-deficient unfoldings falls back to a slow path)."""
    m = matrix.float() if matrix.dtype in (torch.float16, torch.bfloat16) else matrix
    return m @ m.t() if m.shape[0] <= m.shape[1] else m.t() @ m


def _top_basis(gram: Tensor, eps: float) -> Tensor:
    """The leading eigenvectors of the Gram matrix ``gram`` (= ``M Mᵀ`` or ``Mᵀ M``) up to the
    :func:`explained_rank` of ``M``'s singular values ``σ = sqrt(λ)``, in descending order."""
    evals, evecs = torch.linalg.eigh(gram)
    sigma = evals.flip(0).clamp_min(0).sqrt()
    return evecs.flip(1)[:, : explained_rank(sigma, eps)]


def _left_basis(matrix: Tensor, eps: float) -> Tensor:
    """``U_K``: the leading left singular vectors of ``matrix`` up to its explained rank, from
    :func:`_short_gram` (an unfolding is I_n x Π_{m≠n} I_m: usually wide)."""
    basis = _top_basis(_short_gram(matrix), eps)
    if matrix.shape[0] > matrix.shape[1]:  # tall: that was V_K; U_K spans the image M V_K
        basis = torch.linalg.qr(matrix.to(basis) @ basis).Q
    # a copy with its own storage: a one-column slice of LAPACK's column-major eigenvectors
    # counts as contiguous and would keep the whole I_n x I_n matrix alive for backward
    return basis.to(matrix.dtype).clone(memory_format=torch.contiguous_format)


def hosvd(a: Tensor, eps: float) -> tuple[Tensor, list[Tensor]]:
    """Truncated HOSVD of ``a``: the core ``S`` and one factor ``U_n`` (I_n x K_n) per mode.

    ``U_n`` holds the left singular vectors of the mode-n unfolding ``A_(n)`` up to its
    :func:`explained_rank` for ``eps``; ``S = A ×_0 U_0ᵀ … ×_{N-1} U_{N-1}ᵀ``.

    Raises:
        ConfigError: ``eps`` outside (0, 1].
    """
    factors = [_left_basis(_unfold(a, n), eps) for n in range(a.ndim)]
    return _core(a, factors), factors


def _unfold(a: Tensor, n: int) -> Tensor:
    """The mode-n unfolding ``A_(n)`` (I_n x Π_{m≠n} I_m)."""
    return a.movedim(n, 0).reshape(a.shape[n], -1)


def _core(a: Tensor, factors: list[Tensor]) -> Tensor:
    """``S = A ×_0 U_0ᵀ … ×_{N-1} U_{N-1}ᵀ``."""
    core = a
    for u in factors:  # each product moves the contracted mode last, so the order is kept
        core = torch.tensordot(core, u, dims=([0], [0]))
    return core


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
    """Truncated SVD of the channel unfolding of ``a`` (SVD_ε) as two factors ``left @ right``:
    ``(U_K diag σ_K, V_Kᵀ)``, or ``(U_K, diag σ_K V_Kᵀ)`` when the unfolding is wide.

    The unfolding is ``(B·H·W, C)`` for a 4-D conv input and ``(N, features)`` otherwise
    (every leading axis of a linear input is flattened).

    Raises:
        ConfigError: ``eps`` outside (0, 1].
    """
    last = _channel_last(a)
    m = last.reshape(-1, last.shape[-1])
    if m.shape[0] >= m.shape[1]:
        v = _left_basis(m.t(), eps)  # the right singular vectors V_K
        return m @ v, v.t().contiguous()
    u = _left_basis(m, eps)
    return u, (u.t() @ m).contiguous()


def svd_reconstruct(left: Tensor, right: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The tensor of ``shape`` whose channel unfolding is ``left @ right`` (see
    :func:`svd_compress`)."""
    flat = left @ right
    if len(shape) == 4:
        b, c, h, w = shape
        return flat.reshape(b, h, w, c).movedim(-1, 1)
    return flat.reshape(shape)


class ASIState(nn.Module):
    """ASI's warm-start factors: buffers ``factor_0 … factor_{N-1}``, ``U_n`` of the last step.

    :meth:`step` runs one subspace iteration per mode (module doc). A mode whose size or rank
    differs from its stored factor (first step, a smaller last batch, new ranks) is
    re-initialised from a Gaussian ``V`` drawn from a generator seeded with ``seed``; the other
    modes stay warm. The buffers' shapes follow the input (an input with more modes adds
    buffers), so loading a ``state_dict`` resizes them to the stored shapes first: the next step
    then continues exactly where the saved model left off.

    Args:
        modes: the number of modes registered up front (4 for a conv input, 2 for a linear one;
            a ``(B, N, D)`` token input adds the third on its first step).
        seed: seed of the Gaussian initialisation.
    """

    def __init__(self, modes: int, seed: int = 0) -> None:
        super().__init__()
        self.modes, self.seed = modes, seed
        for n in range(modes):
            self.register_buffer(f"factor_{n}", torch.empty(0, 0))

    @property
    def factors(self) -> list[Tensor]:
        """The stored ``U_n`` (empty ``0 x 0`` before the first step)."""
        return [getattr(self, f"factor_{n}") for n in range(self.modes)]

    @torch.no_grad()
    def step(self, a: Tensor, ranks: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """One warm-started subspace iteration per mode of ``a`` at ``ranks`` (clipped to the
        mode sizes); stores and returns the factors with the core ``S``."""
        for n in range(self.modes, a.ndim):
            self.register_buffer(f"factor_{n}", torch.empty(0, 0, device=a.device))
        self.modes = max(self.modes, a.ndim)
        factors = []
        for n, rank in enumerate(ranks):
            prev = getattr(self, f"factor_{n}")
            unfold = _unfold(a, n)
            k = min(rank, a.shape[n])
            if prev.shape == (a.shape[n], k):
                v = unfold.t() @ prev.to(a)
            else:
                gen = torch.Generator().manual_seed(self.seed + n)
                v = torch.randn(unfold.shape[1], k, generator=gen).to(a)
            u = torch.linalg.qr(unfold @ v).Q.contiguous()  # as loaded from a state_dict
            # the buffer is never the tensor saved for backward: an in-place update (kept
            # object, so snapshot-and-restore of buffers works) cannot corrupt a pending backward
            if prev.shape == u.shape:
                prev.copy_(u)
            else:
                setattr(self, f"factor_{n}", u.clone())
            factors.append(u)
        return _core(a, factors), factors

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        n = 0
        while f"{prefix}factor_{n}" in state_dict:
            like = getattr(self, f"factor_{n}", None)
            empty = torch.empty(state_dict[f"{prefix}factor_{n}"].shape)
            self.register_buffer(f"factor_{n}", empty if like is None else empty.to(like))
            n += 1
        self.modes = max(self.modes, n)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"modes={self.modes}, seed={self.seed}"


@dataclass(frozen=True)
class _Spec:
    """How a compressed layer compresses its input and, for a conv, its geometry."""

    method: str
    eps: float
    ranks: tuple[int, ...] = ()
    state: ASIState | None = None
    layer: Any = None  # the module whose ``saved_bytes`` records each step's analytic size
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    shape: tuple[int, ...] = ()

    @property
    def conv(self) -> bool:
        return bool(self.stride)


def _compress(x: Tensor, spec: _Spec) -> list[Tensor]:
    """The tensors saved for ``x``: the core then the factors (HOSVD, ASI), or the two SVD
    factors."""
    if spec.method == "svd":
        return list(svd_compress(x, spec.eps))
    if spec.method == "hosvd":
        core, factors = hosvd(x, spec.eps)
    else:
        assert spec.state is not None
        core, factors = spec.state.step(x, _expand(spec.ranks, x.ndim))
    return [core, *factors]


def _record_saved_bytes(layer: nn.Module | None, saved: Sequence[Tensor]) -> None:
    """Set ``layer.saved_bytes`` to the size of the compressed input it saved for backward."""
    if layer is not None:
        layer.saved_bytes = sum(t.numel() * t.element_size() for t in saved)


def _expand(ranks: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """One rank per mode of an ``ndim``-D input: a single stored rank applies to every mode."""
    if len(ranks) == 1:
        return ranks * ndim
    if len(ranks) != ndim:
        raise ConfigError(
            f"ASI ranks {ranks} have {len(ranks)} entries but the layer's input has {ndim} "
            "modes; give one rank per input axis (or one int for all)"
        )
    return ranks


def linear_weight_grad(g: Tensor, saved: Sequence[Tensor], method: str) -> Tensor:
    """``∂L/∂W = Σ g ⊗ A`` of a linear layer from the compressed input, never rebuilding ``A``.

    SVD: ``(g_(N)ᵀ U σ) Vᵀ``. Tucker (HOSVD, ASI) of an input with modes ``(I_0, …, I_{N-2}, D)``:
    the output gradient is contracted with ``U_0 … U_{N-2}`` over the leading modes, then with the
    core ``S`` and ``U_{N-1}`` (the paper's contraction order: every product stays at rank size).
    """
    if method == "svd":
        left, right = saved
        return (g.reshape(-1, g.shape[-1]).t() @ left) @ right
    core, *factors = saved
    t = g
    for u in factors[:-1]:  # (I_0, …, O) -> (O, K_0, …, K_{N-2})
        t = torch.tensordot(t, u, dims=([0], [0]))
    lead = list(range(1, t.ndim))
    return torch.tensordot(t, core, dims=(lead, list(range(len(lead))))) @ factors[-1].t()


def conv_weight_grad(
    g: Tensor, saved: Sequence[Tensor], spec: _Spec, weight_shape: torch.Size
) -> Tensor:
    """``∂L/∂W`` of a conv from the compressed input without rebuilding it (#35, §3.3).

    Tucker (HOSVD, ASI): ``g`` is contracted with ``U_0`` over the batch, the core's spatial modes
    are expanded with ``U_2, U_3``, one ``conv2d_weight`` runs at batch ``K_0`` and ``K_1``
    channels, and ``U_1`` maps the result back to the input channels. SVD: the ``(B·H·W, K)``
    left factor is the image batch of that ``conv2d_weight`` and ``Vᵀ`` maps back.
    """
    geometry = (spec.stride, spec.padding, spec.dilation)
    if spec.method == "svd":
        left, right = saved
        b, _, h, w = spec.shape
        z = left.reshape(b, h, w, -1).movedim(-1, 1)
        grad = torch.nn.grad.conv2d_weight(
            z, (weight_shape[0], z.shape[1], *weight_shape[2:]), g, *geometry
        )
        return torch.einsum("okhw,kc->ochw", grad, right)
    core, u0, u1, u2, u3 = saved
    g0 = torch.einsum("bohw,bk->kohw", g, u0)
    z = torch.einsum("klhw,yh,xw->klyx", core, u2, u3)
    grad = torch.nn.grad.conv2d_weight(
        z, (weight_shape[0], z.shape[1], *weight_shape[2:]), g0, *geometry
    )
    return torch.einsum("okhw,ck->ochw", grad, u1)


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
        _record_saved_bytes(spec.layer, saved)
        ctx.spec = replace(spec, shape=tuple(x.shape))
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        spec: _Spec = ctx.spec  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        gx = gw = gb = None
        if spec.conv:
            if need_x:
                geometry = (spec.stride, spec.padding, spec.dilation)
                gx = torch.nn.grad.conv2d_input(spec.shape, weight, g, *geometry)
            if need_w:
                gw = conv_weight_grad(g, saved, spec, weight.shape)
            if need_b:
                gb = g.sum((0, 2, 3))
        else:
            if need_x:
                gx = g @ weight
            if need_w:
                gw = linear_weight_grad(g, saved, spec.method)
            if need_b:
                gb = g.reshape(-1, g.shape[-1]).sum(0)
        return gx, gw, gb, None


def _modes(layer: nn.Module) -> int:
    """The modes ASI registers up front for ``layer``: 4 for a conv (B, C, H, W), 2 for a linear
    layer (its input's leading axes and features; a ``(B, N, D)`` input has 3)."""
    return 4 if isinstance(layer, nn.Conv2d) else 2


def _ranks(ranks: Ranks | None, modes: int, name: str) -> tuple[int, ...]:
    """``ranks`` as ``(r,)`` (every mode) or one positive int per mode, or a ConfigError naming
    ``name`` and the fix. A linear layer takes one rank per axis of its input (2 or more)."""
    axes = "B, C, H, W" if modes == 4 else "one per input axis, e.g. B, N, D"
    if ranks is None:
        raise ConfigError(
            f"{name}: method='asi' needs ranks; pass ranks=int (every mode), a tuple ({axes}) "
            "or a dict layer -> ranks, e.g. from select_ranks()"
        )
    out = (int(ranks),) if isinstance(ranks, int) else tuple(int(r) for r in ranks)
    wrong = len(out) != modes if modes == 4 else len(out) < 2
    if (len(out) != 1 and wrong) or min(out, default=0) < 1:
        raise ConfigError(f"{name}: ranks={ranks!r} must be one int >= 1 or one per mode ({axes})")
    return out * 4 if modes == 4 and len(out) == 1 else out


class _Compressed:
    """Settings shared by the compressed layers: ``method``, ``explained_var`` (ε) and, for ASI,
    ``ranks`` and the warm-start submodule ``asi_state``."""

    method: str
    explained_var: float
    ranks: tuple[int, ...] | None

    def __init__(
        self,
        *args: Any,
        method: str = "hosvd",
        explained_var: float = 0.8,
        ranks: Ranks | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # the torch layer's
        if isinstance(self, nn.Conv2d):
            _check_groups(self, type(self).__name__)
        self._configure(method, explained_var, ranks)

    def _configure(self, method: str, explained_var: float, ranks: Ranks | None = None) -> None:
        _check(explained_var, method)
        modes = _modes(self)  # type: ignore[arg-type]
        self.ranks = _ranks(ranks, modes, type(self).__name__) if method == "asi" else None
        self.method, self.explained_var = method, float(explained_var)
        self.saved_bytes = 0  # analytic bytes of the last training forward's compressed input
        if method == "asi" and not hasattr(self, "asi_state"):
            self.asi_state = ASIState(modes)
        elif method != "asi" and hasattr(self, "asi_state"):
            del self.asi_state

    def _spec(self, **conv: Any) -> _Spec:
        return _Spec(
            self.method,
            self.explained_var,
            self.ranks or (),
            getattr(self, "asi_state", None),
            self,
            **conv,
        )


class CompressedLinear(_Compressed, nn.Linear):
    """``nn.Linear`` that saves a truncated HOSVD/SVD of its input for backward (see module doc).

    Args:
        *args: ``nn.Linear``'s arguments.
        method: ``"hosvd"`` (HOSVD_ε over every input axis), ``"svd"`` (SVD_ε of the
            ``(N, features)`` unfolding) or ``"asi"`` (subspace iteration over every input axis
            at fixed ``ranks``).
        explained_var: ε, the fraction of energy kept per mode, in (0, 1] (HOSVD, SVD).
        ranks: ASI's ranks: one int or one per input axis (e.g. B, N, D for tokens).
        **kwargs: ``nn.Linear``'s keyword arguments.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return _CompressedFn.apply(x, self.weight, self.bias, self._spec())


class CompressedConv2d(_Compressed, nn.Conv2d):
    """``nn.Conv2d`` (``groups=1``) that saves a truncated HOSVD/SVD of its input (module doc).

    A non-zero padding mode or string padding pads the input first, and the padded input is
    what gets compressed.

    Args:
        *args: ``nn.Conv2d``'s arguments.
        method: ``"hosvd"`` (HOSVD_ε over B, C, H, W), ``"svd"`` (of the ``(B·H·W, C)``
            unfolding) or ``"asi"`` (subspace iteration over B, C, H, W at fixed ``ranks``).
        explained_var: ε, the fraction of energy kept per mode, in (0, 1] (HOSVD, SVD).
        ranks: ASI's ranks (B, C, H, W): one int or four.
        **kwargs: ``nn.Conv2d``'s keyword arguments.

    Raises:
        ConfigError: a grouped or depthwise conv, ASI without valid ranks.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        padding: Any = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        spec = self._spec(stride=self.stride, padding=padding, dilation=self.dilation)
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


def layer_names(
    model: nn.Module,
    layers: Sequence[str] | str,
    accepts: Callable[[nn.Module], bool],
    what: str,
) -> list[str]:
    """The module names ``layers`` selects among those ``accepts`` (described as ``what`` in
    errors): ``"all"``, ``"last:N"`` (the last N in ``named_modules`` order), one name or a list.

    Raises:
        ConfigError: a bad N.
        UnknownNameError: a name that is not such a module (closest names listed).
    """
    candidates = [name for name, m in model.named_modules() if name and accepts(m)]
    if layers == "all":
        return candidates
    if isinstance(layers, str) and layers.startswith("last:"):
        count = layers.removeprefix("last:")
        if not count.isdigit() or not 1 <= int(count) <= len(candidates):
            raise ConfigError(
                f"layers={layers!r}: N must be an integer in [1, {len(candidates)}] (the "
                f"{what} modules of {type(model).__name__}); e.g. 'last:2' or 'all'"
            )
        return candidates[-int(count) :]
    names = [layers] if isinstance(layers, str) else list(layers)
    for name in names:
        if name not in candidates:
            raise UnknownNameError(
                f"{name!r} is not a {what} module of {type(model).__name__}"
                f"{suggest(name, candidates)}; pass names from model.named_modules(), 'all' or "
                "'last:N'"
            )
    return names


def _layer_names(model: nn.Module, layers: Sequence[str] | str) -> list[str]:
    """:func:`layer_names` among the Conv2d/Linear modules (plain or compressed)."""
    return layer_names(
        model,
        layers,
        lambda m: type(m) in _COMPRESSED or isinstance(m, _Compressed),
        "Conv2d/Linear",
    )


def compress_activations(
    model: M,
    layers: list[str] | str = "last:2",
    method: str = "hosvd",
    explained_var: float = 0.8,
    ranks: Ranks | Mapping[str, Ranks] | None = None,
    budget_bytes: int | None = None,
    batch: Tensor | None = None,
) -> M:
    """Swap the selected ``nn.Conv2d`` / ``nn.Linear`` layers for compressed ones, in place.

    The swapped layers keep their parameters (same objects), hooks and ``state_dict`` keys, and
    their outputs; layers already compressed take the new settings. ASI layers add the keys of
    their warm-start buffers (``<layer>.asi_state.factor_<n>``, see :class:`ASIState`). Each
    compressed layer's ``saved_bytes`` is the analytic size of what its last training forward
    saved (core and factors).

    Args:
        model: the model, edited in place.
        layers: ``"last:N"`` (the last N Conv2d/Linear modules of ``named_modules``), one module
            name or a list of names.
        method: ``"hosvd"``, ``"svd"`` or ``"asi"``.
        explained_var: ε in (0, 1] (HOSVD, SVD).
        ranks: ASI only: one int (every mode of every layer), one per mode (4 for a conv, one
            per input axis for a linear layer) or a dict layer name -> ranks (e.g.
            :func:`select_ranks`'s).
        budget_bytes: ASI only, instead of ``ranks``: the bytes all the selected layers' factors
            may take, allocated by :func:`select_ranks` on ``batch``. HOSVD/SVD ranks follow ε
            and change every step, so no byte budget can hold for them.
        batch: the example input of ``budget_bytes``'s rank selection.

    Returns:
        ``model``.

    Raises:
        UnknownNameError: a name that is not a Conv2d/Linear module (closest names listed).
        ConfigError: bad ε, method or ranks, a grouped conv; the model is then left unchanged.
    """
    _check(explained_var, method)
    names = _layer_names(model, layers)
    if budget_bytes is not None:
        if method != "asi" or ranks is not None or batch is None:
            raise ConfigError(
                f"budget_bytes needs method='asi' (got {method!r}), no ranks and an example "
                "batch: compress_activations(model, layers, method='asi', "
                "budget_bytes=..., batch=x); HOSVD/SVD ranks follow explained_var instead"
            )
        ranks = select_ranks(model, batch, budget_bytes, layers=names)
    modules = [model.get_submodule(name) for name in names]
    per_layer: list[tuple[int, ...] | None] = []
    for name, module in zip(names, modules, strict=True):
        if isinstance(module, nn.Conv2d):
            _check_groups(module, name)
        if method != "asi":
            per_layer.append(None)
            continue
        if isinstance(ranks, Mapping) and name not in ranks:
            raise ConfigError(
                f"ranks has no entry for layer {name!r}; give every selected layer its ranks "
                f"(selected: {names})"
            )
        given = ranks[name] if isinstance(ranks, Mapping) else ranks
        per_layer.append(_ranks(given, _modes(module), name))
    for module, layer_ranks in zip(modules, per_layer, strict=True):
        if not isinstance(module, _Compressed):
            module.__class__ = _COMPRESSED[type(module)]
        module._configure(method, explained_var, layer_ranks)  # type: ignore[operator]
    return model


def _tucker_bytes(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Float32 bytes of a Tucker decomposition: ``(Π K_n + Σ I_n K_n) · 4``."""
    core = 1
    for k in ranks:
        core *= k
    return 4 * (core + sum(i * k for i, k in zip(shape, ranks, strict=True)))


@torch.no_grad()
def select_ranks(
    model: nn.Module,
    batch: Tensor,
    budget_bytes: int,
    layers: list[str] | str = "last:2",
) -> dict[str, tuple[int, ...]]:
    """ASI's fixed ranks under a memory budget, from one forward on ``batch`` (#37).

    Records each selected layer's input (``FeatureTap``, input capture; a linear input as its
    own axes), takes the singular values σ_{n,k} of every mode unfolding and
    allocates greedily: starting from rank 1 everywhere, it repeatedly grows the (layer, mode)
    whose next singular value removes the most relative truncation error
    ``σ²_{n,K_n+1} / ||A||²`` (the HOSVD error bound ``Σ_n Σ_{k>K_n} σ²_{n,k}``, per layer
    normalised) per added byte, while ``Σ_l (|S_l| + Σ_n |U_{l,n}|) · 4 ≤ budget_bytes``. This
    greedy replaces the paper's ε-grid knapsack over measured gradient errors.

    Returns:
        layer name -> ranks (4 for a conv: B, C, H, W; 2 for a linear layer), ready for
        ``compress_activations(..., method="asi", ranks=...)``.

    Raises:
        UnknownNameError: a name that is not a Conv2d/Linear module.
        ConfigError: ``budget_bytes`` below the rank-1 minimum (named in the message).
    """
    names = _layer_names(model, layers)
    with FeatureTap(model, names, capture="input") as tap:
        model(batch)
    shapes, energies = {}, {}
    for name in names:
        a = tap.features[name].float()
        total = a.square().sum().clamp_min(1e-30)
        shapes[name] = tuple(a.shape)
        energies[name] = [  # σ², descending, of every mode unfolding
            torch.linalg.eigvalsh(_short_gram(_unfold(a, n))).flip(0).clamp_min(0) / total
            for n in range(a.ndim)
        ]
    ranks = {name: [1] * len(shape) for name, shape in shapes.items()}
    used = sum(_tucker_bytes(shapes[name], ranks[name]) for name in names)
    if used > budget_bytes:
        raise ConfigError(
            f"budget_bytes={budget_bytes} is below the minimum {used} bytes (rank 1 in every "
            f"mode of {names}); raise the budget or select fewer layers"
        )
    while True:
        best: tuple[float, int, str, int] | None = None
        for name in names:
            for n, k in enumerate(ranks[name]):
                if k >= len(energies[name][n]):  # no energy left in this mode
                    continue
                grown = [*ranks[name][:n], k + 1, *ranks[name][n + 1 :]]
                extra = _tucker_bytes(shapes[name], grown) - _tucker_bytes(
                    shapes[name], ranks[name]
                )
                gain = float(energies[name][n][k]) / extra
                if used + extra <= budget_bytes and (best is None or gain > best[0]):
                    best = (gain, extra, name, n)
        if best is None:
            return {name: tuple(r) for name, r in ranks.items()}
        _, extra, name, n = best
        ranks[name][n] += 1
        used += extra


def decompress_activations(model: M) -> M:
    """Swap every compressed layer of ``model`` back to ``nn.Conv2d`` / ``nn.Linear``, in place
    (same parameter objects)."""
    for module in model.modules():
        if isinstance(module, _Compressed):
            if hasattr(module, "asi_state"):
                del module.asi_state
            del module.method, module.explained_var, module.ranks, module.saved_bytes
            module.__class__ = next(d for d, c in _COMPRESSED.items() if isinstance(module, c))
    return model


@structural_edit("compress_activations")
def compress_recorded(
    model: nn.Module,
    layers: list[str],
    method: str = "hosvd",
    explained_var: float = 0.8,
    ranks: dict[str, list[int]] | None = None,
) -> nn.Module:
    """:func:`compress_activations` as a recorded structure edit (:mod:`sobre.core.edits`): a
    checkpoint written mid-fit holds the ASI buffers, and replaying its log before loading
    rebuilds the compressed layers, so a resumed fit continues exactly. ``ranks``: per layer."""
    return compress_activations(model, layers, method, explained_var, ranks)


@structural_edit("decompress_activations")
def decompress_recorded(model: nn.Module) -> nn.Module:
    """:func:`decompress_activations` as a recorded structure edit (the pair of
    :func:`compress_recorded`: a model compressed for one fit is plain again in its log)."""
    return decompress_activations(model)
