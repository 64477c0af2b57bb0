"""Which channels to train under a budget: the :class:`ChannelSelector` protocol and selectors.

A selector turns per-channel scores into a choice of channels whose summed cost never exceeds a
:class:`Budget`. The cost is a table the caller passes (layer -> cost of each channel), in
parameters (:meth:`NeuronMask.channel_params <sobre.efficient.masks.NeuronMask.channel_params>`,
the neuron-selection paper #33) or in bytes of activation and weight-gradient memory (TraDy #41,
MeDyate #45). Every selector ranks the channels, then fills the budget greedily in that order:

- ``fill="stop"`` (the #33 code): take channels in order until the next one does not fit;
- ``fill="skip"``: pass over a channel that does not fit and keep filling with the cheaper ones.

Costs are whole numbers (round analytic byte counts up), so the realised cost is exact and
``realised <= budget`` holds without rounding slack. Ties and random draws come from the ``rng``
the caller passes: the same generator state gives the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice, suggest

Unit = Literal["params", "bytes"]
Fill = Literal["stop", "skip"]


def _as_costs(name: str, values: Tensor | Sequence[int]) -> Tensor:
    t = torch.as_tensor(values).detach().cpu()
    if t.ndim != 1:
        raise ConfigError(
            f"cost of layer {name!r} must be 1-D (one entry per channel), got shape "
            f"{tuple(t.shape)}"
        )
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ConfigError(
                f"cost of layer {name!r} must hold whole numbers of parameters or bytes; "
                "round fractional costs up (e.g. torch.ceil) before building the Budget"
            )
    elif t.dtype == torch.bool or t.is_complex():
        raise ConfigError(f"cost of layer {name!r} must be numeric, got {t.dtype}")
    t = t.to(torch.int64)
    if bool((t < 0).any()):
        raise ConfigError(f"cost of layer {name!r} has negative entries; costs must be >= 0")
    return t


class Budget:
    """An upper bound on the summed per-channel cost of the trainable channels.

    Args:
        limit: The most the selected channels may cost, in ``unit``.
        cost: Layer name -> cost of each of its channels (whole numbers >= 0), e.g.
            ``mask.channel_params(model)`` for a parameter budget.
        unit: ``"params"`` or ``"bytes"``, used in messages and reports.

    Raises:
        ConfigError: A negative or non-finite limit, a bad unit, or a cost that is not a 1-D
            table of whole non-negative numbers.
    """

    def __init__(
        self, limit: float, cost: Mapping[str, Tensor | Sequence[int]], unit: Unit = "params"
    ) -> None:
        check_choice("unit", unit, ("params", "bytes"), "Budget")
        if not math.isfinite(limit) or limit < 0:
            raise ConfigError(f"budget limit must be a finite number >= 0, got {limit!r}")
        self.limit = limit
        self.unit: Unit = unit
        self.cost = {str(name): _as_costs(str(name), v) for name, v in cost.items()}

    @classmethod
    def fraction(
        cls, fraction: float, cost: Mapping[str, Tensor | Sequence[int]], unit: Unit = "params"
    ) -> Budget:
        """A budget of ``fraction`` of the total cost of the table (e.g. 0.1 of conv params)."""
        if not 0 <= fraction <= 1:
            raise ConfigError(f"budget fraction must lie in [0, 1], got {fraction!r}")
        budget = cls(0, cost, unit)
        budget.limit = math.floor(fraction * budget.total())
        return budget

    def total(self) -> int:
        """Cost of every channel of the table."""
        return sum(int(c.sum()) for c in self.cost.values())

    def realised(self, selection: Mapping[str, Tensor]) -> int:
        """Exact cost of the channels ``selection`` marks ``True``."""
        return sum(
            int(self._layer_cost(name, mask.numel())[mask.cpu().bool()].sum())
            for name, mask in selection.items()
        )

    def _layer_cost(self, name: str, size: int) -> Tensor:
        cost = self.cost.get(name)
        if cost is None:
            raise ConfigError(
                f"the budget has no cost for layer {name!r}{suggest(name, list(self.cost))}; "
                "pass a cost table covering every scored layer"
            )
        if cost.numel() != size:
            raise ConfigError(
                f"layer {name!r} has {size} scores but the budget's cost table has "
                f"{cost.numel()} entries for it; build both from the same model and dim"
            )
        return cost

    def __repr__(self) -> str:
        return f"Budget({self.limit} {self.unit} over {len(self.cost)} layers)"


@runtime_checkable
class ChannelSelector(Protocol):
    """Chooses the channels to train: ``True`` entries cost at most ``budget.limit`` in total."""

    def select(
        self, scores: Mapping[str, Tensor], budget: Budget, rng: torch.Generator
    ) -> dict[str, Tensor]:
        """Layer -> 1-D bool tensor (``True`` = train), one entry per score, for the layers of
        ``scores``; wrap it with ``NeuronMask.replace`` or ``NeuronMask(..., dim=...)``."""
        ...


class _GreedySelector:
    """Ranks every scored channel, then fills the budget in rank order (see the module doc)."""

    def __init__(self, *, fill: Fill = "stop") -> None:
        check_choice("fill", fill, ("stop", "skip"), type(self).__name__)
        self.fill: Fill = fill

    def _rank(
        self, scores: Tensor, layers: list[str], sizes: list[int], rng: torch.Generator
    ) -> Tensor:
        """Flat channel indices, best first."""
        raise NotImplementedError

    def select(
        self, scores: Mapping[str, Tensor], budget: Budget, rng: torch.Generator
    ) -> dict[str, Tensor]:
        """See :class:`ChannelSelector`.

        Raises:
            ConfigError: A layer without cost (did-you-mean), sizes that differ from the cost
                table, non-finite scores, or a budget below the cheapest channel's cost.
        """
        layers = list(scores)
        if not layers:
            return {}
        flat = [s.detach().cpu().to(torch.float64).reshape(-1) for s in scores.values()]
        sizes = [s.numel() for s in flat]
        costs = torch.cat([budget._layer_cost(n, k) for n, k in zip(layers, sizes, strict=True)])
        values = torch.cat(flat)
        if not bool(torch.isfinite(values).all()):
            bad = next(n for n, s in zip(layers, flat, strict=True) if not torch.isfinite(s).all())
            raise ConfigError(f"scores of layer {bad!r} hold NaN or infinite values")
        _check_smallest(budget, layers, costs, sizes)
        order = self._rank(values, layers, sizes, rng)
        take = _fill(costs[order], int(budget.limit), self.fill)
        chosen = torch.zeros(values.numel(), dtype=torch.bool)
        chosen[order[take]] = True
        return dict(zip(layers, chosen.split(sizes), strict=True))


def _check_smallest(budget: Budget, layers: list[str], costs: Tensor, sizes: list[int]) -> None:
    if costs.numel() == 0 or budget.limit >= int(costs.min()):
        return
    at = int(costs.argmin())
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    layer = int((offsets[1:] > at).nonzero()[0])
    raise ConfigError(
        f"the budget of {budget.limit} {budget.unit} is smaller than the cheapest trainable "
        f"channel, which costs {int(costs[at])} {budget.unit} (layer {layers[layer]!r}, channel "
        f"{at - int(offsets[layer])}); raise the budget to at least {int(costs[at])} "
        f"{budget.unit}"
    )


def _fill(costs: Tensor, limit: int, fill: Fill) -> Tensor:
    """Which of the ranked ``costs`` to take so that their sum is at most ``limit``."""
    if fill == "stop":
        return costs.cumsum(0) <= limit  # costs >= 0: a prefix
    take, spent = [], 0
    for c in costs.tolist():
        fits = spent + c <= limit
        spent += c if fits else 0
        take.append(fits)
    return torch.tensor(take, dtype=torch.bool)


def _descending(keys: Tensor, rng: torch.Generator) -> Tensor:
    """Indices of ``keys`` from largest to smallest, ties broken at random by ``rng``."""
    perm = torch.randperm(keys.numel(), generator=rng)
    return perm[torch.argsort(keys[perm], descending=True, stable=True)]


class TopK(_GreedySelector):
    """Highest scores first (e.g. NEq velocity magnitudes, #33); ties broken by ``rng``."""

    def _rank(
        self, scores: Tensor, layers: list[str], sizes: list[int], rng: torch.Generator
    ) -> Tensor:
        return _descending(scores, rng)


class RandomSelector(_GreedySelector):
    """A uniformly random order over all scored channels (scores ignored; #33's random arm,
    TraDy's uniform re-sampling when called per layer)."""

    def _rank(
        self, scores: Tensor, layers: list[str], sizes: list[int], rng: torch.Generator
    ) -> Tensor:
        return torch.randperm(scores.numel(), generator=rng)


class ImportanceSampling(_GreedySelector):
    """Channels drawn without replacement with probability proportional to their score (MeDyate).

    Uses the exponential-race form of Gumbel-top-k: key ``E_i / s_i`` with ``E_i ~ Exp(1)``,
    smallest first, which orders channels as successive draws without replacement with
    probabilities ``s_i / sum(s)``. Zero scores come last, in random order; all-zero scores give
    the uniform order of :class:`RandomSelector`'s distribution.
    """

    def _rank(
        self, scores: Tensor, layers: list[str], sizes: list[int], rng: torch.Generator
    ) -> Tensor:
        if bool((scores < 0).any()):
            raise ConfigError(
                "ImportanceSampling needs scores >= 0 (sampling weights); pass magnitudes, "
                "e.g. scores.abs()"
            )
        wait = torch.empty_like(scores).exponential_(generator=rng)
        race = torch.where(scores > 0, wait / scores, math.inf)
        return _descending(-race, rng)


class StaticSelector(_GreedySelector):
    """A fixed choice: whole layers in a set order, channels in index order (scores and ``rng``
    unused), e.g. the last layers first as in MIT's static sparse update.

    Args:
        order: ``"last_first"`` or ``"first_last"`` (the scores' layer order, reversed or not),
            or layer names in priority order; scored layers not named are never selected.
        fill: See the module docstring.
    """

    def __init__(
        self,
        order: Literal["last_first", "first_last"] | Sequence[str] = "last_first",
        *,
        fill: Fill = "stop",
    ) -> None:
        super().__init__(fill=fill)
        if isinstance(order, str) and order not in ("last_first", "first_last"):
            raise ConfigError(
                f"order must be 'last_first', 'first_last' or a list of layer names, got {order!r}"
            )
        self.order = order if isinstance(order, str) else list(order)

    def _rank(
        self, scores: Tensor, layers: list[str], sizes: list[int], rng: torch.Generator
    ) -> Tensor:
        if self.order == "first_last":
            names = layers
        elif self.order == "last_first":
            names = layers[::-1]
        else:
            names = list(self.order)
            for name in names:
                if name not in layers:
                    raise ConfigError(
                        f"StaticSelector order names {name!r}, which is not a scored layer"
                        f"{suggest(name, layers)}"
                    )
        starts = dict(zip(layers, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
        size = dict(zip(layers, sizes, strict=True))
        ranked = [torch.arange(starts[n], starts[n] + size[n]) for n in names]
        return torch.cat(ranked) if ranked else torch.zeros(0, dtype=torch.int64)
