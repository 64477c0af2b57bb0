"""Iterative magnitude pruning (IMP) on the core weight masks, with the four retraining modes.

One round of IMP (Han et al., 2015; Frankle & Carbin, 2019) masks the ``amount`` fraction of the
*live* (still unmasked) weights with the smallest score, by default ``|w|`` (L1, unstructured):
``k = round(amount * live)`` weights go per round, the semantics of ``torch.nn.utils.prune``, so
after ``r`` rounds the sparsity is ``1 - (1 - amount)^r`` up to rounding. ``scope="global"`` takes
one threshold over all target layers, ``"local"`` the same fraction in every layer. Masks are
``sobre.core.masks`` weight masks: saved in the ``state_dict``, restored with ``restore_masks``,
and a masked weight gets zero gradient and never comes back.

Between rounds the network is retrained (spec §0, used by EGP §1, NEPENTHE §2 and DSD² §5):
:class:`Rewinder` implements fine-tuning, learning-rate rewinding (Renda et al., 2020: same
weights, fresh optimizer and schedule, the DSD² code's choice), weight rewinding to the weights of
epoch ``k`` (Frankle et al., 2020; ``k = 0`` is the lottery-ticket rewind to the initialisation) and
re-initialisation (Liu et al., 2019). :class:`IMPSchedule` runs rounds from a training loop's epoch
ends (the :class:`~sobre.core.methods.EpochHook` protocol) and resumes from its ``state_dict``.

Every rank takes the same decision without communication: the scores are functions of the weights,
which data-parallel training keeps identical on every rank, and ties are broken by position. A
custom ``score`` must be rank-identical too (all-reduce its statistics with ``sobre.core.dist``).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sobre.core.errors import ConfigError
from sobre.core.masks import attach_mask, get_mask, iter_masks
from sobre.core.registry import check_choice, suggest
from sobre.core.weights import fresh_weights

_log = logging.getLogger(__name__)

Scope = Literal["global", "local"]
RewindMode = Literal["finetune", "lr_rewind", "weight_rewind", "reinit"]
ScoreFn = Callable[[str, Tensor], Tensor]

SCOPES: tuple[str, ...] = ("global", "local")
REWIND_MODES: tuple[str, ...] = ("finetune", "lr_rewind", "weight_rewind", "reinit")
DEFAULT_TARGETS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

_ORIGINAL = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _check_targets(targets: tuple[type[nn.Module], ...]) -> tuple[type[nn.Module], ...]:
    targets = tuple(targets)
    bad = [t for t in targets if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if not targets or bad:
        raise ConfigError(
            f"targets must be a non-empty tuple of nn.Module classes such as "
            f"(nn.Conv2d, nn.Linear), got {targets!r}"
        )
    return targets


def _has_weight(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") or isinstance(
        module._parameters.get("weight"), Tensor
    )


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` or one of its ancestors matches one of the fnmatch ``patterns``."""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatchcase(s, p) for s in scopes for p in patterns)


def target_modules(
    model: nn.Module,
    targets: tuple[type[nn.Module], ...] = DEFAULT_TARGETS,
    exclude: Sequence[str] = (),
) -> dict[str, nn.Module]:
    """The modules of ``model`` that IMP prunes, by name, in ``named_modules`` order.

    A module is a target when it is an instance of one of ``targets`` and has a ``weight``
    parameter, unless its name or an ancestor's name matches a pattern of ``exclude`` (module
    names or :mod:`fnmatch` globs: ``"classifier"``, ``"layer4.*"``, ``"*.downsample.0"``).

    Raises:
        ConfigError: No module of the target types, an exclude pattern that excludes no target
            (with the closest target names), or nothing left after exclusion.
    """
    targets = _check_targets(targets)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    found = {n: m for n, m in model.named_modules() if isinstance(m, targets) and _has_weight(m)}
    wanted = ", ".join(t.__name__ for t in targets)
    if not found:
        present = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise ConfigError(
            f"{type(model).__name__} has no {wanted} module with a weight to prune; its layer "
            f"types are {present}: pass targets=(...) with some of them"
        )
    names = list(found)
    for pattern in exclude:
        if not any(_excluded(n, (pattern,)) for n in names):
            raise ConfigError(
                f"exclude pattern {pattern!r} matches no {wanted} module{suggest(pattern, names)} "
                f"Target modules: {names[:8]}{' ...' if len(names) > 8 else ''}"
            )
    kept = {n: m for n, m in found.items() if not _excluded(n, exclude)}
    if not kept:
        raise ConfigError(
            f"exclude={list(exclude)} removes every {wanted} module: nothing to prune"
        )
    return kept


