"""Lightning callbacks for the pruning family: EGP / NEPENTHE, EASIER and IMP inside one fit.

Thin adapters: every decision is taken by the plain objects (:class:`~sobre.prune.egp.
EntropyGuidedPruner`, :class:`~sobre.prune.easier.Easier`, :class:`~sobre.prune.imp.IMPSchedule`);
a callback only says *when* (``on_train_epoch_end`` of every n-th epoch) and wires Lightning: the
network is ``pl_module.net``, the data ``trainer.train_dataloader``, the accuracy ``val/acc`` of
``trainer.callback_metrics``. In Lightning 2.6 with ``val_check_interval=1.0`` validation runs
before ``on_train_epoch_end``, so the accuracy read there is the epoch's own (a callback that needs
it refuses a stale one). Checkpoint callbacks run after ours: the checkpoint of a round's epoch
holds the edited network and the callback state that made it, but its ``val/acc`` was measured
before the edit, so pick depths from the callbacks' curves (and EASIER's per-depth checkpoints),
not from a ``best`` checkpoint. No edit is made at the last epoch of a fit: nothing would
fine-tune or measure it.

**Structure edits inside a fit.** EGP's ``linearize`` and EASIER's ``Identity`` return an edited
copy of the network. The callback puts it in ``pl_module.net`` and points the optimizers at the
copy's parameters, matched by name (the edits add no trainable parameter: an activation becomes
an ``Identity`` or a :class:`~sobre.prune.surgery.ChannelGate`, whose ``keep`` is a buffer), so
Adam moments and the LR schedule carry on. Methods holding modules of the old network (set up
from it) are not set up again. The house rule is that structure edits happen between fit stages,
never inside a distributed fit: these two callbacks refuse ``trainer.world_size > 1``; under DDP
use the stage recipes of ``recipes/prune/`` (``repeat: k`` stages with the pruner or ``Easier`` as
a transform). Masks are fine inside a fit: :class:`IMPCallback` is allowed under DDP, since the
magnitudes, hence the masks, are identical on every rank, and every rank recreates its optimizer
at the same hook.

**Resume.** Callbacks checkpoint their rounds. ``sobre.fit(resume=RUN_DIR)`` replays the edit log
stored beside the checkpoint before Lightning loads it, so a resumed fit continues the rounds.
A plain ``trainer.fit(ckpt_path=...)`` on an unedited network is refused at ``on_fit_start`` (the
callback state holds the edit log to ``sobre.core.edits.replay`` first), and so is
``trainer.test(ckpt_path=...)`` with a checkpoint of another depth (``sobre.fit`` recipes:
``evaluate: {checkpoint: final}``). Optimizer parameters are kept in ``pl_module.parameters()``
order after every edit or new mask, the order a resumed ``configure_optimizers`` builds, so
saved optimizer moments land on the right tensors.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from sobre.core.edits import edit_log
from sobre.core.errors import CheckpointError, ConfigError, SobreError
from sobre.engine.callbacks import MethodCallback
from sobre.engine.checkpoint import SafetensorsCheckpointIO
from sobre.prune.easier import Easier, removed_sites
from sobre.prune.egp import EntropyGuidedPruner, _fraction
from sobre.prune.imp import (
    IMPSchedule,
    MagnitudePruner,
    Rewinder,
    RewindMode,
    Scope,
    _rewindable,
)

log = logging.getLogger(__name__)

__all__ = ["EasierCallback", "EntropyGuidedPruningCallback", "IMPCallback"]

_RECIPES = "recipes/prune/ (stages with `repeat: k` and the method as a stage transform)"


def _positive(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{arg} must be an integer >= 1, got {value!r}")
    return value


def _canonical_order(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Sort every optimizer group in ``pl_module.parameters()`` order (what a resumed
    ``configure_optimizers`` builds; a new mask moves its weight after the module's bias)."""
    order = {id(p): i for i, p in enumerate(pl_module.parameters())}
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["params"].sort(key=lambda p: order.get(id(p), len(order)))


