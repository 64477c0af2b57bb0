"""TraDy (#41) and MeDyate (#45): fine-tuning under a hard memory budget, updating each epoch a
fresh sample of input channels in a few preselected layers.

Both papers bound ``B_mem``, the bytes a training step keeps to compute weight derivatives. For a
layer ``l`` with selected input channels ``S_l`` the memory model is
``mem_l = bytes(X_l[:, S_l]) + bytes(dW_l[:, S_l])`` (+ the bias gradient), with
``sum_l mem_l <= B_mem``. The choice of *where* to update has two stages:

1. **Layers, offline** (:meth:`ChannelBudget.rank_layers`, :meth:`ChannelBudget.plan`): one pass
   with full gradients over a few target batches scores every candidate layer, and the best
   layers that fit are kept. TraDy scores with the relative gradient norm
   ``RGN_l = ||dW_l|| / ||W_l||``; MeDyate with LaRa, whose exact formula we did not read: our
   reconstruction divides RGN by the layer's bytes per input channel (gradient mass per byte).
2. **Channels, online** (:meth:`ChannelBudget.resample`, once per epoch): ``S_l`` is drawn again
   without replacement, uniformly (TraDy) or with probability proportional to the channel
   importance ``pi_{l,c} = ||dW_l[:, c]||`` averaged over the ranking batches (MeDyate; the
   :class:`~sobre.efficient.select.ImportanceSampling` race), optionally refreshed every
   ``refresh_every`` epochs from the gradients the selected channels produce during training.

The savings are real, not counted: :meth:`ChannelBudget.apply` folds frozen BatchNorm into the
convs (:func:`~sobre.efficient.sparse.fold_frozen_bn`), runs the kept layers as channel-sparse
layers (:func:`~sobre.efficient.sparse.sparsify` with ``trainable_in = S_l``: the forward saves
``X[:, S_l]`` and the backward computes ``dW[:, S_l]`` only), runs every other Conv2d/Linear as
a frozen channel-sparse layer that keeps only its weight (a frozen ``nn.Conv2d`` would keep its
input to pass the gradient down), swaps in bit-mask ReLUs where they free bytes
(:func:`~sobre.efficient.sparse.mask_relus`) and freezes every other parameter. A BatchNorm that
cannot be folded stays as it is, frozen: in train mode it still normalises with batch statistics
and keeps its input, which the measured accounting below includes.

**Accounting.** What autograd keeps besides the ``X_l[:, S_l]`` (the ReLU bit masks between the
lowest kept layer and the output, the input of a fully trained head, whatever an op of the
architecture saves) is *measured* with :func:`~sobre.core.measure.saved_activation_bytes` with
every selection empty, and charged first, with the gradients of the biases and of the fully
trained layers. The selected channels fill the rest at their exact analytic cost, so the measured
saved activations of a step never exceed the budget (checked again by :meth:`ChannelBudget.apply`).

Design choices that are ours [infer], not the papers': the LaRa formula above; the per-layer
channel counts ``|S_l|`` split the budget at an equal fraction of each kept layer's channels
(``allocation="layer"``), or one draw covers all kept layers (``allocation="pooled"``: the
D-FullRandom arm, random channels over the whole network); the per-epoch draws depend only on
``(seed, epoch)`` and the importances, so a resumed run draws the same channels.

Arms of the papers' tables: TraDy = ``layer_scorer="rgn", channel_sampler="uniform"``; MeDyate =
``"lara", "importance"``; S-DetRGN (static top-RGN) = ``"rgn", "static"``; D-FullRandom =
``"random", "uniform", allocation="pooled"`` with ``max_layers=None``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.measure import SavedBytes, saved_activation_bytes
from sobre.core.registry import Registry, check_choice, suggest
from sobre.efficient.masks import NeuronMask
from sobre.efficient.select import (
    Budget,
    ChannelSelector,
    ImportanceSampling,
    RandomSelector,
    TopK,
)
from sobre.efficient.sparse import fold_frozen_bn, mask_relus, set_trainable, sparsify

__all__ = [
    "SAMPLERS",
    "SCORERS",
    "ChannelBudget",
    "LayerScorer",
    "LayerStats",
    "UpdatePlan",
]

Allocation = Literal["layer", "pooled"]
Resample = Literal["epoch", "never"]
_SPARSE_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerStats:
    """What the ranking pass measured for one candidate layer.

    Attributes:
        name: Module name.
        grad_norm: ``||dW_l||``, averaged over the ranking batches.
        weight_norm: ``||W_l||``.
        channels: Input channels ``C_l`` (weight columns).
        channel_bytes: Bytes of one selected input channel: ``X_l[:, c]`` plus ``dW_l[:, c]``.
    """

    name: str
    grad_norm: float
    weight_norm: float
    channels: int
    channel_bytes: int

    @property
    def rgn(self) -> float:
        """TraDy's relative gradient norm ``||dW_l|| / ||W_l||``."""
        return self.grad_norm / max(self.weight_norm, torch.finfo(torch.float32).tiny)


