"""Feature taps: the one way to record intermediate features, selected by name, glob or type.

:class:`FeatureTap` registers forward hooks on the selected modules. In ``"full"`` mode it keeps
each module's last output (or input) tensor; in ``"stats"`` mode it keeps bounded per-channel
:class:`RunningStats` (count, mean, variance, min, max, fraction of positive entries) instead.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Self

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sobre.core import dist
from sobre.core.errors import ConfigError, SobreError
from sobre.core.registry import check_choice, closest

Selector = str | type[nn.Module] | tuple[type[nn.Module], ...]
"""An exact dotted module name, an fnmatch glob, a module type or a tuple of module types."""

_GLOB_CHARS = frozenset("*?[")


def _extreme(x: Tensor, cdim: int, *, largest: bool) -> Tensor:
    """Per-channel min or max; reducing the batch dim first is several times faster on CPUs."""
    op = torch.amax if largest else torch.amin
    if cdim == 0:
        return op(x, dim=tuple(range(1, x.ndim)))
    y = op(x, dim=0)
    rest = tuple(d for d in range(y.ndim) if d != cdim - 1)
    return op(y, dim=rest) if rest else y


class RunningStats:
    """Per-channel running count, mean, variance, min, max and fraction of entries > 0.

    Memory is bounded by the number of channels: each batch is reduced on arrival to a few
    per-channel numbers, and up to :attr:`FOLD_EVERY` of those are folded at once into the
    running state with Chan et al.'s parallel formula (``M2`` sums), in float64. The channel
    dimension is ``channel_dim`` for tensors of two or more dimensions (1 for ``(N, C, ...)``,
    -1 for ``(N, L, C)`` tokens); 0-D and 1-D tensors count as one channel. Statistics are
    returned as float32 tensors.
    """

    FOLD_EVERY = 64

    def __init__(self, channel_dim: int = 1) -> None:
        self.channel_dim = channel_dim
        self._n = 0
        self._s: Tensor | None = None  # rows: mean, M2, min, max, count of entries > 0
        self._pending: list[tuple[int, Tensor]] = []

    @torch.no_grad()
    def update(self, x: Tensor) -> Self:
        """Add the entries of batch ``x`` (any floating, integer or bool tensor); returns self."""
        x = x.detach()
        x = x if x.dtype == torch.float64 else x.float()
        if x.ndim < 2:
            x = x.reshape(-1, 1)
            cdim = 1
        elif -x.ndim <= self.channel_dim < x.ndim:
            cdim = self.channel_dim % x.ndim
        else:
            raise ConfigError(
                f"channel_dim={self.channel_dim} is out of range for a tensor of shape "
                f"{tuple(x.shape)}; use 1 for (N, C, ...) tensors or -1 for (N, L, C) tokens"
            )
        if x.numel() == 0:
            return self
        dims = tuple(d for d in range(x.ndim) if d != cdim)
        # One scratch tensor serves both element-wise passes (fresh large allocations are slow
        # on CPUs); mean-then-centred-squares is exact enough and far faster than var_mean.
        scratch = torch.sign(x).clamp_(min=0)
        pos = scratch.sum(dim=dims)
        mean = x.mean(dim=dims, keepdim=True)
        m2 = torch.sub(x, mean, out=scratch).square_().sum(dim=dims)
        mn = _extreme(x, cdim, largest=False)
        mx = _extreme(x, cdim, largest=True)
        batch = torch.stack([mean.reshape(-1), m2, mn, mx, pos])
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        return self._add(x.numel() // x.shape[cdim], batch.to(dtype))

    def merge(self, other: RunningStats) -> Self:
        """Fold ``other``'s statistics into these; returns self."""
        other._fold()
        return self._add(other._n, other._s) if other._s is not None else self

    def _add(self, n: int, part: Tensor) -> Self:
        ref = self._s if self._s is not None else (self._pending[0][1] if self._pending else part)
        if part.shape != ref.shape:
            raise ConfigError(
                f"cannot merge statistics over {part.shape[1]} channels into statistics over "
                f"{ref.shape[1]} channels; check channel_dim (1 for (N, C, ...), -1 for tokens)"
            )
        self._pending.append((n, part))
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()
        return self

    @torch.no_grad()
    def _fold(self) -> None:
        """Combine the running state and the pending batch summaries in one vectorised step."""
        if not self._pending:
            return
        parts = self._pending if self._s is None else [(self._n, self._s), *self._pending]
        dev, dtype = parts[0][1].device, parts[0][1].dtype
        s = torch.stack([p.to(device=dev, dtype=dtype) for _, p in parts])  # (K, 5, C)
        total = sum(n for n, _ in parts)
        counts = torch.tensor([n for n, _ in parts], dtype=dtype)
        w = counts.to(dev, non_blocking=True)[:, None]  # no wait on a GPU's queue
        mean = (s[:, 0] * w).sum(0) / total
        m2 = (s[:, 1] + w * (s[:, 0] - mean).square()).sum(0)
        self._s = torch.stack([mean, m2, s[:, 2].amin(0), s[:, 3].amax(0), s[:, 4].sum(0)])
        self._n = total
        self._pending = []

    @torch.no_grad()
    def all_reduce(self) -> Self:
        """Combine the statistics of every rank so that all ranks hold identical values.

        Every rank must call it (collective) with non-empty statistics over the same channels.
        A no-op outside distributed runs. Returns self.
        """
        if not dist.is_distributed():
            return self
        mean, m2, mn, mx, pos = self._state()
        n = torch.full_like(mean, float(self._n))
        sums = dist.all_reduce_sum(torch.stack([n * mean, pos, n]))
        n_tot = sums[2]
        mean_tot = sums[0] / n_tot
        m2_tot = dist.all_reduce_sum(m2 + n * (mean - mean_tot).square())
        extrema = dist.all_reduce_max(torch.stack([mx, -mn]))
        self._n = int(n_tot[0].item())
        self._s = torch.stack([mean_tot, m2_tot, -extrema[1], extrema[0], sums[1]])
        return self

    def _state(self) -> Tensor:
        self._fold()
        if self._s is None:
            raise SobreError(
                "RunningStats is empty: update() it (run a forward pass through the tapped "
                "model) before reading or reducing statistics"
            )
        return self._s

    @property
    def count(self) -> int:
        """Number of entries seen per channel."""
        return self._n + sum(n for n, _ in self._pending)

    @property
    def mean(self) -> Tensor:
        """Per-channel mean."""
        return self._state()[0].float()

    @property
    def var(self) -> Tensor:
        """Per-channel population variance (``M2 / count``)."""
        return (self._state()[1] / self._n).float()

    @property
    def std(self) -> Tensor:
        """Per-channel population standard deviation."""
        return (self._state()[1] / self._n).sqrt().float()

    @property
    def min(self) -> Tensor:
        """Per-channel minimum."""
        return self._state()[2].float()

    @property
    def max(self) -> Tensor:
        """Per-channel maximum."""
        return self._state()[3].float()

    @property
    def frac_positive(self) -> Tensor:
        """Per-channel fraction of entries strictly greater than 0."""
        return (self._state()[4] / self._n).float()

    def __repr__(self) -> str:
        self._fold()
        channels = "?" if self._s is None else self._s.shape[1]
        return f"RunningStats(count={self._n}, channels={channels}, channel_dim={self.channel_dim})"