def _swap(trainer: pl.Trainer, pl_module: pl.LightningModule, new: nn.Module) -> None:
    """Make ``new`` the network and re-point the optimizers at its parameters by name.

    Optimizer state follows its parameter; parameters the edit removed leave the optimizer.

    Raises:
        SobreError: ``new`` has trainable parameters ``pl_module.net`` did not have.
    """
    old = pl_module.net
    if new is not old:
        old_names = {id(t): k for k, t in _rewindable(old).items()}
        fresh = _rewindable(new)
        known = set(old_names.values())
        added = [
            k
            for k, t in fresh.items()
            if isinstance(t, nn.Parameter) and t.requires_grad and k not in known
        ]
        if added:
            raise SobreError(
                f"the edit added trainable parameters {added[:5]} that no optimizer holds; run "
                f"this edit between fit stages instead: {_RECIPES}"
            )
        pl_module.net = new
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                params = []
                for p in group["params"]:
                    name = old_names.get(id(p))
                    q = p if name is None else fresh.get(name)  # None: the edit removed it
                    state = optimizer.state.pop(p, None)
                    if q is None:
                        continue
                    if state is not None:
                        optimizer.state[q] = state
                    params.append(q)
                group["params"] = params
    _canonical_order(trainer, pl_module)


def _outside(val_acc: float, dense_acc: float, points: float) -> bool:
    """The accuracy fell more than ``points`` below the dense one (same rule as NEPENTHE's
    :meth:`~sobre.prune.egp.EntropyGuidedPruner.should_stop`; exactly ``points`` is inside)."""
    return 100.0 * (dense_acc - val_acc) > points + 1e-9


