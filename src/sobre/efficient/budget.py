"""Neuron selection under a parameter budget (#33): which neurons to update each epoch when at
most ``B`` parameters may be.

MIT's sparse update (SU) fine-tunes a fixed, searched subset of a pretrained network. #33 keeps
SU's budget ``B`` but re-selects the updated neurons every epoch: at random, or by NEq velocity
(:class:`~sobre.efficient.neq.NEq`), least equilibrated first. A neuron is an output channel of
a target layer (Conv2d by default, as in the #33 code); its cost is the parameters of its row
(:meth:`NeuronMask.channel_params <sobre.efficient.masks.NeuronMask.channel_params>`: weight row
plus bias entry). The selectors of :mod:`sobre.efficient.select` fill the budget greedily in
score order, so the realised updated-parameter count never exceeds ``B`` (the #33 random arm
counts costs in the unpermuted order and can overshoot; this one counts what it selects).

Parameters outside the target layers (norms, the classifier) are not counted and are trained or
frozen by the caller (e.g. leave them in the optimizer for every arm).

Driving it::

    selector = BudgetedNeuronSelector(model, budget_fraction=0.1, probe=probe)
    opt = selector.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    for epoch in range(epochs):
        selector.select(epoch)  # the mask for this epoch, set on opt and on sparse layers
        train_one_epoch(model, opt)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice
from sobre.core.taps import Selector
from sobre.efficient.masks import NeuronMask
from sobre.efficient.neq import (
    MaskDriver,
    NEq,
    VelocityRule,
    _check_state_tensors,
    _targets,
)
from sobre.efficient.select import (
    Budget,
    ChannelSelector,
    Fill,
    RandomSelector,
    StaticSelector,
    TopK,
)

__all__ = ["SCORERS", "BudgetedNeuronSelector"]

Scorer = Literal["velocity", "random", "static"]
SCORERS: tuple[str, ...] = ("velocity", "random", "static")
"""``"velocity"``: NEq's ``|v|`` (per parameter), highest first; ``"random"``: a new uniform
order each epoch; ``"static"``: SU-like, the same neurons every epoch (last layers first, a
layer priority list, or a fixed mask)."""


class BudgetedNeuronSelector(MaskDriver):
    """Per-epoch neuron masks whose updated parameters never exceed a budget (#33).

    Args:
        model: The model.
        budget_params: ``B`` in parameters.
        budget_fraction: ``B`` as a fraction of the targets' parameters (give exactly one of the
            two).
        scorer: See :data:`SCORERS`.
        static_plan: For ``"static"``: layer names in priority order (filled last channel...
            in index order), or a fixed :class:`NeuronMask` over the targets; default: the
            last layers first (``StaticSelector("last_first")``).
        probe: The probe set for ``"velocity"`` (see :class:`~sobre.efficient.neq.NEq`).
        seed: Seeds the random order and the tie-breaking.
        fill: ``"stop"`` (#33: stop at the first neuron that does not fit) or ``"skip"``.
        targets: Layers whose output channels are the neurons (the final Linear is never one).
        exclude: Layers to leave out of ``targets``.
        mu: NEq's velocity momentum.
        velocity_rule: NEq's velocity bookkeeping.
        per_param: Rank by ``|v|`` per parameter of the neuron (the #33 code) instead of ``|v|``.

    Raises:
        ConfigError: No or both budgets, an unknown scorer, a velocity scorer without probe, a
            plan for another scorer, a plan of the wrong layers or widths or over budget, or a
            budget below the cheapest neuron (naming it).
    """

    def __init__(
        self,
        model: nn.Module,
        budget_params: int | None = None,
        budget_fraction: float | None = None,
        scorer: Scorer = "velocity",
        static_plan: NeuronMask | Sequence[str] | None = None,
        probe: Sequence[Tensor] | Tensor | Iterable[Any] | None = None,
        seed: int = 0,
        fill: Fill = "stop",
        targets: Selector | Sequence[Selector] = nn.Conv2d,
        exclude: Selector | Sequence[Selector] = (),
        mu: float = 0.5,
        velocity_rule: VelocityRule = "paper",
        per_param: bool = True,
    ) -> None:
        self.scorer = check_choice("scorer", scorer, SCORERS, "BudgetedNeuronSelector")
        if (budget_params is None) == (budget_fraction is None):
            raise ConfigError(
                "give exactly one of budget_params (B in parameters) and budget_fraction (B as "
                f"a fraction of the targets' parameters); got budget_params={budget_params}, "
                f"budget_fraction={budget_fraction}"
            )
        if static_plan is not None and scorer != "static":
            raise ConfigError(f"static_plan is for scorer='static', not {scorer!r}")
        if scorer == "velocity" and probe is None:
            raise ConfigError(
                "scorer='velocity' needs a probe set (probe_inputs(loader, per_class=...)) to "
                "measure NEq velocities"
            )
        self.model = model
        self.names = _targets(model, targets, exclude)
        self._full = NeuronMask.from_model(model, self.names)
        cost = self._full.channel_params(model)
        if budget_fraction is not None:
            self.budget = Budget.fraction(budget_fraction, cost)
        else:
            self.budget = Budget(budget_params or 0, cost)
        self.per_param = per_param
        self.neq = (
            NEq(model, probe, mu=mu, targets=self.names, velocity_rule=velocity_rule)
            if scorer == "velocity"
            else None
        )
        self._plan = self._check_plan(static_plan) if isinstance(static_plan, NeuronMask) else None
        self.selector: ChannelSelector | None = None
        if scorer == "velocity":
            self.selector = TopK(fill=fill)
        elif scorer == "random":
            self.selector = RandomSelector(fill=fill)
        elif self._plan is None:
            order = "last_first" if static_plan is None else list(static_plan)
            self.selector = StaticSelector(order, fill=fill)
        self._rng = torch.Generator().manual_seed(seed)
        if self.selector is not None:  # fails early, naming the cheapest neuron, when B < its cost
            self.selector.select(self._zeros(), self.budget, torch.Generator().manual_seed(seed))
        self._mask = self._full.replace({n: torch.zeros_like(m) for n, m in self._full.items()})
        self._optimizers = []
        self.epoch: int | None = None

    def _zeros(self) -> dict[str, Tensor]:
        return {n: torch.zeros(m.numel()) for n, m in self._full.items()}

    def _check_plan(self, plan: NeuronMask) -> NeuronMask:
        _check_state_tensors(
            "static_plan", dict(plan.items()), {n: m.float() for n, m in self._full.items()}
        )
        spent = self.budget.realised(plan)
        if spent > self.budget.limit:
            raise ConfigError(
                f"static_plan updates {spent} params, over the budget of {self.budget.limit} "
                "params; free some neurons or raise the budget"
            )
        return self._full.replace(dict(plan.items()))

    def scores(self, epoch: int) -> dict[str, Tensor]:
        """The per-neuron ranking keys for ``epoch`` (measures NEq velocities for
        ``"velocity"``; zeros before the first velocity exists, so that epoch is random)."""
        if self.neq is None:
            return self._zeros()
        velocity = self.neq.measure(epoch)
        if not velocity:
            return self._zeros()
        cost = self.budget.cost
        return {
            n: v.abs() / cost[n].clamp_min(1) if self.per_param else v.abs()
            for n, v in velocity.items()
        }

    def select(self, epoch: int) -> NeuronMask:
        """The mask for ``epoch`` (call it before each epoch), also set on the wrapped
        optimizers and the channel-sparse layers; ``realised() <= budget.limit`` always."""
        if self.selector is None:
            mask = self._plan
        else:
            chosen = self.selector.select(self.scores(epoch), self.budget, self._rng)
            mask = self._full.replace(chosen)
        self.epoch = epoch
        return self._publish(mask)

    def realised(self) -> int:
        """Parameters the mask in force updates (its cost in the budget's table)."""
        return self.budget.realised(self._mask)

    def stats(self) -> dict[str, Any]:
        """Epoch, budget, realised parameters and the fraction of neurons trained."""
        return {
            "epoch": self.epoch,
            "budget": self.budget.limit,
            "realised": self.realised(),
            "trained": self._mask.trainable_fraction(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The random state, the mask in force and the NEq state (plain types and tensors)."""
        return {
            "epoch": self.epoch,
            "rng": self._rng.get_state(),
            "mask": self._mask.state_dict(),
            "neq": self.neq.state_dict() if self.neq is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the mask is published again).

        Raises:
            ConfigError: Missing keys, or a mask or NEq state for other layers or widths.
        """
        missing = {"epoch", "rng", "mask", "neq"} - set(state)
        if missing:
            raise ConfigError(f"not a BudgetedNeuronSelector state: keys {sorted(missing)} missing")
        mask = NeuronMask({}, dim="out")
        mask.load_state_dict(state["mask"])
        _check_state_tensors(
            "mask", dict(mask.items()), {n: m.float() for n, m in self._full.items()}
        )
        if self.neq is not None:
            self.neq.load_state_dict(state["neq"])
        self._rng.set_state(state["rng"])
        self.epoch = state["epoch"]
        self._publish(self._full.replace(dict(mask.items())))

    def __repr__(self) -> str:
        return (
            f"BudgetedNeuronSelector(scorer={self.scorer!r}, {self.budget!r}, epoch={self.epoch})"
        )
