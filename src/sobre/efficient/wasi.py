"""WASI: weight-activation subspace iteration for transformers' linear layers (paper #46).

WASI (Nguyen et al., 2025, paper #46) extends ASI (#37, :mod:`sobre.efficient.compress`) from the
activations to the weights of every ``nn.Linear``:

- Swap time: a truncated SVD of ``W`` (out x in) keeps the explained variance ``weight_var``
  (:func:`~sobre.efficient.compress.explained_rank`), rank ``k`` fixed from then on:
  ``L = U_k`` (out x k), ``R = Σ_k V_kᵀ`` (k x in), buffers ``left`` and ``right``.
- Every training forward after a change of ``W`` (an optimizer step) first runs one subspace
  iteration on the dense ``W``:
  ``q = Wᵀ L_prev``, ``L = QR(W q).Q``, ``R = Lᵀ W`` (so ``L R`` is ``W`` projected on the tracked
  rank-k column space), then ``y = (x Rᵀ) Lᵀ + b``. Backward: ``∂L/∂x = (g L) R``; ``∂L/∂W`` is
  dense, from ``g`` and the input's ASI Tucker factors (:class:`~sobre.efficient.compress.ASIState`
  at fixed activation ranks, one per input axis, 3 for ``(B, N, D)`` tokens), contracted without
  rebuilding the input (:func:`~sobre.efficient.compress.linear_weight_grad`); ``∂L/∂b`` is exact.
  The dense ``W`` stays the trained parameter: the rank-k forward with a full gradient is a
  straight-through estimate, exact at ``weight_var = 1`` and full activation ranks.
- Eval (no grad): ``y = L (R x) + b``, ``k (in + out)`` multiply-adds per token instead of
  ``in · out``; :meth:`WASILinear.export` / :func:`export_wasi` give the plain two-Linear module.

The ``state_dict`` keeps ``W`` (a training checkpoint resumes exactly, unlike the paper's code,
which drops it) plus ``left``, ``right`` and ``asi_state.factor_<n>``. :func:`wasi` swaps layers
in place, :func:`unwasi` swaps them back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.nn.utils.parametrize import is_parametrized

from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError
from sobre.efficient.compress import (
    ASIState,
    Ranks,
    _check,
    _expand,
    _ranks,
    _record_saved_bytes,
    explained_rank,
    layer_names,
    linear_weight_grad,
    select_ranks,
)

__all__ = [
    "WASILinear",
    "export_wasi",
    "unwasi",
    "unwasi_recorded",
    "wasi",
    "wasi_recorded",
]

M = TypeVar("M", bound=nn.Module)


class _WASIFn(torch.autograd.Function):
    """``y = (x Rᵀ) Lᵀ + b`` saving ``L``, ``R`` and the ASI factors of ``x`` (module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        left: Tensor,
        right: Tensor,
        layer: WASILinear,
    ) -> Tensor:
        out = F.linear(F.linear(x, right), left, bias)
        saved: list[Tensor] = []
        if ctx.needs_input_grad[1]:
            ranks = _expand(layer.activation_ranks, x.ndim)
            core, factors = layer.asi_state.step(x.detach(), ranks)
            saved = [core, *factors]
            _record_saved_bytes(layer, saved)
        ctx.save_for_backward(left, right, *saved)
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        left, right, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        gx = (g @ left) @ right if need_x else None
        gw = linear_weight_grad(g, saved, "asi") if need_w else None
        gb = g.reshape(-1, g.shape[-1]).sum(0) if need_b else None
        return gx, gw, gb, None, None, None