LayerScorer = Callable[[LayerStats, torch.Generator], float]
"""Layer score from its ranking statistics (higher = kept first); the generator is seeded."""

SCORERS: Registry[LayerScorer] = Registry("layer scorer")


@SCORERS.register("rgn")
def rgn_score(stats: LayerStats, rng: torch.Generator) -> float:
    """TraDy: ``RGN_l = ||dW_l|| / ||W_l||``."""
    return stats.rgn


@SCORERS.register("lara")
def lara_score(stats: LayerStats, rng: torch.Generator) -> float:
    """MeDyate's LaRa, our reconstruction: ``RGN_l`` per byte of one input channel."""
    return stats.rgn / stats.channel_bytes


@SCORERS.register("random")
def random_score(stats: LayerStats, rng: torch.Generator) -> float:
    """A uniform random score (random layer order; the D-FullRandom arm)."""
    return float(torch.rand((), generator=rng))


SAMPLERS: dict[str, type[TopK] | type[RandomSelector] | type[ImportanceSampling]] = {
    "uniform": RandomSelector,
    "importance": ImportanceSampling,
    "topk": TopK,
    "static": TopK,
}
"""Channel samplers: ``uniform`` (TraDy), ``importance`` (MeDyate, weights ``pi``), ``topk``
(the top channel RGNs, re-evaluated each epoch) and ``static`` (the same, drawn once: S-DetRGN)."""


@dataclass(frozen=True)
class UpdatePlan:
    """Which layers train, how many input channels each epoch, and what that costs in bytes.

    Attributes:
        layers: Kept layers, best score first.
        channels: ``|S_l|`` per kept layer (``allocation="layer"``); None when one pooled draw
            per epoch decides the counts.
        channel_bytes: Bytes of one selected input channel per kept layer (``X[:, c]`` +
            ``dW[:, c]``).
        saved_bytes: Activations the step keeps with every selection empty (measured).
        fixed_grad_bytes: Gradients of the kept layers' biases and of the fully trained layers.
        channel_limit: Bytes of the selected channels: the exact cost of the counts, or the pooled
            draw's limit.
        budget_bytes: ``B_mem``.
        full_bytes: Activations + weight gradients of a full backward (every parameter trained).
        allocation: ``"layer"`` or ``"pooled"``.
    """

    layers: tuple[str, ...]
    channels: dict[str, int] | None
    channel_bytes: dict[str, int]
    saved_bytes: int
    fixed_grad_bytes: int
    channel_limit: int
    budget_bytes: int
    full_bytes: int
    allocation: Allocation

    @property
    def layer_bytes(self) -> dict[str, int]:
        """``|S_l|`` times the bytes of one channel, per kept layer (empty when pooled)."""
        counts = self.channels or {}
        return {name: k * self.channel_bytes[name] for name, k in counts.items()}

    @property
    def total_bytes(self) -> int:
        """``saved_bytes + fixed_grad_bytes + channel_limit``; never above ``budget_bytes``."""
        return self.saved_bytes + self.fixed_grad_bytes + self.channel_limit


@dataclass
class _Layer:
    """A candidate layer and its per-channel cost."""

    module: nn.Module
    channels: int
    act_bytes: int  # X[:, c], summed over the layer's calls
    grad_bytes: int  # dW[:, c]
    bias_bytes: int

    @property
    def cost(self) -> int:
        return self.act_bytes + self.grad_bytes


def _columns(weight: Tensor) -> Tensor:
    """``weight`` as ``(C_in, rest)``: one row per input channel."""
    return weight.detach().transpose(0, 1).reshape(weight.shape[1], -1)


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (independent streams per key tuple)."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