def global_sparsity(
    model: nn.Module,
    targets: tuple[type[nn.Module], ...] = DEFAULT_TARGETS,
    exclude: Sequence[str] = (),
) -> float:
    """Fraction of zero entries in the effective (masked) weights of the target modules.

    Unlike :func:`sobre.core.masks.sparsity` (mask entries over every masked parameter), this
    counts dense target layers in the denominator and still sees the zeros after ``bake``: it is
    the sparsity axis of IMP curves (Frankle & Carbin, 2019). Arguments as in
    :func:`target_modules`.
    """
    modules = target_modules(model, targets, exclude)
    zeros = total = 0
    with torch.no_grad():
        for module in modules.values():
            weight = module.weight
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total


@dataclass(frozen=True)
class LayerPrune:
    """One layer after a pruning step: live (unmasked) and total weights.

    ``threshold`` is the layer's cut score under ``scope="local"`` (``None`` under ``"global"``
    or when nothing was pruned in the layer).
    """

    live: int
    total: int
    threshold: float | None = None

    @property
    def sparsity(self) -> float:
        """Masked fraction of the layer's weights."""
        return 1.0 - self.live / self.total


@dataclass(frozen=True)
class PruneReport:
    """What one :meth:`MagnitudePruner.step` did.

    Attributes:
        scope: ``"global"`` or ``"local"``.
        amount: Fraction of the live weights pruned.
        pruned: Weights masked by this step.
        threshold: The global cut score (the largest pruned score; ties at it are broken by
            position), ``None`` under ``"local"`` or when nothing was pruned.
        layers: Per target layer, its counts after the step.
    """

    scope: str
    amount: float
    pruned: int
    threshold: float | None
    layers: dict[str, LayerPrune]

    @property
    def live(self) -> int:
        """Live weights over all target layers."""
        return sum(layer.live for layer in self.layers.values())

    @property
    def total(self) -> int:
        """Weights of all target layers."""
        return sum(layer.total for layer in self.layers.values())

    @property
    def sparsity(self) -> float:
        """Global sparsity of the target layers: ``1 - live / total``."""
        return 1.0 - self.live / self.total

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (plain numbers, strings, ``None``), with the sparsities."""
        return {
            "scope": self.scope,
            "amount": self.amount,
            "pruned": self.pruned,
            "threshold": self.threshold,
            "live": self.live,
            "total": self.total,
            "sparsity": self.sparsity,
            "layers": {
                name: {**asdict(layer), "sparsity": layer.sparsity}
                for name, layer in self.layers.items()
            },
        }


def _weight_mask(name: str, module: nn.Module) -> Tensor | None:
    """The sobre weight mask on ``module.weight`` (``None`` when unmasked).

    Raises:
        ConfigError: The weight carries a channel mask or a foreign parametrization.
    """
    if not parametrize.is_parametrized(module, "weight"):
        return None
    own = [i for i in iter_masks(module) if i.module == "" and i.param == "weight"]
    mask = next((i for i in own if i.target == "weight"), None)
    if mask is None:
        raise ConfigError(
            f"module {name!r} has a parametrization on its weight that is not a sobre mask; "
            "attach masks before other parametrizations, or exclude it"
        )
    if mask.kind != "weight":
        raise ConfigError(
            f"module {name!r} has a channel mask on its weight; IMP needs a weight mask: "
            f"exclude it (exclude=[{name!r}]) or bake(model) first"
        )
    return mask.mask


def _cut(scores: Tensor, live: Tensor, amount: float) -> tuple[Tensor, float | None]:
    """Mark the ``round(amount * live)`` live entries of lowest score (``live``: a bool mask).

    Ties at the cut are broken by position (lowest flat index first), so exactly that many go
    and the choice is the same on every rank. Returns the pruned entries (``scores``' shape)
    and the cut score.
    """
    k = round(amount * int(live.sum()))  # torch.nn.utils.prune's count, relative to live
    prune = torch.zeros_like(live)
    if k == 0:
        return prune, None
    threshold = scores[live].kthvalue(k).values
    prune |= live & (scores < threshold)
    ties = torch.nonzero((live & (scores == threshold)).flatten()).flatten()
    prune.view(-1)[ties[: k - int(prune.sum())]] = True
    return prune, float(threshold)


class MagnitudePruner:
    """One round of unstructured magnitude pruning per :meth:`step` (spec §0 "IMP").

    As a recipe stage transform (``apply``), each stage of ``repeat: k`` is one IMP round whose
    fit is the retraining (a fresh optimizer and LR schedule: LR rewinding).

    Args:
        amount: Fraction in (0, 1) of the *live* weights to prune per step (group default 0.2,
            DSD² code); after ``r`` steps sparsity is ``1 - (1 - amount)^r``.
        scope: ``"global"`` (one threshold over all target layers, the IMP of the papers) or
            ``"local"`` (the same fraction in every layer).
        targets: Module classes whose ``weight`` is pruned.
        exclude: Module names or fnmatch globs left dense (with everything under them).
        score: ``score(module_name, weight) -> Tensor`` of the weight's shape; lower is pruned
            first. Receives the effective (masked) weight; defaults to ``|w|``. EGP reweights
            magnitudes by layer entropy through it. Masked entries are never candidates.

    Raises:
        ConfigError: ``amount`` outside (0, 1), unknown ``scope``, bad ``targets`` or ``score``.
    """

    def __init__(
        self,
        amount: float = 0.2,
        scope: Scope = "global",
        targets: tuple[type[nn.Module], ...] = DEFAULT_TARGETS,
        exclude: Sequence[str] = (),
        score: ScoreFn | None = None,
    ) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0 < amount < 1:
            raise ConfigError(
                f"amount must be a fraction in (0, 1) of the live weights (e.g. 0.2), "
                f"got {amount!r}"
            )
        check_choice("scope", scope, SCOPES, "MagnitudePruner")
        if score is not None and not callable(score):
            raise ConfigError(f"score must be a callable (name, weight) -> Tensor, got {score!r}")
        self.amount = float(amount)
        self.scope = scope
        self.targets = _check_targets(targets)
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.score = score
        self.last: PruneReport | None = None

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers this pruner prunes in ``model`` (see :func:`target_modules`)."""
        return target_modules(model, self.targets, self.exclude)

    def _scores(self, name: str, weight: Tensor) -> Tensor:
        if self.score is None:
            return weight.abs()
        scores = torch.as_tensor(self.score(name, weight))
        if tuple(scores.shape) != tuple(weight.shape):
            raise ConfigError(
                f"score({name!r}, weight) returned shape {tuple(scores.shape)}; it must return "
                f"one score per weight entry, shape {tuple(weight.shape)}"
            )
        if torch.isnan(scores).any():
            raise ConfigError(f"score({name!r}, weight) returned NaN scores")
        return scores.to(weight.device)

    def step(self, model: nn.Module) -> PruneReport:
        """Prune ``amount`` of the live weights of ``model`` in place and report the counts.

        Raises:
            ConfigError: No target module (see :func:`target_modules`), or a target whose weight
                already carries a channel mask or another parametrization.
        """
        modules = self.modules(model)
        masks = {name: _weight_mask(name, module) for name, module in modules.items()}
        with torch.no_grad():
            scores = {n: self._scores(n, m.weight.detach()) for n, m in modules.items()}
            live = {
                n: torch.ones_like(s, dtype=torch.bool) if masks[n] is None else masks[n] != 0
                for n, s in scores.items()
            }
            threshold = None
            if self.scope == "global":
                device = next(iter(scores.values())).device
                flat_prune, threshold = _cut(
                    torch.cat([s.flatten().to(device) for s in scores.values()]),
                    torch.cat([v.flatten().to(device) for v in live.values()]),
                    self.amount,
                )
                parts = flat_prune.split([s.numel() for s in scores.values()])
                cuts: dict[str, tuple[Tensor, float | None]] = {
                    n: (p.view(s.shape).to(s.device), None)
                    for (n, s), p in zip(scores.items(), parts, strict=True)
                }
            else:
                cuts = {n: _cut(scores[n], live[n], self.amount) for n in scores}
            layers = {}
            pruned = 0
            for name, module in modules.items():
                prune, layer_threshold = cuts[name]
                old = masks[name]
                attach_mask(
                    module, "weight", ~prune if old is None else old * ~prune, kind="weight"
                )
                kept = live[name] & ~prune
                pruned += int(prune.sum())
                layers[name] = LayerPrune(int(kept.sum()), kept.numel(), layer_threshold)
        report = PruneReport(self.scope, self.amount, pruned, threshold, layers)
        _log.info(
            "IMP %s step: pruned %d weights, sparsity %.4f", self.scope, pruned, report.sparsity
        )
        self.last = report
        return report

    def apply(self, model: nn.Module) -> nn.Module:
        """As a recipe stage transform: one :meth:`step` on ``model`` (masks only, no edit)."""
        self.step(model)
        return model

    def report(self) -> dict[str, Any]:
        """The last step's counts (``PruneReport.to_dict`` without the per-layer detail)."""
        if self.last is None:
            return {}
        return {k: v for k, v in self.last.to_dict().items() if k != "layers"}


def _rewindable(model: nn.Module) -> dict[str, Tensor]:
    """Parameters (the unmasked originals of masked ones) and buffers by plain name, no masks."""
    masks = {id(info.mask) for info in iter_masks(model)}
    return {
        _ORIGINAL.sub(r"\1\2", key): tensor
        for key, tensor in model.state_dict(keep_vars=True).items()
        if isinstance(tensor, Tensor) and id(tensor) not in masks
    }


class Rewinder:
    """What happens to the weights between IMP rounds; masks are always kept.

    Modes (:meth:`apply` returns whether the optimizer and LR schedule must be recreated):

    - ``"finetune"``: keep training the pruned weights with the same optimizer and schedule
      (Han et al., 2015). Nothing changes; returns ``False``.
    - ``"lr_rewind"``: keep the pruned weights, restart training with a fresh optimizer and the
      schedule from its start (Renda et al., 2020; the DSD² code). Returns ``True``.
    - ``"weight_rewind"``: set every parameter and buffer (BN statistics included) back to the
      values stored by :meth:`capture` (the weights of epoch ``k``; ``k = 0`` is the lottery-ticket
      rewind to initialisation, Frankle & Carbin, 2019) and restart the schedule. Returns ``True``.
    - ``"reinit"``: re-draw the parameters and buffers under ``torch.manual_seed(seed)``
      (Liu et al., 2019) with :func:`~sobre.core.weights.fresh_weights`: each module's
      ``reset_parameters()``, then the model's own ``init_weights()`` scheme where it has one
      (sobre's and timm's models), on the CPU so the values do not depend on the device,
      without touching the global RNG. Parameters under neither keep their values (logged).
      Every call draws the same values. Returns ``True``.

    What is rewound is the unmasked ``original`` tensor behind each mask: masked weights stay
    zero in the effective weights whatever the stored values are.

    Args:
        mode: One of ``"finetune"``, ``"lr_rewind"``, ``"weight_rewind"``, ``"reinit"``.
        seed: Seed of ``"reinit"``.
    """

    def __init__(self, mode: RewindMode = "lr_rewind", seed: int = 0) -> None:
        self.mode = check_choice("mode", mode, REWIND_MODES, "Rewinder")
        self.seed = int(seed)
        self._captured: dict[str, Tensor] | None = None

    @property
    def captured(self) -> bool:
        """Whether a rewind point is stored (only ``"weight_rewind"`` stores one)."""
        return self._captured is not None

    def capture(self, model: nn.Module) -> None:
        """Store the rewind point: a copy of the weights and buffers (``"weight_rewind"`` only)."""
        if self.mode == "weight_rewind":
            self._captured = {k: t.detach().clone() for k, t in _rewindable(model).items()}

    def apply(self, model: nn.Module) -> bool:
        """Reset the unmasked weights as the mode says; True: recreate the optimizer and schedule.

        Raises:
            ConfigError: ``"weight_rewind"`` without a :meth:`capture`, or a model whose
                parameters differ (names or shapes) from the captured ones.
        """
        if self.mode == "weight_rewind":
            self._rewind(model)
        elif self.mode == "reinit":
            self._reinit(model)
        return self.mode != "finetune"

    def _rewind(self, model: nn.Module) -> None:
        if self._captured is None:
            raise ConfigError(
                "weight_rewind has no rewind point: call Rewinder.capture(model) at the rewind "
                "epoch first (IMPSchedule does it at its rewind_epoch)"
            )
        current = _rewindable(model)
        missing = sorted(self._captured.keys() ^ current.keys())
        if missing:
            raise ConfigError(
                f"cannot rewind: the model's tensors differ from the captured ones at {missing[:5]}"
            )
        with torch.no_grad():
            for key, tensor in current.items():
                saved = self._captured[key]
                if saved.shape != tensor.shape:
                    raise ConfigError(
                        f"cannot rewind {key!r}: captured shape {tuple(saved.shape)}, "
                        f"model shape {tuple(tensor.shape)}"
                    )
                tensor.copy_(saved)

    def _reinit(self, model: nn.Module) -> None:
        raw = _rewindable(model)
        with torch.no_grad():
            for key, value in fresh_weights(model, self.seed).items():
                raw[key].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Mode, seed and the captured rewind point (tensors) or ``None``."""
        return {"mode": self.mode, "seed": self.seed, "captured": self._captured}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the mode must match)."""
        if state["mode"] != self.mode:
            raise ConfigError(
                f"rewinder state has mode {state['mode']!r}, this rewinder {self.mode!r}"
            )
        self.seed = int(state["seed"])
        captured = state["captured"]
        self._captured = None if captured is None else dict(captured)


class Reinitialize:
    """Stage transform: fresh weights (masks kept), e.g. the DSD² student that starts anew.

    Draws them as :class:`Rewinder`'s ``"reinit"`` mode does
    (:func:`~sobre.core.weights.fresh_weights` under ``seed``: the model's own init).

    Args:
        seed: seed of the new weights.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rewinder = Rewinder("reinit", seed)

    def apply(self, model: nn.Module) -> nn.Module:
        """Re-draw ``model``'s weights in place and return it."""
        self.rewinder.apply(model)
        return model


class IMPSchedule:
    """IMP from a training loop's epoch ends: prune every ``every_n_epochs``, ``rounds`` times.

    After training epoch ``e`` (0-based) with ``(e + 1) % every_n_epochs == 0`` and fewer than
    ``rounds`` rounds done, it calls ``pruner.step(model)`` then ``rewinder.apply(model)``.
    ``history`` holds one dict per round: the :class:`PruneReport` dict plus ``round``, ``epoch``
    and ``reset_optimizer`` (the rewinder's answer: the loop, or later the engine, must recreate
    the optimizer and LR schedule). A ``"weight_rewind"`` rewinder without a rewind point gets
    one: the initial weights in :meth:`setup` (``rewind_epoch=0``), else the weights after
    ``rewind_epoch`` epochs.

    Args:
        pruner: The pruner run each round.
        every_n_epochs: Training epochs per round (>= 1).
        rounds: Number of rounds (>= 1).
        rewinder: What happens to the weights after each round (``None``: fine-tune).
        rewind_epoch: Epoch ``k`` of weight rewinding, at most ``every_n_epochs``.
    """

    def __init__(
        self,
        pruner: MagnitudePruner,
        every_n_epochs: int,
        rounds: int,
        rewinder: Rewinder | None = None,
        rewind_epoch: int = 0,
    ) -> None:
        for arg, value, low in (("every_n_epochs", every_n_epochs, 1), ("rounds", rounds, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{arg} must be an integer >= {low}, got {value!r}")
        if isinstance(rewind_epoch, bool) or not isinstance(rewind_epoch, int):
            raise ConfigError(f"rewind_epoch must be an integer, got {rewind_epoch!r}")
        if not 0 <= rewind_epoch <= every_n_epochs:
            raise ConfigError(
                f"rewind_epoch must be in [0, every_n_epochs={every_n_epochs}] so the rewind "
                f"point precedes the first round, got {rewind_epoch}"
            )
        self.pruner = pruner
        self.every_n_epochs = every_n_epochs
        self.rounds = rounds
        self.rewinder = rewinder
        self.rewind_epoch = rewind_epoch
        self.history: list[dict[str, Any]] = []

    @property
    def rounds_done(self) -> int:
        """Rounds pruned so far."""
        return len(self.history)

    def _capture_if_due(self, model: nn.Module, epochs_trained: int) -> None:
        rewinder = self.rewinder
        if (
            rewinder is not None
            and rewinder.mode == "weight_rewind"
            and not rewinder.captured
            and epochs_trained == self.rewind_epoch
        ):
            rewinder.capture(model)

    def setup(self, model: nn.Module) -> None:
        """Attach all-ones masks to the unmasked target layers, and capture the initial weights
        when weight rewinding goes back to epoch 0.

        With the masks in place before the optimizer (and a DDP wrapper) is built, rounds only
        change mask values: the parameter order a resumed optimizer relies on never changes.
        """
        for module in self.pruner.modules(model).values():
            if get_mask(module) is None:
                attach_mask(module, "weight")
        self._capture_if_due(model, 0)

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        """Prune (and rewind) when epoch ``epoch`` closes a round."""
        self._capture_if_due(model, epoch + 1)
        if self.rounds_done >= self.rounds or (epoch + 1) % self.every_n_epochs:
            return
        report = self.pruner.step(model)
        reset = self.rewinder.apply(model) if self.rewinder is not None else False
        self.history.append(
            {
                "round": self.rounds_done + 1,
                "epoch": epoch,
                **report.to_dict(),
                "reset_optimizer": reset,
            }
        )

    def state_dict(self) -> dict[str, Any]:
        """The rounds' history and the rewinder's state (so a resumed run continues)."""
        return {
            "history": copy.deepcopy(self.history),
            "rewinder": None if self.rewinder is None else self.rewinder.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        saved = state["rewinder"]
        if (saved is None) != (self.rewinder is None):
            raise ConfigError(
                "IMPSchedule state and schedule disagree on having a rewinder; build the schedule "
                "with the same rewinder mode as the run that saved it"
            )
        if self.rewinder is not None:
            self.rewinder.load_state_dict(saved)
        self.history = copy.deepcopy(list(state["history"]))