class _EditCallback(pl.Callback):
    """What the two structure-editing callbacks share: when, DDP refusal, fresh accuracy,
    swapping the network, keeping and restoring the last model inside the tolerance."""

    def __init__(
        self, every_n_epochs: int, monitor: str, dense_acc: float | None, restore: bool
    ) -> None:
        self.every_n_epochs = _positive(every_n_epochs, type(self)._every_arg)
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"monitor must be a metric name such as 'val/acc', got {monitor!r}")
        self.monitor = monitor
        self.dense_acc = None if dense_acc is None else _fraction(dense_acc, "dense_acc")
        self.restore = bool(restore)
        self.stopped: dict[str, Any] | None = None
        self._kept: nn.Module | None = None  # in memory only: lost by a resume
        self._val_epoch: int | None = None
        self._loaded_edits: list[dict[str, Any]] | None = None
        self._module: pl.LightningModule | None = None
        self._stage: str | None = None

    _every_arg = "every_n_epochs"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage, self._module = stage, pl_module
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise ConfigError(
                f"{type(self).__name__} edits the network's structure, which never happens inside "
                f"a distributed fit (world_size={trainer.world_size}); use the stage-based "
                f"recipes in {_RECIPES}"
            )
        if not isinstance(getattr(pl_module, "net", None), nn.Module):
            raise ConfigError(
                f"{type(self).__name__} needs a LightningModule whose network is `.net` "
                "(sobre.engine.ClassificationRoutine)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaded, self._loaded_edits = self._loaded_edits, None
        if loaded is not None and edit_log(pl_module.net) != loaded:
            raise CheckpointError(
                f"the checkpoint's network had {len(loaded)} structure edits, this one "
                f"has {len(edit_log(pl_module.net))}: resume with sobre.fit(resume=RUN_DIR), which "
                "replays them, or sobre.core.edits.replay(net, edits) with the edits in this "
                f"callback's checkpointed state ({self.state_key!r}) before trainer.fit"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_epoch = trainer.current_epoch

    def _due(self, trainer: pl.Trainer) -> bool:
        return self.stopped is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @staticmethod
    def _last_epoch(trainer: pl.Trainer) -> bool:
        """No epoch follows this one: an edit now would never be fine-tuned nor measured."""
        last = trainer.max_epochs
        return last is not None and last >= 0 and trainer.current_epoch + 1 >= last

    def _accuracy(self, trainer: pl.Trainer) -> float | None:
        """The monitored accuracy of the epoch that just ended (``None``: not validated)."""
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or self._val_epoch != trainer.current_epoch:
            return None
        return float(value)

    def _required_accuracy(self, trainer: pl.Trainer) -> float:
        """:meth:`_accuracy`, which must exist.

        Raises:
            ConfigError: Validation did not run this epoch or does not log ``monitor``.
        """
        value = self._accuracy(trainer)
        if value is None:
            raise ConfigError(
                f"{type(self).__name__} needs {self.monitor!r} of epoch {trainer.current_epoch}: "
                "give the fit validation data, validate every epoch (check_val_every_n_epoch=1, "
                "val_check_interval=1.0) and log the monitor"
            )
        return value

    @staticmethod
    def _loader(trainer: pl.Trainer) -> Any:
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, Mapping | list | tuple):
            raise ConfigError(
                "the pruning callbacks measure entropy on one training DataLoader; this fit has "
                f"{type(loader).__name__}"
            )
        return loader

    def _keep(self, pl_module: pl.LightningModule) -> None:
        if self.restore:
            self._kept = copy.deepcopy(pl_module.net)

    def _stop(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, val_acc: float, kept: int
    ) -> None:
        """Stop editing; put back the last model inside the tolerance (``restore``)."""
        restored = self._kept is not None
        if restored:
            _swap(trainer, pl_module, self._kept)
            self._kept = None
        elif self.restore:
            log.warning(
                "%s: no in-memory copy of the last model inside the tolerance (the fit was "
                "resumed since); keeping the current model",
                type(self).__name__,
            )
        self.stopped = {
            "epoch": trainer.current_epoch,
            "val_acc": val_acc,
            "dense_acc": self.dense_acc,
            "kept": kept,
            "restored": restored,
        }
        log.info("%s stopped: %s", type(self).__name__, self.stopped)

    def _log(self, pl_module: pl.LightningModule, values: Mapping[str, float]) -> None:
        pl_module.log_dict(
            {f"prune/{k}": float(v) for k, v in values.items()}, on_step=False, on_epoch=True
        )

    def state_dict(self) -> dict[str, Any]:
        net = self._module.net if self._module is not None else None
        return {
            "dense_acc": self.dense_acc,
            "stopped": copy.deepcopy(self.stopped),
            "edits": edit_log(net) if net is not None else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the rounds of a resumed fit; outside a fit (``trainer.test(ckpt_path=...)``)
        keep this callback's results and refuse a checkpoint of another depth.

        Raises:
            CheckpointError: Outside a fit, the checkpoint's structure edits differ from the
                network's (its weights were loaded into the wrong structure).
        """
        if self._stage != "fit":
            net = self._module.net if self._module is not None else None
            if net is not None and edit_log(net) != list(state_dict["edits"]):
                raise CheckpointError(
                    f"this checkpoint holds the network after {len(state_dict['edits'])} "
                    f"structure edits, the model has {len(edit_log(net))}: its weights do not "
                    "belong to this structure. Evaluate the model in memory (recipes: "
                    "`evaluate: {checkpoint: final}`) or load the checkpoint with sobre.load"
                )
            return
        self.dense_acc = state_dict["dense_acc"]
        self.stopped = copy.deepcopy(state_dict["stopped"])
        self._loaded_edits = list(state_dict["edits"])


class EntropyGuidedPruningCallback(_EditCallback):
    """EGP (spec §1.6) / NEPENTHE (§2.6) rounds inside one fit: every ``every_n_epochs`` epochs,
    one :meth:`EntropyGuidedPruner.step` on ``pl_module.net`` and the training data, at most
    ``rounds`` times; the epochs in between fine-tune.

    NEPENTHE (``pruner.variant == "nepenthe"``): before each round, and once after the last, the
    validation accuracy of the current model is checked with ``pruner.should_stop(val_acc,
    dense_acc)``; once it is outside the tolerance no more rounds run and (``restore``) the last
    model inside it is put back and fine-tuned for the rest of the fit. Refused under DDP
    (``world_size > 1``): use the stage recipes of ``recipes/prune/``.

    Attributes:
        history: One dict per round: the :class:`~sobre.prune.egp.EGPReport` dict plus ``epoch``
            and ``val_acc`` (accuracy of the model just before the round; ``None`` without
            validation).
        stopped: NEPENTHE's stop (``epoch``, ``val_acc``, ``dense_acc``, ``kept`` rounds,
            ``restored``), else ``None``.

    Args:
        every_n_epochs: Training epochs per round (>= 1); a round runs after epoch ``e`` (0-based)
            when ``(e + 1) % every_n_epochs == 0``.
        rounds: Maximum number of rounds (>= 1).
        pruner: The pruner (default ``EntropyGuidedPruner()``, EGP with the paper defaults).
        monitor: The validation accuracy (a fraction) NEPENTHE reads.
        dense_acc: NEPENTHE's reference accuracy; default: ``monitor`` at the first round epoch.
        restore: NEPENTHE: put back the last model inside the tolerance when stopping (an
            in-memory copy of the network, taken before each round).

    Raises:
        ConfigError: ``every_n_epochs`` or ``rounds`` below 1, ``pruner`` not an
            ``EntropyGuidedPruner``, ``dense_acc`` outside [0, 1]; at ``setup``, a distributed fit.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        rounds: int = 1,
        pruner: EntropyGuidedPruner | None = None,
        monitor: str = "val/acc",
        dense_acc: float | None = None,
        restore: bool = True,
    ) -> None:
        super().__init__(every_n_epochs, monitor, dense_acc, restore)
        self.rounds = _positive(rounds, "rounds")
        pruner = EntropyGuidedPruner() if pruner is None else pruner
        if not isinstance(pruner, EntropyGuidedPruner):
            raise ConfigError(f"pruner must be an EntropyGuidedPruner, got {pruner!r}")
        self.pruner = pruner
        self.history: list[dict[str, Any]] = []
        self._checked = 0  # rounds whose model NEPENTHE has checked

    @property
    def nepenthe(self) -> bool:
        return self.pruner.variant == "nepenthe"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        done = len(self.history)
        val_acc: float | None
        if self.nepenthe:
            val_acc = acc = self._required_accuracy(trainer)
            if self.dense_acc is None:
                self.dense_acc = acc
            if self._checked < done:
                self._checked = done
                if self.pruner.should_stop(acc, self.dense_acc):
                    self._stop(trainer, pl_module, acc, kept=done - 1)
                    return
        else:
            val_acc = self._accuracy(trainer)
        if done >= self.rounds or self._last_epoch(trainer):
            return
        if self.nepenthe:
            self._keep(pl_module)
        net, report = self.pruner.step(pl_module.net, self._loader(trainer))
        _swap(trainer, pl_module, net)
        self.history.append(
            {**report.to_dict(), "epoch": trainer.current_epoch, "val_acc": val_acc}
        )
        self._log(pl_module, {"sparsity": report.sparsity, "removed": len(report.linearized_total)})

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": copy.deepcopy(self.history),
            "checked": self._checked,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._stage != "fit":
            return
        self.history = copy.deepcopy(list(state_dict["history"]))
        self._checked = int(state_dict["checked"])
        self.pruner.rounds = len(self.history)