class ChannelBudget:
    """TraDy / MeDyate: train, under ``B_mem`` bytes, a per-epoch sample of input channels of the
    best-ranked layers (see the module docstring).

    Usage: ``cb = ChannelBudget(model, budget_fraction=0.05, example_input=x)``,
    ``cb.rank_layers(loader)``, ``net = cb.apply()`` (train ``net``, a folded copy of ``model``,
    with an optimizer over its ``requires_grad`` parameters), then ``cb.resample(epoch)`` at the
    start of every epoch. Channels that are not selected get an exactly zero gradient, yet still
    move under momentum or weight decay: wrap the optimizer in
    :class:`~sobre.efficient.masks.MaskedOptimizer` with :meth:`neuron_mask` (and ``set_masks``
    after each resample) to keep them bit-identical.

    Args:
        model: The pretrained model (with its new head); left unchanged.
        budget_bytes: ``B_mem`` in bytes.
        budget_fraction: ``B_mem`` as a fraction of the full backward's activation + weight-gradient
            bytes, measured on the folded model with every parameter trained.
        example_input: One training batch of inputs; the budget holds for this batch size.
        layer_scorer: ``"rgn"`` (TraDy), ``"lara"`` (MeDyate), ``"random"``, or a callable
            ``(LayerStats, Generator) -> float``.
        channel_sampler: ``"uniform"``, ``"importance"``, ``"topk"`` or ``"static"`` (see
            :data:`SAMPLERS`).
        layers: Candidate layers; default every ``nn.Conv2d`` with ``groups=1`` and every
            ``nn.Linear`` outside ``train_fully``.
        train_fully: Layers trained whole in every arm (e.g. a new classifier head), charged to
            the budget first.
        max_layers: Keep at most this many layers (TraDy's K); None: no cap.
        min_fraction: ``allocation="layer"``: a layer is kept only if every kept layer still gets
            at least this fraction of its input channels (see :meth:`plan`).
        allocation: ``"layer"``: fixed ``|S_l|`` per kept layer; ``"pooled"``: one draw over the
            channels of all kept layers per epoch (counts vary).
        resample: ``"epoch"``: a new draw each epoch; ``"never"``: the epoch-0 draw throughout.
        refresh_every: Refresh ``pi`` every this many epochs from the observed gradient columns
            of the selected channels (the others keep theirs); None: never.
        fold_bn: Fold eval-mode BatchNorm into the preceding convs (needs a traceable model).
        seed: Seed of every draw.

    Raises:
        ConfigError: A bad budget, an unknown scorer/sampler/allocation (choices listed), a layer
            name that does not exist (closest names listed), a candidate that is not a Conv2d
            with ``groups=1`` or a Linear, or an ``example_input`` the model cannot run.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        budget_bytes: int | None = None,
        budget_fraction: float | None = None,
        example_input: Tensor,
        layer_scorer: str | LayerScorer = "rgn",
        channel_sampler: str = "uniform",
        layers: Sequence[str] | None = None,
        train_fully: Sequence[str] = (),
        max_layers: int | None = None,
        min_fraction: float = 0.25,
        allocation: Allocation = "layer",
        resample: Resample = "epoch",
        refresh_every: int | None = None,
        fold_bn: bool = True,
        seed: int = 0,
    ) -> None:
        if (budget_bytes is None) == (budget_fraction is None):
            raise ConfigError(
                "pass exactly one of budget_bytes (bytes) and budget_fraction (of the full "
                f"backward's bytes); got budget_bytes={budget_bytes}, "
                f"budget_fraction={budget_fraction}"
            )
        if budget_fraction is not None and not 0 < budget_fraction <= 1:
            raise ConfigError(f"budget_fraction must lie in (0, 1], got {budget_fraction}")
        if budget_bytes is not None and budget_bytes <= 0:
            raise ConfigError(f"budget_bytes must be > 0, got {budget_bytes}")
        self.scorer: LayerScorer = (
            layer_scorer if callable(layer_scorer) else SCORERS.get(layer_scorer)
        )
        owner = type(self).__name__
        self.channel_sampler = check_choice("channel_sampler", channel_sampler, SAMPLERS, owner)
        self.allocation = check_choice("allocation", allocation, ("layer", "pooled"), owner)
        self.resample_mode = check_choice("resample", resample, ("epoch", "never"), owner)
        if max_layers is not None and max_layers < 1:
            raise ConfigError(f"max_layers must be >= 1 or None, got {max_layers}")
        if not 0 <= min_fraction <= 1:
            raise ConfigError(f"min_fraction must lie in [0, 1], got {min_fraction}")
        if refresh_every is not None and refresh_every < 1:
            raise ConfigError(f"refresh_every must be >= 1 epochs or None, got {refresh_every}")
        if not isinstance(example_input, Tensor):
            raise ConfigError(
                f"example_input must be one batch of inputs (a Tensor), got "
                f"{type(example_input).__name__}"
            )
        self.max_layers, self.min_fraction = max_layers, min_fraction
        self.refresh_every, self.seed = refresh_every, int(seed)
        self.example_input = example_input

        names = [n for n, _ in model.named_modules() if n]
        for name in (*(layers or ()), *train_fully):
            if name not in names:
                raise UnknownNameError(
                    f"{type(model).__name__} has no module {name!r}{suggest(name, names)}; "
                    "names are those of model.named_modules()"
                )
        overlap = set(layers or ()) & set(train_fully)
        if overlap:
            raise ConfigError(
                f"layers {sorted(overlap)} are both candidates and trained fully; name each "
                "layer in one of layers= and train_fully="
            )
        self.model = fold_frozen_bn(model) if fold_bn else copy.deepcopy(model)
        self._flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.train_fully = tuple(train_fully)
        full = tuple(f"{n}." for n in self.train_fully)
        inside = [
            n for n, _ in self.model.named_modules() if n in self.train_fully or n.startswith(full)
        ]
        if layers is None:
            layers = [
                n
                for n, m in self.model.named_modules()
                if type(m) in _SPARSE_TYPES and getattr(m, "groups", 1) == 1 and n not in inside
            ]
        self._layers = self._measure_layers(list(layers))
        self.full_bytes = self._full_bytes()
        if budget_bytes is None:
            assert budget_fraction is not None
            budget_bytes = math.floor(budget_fraction * self.full_bytes)
        self.budget_bytes = int(budget_bytes)
        # Every other Conv2d/Linear becomes a channel-sparse layer (dense until apply freezes it).
        sparsify(
            self.model,
            {
                n: None
                for n, m in self.model.named_modules()
                if type(m) in _SPARSE_TYPES and n not in inside
            },
        )
        with self._configured(list(self._layers)):  # the longest gradient path, nothing selected
            mask_relus(self.model, example_input[:2])
        self.stats: dict[str, LayerStats] = {}
        self.scores: dict[str, float] = {}
        self.importance: dict[str, Tensor] = {}
        self.channel_rgn: dict[str, Tensor] = {}
        self._plan: UpdatePlan | None = None
        self._applied = False
        self._selection: dict[str, Tensor] = {}
        self._epoch: int | None = None
        self._refresh: dict[str, tuple[Tensor, Tensor]] = {}

    # ----------------------------------------------------------------------------- setup

    def _measure_layers(self, names: list[str]) -> dict[str, _Layer]:
        """Per candidate: input channels and the bytes of one channel, from ``example_input``."""
        found: dict[str, _Layer] = {}
        for name in names:
            module = self.model.get_submodule(name)
            if type(module) not in _SPARSE_TYPES or getattr(module, "groups", 1) != 1:
                groups = getattr(module, "groups", 1)
                raise ConfigError(
                    f"candidate layer {name!r} is a {type(module).__name__} (groups={groups}); "
                    "input-channel selection supports nn.Conv2d with groups=1 and nn.Linear"
                )
            weight = module.weight
            columns = weight.shape[1]
            grad = weight[:, 0].numel() * weight.element_size()
            bias = module.bias
            bias_bytes = bias.numel() * bias.element_size() if bias is not None else 0
            found[name] = _Layer(module, columns, 0, grad, bias_bytes)

        def record(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                found[name].act_bytes += _input_channel_bytes(module, args[0])

            return hook

        handles = [found[n].module.register_forward_pre_hook(record(n)) for n in found]
        training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(self.example_input)
        except Exception as err:  # any shape/dtype mismatch inside the model
            raise ConfigError(
                f"example_input of shape {tuple(self.example_input.shape)} does not run through "
                f"{type(self.model).__name__} ({type(err).__name__}: {err}); pass one training "
                "batch of inputs, e.g. next(iter(loader))[0]"
            ) from None
        finally:
            self.model.train(training)
            for handle in handles:
                handle.remove()
        idle = [n for n, layer in found.items() if layer.act_bytes == 0]
        if idle:
            raise ConfigError(
                f"candidate layers {idle} are not called by the model's forward; leave them out "
                "of layers="
            )
        return found

    def _full_bytes(self) -> int:
        """Activations + weight gradients of one step with every parameter trained."""
        params = list(self.model.parameters())
        try:
            for p in params:
                p.requires_grad_(True)
            saved = saved_activation_bytes(self.model, self.example_input).activations
        finally:
            self._restore_flags()
        return saved + sum(p.numel() * p.element_size() for p in params)

    def _restore_flags(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._flags[name])

    def _trained(self, kept: Iterable[str]) -> list[Tensor]:
        """Parameters that train when ``kept`` layers are kept: their weight and bias, and
        every parameter of the fully trained layers."""
        params = [p for name in kept for p in self._layers[name].module.parameters()]
        for name in self.train_fully:
            params += list(self.model.get_submodule(name).parameters())
        return params

    def _set(self, kept: Sequence[str], selection: Mapping[str, Tensor]) -> None:
        """Freeze everything except ``kept`` (and ``train_fully``); select ``selection``'s input
        channels in the kept layers, no channel elsewhere."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self._trained(kept):
            p.requires_grad_(True)
        frozen = {
            n: torch.zeros(m.weight.shape[0], dtype=torch.bool)
            for n, m in self.model.named_modules()
            if _is_sparse(m) and n not in kept
        }
        set_trainable(self.model, frozen, {n: selection[n] for n in kept})

    @contextmanager
    def _configured(self, kept: Sequence[str]) -> Iterator[None]:
        """The training configuration of ``kept`` with every selection empty; afterwards the
        model is dense again with its original ``requires_grad`` flags."""
        empty = {n: torch.zeros(self._layers[n].channels, dtype=torch.bool) for n in kept}
        try:
            self._set(kept, empty)
            yield
        finally:
            self._restore_flags()
            set_trainable(
                self.model, {n: None for n, m in self.model.named_modules() if _is_sparse(m)}
            )

    # ----------------------------------------------------------------------------- ranking

    def rank_layers(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        *,
        max_batches: int = 4,
    ) -> dict[str, float]:
        """Score every candidate layer from full gradients on a few batches (offline stage).

        Runs the model in eval mode (frozen BN, no dropout) and accumulates, per layer,
        ``||dW_l||`` and the column norms ``||dW_l[:, c]||`` (averaged over the batches), which
        give the layer score, MeDyate's importance ``pi_{l,c}`` and the channel RGN
        ``||dW_l[:, c]|| / ||W_l[:, c]||`` of the ``static``/``topk`` samplers.

        Args:
            batches: ``(inputs, targets)`` pairs, e.g. a DataLoader of the target task.
            loss_fn: ``loss_fn(model(inputs), targets)``.
            max_batches: Read at most this many batches.

        Returns:
            Layer name -> score, best first.

        Raises:
            ConfigError: No batch, a batch that is not a pair, or called after :meth:`apply`.
        """
        if self._applied:
            raise ConfigError("rank_layers must run before apply(): the plan is fixed by then")
        if max_batches < 1:
            raise ConfigError(f"max_batches must be >= 1, got {max_batches}")
        names = list(self._layers)
        weights = [self._layers[n].module.weight for n in names]
        grad_norm = dict.fromkeys(names, 0.0)
        columns = {n: torch.zeros(self._layers[n].channels) for n in names}
        count = 0
        training = self.model.training
        try:
            self.model.eval()
            for w in weights:
                w.requires_grad_(True)
            for batch in itertools.islice(batches, max_batches):
                if not isinstance(batch, tuple | list) or len(batch) < 2:
                    raise ConfigError(
                        "rank_layers needs (inputs, targets) batches, got "
                        f"{type(batch).__name__}; pass a DataLoader of (x, y) pairs"
                    )
                loss = loss_fn(self.model(batch[0]), batch[1])
                for name, g in zip(names, torch.autograd.grad(loss, weights), strict=True):
                    grad_norm[name] += float(g.norm())
                    columns[name] += _columns(g).norm(dim=1).float().cpu()
                count += 1
        finally:
            self.model.train(training)
            self._restore_flags()
        if count == 0:
            raise ConfigError(
                "rank_layers got no batch: the loader is empty; pass a few target batches "
                "(e.g. a DataLoader over the fine-tuning set)"
            )
        rng = _generator(self.seed, 1)
        for name, w in zip(names, weights, strict=True):
            layer = self._layers[name]
            self.stats[name] = LayerStats(
                name, grad_norm[name] / count, float(w.detach().norm()), layer.channels, layer.cost
            )
            self.importance[name] = columns[name] / count
            norms = _columns(w).norm(dim=1).float().cpu()
            self.channel_rgn[name] = self.importance[name] / norms.clamp_min(1e-12)
            self.scores[name] = float(self.scorer(self.stats[name], rng))
        self.scores = dict(sorted(self.scores.items(), key=lambda kv: -kv[1]))
        self._plan = None
        return dict(self.scores)

    # ----------------------------------------------------------------------------- planning

    def _fixed(self, kept: Sequence[str]) -> tuple[int, int]:
        """(activations saved with every selection of ``kept`` empty, measured; gradient bytes
        of their biases and of the fully trained layers)."""
        with self._configured(kept):
            saved = saved_activation_bytes(self.model, self.example_input).activations
        bias = sum(self._layers[n].bias_bytes for n in kept)
        full = sum(
            p.numel() * p.element_size()
            for name in self.train_fully
            for p in self.model.get_submodule(name).parameters()
        )
        return saved, bias + full

    def plan(self) -> UpdatePlan:
        """Keep the best-scored layers that fit and split the budget into channel counts.

        Layers are taken in score order; one is kept when, with it, the measured fixed bytes
        plus one channel of every kept layer fit, up to ``max_layers``. ``allocation="layer"``
        also needs every kept layer to still get ``min_fraction`` of its channels (when no layer
        can, the best-scored one that fits is kept alone), then adds channels one at a time to
        the kept layer with the lowest selected fraction while they fit (equal fractions up to
        rounding). ``"pooled"`` needs the cheapest channel of the kept layers to fit and leaves
        the rest of the budget to each epoch's draw.

        Raises:
            ConfigError: :meth:`rank_layers` has not run, or the budget is below the smallest
                trainable unit (the layer and the bytes it needs are named).
        """
        if self._plan is not None:
            return self._plan
        if not self.scores:
            raise ConfigError("call rank_layers(batches) before plan(): layers are kept by score")
        order = sorted(self._layers, key=lambda n: -self.scores[n])
        kept: list[str] = []
        best: tuple[int, int, dict[str, int] | None] | None = None
        fallback: tuple[list[str], tuple[int, int, dict[str, int] | None]] | None = None
        for name in order:
            if self.max_layers is not None and len(kept) == self.max_layers:
                break
            trial = [*kept, name]
            saved, grads = self._fixed(trial)
            limit = self.budget_bytes - saved - grads
            if self.allocation == "pooled":
                if limit >= min(self._layers[n].cost for n in trial):
                    kept, best = trial, (saved, grads, None)
                continue
            counts = self._fill(trial, limit)
            if counts is None:
                continue
            fallback = fallback or (trial, (saved, grads, counts))
            if min(counts[n] / self._layers[n].channels for n in trial) >= self.min_fraction:
                kept, best = trial, (saved, grads, counts)
        if best is None and fallback is not None:  # no layer reaches min_fraction
            kept, best = fallback
        if best is None:
            raise self._too_small(order)
        saved, grads, counts = best
        costs = {n: self._layers[n].cost for n in kept}
        if counts is None:
            limit = self.budget_bytes - saved - grads
        else:
            limit = sum(k * costs[n] for n, k in counts.items())
        self._plan = UpdatePlan(
            layers=tuple(kept),
            channels=counts,
            channel_bytes=costs,
            saved_bytes=saved,
            fixed_grad_bytes=grads,
            channel_limit=limit,
            budget_bytes=self.budget_bytes,
            full_bytes=self.full_bytes,
            allocation=self.allocation,
        )
        return self._plan

    def _fill(self, kept: list[str], limit: int) -> dict[str, int] | None:
        """One channel per layer, then one more to the layer with the lowest selected fraction
        (ties: the better-scored) while it fits; None if one channel each does not fit."""
        layers = [self._layers[n] for n in kept]
        spent = sum(layer.cost for layer in layers)
        if spent > limit:
            return None
        counts = [1] * len(layers)
        while True:
            open_ = [
                (counts[i] / layer.channels, i)
                for i, layer in enumerate(layers)
                if counts[i] < layer.channels and spent + layer.cost <= limit
            ]
            if not open_:
                return dict(zip(kept, counts, strict=True))
            _, i = min(open_)
            counts[i] += 1
            spent += layers[i].cost

    def _too_small(self, order: list[str]) -> ConfigError:
        """The error of a budget below every layer's smallest trainable unit."""
        needs = []
        for name in order:
            saved, grads = self._fixed([name])
            needs.append((saved + grads + self._layers[name].cost, name, saved, grads))
        need, name, saved, grads = min(needs)
        layer = self._layers[name]
        return ConfigError(
            f"the budget of {self.budget_bytes} bytes is smaller than the smallest trainable "
            f"unit: layer {name!r} needs {need} bytes ({saved} of activations the step keeps "
            f"anyway + {grads} of bias/fully-trained gradients + {layer.cost} for one input "
            f"channel: {layer.act_bytes} of X[:, c] and {layer.grad_bytes} of dW[:, c]); raise "
            f"budget_bytes to at least {need} (budget_fraction "
            f"{need / self.full_bytes:.4f} of the full {self.full_bytes} bytes)"
        )

    # ----------------------------------------------------------------------------- training

    def apply(self) -> nn.Module:
        """Prepare the model for memory-bounded training and draw the epoch-0 channels (or
        install those a loaded state holds).

        The kept layers train their weight (the selected input columns) and bias, the
        ``train_fully`` layers everything; every other parameter gets ``requires_grad=False``.
        The measured saved activations are checked against the plan.

        Returns:
            The model to train: the copy (folded) made at construction, the same object on
            every call; the model passed to the constructor is never changed.

        Raises:
            ConfigError: As :meth:`plan`, or (a bug, please report) a step that keeps more bytes
                than planned.
        """
        plan = self.plan()
        if not self._applied:
            self._applied = True
            if self.refresh_every is not None:
                for name in plan.layers:
                    self._layers[name].module.weight.register_post_accumulate_grad_hook(
                        self._observer(name)
                    )
            if self._selection:  # restored by load_state_dict
                self._set(plan.layers, self._selection)
            else:
                self.resample(0)
            self._check(plan)
        return self.model

    def _observer(self, name: str) -> Callable[[Tensor], None]:
        """Post-accumulate-grad hook: add the selected columns' gradient norms to the refresh
        sums of ``name``."""

        def observe(weight: Tensor) -> None:
            if weight.grad is None:
                return
            chosen = self._selection[name]
            total, seen = self._refresh.setdefault(
                name, (torch.zeros(chosen.numel()), torch.zeros(chosen.numel()))
            )
            total += _columns(weight.grad).norm(dim=1).float().cpu() * chosen
            seen += chosen

        return observe

    def resample(self, epoch: int) -> dict[str, Tensor]:
        """Draw the input channels ``S_l`` of every kept layer for ``epoch`` and install them.

        The draw depends only on ``(seed, epoch)`` and the importances, so calling it again for
        the same epoch, or in a resumed run, gives the same channels. ``static`` keeps the first
        draw; so does ``resample="never"``. With ``refresh_every``, ``pi`` of the channels seen
        since the last refresh becomes the mean of their observed gradient-column norms first.

        Args:
            epoch: The epoch about to start (>= 0).

        Returns:
            Layer name -> bool mask over its input channels (a copy).

        Raises:
            ConfigError: Before :meth:`apply`, or a negative epoch.
        """
        if not self._applied:
            raise ConfigError("call apply() before resample(): it swaps in the sparse layers")
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        plan = self.plan()
        if self.refresh_every and epoch > 0 and epoch % self.refresh_every == 0:
            self._refresh_importance()
        fixed = self.channel_sampler == "static" or self.resample_mode == "never"
        if not (fixed and self._selection):
            self._selection = self._draw(plan, epoch)
        self._epoch = epoch
        self._set(plan.layers, self._selection)
        if any(bool(s.all()) for s in self._selection.values()):
            self._check(plan)  # a fully selected layer saves its input as is: measure it
        return {name: s.clone() for name, s in self._selection.items()}

    def _refresh_importance(self) -> None:
        for name, (total, seen) in self._refresh.items():
            hit = seen > 0
            self.importance[name][hit] = total[hit] / seen[hit]
        self._refresh = {}

    def _draw(self, plan: UpdatePlan, epoch: int) -> dict[str, Tensor]:
        """One draw of every kept layer's channels with the configured selector."""
        rng = _generator(self.seed, 0, epoch)
        selector: ChannelSelector
        if self.channel_sampler == "importance":
            scores = {n: self.importance[n] for n in plan.layers}
        elif self.channel_sampler in ("topk", "static"):
            scores = {n: self.channel_rgn[n] for n in plan.layers}
        else:
            scores = {n: torch.zeros(self._layers[n].channels) for n in plan.layers}
        costs = {
            n: torch.full((self._layers[n].channels,), c) for n, c in plan.channel_bytes.items()
        }
        if plan.channels is None:
            selector = SAMPLERS[self.channel_sampler](fill="skip")
            return selector.select(scores, Budget(plan.channel_limit, costs, "bytes"), rng)
        selector = SAMPLERS[self.channel_sampler](fill="stop")
        chosen: dict[str, Tensor] = {}
        for name, k in plan.channels.items():
            budget = Budget(k * plan.channel_bytes[name], {name: costs[name]}, "bytes")
            chosen.update(selector.select({name: scores[name]}, budget, rng))
        return chosen

    def _check(self, plan: UpdatePlan) -> None:
        """Raise if the measured step keeps more than the plan allows."""
        saved = self.measured_bytes().activations
        chosen = sum(int(s.sum()) * self._layers[n].act_bytes for n, s in self._selection.items())
        if saved > plan.saved_bytes + chosen:
            raise ConfigError(
                f"a training step keeps {saved} bytes of activations, more than the "
                f"{plan.saved_bytes + chosen} planned ({plan.saved_bytes} measured with no "
                f"channel selected + {chosen} for X[:, S_l]); an op of this model saves the "
                "selected layers' inputs in another way: leave those layers out of layers="
            )

    def measured_bytes(self, inputs: Tensor | None = None) -> SavedBytes:
        """What one training forward of the model keeps for backward, measured with
        :func:`~sobre.core.measure.saved_activation_bytes` (default input: ``example_input``)."""
        return saved_activation_bytes(self.model, self.example_input if inputs is None else inputs)

    @property
    def epoch(self) -> int | None:
        """The epoch of the selection in force (None before :meth:`apply`)."""
        return self._epoch

    def selection(self) -> dict[str, Tensor]:
        """The input channels in force: layer -> bool mask (a copy)."""
        return {name: s.clone() for name, s in self._selection.items()}

    def neuron_mask(self) -> NeuronMask:
        """The selection as a :class:`~sobre.efficient.masks.NeuronMask` over input channels
        (biases train), for :class:`~sobre.efficient.masks.MaskedOptimizer`."""
        if not self._selection:
            raise ConfigError("no selection yet: call apply() first")
        return NeuronMask(self._selection, dim="in", in_bias="train")

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything later draws depend on: seed, last epoch, the ranking (layer statistics and
        scores, channel RGNs), the importances ``pi`` with their refresh sums, and the selection
        in force."""
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "stats": {n: asdict(s) for n, s in self.stats.items()},
            "scores": dict(self.scores),
            "importance": {n: t.clone() for n, t in self.importance.items()},
            "channel_rgn": {n: t.clone() for n, t in self.channel_rgn.items()},
            "refresh": {n: (a.clone(), b.clone()) for n, (a, b) in self._refresh.items()},
            "selection": self.selection(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s content, so that the plan and every later
        :meth:`resample` are those of the saved run.

        To resume: build the ChannelBudget with the same arguments (from the pretrained model),
        call this instead of :meth:`rank_layers` (the ranking is restored, not recomputed on
        the trained weights), call :meth:`apply`, which installs the saved selection, and load
        the checkpoint's weights into the model it returns.

        Raises:
            ConfigError: Missing keys, layers that are not this budget's candidates, or (after
                :meth:`apply`) a selection of other layers than the plan keeps.
        """
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ConfigError(f"ChannelBudget state lacks {sorted(missing)}; pass state_dict()")
        unknown = set(state["scores"]) - set(self._layers)
        if unknown:
            raise ConfigError(
                f"the state ranks layers {sorted(unknown)} that are not candidates of this "
                "budget; build the ChannelBudget with the same model and layers"
            )
        if self._applied and set(state["selection"]) != set(self.plan().layers):
            raise ConfigError(
                f"the state selects layers {sorted(state['selection'])} but this plan keeps "
                f"{sorted(self.plan().layers)}; load the state before apply()"
            )
        self.seed, self._epoch = int(state["seed"]), state["epoch"]
        self.stats = {n: LayerStats(**s) for n, s in state["stats"].items()}
        self.scores = dict(state["scores"])
        self.importance = {n: t.clone() for n, t in state["importance"].items()}
        self.channel_rgn = {n: t.clone() for n, t in state["channel_rgn"].items()}
        self._refresh = {n: (a.clone(), b.clone()) for n, (a, b) in state["refresh"].items()}
        self._selection = {n: s.clone().bool() for n, s in state["selection"].items()}
        if self._applied:
            self._set(self.plan().layers, self._selection)
        else:
            self._plan = None


def _is_sparse(module: nn.Module) -> bool:
    """A channel-sparse layer (it carries the selection buffers)."""
    return hasattr(module, "trainable_out") and hasattr(module, "trainable_in")


def _input_channel_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes of one input channel of ``x`` as the channel-sparse layer saves it: a Conv2d that
    pads before convolving (``padding="same"`` or a non-zero padding mode) saves the padded
    input."""
    if isinstance(module, nn.Linear):
        return x.numel() // x.shape[-1] * x.element_size()
    conv: Any = module
    h, w = x.shape[-2:]
    if conv.padding_mode != "zeros" or conv.padding == "same":
        left, right, top, bottom = conv._reversed_padding_repeated_twice
        h, w = h + top + bottom, w + left + right
    return x.numel() // (x.shape[-3] * x.shape[-2] * x.shape[-1]) * h * w * x.element_size()