def _first_tensor(values: Iterable[Any]) -> Tensor | None:
    for v in values:
        if isinstance(v, Tensor):
            return v
    return None


def _as_tensor(obj: Any) -> Tensor | None:
    """``obj`` if it is a tensor, else the first tensor of a tuple/list or mapping's values."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, tuple | list):
        return _first_tensor(obj)
    if isinstance(obj, Mapping):
        return _first_tensor(obj.values())
    return None


def _is_single(sel: object) -> bool:
    """Whether ``sel`` is one selector: a str, a type, or a non-empty tuple of types."""
    if isinstance(sel, str | type):
        return True
    return isinstance(sel, tuple) and bool(sel) and all(isinstance(t, type) for t in sel)


def _selectors(select: Selector | Sequence[Selector]) -> list[Selector]:
    """``select`` as a list of single selectors (a tuple of types is one selector)."""
    if _is_single(select):
        return [select]  # type: ignore[list-item]
    if isinstance(select, Sequence):
        items = list(select)
        for s in items:
            if not _is_single(s):
                raise ConfigError(
                    f"bad feature selector {s!r}: use a module name, a glob such as 'layer1.*', "
                    "a module type such as nn.Conv2d, or a tuple of module types"
                )
        return items
    raise ConfigError(
        f"bad feature selector {select!r}: use a module name, a glob, a module type, "
        "or a list of those"
    )


def _describe(sel: Selector) -> str:
    if isinstance(sel, str):
        return repr(sel)
    types = sel if isinstance(sel, tuple) else (sel,)
    return " | ".join(t.__name__ for t in types)


def _match(sel: Selector, named: list[tuple[str, nn.Module]]) -> list[str]:
    if isinstance(sel, str):
        if any(name == sel for name, _ in named):
            return [sel]
        if _GLOB_CHARS.isdisjoint(sel):
            return []
        return [name for name, _ in named if name and fnmatch.fnmatchcase(name, sel)]
    return [name for name, m in named if isinstance(m, sel)]


def _no_match_error(sel: Selector, model: nn.Module, named: list[tuple[str, nn.Module]]) -> str:
    what = type(model).__name__
    if isinstance(sel, str):
        names = [n for n, _ in named if n]
        near = closest(sel, names, n=5)
        listed = near or names[:10]
        label = "closest names" if near else "some module names"
        return (
            f"feature selector {sel!r} matches no module of {what}; {label}: "
            f"{', '.join(listed)}. Use an exact dotted name from model.named_modules(), "
            "a glob such as 'layer1.*' or '*.relu', or a module type"
        )
    present = list(dict.fromkeys(type(m).__name__ for _, m in named))[:10]
    return (
        f"feature selector {_describe(sel)} matches no module of {what}; module types present: "
        f"{', '.join(present)}. Select one of these types, or a name or glob"
    )


def resolve_modules(
    model: nn.Module, select: Selector | Sequence[Selector]
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that ``select`` picks, in ``named_modules`` order.

    Args:
        model: The model to search.
        select: An exact dotted name, an fnmatch glob (``"layer1.*"``, ``"*.relu"``; never
            matches the root module ``""``), a module type, a tuple of types, or a sequence of
            these (their union). An empty sequence selects nothing.

    Raises:
        ConfigError: A selector matches no module; the message lists close or available names.
    """
    named = list(model.named_modules())
    chosen: set[str] = set()
    for sel in _selectors(select):
        hits = _match(sel, named)
        if not hits:
            raise ConfigError(_no_match_error(sel, model, named))
        chosen.update(hits)
    return [(name, m) for name, m in named if name in chosen]