class WASILinear(nn.Linear):
    """``nn.Linear`` with a tracked rank-k weight ``L R`` and ASI-compressed input (module doc).

    Usually made by :func:`wasi` (``module.__class__`` swap, same parameters); built directly, it
    takes ``nn.Linear``'s arguments plus the keywords below.

    Args:
        *args: ``nn.Linear``'s arguments.
        weight_var: explained variance of ``W`` kept by the rank ``k``, in (0, 1].
        activation_ranks: ASI ranks of the input: one int for every axis or one per axis.
        **kwargs: ``nn.Linear``'s keyword arguments.
    """

    left: Tensor
    right: Tensor
    asi_state: ASIState
    weight_var: float
    activation_ranks: tuple[int, ...]

    def __init__(
        self, *args: Any, weight_var: float = 0.8, activation_ranks: Ranks = 10**6, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._configure(weight_var, _ranks(activation_ranks, 2, type(self).__name__))

    @torch.no_grad()
    def _configure(self, weight_var: float, activation_ranks: tuple[int, ...]) -> None:
        """Step 0: ``L = U_k``, ``R = Σ_k V_kᵀ`` from the SVD of ``W``; fresh ASI state."""
        u, s, vh = torch.linalg.svd(self.weight.detach().float(), full_matrices=False)
        k = explained_rank(s, weight_var)
        like = self.weight.detach()
        self.register_buffer("left", u[:, :k].to(like).contiguous())
        self.register_buffer("right", (s[:k, None] * vh[:k]).to(like).contiguous())
        self.weight_var, self.activation_ranks = float(weight_var), activation_ranks
        self.asi_state = ASIState(2)
        self._tracked = self._weight_version()

    def _weight_version(self) -> int:
        """The version counter of the stored ``W`` (a mask's ``original`` when parametrized)."""
        stored = self.parametrizations.weight.original if is_parametrized(self, "weight") else None
        return (self.weight if stored is None else stored)._version

    @property
    def rank(self) -> int:
        """The weight rank ``k``."""
        return self.left.shape[1]

    @torch.no_grad()
    def power_iteration(self) -> None:
        """One subspace iteration on ``W``: ``q = Wᵀ L``, ``L = QR(W q).Q``, ``R = Lᵀ W``, written
        into the buffers in place."""
        w = self.weight.detach()
        left = torch.linalg.qr(w @ (w.t() @ self.left)).Q
        self.left.copy_(left)
        self.right.copy_(left.t() @ w)

    def forward(self, x: Tensor) -> Tensor:
        """Training (grad enabled): a power iteration if ``W`` changed since the last one (train
        mode only), then the compressed low-rank linear; no grad: ``L (R x) + b``.

        The graph saves the ``L``, ``R`` buffers themselves; since ``W`` cannot change between a
        forward and its backward, several forwards before one backward (a siamese loss) share
        them instead of overwriting them.
        """
        if not torch.is_grad_enabled():
            return F.linear(F.linear(x, self.right), self.left, self.bias)
        if self.training and self._weight_version() != self._tracked:
            self.power_iteration()
            self._tracked = self._weight_version()
        return _WASIFn.apply(x, self.weight, self.bias, self.left, self.right, self)

    def export(self) -> nn.Sequential:
        """The plain inference module ``Linear(in, k, bias=False)`` (weight ``R``) then
        ``Linear(k, out)`` (weight ``L``, this layer's bias), copies on this layer's device."""
        like = self.weight.detach()
        first = nn.Linear(self.in_features, self.rank, bias=False).to(like)
        second = nn.Linear(self.rank, self.out_features, bias=self.bias is not None).to(like)
        with torch.no_grad():
            first.weight.copy_(self.right)
            second.weight.copy_(self.left)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        return nn.Sequential(first, second)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        for name in ("left", "right"):  # k follows the saved weight: take the stored shapes
            if f"{prefix}{name}" in state_dict:
                shape = state_dict[f"{prefix}{name}"].shape
                self.register_buffer(name, torch.empty(shape).to(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, weight_var={self.weight_var}, "
            f"activation_ranks={self.activation_ranks}"
        )


@contextmanager
def _as_linear(modules: list[nn.Module]) -> Iterator[None]:
    """Temporarily give the WASI layers among ``modules`` the plain ``nn.Linear`` class."""
    swapped = [m for m in modules if isinstance(m, WASILinear)]
    for m in swapped:
        m.__class__ = nn.Linear
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = WASILinear


def wasi(
    model: M,
    weight_var: float = 0.8,
    activation_budget_bytes: int | None = None,
    batch: Tensor | None = None,
    layers: Sequence[str] | str = "all",
    activation_ranks: Ranks | Mapping[str, Ranks] | None = None,
) -> M:
    """Swap the selected ``nn.Linear`` layers for :class:`WASILinear`, in place.

    The swapped layers keep their parameters (same objects) and ``state_dict`` keys and add
    ``left``, ``right`` and ``asi_state.factor_<n>``; layers already swapped are reconfigured
    (new SVD of their current ``W``).

    Args:
        model: the model, edited in place.
        weight_var: explained variance of each ``W`` kept by its rank ``k``, in (0, 1].
        activation_budget_bytes: total bytes of the saved activation factors;
            with ``batch``, the ranks come from :func:`~sobre.efficient.compress.select_ranks`.
        batch: an example input batch for the budget search.
        layers: ``"all"``, ``"last:N"``, one module name or a list of names.
        activation_ranks: instead of a budget: one int (every axis of every layer), one per
            input axis (3 for ``(B, N, D)`` tokens) or a dict layer name -> ranks.

    Returns:
        ``model``.

    Raises:
        UnknownNameError: a name that is not an ``nn.Linear`` module (closest names listed).
        ConfigError: ``weight_var`` outside (0, 1]; neither or both of ranks and budget; a budget
            without ``batch`` or below the rank-1 minimum; bad ranks. The model is then unchanged.
    """
    _check(weight_var)
    names = layer_names(
        model, layers, lambda m: type(m) is nn.Linear or isinstance(m, WASILinear), "nn.Linear"
    )
    modules = [model.get_submodule(name) for name in names]
    if (activation_ranks is None) == (activation_budget_bytes is None):
        raise ConfigError(
            "wasi needs exactly one of activation_ranks (int, one per input axis, or a dict "
            "layer -> ranks) and activation_budget_bytes (with an example batch=...)"
        )
    if activation_ranks is None:
        if batch is None:
            raise ConfigError(
                "activation_budget_bytes needs an example input: pass batch=<a training batch>"
            )
        with _as_linear(modules):
            activation_ranks = select_ranks(model, batch, int(activation_budget_bytes), names)
    per_layer = []
    for name in names:
        if isinstance(activation_ranks, Mapping) and name not in activation_ranks:
            raise ConfigError(
                f"activation_ranks has no entry for layer {name!r}; give every selected layer "
                f"its ranks (selected: {names})"
            )
        given = (
            activation_ranks[name] if isinstance(activation_ranks, Mapping) else activation_ranks
        )
        per_layer.append(_ranks(given, 2, name))
    for module, ranks in zip(modules, per_layer, strict=True):
        module.__class__ = WASILinear
        module._configure(weight_var, ranks)  # type: ignore[operator]
    return model


def _wasi_layers(model: nn.Module) -> list[tuple[str, WASILinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WASILinear)]


def export_wasi(model: M) -> M:
    """Replace every :class:`WASILinear` by its :meth:`~WASILinear.export` (two plain Linears,
    ``W`` dropped), in place: the deployment model, same eval outputs."""
    for name, module in _wasi_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.export())
    return model


def unwasi(model: M) -> M:
    """Swap every :class:`WASILinear` back to ``nn.Linear``, in place (same parameter objects,
    the ``state_dict`` keys of before :func:`wasi`)."""
    for _, module in _wasi_layers(model):
        del module.asi_state, module.left, module.right
        del module.weight_var, module.activation_ranks
        module.__dict__.pop("saved_bytes", None)
        module.__class__ = nn.Linear
    return model


@structural_edit("wasi")
def wasi_recorded(
    model: nn.Module, layers: list[str], weight_var: float, ranks: dict[str, list[int]]
) -> nn.Module:
    """:func:`wasi` as a recorded structure edit at resolved per-layer activation ``ranks``: a
    mid-fit checkpoint (``W``, ``L``, ``R`` and the ASI buffers) resumes exactly once its log is
    replayed."""
    return wasi(model, weight_var, layers=layers, activation_ranks=ranks)


@structural_edit("unwasi")
def unwasi_recorded(model: nn.Module) -> nn.Module:
    """:func:`unwasi` as a recorded structure edit (the pair of :func:`wasi_recorded`)."""
    return unwasi(model)
