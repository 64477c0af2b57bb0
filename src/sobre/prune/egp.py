"""Entropy-guided pruning (EGP, spec §1) and its depth-reducing variant NEPENTHE (§2).

One round of :meth:`EntropyGuidedPruner.step`, run after (re)training:

1. measure the layer entropy ``H̄_l`` of every activation site on the training data (eval mode,
   :class:`~sobre.prune.entropy.ActivationEntropy`);
2. *linearise* the sites with ``H̄_l <= eps`` (:func:`~sobre.prune.surgery.linearize`: neurons
   always OFF are masked, the others pass as identity) — they leave the pruning pool;
3. prune ``amount`` of the pool's live weights with one global threshold on the score
   ``|w| * exp((H̄_l - max_k H̄_k) / tau)`` (spec §1.2, our default: the paper's budget split
   could not be read), so that low-entropy layers lose weights first and reach zero entropy.

**Layer -> site.** The entropy that weights a layer is the one of the site it *feeds* (its output
reaches the site through batch norm, identity, dropout, pooling, flatten/view or a
:class:`~sobre.prune.surgery.ChannelGate`), or failing that the site it *consumes* (its input
comes from the site through the same ops): in ``x + fc2(relu(fc1(x)))`` both ``fc1`` and ``fc2``
belong to ``relu``, and a conv-BN-ReLU layer to its ReLU. Found by following tensors through one
eval forward of an example batch (:func:`layer_sites`): leaf modules are watched with hooks, the
torch ops between them with a torch function mode, so it works on models ``torch.fx`` cannot
trace. A layer tied to no site (a stem read by a residual sum, a classifier after a sum) keeps
plain magnitude scores (factor 1, as the highest-entropy layer). Layers of linearised sites leave
the pool: they are what :func:`~sobre.prune.surgery.fold_linear` merges afterwards.

**Zero entropy is not always exactly constant.** ``H̄_l <= eps`` can hide a few neurons that
switch on a handful of inputs (one flip in 4,000 inputs costs 0.003 bit); such a neuron gets
``keep = p_on > 0.5`` (its majority state), which is exact on every input except those few.
:attr:`EGPReport.inexact` counts them per site; ``eps=0`` linearises only exactly-constant sites.

**NEPENTHE** (``variant="nepenthe"``) is the same loop with an accuracy tolerance: stop when the
validation accuracy falls more than ``delta`` points below the dense model's, and keep the last
model inside the tolerance. In a user loop::

    pruner = EntropyGuidedPruner(variant="nepenthe", delta=1.0, exclude=("stem", "classifier"))
    dense_acc = evaluate(model, val)
    while True:
        candidate, report = pruner.step(copy.deepcopy(model), train_loader)
        finetune(candidate)
        if pruner.should_stop(evaluate(candidate, val), dense_acc):
            break
        model = candidate          # the last model inside the tolerance

In a recipe the pruner is a stage transform (:meth:`~EntropyGuidedPruner.apply`,
:meth:`~EntropyGuidedPruner.report`) on a stage with ``repeat: k``; every stage stores its
``val/acc`` and this report in ``metrics.json``, and :meth:`~EntropyGuidedPruner.select` picks
the last stage inside the tolerance from those accuracies (same criterion as ``should_stop``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _MaxPoolNd,
)
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from sobre.core.edits import edit_log
from sobre.core.errors import ConfigError, SobreError
from sobre.core.measure import model_device
from sobre.core.registry import check_choice
from sobre.prune.entropy import ActivationEntropy, EntropyReport, Estimator, Neuron
from sobre.prune.imp import DEFAULT_TARGETS, MagnitudePruner, global_sparsity, target_modules
from sobre.prune.sites import find_sites, uniquify_activations
from sobre.prune.surgery import ChannelGate, get_module, linearize

log = logging.getLogger(__name__)

__all__ = ["VARIANTS", "EGPReport", "EntropyGuidedPruner", "layer_sites"]

Variant = Literal["egp", "nepenthe"]
VARIANTS: tuple[str, ...] = ("egp", "nepenthe")

# Ops a layer reaches its site through: they keep the channels apart (no mixing, no sum).
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    nn.Identity,
    _DropoutNd,
    ChannelGate,
    _MaxPoolNd,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    nn.Flatten,
)
_PASS_FUNCTIONS: frozenset[str] = frozenset(
    {"flatten", "reshape", "view", "contiguous", "dropout", "batch_norm"}
)
_PASS_PREFIXES: tuple[str, ...] = ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")


# --------------------------------------------------------------------------- layer -> site


@dataclass
class _Node:
    """One call in the recorded forward: a leaf module (``module`` set) or a torch op."""

    label: str
    module: str | None
    passes: bool
    args: list[int | None]  # producing node of each tensor input (None: input, parameter, ...)
    users: list[int] = field(default_factory=list)


class _Dataflow(TorchFunctionMode):
    """Records one forward as a graph of leaf-module calls and the torch ops between them.

    Tensors are followed by identity (strong references keep the ids valid); an in-place op
    becomes the new producer of the tensor it returns, so ``out += skip`` breaks a chain.
    """

    def __init__(self, sites: set[str]) -> None:
        super().__init__()
        self.sites = sites
        self.nodes: list[_Node] = []
        self.ranks: dict[str, int] = {}  # site -> rank of its input
        self._producer: dict[int, int] = {}
        self._alive: list[Tensor] = []
        self._stack: list[list[int | None]] = []

    def _inputs(self, values: Any) -> list[Tensor]:
        return [t for t in tree_leaves(values) if isinstance(t, Tensor)]

    def _record(self, node: _Node, out: Any) -> None:
        index = len(self.nodes)
        self.nodes.append(node)
        for arg in node.args:
            if arg is not None:
                self.nodes[arg].users.append(index)
        for t in self._inputs(out):
            self._producer[id(t)] = index
            self._alive.append(t)

    def pre_hook(self, name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        inputs = self._inputs((args, kwargs))
        if not self._stack and name in self.sites and inputs:
            self.ranks.setdefault(name, inputs[0].ndim)
        self._stack.append([self._producer.get(id(t)) for t in inputs])

    def hook(self, name: str, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        producers = self._stack.pop()
        if not self._stack:
            passes = isinstance(module, _PASS_MODULES)
            self._record(_Node(name, name, passes, producers), out)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._stack:
            outputs = self._inputs(out)
            if outputs:
                name = getattr(func, "__name__", str(func)).lstrip("_")
                passes = name in _PASS_FUNCTIONS or name.startswith(_PASS_PREFIXES)
                producers = [self._producer.get(id(t)) for t in self._inputs((args, kwargs))]
                self._record(_Node(name, None, passes, producers), out)
        return out

    def feeds(self, start: int) -> str | None:
        """The first site reached from node ``start``'s output through pass-through ops."""
        frontier, seen = [start], {start}
        while frontier:
            nxt = []
            for index in frontier:
                for user in self.nodes[index].users:
                    node = self.nodes[user]
                    if node.module in self.sites:
                        return node.module
                    if node.passes and node.args[:1] == [index] and user not in seen:
                        seen.add(user)
                        nxt.append(user)
            frontier = nxt
        return None

    def consumes(self, start: int) -> str | None:
        """The site whose output reaches node ``start``'s first input through pass-through ops."""
        args = self.nodes[start].args
        producer = args[0] if args else None
        while producer is not None:
            node = self.nodes[producer]
            if node.module in self.sites:
                return node.module
            if not node.passes or not node.args:
                return None
            producer = node.args[0]
        return None