class FeatureTap:
    """Records intermediate features of selected modules through forward hooks.

    Example:
        >>> with FeatureTap(model, "layer*.0.relu", detach=False) as tap:
        ...     out = model(x)
        >>> loss = sum(f.square().mean() for f in tap.features.values())

    Args:
        model: The model whose modules are tapped.
        select: Which modules (see :func:`resolve_modules`).
        capture: ``"output"`` records each module's output (the first tensor of a tuple, list or
            mapping); ``"input"`` its first positional tensor input (else its first tensor
            keyword argument).
        detach: In full mode, store detached tensors (``False`` keeps the graph so losses can
            backpropagate through the features).
        mode: ``"full"`` keeps the last tensor per module in :attr:`features`; ``"stats"``
            accumulates every call into :attr:`stats` without keeping any tensor.
        channel_dim: Channel dimension for stats mode (1 for ``(N, C, ...)``, -1 for tokens).

    Raises:
        ConfigError: Bad ``capture``/``mode`` or a selector that matches no module.
    """

    def __init__(
        self,
        model: nn.Module,
        select: Selector | Sequence[Selector],
        *,
        capture: Literal["output", "input"] = "output",
        detach: bool = True,
        mode: Literal["full", "stats"] = "full",
        channel_dim: int = 1,
    ) -> None:
        check_choice("capture", capture, ("output", "input"), "FeatureTap")
        check_choice("mode", mode, ("full", "stats"), "FeatureTap")
        self.capture = capture
        self.detach = detach
        self.mode = mode
        self.channel_dim = channel_dim
        self._modules = resolve_modules(model, select)
        self.features: dict[str, Tensor] = {}
        self.stats: dict[str, RunningStats] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def names(self) -> list[str]:
        """Names of the tapped modules, in ``named_modules`` order."""
        return [name for name, _ in self._modules]

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self._handles)

    def attach(self) -> Self:
        """Register the forward hooks (a no-op when already attached); returns self."""
        if not self._handles:
            self._handles = [
                m.register_forward_hook(functools.partial(self._hook, name), with_kwargs=True)
                for name, m in self._modules
            ]
        return self

    def remove(self) -> None:
        """Remove the forward hooks (a no-op when not attached); recorded data is kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget the recorded features and statistics."""
        self.features.clear()
        self.stats.clear()

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _hook(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if self.capture == "output":
            t = _as_tensor(output)
        else:
            t = _first_tensor(args)
            if t is None:
                t = _first_tensor(kwargs.values())
        if t is None:
            return
        if self.mode == "full":
            self.features[name] = t.detach() if self.detach else t
        else:
            stats = self.stats.get(name)
            if stats is None:
                stats = self.stats[name] = RunningStats(self.channel_dim)
            stats.update(t)

    def __repr__(self) -> str:
        return (
            f"FeatureTap({len(self._modules)} modules, mode={self.mode!r}, "
            f"capture={self.capture!r}, attached={self.attached})"
        )