class EasierCallback(_EditCallback):
    """EASIER (spec §3.6) inside one fit: every ``finetune_epochs`` epochs, record the validation
    accuracy of the current depth, then make the lowest-entropy site an identity
    (:meth:`Easier.apply`), until ``max_removed`` sites are gone or the accuracy falls more than
    ``tolerance`` points below the dense one.

    The first measured depth is the dense model (train it in an earlier stage, or let the first
    ``finetune_epochs`` epochs train it). When the tolerance is left, no more sites are removed
    and (``restore``) the last depth inside it is put back and fine-tuned for the rest of the fit.
    One checkpoint per measured depth: ``<dirpath>/depth_<k>.safetensors`` through
    ``trainer.save_checkpoint`` when the trainer writes sobre checkpoints
    (:class:`~sobre.engine.checkpoint.SafetensorsCheckpointIO`, as ``sobre.fit`` does; its state
    holds the edit log to replay); with any other checkpoint IO the depth's edit log and CPU
    weights stay in memory (:attr:`depth_states`). Refused under DDP (``world_size > 1``): use the
    stage recipes of ``recipes/prune/``.

    Attributes:
        curve: Accuracy vs depth, one dict per measured depth: ``removed`` (sites removed),
            ``sites``, ``epoch``, ``val_acc``, ``within`` (inside the tolerance), ``checkpoint``
            (path or ``None``), and ``next`` / ``entropy`` (the site removed after it, its H̄_l).
        depth_states: ``{removed: {"edits", "state_dict"}}`` when no sobre checkpoint IO.
        stopped: The stop (``epoch``, ``val_acc``, ``dense_acc``, ``kept`` depth, ``restored``).

    Args:
        finetune_epochs: Training epochs per depth (>= 1).
        max_removed: Sites removed at most (>= 1, at most the candidate sites).
        tolerance: Accuracy points below the dense model that are still acceptable (>= 0).
        easier: The ranking object (default ``Easier()``, the authors' settings).
        monitor: The validation accuracy (a fraction).
        dense_acc: Reference accuracy; default: ``monitor`` at the first measured depth.
        restore: Put back the last depth inside the tolerance when stopping.
        dirpath: Folder of the per-depth checkpoints; default: the checkpoint callback's folder,
            else ``<default_root_dir>/checkpoints``.

    Raises:
        ConfigError: Bad numbers, ``easier`` not an ``Easier``; at ``setup``, a distributed fit
            or ``max_removed`` above the candidate sites.
    """

    _every_arg = "finetune_epochs"

    def __init__(
        self,
        finetune_epochs: int = 1,
        max_removed: int = 1,
        tolerance: float = 1.0,
        easier: Easier | None = None,
        monitor: str = "val/acc",
        dense_acc: float | None = None,
        restore: bool = True,
        dirpath: str | Path | None = None,
    ) -> None:
        super().__init__(finetune_epochs, monitor, dense_acc, restore)
        self.max_removed = _positive(max_removed, "max_removed")
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
            raise ConfigError(f"tolerance must be >= 0 accuracy points, got {tolerance!r}")
        self.tolerance = float(tolerance)
        easier = Easier() if easier is None else easier
        if not isinstance(easier, Easier):
            raise ConfigError(f"easier must be a sobre.prune.Easier, got {easier!r}")
        self.easier = easier
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.curve: list[dict[str, Any]] = []
        self.depth_states: dict[int, dict[str, Any]] = {}

    @property
    def finetune_epochs(self) -> int:
        return self.every_n_epochs

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        candidates = len(removed_sites(pl_module.net)) + len(self.easier.remaining(pl_module.net))
        if self.max_removed > candidates:
            raise ConfigError(
                f"max_removed={self.max_removed} but {type(pl_module.net).__name__} has "
                f"{candidates} candidate sites"
            )

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, removed: int) -> str | None:
        if not isinstance(trainer.strategy.checkpoint_io, SafetensorsCheckpointIO):
            self.depth_states[removed] = {
                "edits": edit_log(pl_module.net),
                "state_dict": {
                    k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()
                },
            }
            return None
        folder = self.dirpath
        if folder is None:
            ckpt = trainer.checkpoint_callback
            given = getattr(ckpt, "dirpath", None)
            folder = Path(given) if given else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / f"depth_{removed}.safetensors"
        trainer.save_checkpoint(path)
        return str(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        sites = removed_sites(pl_module.net)
        if self.curve and self.curve[-1]["removed"] == len(sites):
            return  # max_removed reached: this depth is measured already
        val_acc = self._required_accuracy(trainer)
        if self.dense_acc is None:
            self.dense_acc = val_acc
        within = not sites or not _outside(val_acc, self.dense_acc, self.tolerance)
        entry = {
            "removed": len(sites),
            "sites": sites,
            "epoch": trainer.current_epoch,
            "val_acc": val_acc,
            "within": within,
            "checkpoint": None,
        }
        self.curve.append(entry)
        entry["checkpoint"] = self._save(trainer, pl_module, len(sites))
        log.info(
            "EASIER depth: %d removed, val acc %.4f (dense %.4f)",
            len(sites),
            val_acc,
            self.dense_acc,
        )
        if not within:
            self._stop(trainer, pl_module, val_acc, kept=len(sites) - 1)
        elif len(sites) < self.max_removed and not self._last_epoch(trainer):
            self._keep(pl_module)
            _swap(trainer, pl_module, self.easier.apply(pl_module.net, self._loader(trainer)))
            report = self.easier.report()
            entry.update(next=report["removed"], entropy=report["entropy"])
        self._log(pl_module, {"removed": len(removed_sites(pl_module.net)), "val_acc": val_acc})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "curve": copy.deepcopy(self.curve)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._stage != "fit":
            return
        self.curve = copy.deepcopy(list(state_dict["curve"]))


class IMPCallback(MethodCallback):
    """Iterative magnitude pruning (spec §5.6) inside one fit: an :class:`IMPSchedule` whose
    retraining mode actually resets the optimizer.

    Every ``every_n_epochs`` epochs (``rounds`` times) the schedule masks ``amount`` of the live
    weights and applies its rewinder. When the round's ``reset_optimizer`` is true (LR
    rewinding, weight rewinding, re-initialisation) the optimizer and LR schedule are recreated
    with ``trainer.strategy.setup_optimizers`` at the start of the next epoch, so it trains from
    the initial learning rate with no momentum or Adam state (recreating at the epoch end would
    let Lightning step the new schedule once). ``"finetune"`` keeps both. The rounds are in
    ``schedule.history``. All-ones masks are attached to the target layers at ``setup``, so the
    rounds only change mask values. Allowed under DDP: masks are functions of the weights,
    identical on every rank, and every rank resets at the same hook (checked on two CPU ranks).

    Args:
        schedule: A ready schedule; otherwise one is built from the arguments below.
        amount: Fraction of the live weights pruned per round.
        every_n_epochs: Training epochs per round.
        rounds: Number of rounds.
        retrain: ``"finetune"``, ``"lr_rewind"`` (default, the DSD² code), ``"weight_rewind"``
            or ``"reinit"`` (see :class:`Rewinder`).
        rewind_epoch: Epoch ``k`` of weight rewinding.
        scope: ``"global"`` or ``"local"``.
        exclude: Layer names or globs left dense.
        seed: Seed of ``"reinit"``.

    Raises:
        ConfigError: Bad arguments (see :class:`MagnitudePruner`, :class:`Rewinder`,
            :class:`IMPSchedule`), or ``schedule`` not an ``IMPSchedule``.
    """

    def __init__(
        self,
        schedule: IMPSchedule | None = None,
        amount: float = 0.2,
        every_n_epochs: int = 1,
        rounds: int = 1,
        retrain: RewindMode = "lr_rewind",
        rewind_epoch: int = 0,
        scope: Scope = "global",
        exclude: list[str] | tuple[str, ...] = (),
        seed: int = 0,
    ) -> None:
        if schedule is None:
            pruner = MagnitudePruner(amount, scope, exclude=tuple(exclude))
            schedule = IMPSchedule(
                pruner, every_n_epochs, rounds, Rewinder(retrain, seed), rewind_epoch
            )
        elif not isinstance(schedule, IMPSchedule):
            raise ConfigError(f"schedule must be a sobre.prune.IMPSchedule, got {schedule!r}")
        super().__init__(schedule)
        self.schedule = schedule
        self._reset_pending = False
        self._stage: str | None = None

    @property
    def state_key(self) -> str:
        return "IMPCallback"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """``IMPSchedule.setup`` attaches all-ones masks before Lightning builds the optimizer
        and the DDP wrapper (a mask attached inside a DDP fit breaks its gradient reduction)."""
        self._stage = stage
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Also called first thing in a fit resumed from an epoch-end checkpoint (Lightning 2.6),
        # after the checkpoint's optimizer was loaded: a pending reset replaces it then.
        if self._reset_pending:
            trainer.strategy.setup_optimizers(trainer)
            self._reset_pending = False
            log.info("IMP: optimizer and LR schedule recreated for epoch %d", trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = self.schedule.rounds_done
        super().on_train_epoch_end(trainer, pl_module)
        if self.schedule.rounds_done == done:
            return
        last = self.schedule.history[-1]
        self._reset_pending = bool(last["reset_optimizer"])
        pl_module.log_dict(
            {"prune/round": float(last["round"]), "prune/sparsity": float(last["sparsity"])},
            on_step=False,
            on_epoch=True,
            sync_dist=True,  # equal on every rank; silences Lightning's DDP advice
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reset_pending": self._reset_pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the rounds of a resumed fit (ignored outside a fit, e.g. ``trainer.test``)."""
        if self._stage != "fit":
            return
        super().load_state_dict(state_dict)
        self._reset_pending = bool(state_dict["reset_pending"])