def _leaves(model: nn.Module, keep: set[str]) -> list[tuple[str, nn.Module]]:
    """Modules watched as a whole: no children, masked (parametrized), or named in ``keep``."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{leaf}.") for leaf, _ in out):
            continue
        if (
            name in keep
            or parametrize.is_parametrized(module)
            or next(module.children(), None) is None
        ):
            out.append((name, module))
    return out


def _probe(model: nn.Module, example: Any, sites: set[str], layers: set[str]) -> _Dataflow:
    """Record one eval, no-grad forward of ``example`` (train flags restored)."""
    flow = _Dataflow(sites)
    handles = []
    for name, module in _leaves(model, sites | layers):
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, k, name=name: flow.pre_hook(name, m, a, k), with_kwargs=True
            )
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, k, o, name=name: flow.hook(name, m, a, k, o), with_kwargs=True
            )
        )
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), flow:
            model(*(example if isinstance(example, tuple) else (example,)))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in flags:
            m.training = training
    return flow


def _map(flow: _Dataflow, layers: Iterable[str]) -> dict[str, str | None]:
    first = {}
    for index, node in enumerate(flow.nodes):
        if node.module is not None:
            first.setdefault(node.module, index)
    out: dict[str, str | None] = {}
    for name in layers:
        index = first.get(name)
        out[name] = None if index is None else flow.feeds(index) or flow.consumes(index)
    return out


def _linearized(model: nn.Module) -> list[str]:
    """Sites made linear by recorded ``linearize`` edits that still exist, oldest first."""
    names = dict(model.named_modules())
    sites = [e["params"]["site"] for e in edit_log(model) if e["op"] == "linearize"]
    return [s for s in dict.fromkeys(sites) if s in names]


def layer_sites(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...],
    *,
    targets: tuple[type[nn.Module], ...] = DEFAULT_TARGETS,
    exclude: Sequence[str] = (),
    sites: Sequence[str] | None = None,
) -> dict[str, str | None]:
    """The activation site whose entropy weights each target layer (``None``: no site).

    A layer maps to the site it feeds (through BN, identity, dropout, pooling, flatten/view,
    ChannelGate), else to the site it consumes (through the same ops); see the module docstring.
    Found on one eval forward of ``example_inputs`` (a tensor, or a tuple of positional
    arguments); a layer that does not run maps to ``None``.

    Args:
        model: The model; its train/eval flags are restored.
        example_inputs: One (small) batch.
        targets: Layer classes (as :class:`~sobre.prune.imp.MagnitudePruner`).
        exclude: Layer names or globs left out (as ``MagnitudePruner``).
        sites: Site module names; default: the model's activation sites plus the sites made
            linear by earlier ``linearize`` edits.

    Raises:
        ConfigError: No target layer (see :func:`~sobre.prune.imp.target_modules`) or a site
            name that is not a module of ``model``.
    """
    layers = list(target_modules(model, targets, exclude))
    if sites is None:
        names = [s.name for s in find_sites(model)] + _linearized(model)
    else:
        names = list(sites)
        for site in names:
            get_module(model, site)  # an unknown site fails with the closest module names
    return _map(_probe(model, example_inputs, set(names), set(layers)), layers)


# --------------------------------------------------------------------------- the pruner


@dataclass(frozen=True)
class EGPReport:
    """What one :meth:`EntropyGuidedPruner.step` did.

    Attributes:
        round: 1 for the first call of ``step`` on this pruner.
        variant: ``"egp"`` or ``"nepenthe"``.
        sparsity: Zero fraction of the target layers' weights after the round (user ``exclude``
            applied; layers of linearised sites included).
        pruned: Weights masked this round.
        entropy: Per activation site, ``H̄_l`` in bits measured this round (before linearising).
        linearized: Sites linearised this round.
        linearized_total: Every linearised site of the model (this round's included).
        inexact: Per site linearised this round, its neurons that were neither always ON nor
            always OFF (kept as ``p_on > 0.5``; 0 means the edit is exact on the data).
        skipped: Sites at zero entropy that ``linearize`` cannot handle (not a ReLU, ReLU6,
            GELU or SiLU module); they stay in the pool.
        layers: Per target layer: ``site`` (or ``None``), ``factor`` (score multiplier
            ``exp((H̄ - max H̄) / tau)``; ``None`` once the layer left the pool) and
            ``sparsity``.
    """

    round: int
    variant: str
    sparsity: float
    pruned: int
    entropy: dict[str, float]
    linearized: list[str]
    linearized_total: list[str]
    inexact: dict[str, int]
    skipped: list[str]
    layers: dict[str, dict[str, Any]]

    @property
    def pool(self) -> list[str]:
        """The layers pruned this round."""
        return [name for name, layer in self.layers.items() if layer["factor"] is not None]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (numbers, strings, lists, ``None``)."""
        return {
            "round": self.round,
            "variant": self.variant,
            "sparsity": self.sparsity,
            "pruned": self.pruned,
            "entropy": dict(self.entropy),
            "linearized": list(self.linearized),
            "linearized_total": list(self.linearized_total),
            "removed": len(self.linearized_total),
            "inexact": dict(self.inexact),
            "skipped": list(self.skipped),
            "pool": self.pool,
            "layers": {name: dict(layer) for name, layer in self.layers.items()},
        }


def _first_input(loader: Iterable[Any]) -> Any:
    for batch in loader:
        return batch[0] if isinstance(batch, tuple | list) else batch
    raise SobreError("EntropyGuidedPruner.step: the loader yielded no batch")


def _fraction(value: float, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(
            f"{arg} must be an accuracy fraction in [0, 1] (e.g. 0.945, not 94.5), got {value!r}"
        )
    return float(value)


class EntropyGuidedPruner:
    """EGP (spec §1) / NEPENTHE (§2): entropy-weighted IMP that linearises zero-entropy sites.

    Args:
        amount: Fraction in (0, 1) of the pool's live weights pruned per round (group default
            0.2; sparsity after ``r`` rounds is ``1 - 0.8^r`` while the pool is unchanged).
        tau: Temperature of the score ``|w| * exp((H̄_l - max_k H̄_k) / tau)`` (default 0.05);
            ``float("inf")`` gives plain magnitude scores (linearisation still happens).
        eps: Sites with ``H̄_l <= eps`` bits are linearised (default 1e-3).
        neuron: ``"channel"`` or ``"unit"`` (see :class:`~sobre.prune.entropy.ActivationEntropy`).
        estimator: ``"dataset"`` or ``"batch_mean"``.
        variant: ``"egp"`` or ``"nepenthe"`` (adds the accuracy tolerance ``delta``).
        delta: NEPENTHE's tolerance in accuracy points (default 1.0).
        targets: Layer classes pruned (default Conv2d and Linear).
        exclude: Layer names or fnmatch globs never pruned (e.g. ``("stem", "classifier")``).
        max_batches: Batches of the loader used to measure entropy (default: all).

    Raises:
        ConfigError: ``amount`` outside (0, 1), ``tau <= 0``, ``eps < 0``, ``delta < 0``, or an
            unknown ``variant``, ``neuron``, ``estimator``.
    """

    def __init__(
        self,
        amount: float = 0.2,
        tau: float = 0.05,
        eps: float = 1e-3,
        neuron: Neuron = "channel",
        estimator: Estimator = "dataset",
        variant: Variant = "egp",
        delta: float = 1.0,
        targets: tuple[type[nn.Module], ...] = DEFAULT_TARGETS,
        exclude: Sequence[str] = (),
        max_batches: int | None = None,
    ) -> None:
        for arg, value, low in (("tau", tau, 0.0), ("eps", eps, None), ("delta", delta, None)):
            bad = isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value)
            if bad or (low is not None and value <= low) or (low is None and value < 0):
                need = "> 0" if low is not None else ">= 0"
                raise ConfigError(f"{arg} must be a number {need}, got {value!r}")
        check_choice("variant", variant, VARIANTS, "EntropyGuidedPruner")
        if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
            raise ConfigError(f"max_batches must be an integer >= 1 (or None), got {max_batches!r}")
        # Both check their arguments on construction: bad ones fail before the first round.
        base = MagnitudePruner(amount, "global", targets, exclude)
        self.entropy = ActivationEntropy("auto", neuron, estimator)
        self.amount = base.amount
        self.tau = float(tau)
        self.eps = float(eps)
        self.variant = variant
        self.delta = float(delta)
        self.targets = base.targets
        self.exclude = base.exclude
        self.max_batches = max_batches
        self.rounds = 0
        self._last: EGPReport | None = None

    # ----------------------------------------------------------------- one round

    def step(self, model: nn.Module, loader: Iterable[Any]) -> tuple[nn.Module, EGPReport]:
        """One round after (re)training: entropy, linearisation, entropy-weighted pruning.

        Pruning happens in place on the returned model. When a site is linearised (or the
        activations are uniquified) that is a new copy and ``model`` is left untouched;
        otherwise it is ``model`` itself. Continue with the returned model (and a new optimizer
        when it is a copy).

        Args:
            model: The trained model.
            loader: The training data (yields ``(x, y, ...)`` or ``x``), iterated twice: its
                first batch maps layers to sites, then the whole of it (or ``max_batches``)
                measures entropy. Entropy counts are all-reduced over ranks and the scores are
                functions of the weights, so every rank takes the same decision.

        Raises:
            ConfigError: No target layer, or bad sites (see ``ActivationEntropy``).
            SobreError: The loader is empty.
        """
        if any(not s.unique for s in find_sites(model)):
            log.info(
                "EGP: %s has activation modules shared by several call sites or functional "
                "activations; giving each site its own module (uniquify_activations)",
                type(model).__name__,
            )
            model = uniquify_activations(model)
        example = _first_input(loader)
        if isinstance(example, Tensor):
            example = example.to(model_device(model))
        live_sites = [s.name for s in find_sites(model)]
        before = _linearized(model)
        layers = list(target_modules(model, self.targets, self.exclude))
        flow = _probe(model, example, set(live_sites + before), set(layers))
        mapping = _map(flow, layers)
        report = (
            self.entropy.compute(model, loader, max_batches=self.max_batches)
            if live_sites
            else None
        )
        entropy = dict(report.layer_entropy) if report is not None else {}
        model, linearized, inexact, skipped = self._linearize(model, report, flow.ranks)
        gone = set(before) | set(linearized)
        top = max(entropy.values(), default=0.0)
        factors: dict[str, float | None] = {}
        for name in layers:
            site = mapping[name]
            if site in gone:
                factors[name] = None
            else:
                factors[name] = 1.0 if site is None else math.exp((entropy[site] - top) / self.tau)
        pool = [name for name, f in factors.items() if f is not None]
        pruned = 0
        if pool:
            pruner = MagnitudePruner(
                self.amount,
                "global",
                self.targets,
                (*self.exclude, *(n for n in layers if factors[n] is None)),
                score=lambda name, w: w.abs() * factors[name],
            )
            pruned = pruner.step(model).pruned
        else:
            log.info("EGP: every target layer belongs to a linearised site; nothing to prune")
        self.rounds += 1
        modules = dict(model.named_modules())
        with torch.no_grad():
            per_layer = {
                name: {
                    "site": mapping[name],
                    "factor": factors[name],
                    "sparsity": float((modules[name].weight == 0).double().mean()),
                }
                for name in layers
            }
        self._last = EGPReport(
            round=self.rounds,
            variant=self.variant,
            sparsity=global_sparsity(model, self.targets, self.exclude),
            pruned=pruned,
            entropy=entropy,
            linearized=linearized,
            linearized_total=[*before, *linearized],
            inexact=inexact,
            skipped=skipped,
            layers=per_layer,
        )
        log.info(
            "EGP round %d: sparsity %.4f, linearised %s (%d in total)",
            self.rounds,
            self._last.sparsity,
            linearized,
            len(self._last.linearized_total),
        )
        return model, self._last

    def _linearize(
        self, model: nn.Module, report: EntropyReport | None, ranks: dict[str, int]
    ) -> tuple[nn.Module, list[str], dict[str, int], list[str]]:
        """Linearise the zero-entropy sites: keep = ``p_on > 0.5`` per neuron."""
        linearized: list[str] = []
        inexact: dict[str, int] = {}
        skipped: list[str] = []
        if report is None:
            return model, linearized, inexact, skipped
        for site in report.zero_entropy_sites(self.eps):
            p = report.p_on[site]
            keep = (p > 0.5).to(torch.int64).tolist()
            tokens = self.entropy.neuron == "channel" and ranks.get(site) == 3
            try:
                model = linearize(model, site=site, keep=keep, channel_dim=-1 if tokens else 1)
            except ConfigError as err:
                log.warning("EGP: zero-entropy site %r is kept non-linear: %s", site, err)
                skipped.append(site)
                continue
            linearized.append(site)
            inexact[site] = int(((p > 0) & (p < 1)).sum())
            if inexact[site]:
                log.info(
                    "EGP: site %r linearised with %d neurons that switch on some inputs "
                    "(kept in their majority state)",
                    site,
                    inexact[site],
                )
        return model, linearized, inexact, skipped

    # ----------------------------------------------------------------- NEPENTHE

    def _tolerance(self) -> float:
        if self.variant != "nepenthe":
            raise ConfigError(
                "the accuracy tolerance belongs to NEPENTHE: build the pruner with "
                "variant='nepenthe' (and delta, in accuracy points)"
            )
        return self.delta

    def should_stop(self, val_acc: float, dense_acc: float) -> bool:
        """NEPENTHE's stop rule: the validation accuracy fell more than ``delta`` points below
        the dense model's. Accuracies are fractions in [0, 1]; ``delta`` is in points.

        Raises:
            ConfigError: ``variant="egp"``, or an accuracy outside [0, 1].
        """
        delta = self._tolerance()
        drop = 100.0 * (_fraction(dense_acc, "dense_acc") - _fraction(val_acc, "val_acc"))
        return drop > delta + 1e-9  # exactly delta points is inside (accuracies are k / n)

    def select(self, val_accs: Sequence[float], dense_acc: float) -> int:
        """How many rounds to keep: the last round before the first one that ``should_stop``
        (0: the dense model). For recipes, from the per-stage ``val/acc`` in ``metrics.json``.

        Raises:
            ConfigError: ``variant="egp"``, or an accuracy outside [0, 1].
        """
        for index, acc in enumerate(val_accs):
            if self.should_stop(acc, dense_acc):
                return index
        return len(val_accs)

    # ----------------------------------------------------------------- stage transform

    def apply(self, model: nn.Module, loader: Iterable[Any]) -> nn.Module:
        """Stage transform: one :meth:`step`; returns the edited model."""
        return self.step(model, loader)[0]

    def report(self) -> dict[str, Any]:
        """The last round's report as a JSON-able dict (``{}`` before the first round)."""
        return self._last.to_dict() if self._last is not None else {}
