"""Lightning callbacks of the efficient-training family (imported on first use: Lightning only).

:class:`ChannelFreezing` is the one mechanism every selection callback shares: each epoch a
:class:`~sobre.efficient.masks.NeuronMask` decides which channels train; the frozen entries are put
back after every optimizer step (exact for any optimizer, :class:`MaskedOptimizer`'s snapshot and
restore around the trainer's own step), the masked Conv2d/Linear layers run as channel-sparse
layers so frozen channels skip their weight-gradient work for real, and each epoch logs, side by
side, what is counted and what is measured:

- ``efficient/trainable``: fraction of the masked channels that trained this epoch (and
  ``efficient/trainable/<layer>`` per layer);
- ``efficient/backward_gflop`` and ``efficient/backward_saving``: counted backward FLOPs of one
  step on a batch and their saving against training everything (analytic,
  :func:`sobre.core.measure.backward_flops`);
- ``efficient/step_ms``: measured median wall time of this epoch's training steps;
- ``efficient/saved_mb``: measured activation bytes autograd keeps for one step on a batch
  (:func:`sobre.core.measure.saved_activation_bytes`, unique storages).

Subclasses give the mask of each epoch and may observe the model after it. Every rank of a DDP run
computes the same masks (same probe set, same weights, seeded draws), so nothing is all-reduced; a
layer whose channels are all frozen gets no weight gradient, which DDP reports as an unused
parameter, so under DDP the channel-sparse layers are off by default (``sparse="auto"``) and the
saving is the counted one.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import backward_flops, saved_activation_bytes
from sobre.core.registry import check_choice
from sobre.efficient.budget import BudgetedNeuronSelector
from sobre.efficient.compress import (
    METHODS,
    _Compressed,
    _layer_names,
    compress_recorded,
    decompress_recorded,
    layer_names,
    select_ranks,
)
from sobre.efficient.dynamic import ChannelBudget
from sobre.efficient.lora import LoRALinear, add_lora_recorded, merge_lora_recorded
from sobre.efficient.masks import MaskedOptimizer, NeuronMask
from sobre.efficient.neq import NEq, drive_sparse
from sobre.efficient.neve import NeuralVelocity, VelocityPlateau
from sobre.efficient.probe import probe_inputs
from sobre.efficient.sparse import densify, fold_frozen_bn, mask_relus, sparsify
from sobre.efficient.wasi import WASILinear, unwasi_recorded, wasi_recorded

__all__ = [
    "ActivationCompressionCallback",
    "BudgetCallback",
    "ChannelFreezing",
    "NEqCallback",
    "NeVeCallback",
    "SparseUpdateCallback",
]

log = logging.getLogger(__name__)
Sparse = bool | Literal["auto"]
_SPARSE_TYPES = (nn.Conv2d, nn.Linear)


class _StepTimer(pl.Callback):
    """Times each training step, batch start to batch end (wall clock; the GPU is not synced)."""

    def __init__(self) -> None:
        super().__init__()
        self._times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self._times.append(time.perf_counter() - self._t0)

    def step_ms(self) -> dict[str, float]:
        """``{"efficient/step_ms": median}`` over the steps since the last call (``{}``: none)."""
        times, self._times = self._times, []
        return {"efficient/step_ms": 1000 * statistics.median(times)} if times else {}


class ChannelFreezing(_StepTimer):
    """Base: apply a per-epoch :class:`NeuronMask` for real and log its counted and measured cost.

    Subclasses implement :meth:`build` (make the plain method object, :attr:`method`, once the
    model and data are known, then :meth:`restore` it), :meth:`mask_for_epoch` (the mask of the
    epoch about to start) and may implement :meth:`after_epoch` (observe the trained model,
    return extra scalars to log). The method's ``state_dict`` is checkpointed, so a resumed run
    decides the same.

    Args:
        sparse: swap the masked ``nn.Conv2d``/``nn.Linear`` for channel-sparse layers for the
            fit (``"auto"``: yes unless the run is distributed); they are swapped back at the
            end of the fit, so checkpoints and the final model are plain.
        measure_batch: batch size of the per-epoch FLOP count and byte measurement (``None``:
            the datamodule's batch size); ``0`` turns both off.
        log_layers: log the trainable fraction of each masked layer too.
    """

    def __init__(
        self, *, sparse: Sparse = "auto", measure_batch: int | None = None, log_layers: bool = True
    ) -> None:
        check_choice("sparse", sparse, (True, False, "auto"), "ChannelFreezing")
        if measure_batch is not None and measure_batch < 0:
            raise ConfigError(
                f"measure_batch must be >= 0 (0: no measurement), got {measure_batch}"
            )
        super().__init__()
        self.sparse = sparse
        self.measure_batch = measure_batch
        self.log_layers = log_layers
        self.method: Any = None
        self._loaded: dict[str, Any] | None = None
        self._masked: MaskedOptimizer | None = None
        self._saved: list[Any] | None = None
        self._swapped = False
        self._example: Tensor | None = None
        self._full_backward = 0

    # -- what subclasses provide -----------------------------------------------------------
    def build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Create the method object (model: ``pl_module.net``; data: ``trainer.datamodule``)."""

    def mask_for_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> NeuronMask | None:
        """The channels that train during ``epoch`` (``None``: everything trains)."""
        raise NotImplementedError(f"{type(self).__name__} must implement mask_for_epoch")

    def after_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> dict[str, float]:
        """Observe the model after ``epoch``; return extra scalars to log (default: none)."""
        return {}

    def restore(self) -> bool:
        """Load a resumed run's checkpointed state into the :attr:`method` :meth:`build` just
        made; False on a fresh fit."""
        if self._loaded is None:
            return False
        self.method.load_state_dict(self._loaded)
        self._loaded = None
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict()} if self.method is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("method")

    # -- Lightning hooks -------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        n = self.measure_batch if self.measure_batch is not None else getattr(dm, "batch_size", 0)
        if n and dm is not None:  # the reference: every layer trained, before build() acts
            n = min(n, len(dm.train_dataset))
            self._example = dm.example_input(n).to(pl_module.device)
            self._full_backward = backward_flops(pl_module.net, self._example).backward
        self.build(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        mask = self.mask_for_epoch(trainer, pl_module, trainer.current_epoch)
        if mask is None:
            self._masked = None
            if self._swapped:
                densify(net)
                self._swapped = False
            return
        self._masked = MaskedOptimizer(trainer.optimizers[0], mask, net)
        use_sparse = trainer.world_size == 1 if self.sparse == "auto" else self.sparse
        if use_sparse and not self._swapped:  # swap once; drive_sparse sets them every epoch
            sparsify(net, {n: None for n in mask if type(net.get_submodule(n)) in _SPARSE_TYPES})
            self._swapped = True
        if self._swapped:
            drive_sparse(net, mask)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._masked is not None:
            self._saved = self._masked.snapshot()

    def on_train_batch_end(self, *args: Any) -> None:
        if self._saved is not None:
            MaskedOptimizer.restore(self._saved)
            self._saved = None
        super().on_train_batch_end(*args)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        logs = self._cost_logs(pl_module)
        logs.update(self.after_epoch(trainer, pl_module, epoch))
        for key, value in logs.items():
            pl_module.log(key, float(value), on_epoch=True, sync_dist=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            densify(pl_module.net)
            self._swapped = False
        self._masked = None

    # -- measurement -----------------------------------------------------------------------
    def _cost_logs(self, pl_module: pl.LightningModule) -> dict[str, float]:
        logs = self.step_ms()
        mask = self._masked.masks if self._masked is not None else None
        if mask is not None:
            logs["efficient/trainable"] = mask.trainable_fraction()
            if self.log_layers:
                for name, m in mask.items():
                    logs[f"efficient/trainable/{name}"] = float(m.float().mean())
        if self._example is None:
            return logs
        net = pl_module.net
        trainable: dict[str, float | Tensor] = {}
        if mask is not None:
            for name, m in mask.items():
                if isinstance(net.get_submodule(name), _SPARSE_TYPES):
                    trainable[name] = m if mask.dim == "out" else float(m.float().mean())
        counted = backward_flops(net, self._example, trainable)
        logs["efficient/backward_gflop"] = counted.backward / 1e9
        if self._full_backward:
            logs["efficient/backward_saving"] = 1 - counted.backward / self._full_backward
        logs["efficient/saved_mb"] = saved_activation_bytes(net, self._example).activations / 1e6
        return logs


def _train_samples(trainer: pl.Trainer) -> Iterator[tuple[Tensor, Tensor]]:
    """Training samples one by one in dataset order (not the sharded, shuffled loader, so every
    rank of a DDP run reads the same ones), as ``(input[None], label[None])`` batches."""
    dm = trainer.datamodule
    if dm is None:
        raise ConfigError("the efficient callbacks need a datamodule passed to trainer.fit")
    data = dm.train_dataset
    for i in range(len(data)):
        x, y = data[i][:2]
        yield torch.as_tensor(x)[None], torch.as_tensor(int(y))[None]


def _check_per_class(per_class: int) -> int:
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1 probe image per class, got {per_class}")
    return per_class


def _decided(last: int | None, epoch: int) -> bool:
    """Whether the method already decided ``epoch``'s mask (a run resumed inside it)."""
    return last is not None and last >= epoch


def probe_per_class(trainer: pl.Trainer, per_class: int) -> list[Tensor]:
    """The first ``per_class`` training images of each class, in dataset order (NEq's probe Ξ;
    the paper finds one image per class enough), read without touching the rest."""
    num_classes = getattr(trainer.datamodule, "num_classes", None)
    return probe_inputs(_train_samples(trainer), per_class=per_class, num_classes=num_classes)


class NEqCallback(ChannelFreezing):
    """NEq (#11) or SCoTTi (#38, ``threshold="learned"``) in a Lightning fit.

    Before each epoch the probe set (``per_class`` training images per class, the same on every
    rank) is forwarded and neurons whose velocity is below ε are frozen for that epoch (see
    :class:`~sobre.efficient.neq.NEq`; the first epoch is the reference, ``warmup`` epochs train
    densely). Logs, besides :class:`ChannelFreezing`'s costs, ``velocity/mean`` and
    ``velocity/<layer>`` (mean ``|v|``, measured before the epoch) and ``efficient/frozen``.

    Args:
        eps, mu, warmup, criterion, velocity_rule, threshold, tau_lr, temperature, tradeoff:
            :class:`~sobre.efficient.neq.NEq`'s.
        per_class: probe images per class.
        sparse, measure_batch, log_layers: :class:`ChannelFreezing`'s.
    """

    def __init__(
        self,
        eps: float = 1e-3,
        mu: float = 0.5,
        warmup: int = 1,
        per_class: int = 10,
        criterion: Literal["cosine", "pooled"] = "cosine",
        velocity_rule: Literal["paper", "code"] = "paper",
        threshold: Literal["fixed", "learned"] = "fixed",
        tau_lr: float = 0.3,
        temperature: float = 0.01,
        tradeoff: float = 20.0,
        *,
        sparse: Sparse = "auto",
        measure_batch: int | None = None,
        log_layers: bool = True,
    ) -> None:
        super().__init__(sparse=sparse, measure_batch=measure_batch, log_layers=log_layers)
        self.per_class = _check_per_class(per_class)
        self.options: dict[str, Any] = dict(
            eps=eps,
            mu=mu,
            warmup=warmup,
            criterion=criterion,
            velocity_rule=velocity_rule,
            threshold=threshold,
            tau_lr=tau_lr,
            temperature=temperature,
            tradeoff=tradeoff,
        )
        toy = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
        NEq(toy, [torch.zeros(1, 1, 2, 2)], **self.options)  # bad values fail as the recipe loads

    def build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.method = NEq(pl_module.net, probe_per_class(trainer, self.per_class), **self.options)
        self.restore()

    def mask_for_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> NeuronMask:
        neq: NEq = self.method
        return neq.mask if _decided(neq.epoch, epoch) else neq.update(epoch)

    def after_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> dict[str, float]:
        stats = self.method.stats()
        logs = {"efficient/frozen": float(stats["frozen"])}
        velocities = self.method.velocities()
        if velocities:
            total = torch.cat([v.abs() for v in velocities.values()])
            logs["velocity/mean"] = float(total.mean())
            if self.log_layers:
                logs.update({f"velocity/{n}": float(v.abs().mean()) for n, v in velocities.items()})
        return logs


class BudgetCallback(ChannelFreezing):
    """Neuron selection under a parameter budget (#33) in a Lightning fit.

    Before each epoch :class:`~sobre.efficient.budget.BudgetedNeuronSelector` picks the conv
    neurons (output channels) to update, whose parameters never exceed the budget: by NEq
    velocity (``per_class`` probe images per class), at random, or a static SU-like plan. Norms
    and the classifier train in every arm. Logs ``efficient/budget`` (the budget as a fraction
    of the conv parameters, for ``sobre report RUN RUN --out``'s accuracy-vs-budget figure) and
    ``efficient/realised`` (the parameters updated, as the same fraction), besides
    :class:`ChannelFreezing`'s costs.

    Args:
        budget_fraction, budget_params, scorer, static_plan, seed, fill, per_param:
            :class:`~sobre.efficient.budget.BudgetedNeuronSelector`'s (``static_plan``: layer
            names in priority order).
        per_class: probe images per class for ``scorer="velocity"``.
        sparse, measure_batch, log_layers: :class:`ChannelFreezing`'s.
    """

    def __init__(
        self,
        budget_fraction: float | None = None,
        budget_params: int | None = None,
        scorer: Literal["velocity", "random", "static"] = "velocity",
        static_plan: list[str] | None = None,
        seed: int = 0,
        fill: Literal["stop", "skip"] = "stop",
        per_param: bool = True,
        per_class: int = 10,
        *,
        sparse: Sparse = "auto",
        measure_batch: int | None = None,
        log_layers: bool = True,
    ) -> None:
        super().__init__(sparse=sparse, measure_batch=measure_batch, log_layers=log_layers)
        self.per_class = _check_per_class(per_class)
        self.options: dict[str, Any] = dict(
            budget_fraction=budget_fraction,
            budget_params=budget_params,
            scorer=scorer,
            static_plan=static_plan,
            seed=seed,
            fill=fill,
            per_param=per_param,
        )
        if (budget_params is None) == (budget_fraction is None):
            raise ConfigError(
                "give exactly one of budget_fraction (e.g. 0.1 of the conv parameters) and "
                f"budget_params; got budget_fraction={budget_fraction}, "
                f"budget_params={budget_params}"
            )

    def build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = None
        if self.options["scorer"] == "velocity":
            probe = probe_per_class(trainer, self.per_class)
        self.method = BudgetedNeuronSelector(pl_module.net, probe=probe, **self.options)
        self.restore()

    def mask_for_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> NeuronMask:
        selector: BudgetedNeuronSelector = self.method
        return selector.mask if _decided(selector.epoch, epoch) else selector.select(epoch)

    def after_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> dict[str, float]:
        selector: BudgetedNeuronSelector = self.method
        total = selector.budget.total() or 1
        return {
            "efficient/budget": selector.budget.limit / total,
            "efficient/realised": selector.realised() / total,
        }


class SparseUpdateCallback(ChannelFreezing):
    """TraDy (#41) or MeDyate (#45): fine-tune under a hard memory budget, in a Lightning fit.

    At the start of the fit :class:`~sobre.efficient.dynamic.ChannelBudget` ranks the layers on
    the first ``rank_batches`` training batches (dataset order), keeps the best that fit the
    budget, folds BatchNorm, swaps channel-sparse layers and bit-mask ReLUs in and freezes the
    rest; the optimizer is rebuilt over what trains. Before each epoch the input channels of the
    kept layers are drawn again (uniformly: TraDy; by importance: MeDyate). The measured saved
    activations of a step never exceed the budget (logged as ``efficient/saved_mb``, with
    ``efficient/budget``, the budget as a fraction of the full backward's bytes).

    The BN fold is a structure edit made inside the fit, so this callback refuses distributed
    runs: memory-bounded fine-tuning targets one small device.

    Args:
        budget_fraction, budget_bytes, layer_scorer, channel_sampler, layers, train_fully,
            max_layers, min_fraction, allocation, resample, refresh_every, seed:
            :class:`~sobre.efficient.dynamic.ChannelBudget`'s (TraDy: ``rgn`` + ``uniform``;
            MeDyate: ``lara`` + ``importance``).
        rank_batches: training batches of the offline layer ranking.
        measure_batch, log_layers: :class:`ChannelFreezing`'s.
    """

    def __init__(
        self,
        budget_fraction: float | None = None,
        budget_bytes: int | None = None,
        layer_scorer: str = "rgn",
        channel_sampler: str = "uniform",
        layers: list[str] | None = None,
        train_fully: list[str] | None = None,
        max_layers: int | None = None,
        min_fraction: float = 0.25,
        allocation: Literal["layer", "pooled"] = "layer",
        resample: Literal["epoch", "never"] = "epoch",
        refresh_every: int | None = None,
        seed: int = 0,
        rank_batches: int = 4,
        *,
        measure_batch: int | None = None,
        log_layers: bool = True,
    ) -> None:
        super().__init__(sparse=False, measure_batch=measure_batch, log_layers=log_layers)
        if rank_batches < 1:
            raise ConfigError(f"rank_batches must be >= 1, got {rank_batches}")
        self.rank_batches = rank_batches
        self.options: dict[str, Any] = dict(
            budget_fraction=budget_fraction,
            budget_bytes=budget_bytes,
            layer_scorer=layer_scorer,
            channel_sampler=channel_sampler,
            layers=layers,
            train_fully=tuple(train_fully or ()),
            max_layers=max_layers,
            min_fraction=min_fraction,
            allocation=allocation,
            resample=resample,
            refresh_every=refresh_every,
            seed=seed,
        )

    def build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise ConfigError(
                "SparseUpdateCallback edits the model (BN folding) inside the fit, which a "
                f"distributed run ({trainer.world_size} processes) cannot do; run it on one "
                "device"
            )
        dm = trainer.datamodule
        example = dm.example_input(min(dm.batch_size, len(dm.train_dataset)))
        budget = self.method = ChannelBudget(
            pl_module.net, example_input=example.to(pl_module.device), **self.options
        )
        if not self.restore():
            samples = list(
                itertools.islice(_train_samples(trainer), self.rank_batches * dm.batch_size)
            )
            batches = [
                (
                    torch.cat([x for x, _ in samples[i : i + dm.batch_size]]),
                    torch.cat([y for _, y in samples[i : i + dm.batch_size]]),
                )
                for i in range(0, len(samples), dm.batch_size)
            ]
            budget.rank_layers(batches, max_batches=self.rank_batches)
        pl_module.net = budget.apply()
        self._swapped = True  # densified at the end of the fit (ChannelFreezing.on_fit_end)
        trainer.strategy.setup_optimizers(trainer)  # over what trains now
        plan = budget.plan()
        log.info(
            "sparse update: %d layers kept (%s), %d of %d budget bytes planned",
            len(plan.layers),
            ", ".join(plan.layers),
            plan.total_bytes,
            plan.budget_bytes,
        )

    def mask_for_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> NeuronMask:
        budget: ChannelBudget = self.method
        if not _decided(budget.epoch, epoch):  # apply() drew epoch 0, a resume its own epoch
            budget.resample(epoch)
        return budget.neuron_mask()

    def after_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> dict[str, float]:
        budget: ChannelBudget = self.method
        return {
            "efficient/budget": budget.budget_bytes / budget.full_bytes,
            "efficient/budget_mb": budget.budget_bytes / 1e6,
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        for p in pl_module.net.parameters():  # a later stage trains the whole model again
            p.requires_grad_(True)


class NeVeCallback(pl.Callback):
    """NeVe (#48): decay the LR and stop training from the neural velocity, without held-out data.

    After each epoch the probe (``n_probe`` noise inputs of the data's input shape, or the first
    training images with ``probe="train"``) is forwarded; :class:`~sobre.efficient.neve.
    VelocityPlateau` multiplies every group's LR by ``factor`` when the velocity signal stops
    decreasing for ``patience`` epochs and stops the fit when the mean ``|v|`` falls below
    ``stop_below``. Use it with ``scheduler: none`` (it is the schedule). Logs ``velocity/mean``,
    ``velocity/signal`` (M^t), ``lr`` and ``neve/decays``.
    """

    def __init__(
        self,
        probe: Literal["noise", "train"] = "noise",
        n_probe: int = 100,
        mu: float = 0.5,
        noise: Literal["uniform", "gaussian"] = "uniform",
        seed: int = 0,
        factor: float = 0.5,
        patience: int = 10,
        stop_below: float | None = 1e-3,
        threshold: float = 0.0,
        min_lr: float = 0.0,
    ) -> None:
        check_choice("probe", probe, ("noise", "train"), "NeVeCallback")
        self.probe, self.n_probe, self.mu, self.noise, self.seed = probe, n_probe, mu, noise, seed
        self.rule = dict(
            factor=factor,
            patience=patience,
            stop_below=stop_below,
            threshold=threshold,
            min_lr=min_lr,
        )
        VelocityPlateau(torch.optim.SGD([torch.zeros(1)], lr=1.0), **self.rule)  # check values
        self.velocity: NeuralVelocity | None = None
        self.plateau: VelocityPlateau | None = None
        self._loaded: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if self.probe == "train":
            samples = itertools.islice(_train_samples(trainer), self.n_probe)
            probe: Any = [torch.cat([x for x, _ in samples])]
        else:
            probe = "noise"
        self.velocity = NeuralVelocity(
            pl_module.net,
            probe,
            n_probe=self.n_probe,
            mu=self.mu,
            noise=self.noise,
            seed=self.seed,
            input_shape=getattr(dm, "input_shape", None),
        )
        self.plateau = VelocityPlateau(trainer.optimizers[0], **self.rule)
        if self._loaded is not None:
            self.velocity.load_state_dict(self._loaded["velocity"])
            self.plateau.load_state_dict(self._loaded["plateau"])
            self.plateau.optimizer = trainer.optimizers[0]
            self._loaded = None
        else:
            self.velocity.measure()  # the reference, before any training

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.velocity is not None and self.plateau is not None
        report = self.velocity.measure()
        stop = self.plateau.step(report)
        logs = {"lr": float(trainer.optimizers[0].param_groups[0]["lr"])}
        logs["neve/decays"] = float(self.plateau.num_decays)
        if report.mean_velocity is not None:
            logs["velocity/mean"] = report.mean_velocity
        if report.mse is not None:
            logs["velocity/signal"] = report.mse
        for key, value in logs.items():
            pl_module.log(key, value, on_epoch=True, sync_dist=False)
        if stop:
            log.info(
                "NeVe: mean velocity %.2e < %.0e after epoch %d: stopping",
                report.mean_velocity or 0.0,
                self.plateau.stop_below,
                trainer.current_epoch,
            )
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        if self.velocity is None or self.plateau is None:
            return {}
        return {"velocity": self.velocity.state_dict(), "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict or None


class ActivationCompressionCallback(_StepTimer):
    """Memory-bounded fine-tuning in a fit: HOSVD_ε (#35), ASI (#37), WASI (#46) or LoRA.

    At the start of the fit BatchNorm is folded (``fold_bn``; frozen BN saves its input, spec
    §0), every parameter outside ``layers`` and ``train_fully`` is frozen, and ``layers`` are
    swapped by a recorded structure edit (a mid-fit checkpoint, ASI/WASI buffers and LoRA
    adapters included, resumes exactly):

    - ``hosvd`` / ``svd`` / ``asi``: compressed Conv2d/Linear layers
      (:func:`~sobre.efficient.compress.compress_recorded`);
    - ``wasi``: :class:`~sobre.efficient.wasi.WASILinear` (rank-k weights keeping
      ``weight_var``, ASI-compressed inputs);
    - ``lora``: :class:`~sobre.efficient.lora.LoRALinear` adapters (rank ``lora_rank``) on the
      frozen layers, the peer arm;
    - ``none``: the uncompressed baseline (same frozen set, folding and mask ReLUs).

    ReLUs that would keep a compressed input alive then save a bit mask (``mask_relus``). ASI's
    and WASI's activation ranks come from ``ranks`` or from
    :func:`~sobre.efficient.compress.select_ranks` under ``budget_bytes`` (or
    ``budget_fraction`` of the measured uncompressed step). At the end of the fit the layers
    are plain again (WASI keeps its dense ``W``; LoRA is merged), so the final checkpoint is an
    ordinary model, and everything trains in a later stage.

    Logged each epoch, measured beside analytic: ``efficient/saved_mb`` (autograd's saved
    activations of one step, unique storages), ``efficient/uncompressed_mb`` (the same step
    before the swap, same frozen set), ``efficient/compression`` (their ratio),
    ``efficient/analytic_mb`` (the compressed inputs' cores and factors) and
    ``efficient/step_ms`` (median step time).

    Args:
        layers: the modules to swap (names, ``"last:N"`` or ``"all"``; Conv2d/Linear, or Linear
            only for WASI and LoRA).
        method: ``"hosvd"``, ``"svd"``, ``"asi"``, ``"wasi"``, ``"lora"`` or ``"none"``.
        explained_var: ε of HOSVD/SVD.
        ranks: ASI/WASI activation ranks (one int, one per mode, or per layer).
        budget_bytes, budget_fraction: ASI/WASI factor budget in bytes, or as a fraction of the
            uncompressed step's measured bytes (exactly one of them or ``ranks``).
        weight_var: WASI's explained variance of each weight.
        lora_rank, lora_alpha: LoRA's rank and scale numerator.
        train_fully: modules (or parameters, e.g. ``pos_embed``) trained as they are (a new
            head, norms, embeddings).
        fold_bn: fold every BatchNorm that follows a conv (needs a traceable model).
        mask_relus: swap ReLUs for bit-mask ones where that saves measured bytes.
        measure_batch: batch size of the measurement (``None``: the datamodule's).
    """

    def __init__(
        self,
        layers: list[str] | str = "last:2",
        method: str = "hosvd",
        explained_var: float = 0.8,
        ranks: int | list[int] | dict[str, list[int]] | None = None,
        budget_bytes: int | None = None,
        budget_fraction: float | None = None,
        weight_var: float = 0.8,
        lora_rank: int = 8,
        lora_alpha: float = 16,
        train_fully: list[str] | None = None,
        fold_bn: bool = True,
        mask_relus: bool = True,
        measure_batch: int | None = None,
    ) -> None:
        check_choice("method", method, SWAPS, owner="ActivationCompressionCallback")
        if budget_bytes is not None and budget_fraction is not None:
            raise ConfigError("give budget_bytes or budget_fraction, not both")
        if budget_fraction is not None and not 0 < budget_fraction <= 1:
            raise ConfigError(f"budget_fraction must lie in (0, 1], got {budget_fraction}")
        budgeted = budget_bytes is not None or budget_fraction is not None
        if method in ("asi", "wasi") and (ranks is None) == (not budgeted):
            raise ConfigError(
                f"method={method!r} needs exactly one of ranks, budget_bytes or budget_fraction"
            )
        if method not in ("asi", "wasi") and (ranks is not None or budgeted):
            raise ConfigError(
                f"ranks and budgets are ASI's and WASI's; method={method!r} takes none"
            )
        super().__init__()
        self.layers, self.method, self.explained_var = layers, method, explained_var
        self.ranks, self.budget_bytes, self.budget_fraction = ranks, budget_bytes, budget_fraction
        self.weight_var, self.lora_rank, self.lora_alpha = weight_var, lora_rank, lora_alpha
        self.train_fully = list(train_fully or [])
        self.fold_bn, self.mask_relus, self.measure_batch = fold_bn, mask_relus, measure_batch
        self._example: Tensor | None = None
        self._uncompressed = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError("ActivationCompressionCallback needs a datamodule passed to fit")
        if self.fold_bn and trainer.world_size > 1:
            raise ConfigError(
                "ActivationCompressionCallback folds BN (a structure edit) inside the fit, which "
                f"a distributed run ({trainer.world_size} processes) cannot do; run it on one "
                "device or set fold_bn: false"
            )
        n = min(self.measure_batch or dm.batch_size, len(dm.train_dataset))
        self._example = example = dm.example_input(n).to(pl_module.device)
        net: nn.Module = pl_module.net
        swapped = [name for name, m in net.named_modules() if isinstance(m, _SWAPPED)]
        if swapped:  # a resumed fit: the engine replayed the edits; requires_grad is not saved
            _train_only(net, [*swapped, *self.train_fully])
        else:
            linear = self.method in ("wasi", "lora")
            names = (
                layer_names(net, self.layers, lambda m: type(m) is nn.Linear, "nn.Linear")
                if linear
                else _layer_names(net, self.layers)
            )
            if self.fold_bn:
                net = fold_frozen_bn(net)
            _train_only(net, [*names, *self.train_fully])
            self._uncompressed = saved_activation_bytes(net, example).activations
            net = self._swap(net, names, example)
        if self.mask_relus:
            net = mask_relus(net, example)
        pl_module.net = net
        trainer.strategy.setup_optimizers(trainer)  # over what trains now

    def _swap(self, net: nn.Module, names: list[str], example: Tensor) -> nn.Module:
        """Apply the method's recorded edit to ``names``."""
        if self.method == "none":
            return net
        if self.method == "lora":
            return add_lora_recorded(net, layers=names, rank=self.lora_rank, alpha=self.lora_alpha)
        ranks = self._ranks(net, names, example)
        if self.method == "wasi":
            return wasi_recorded(net, layers=names, weight_var=self.weight_var, ranks=ranks)
        return compress_recorded(
            net, layers=names, method=self.method, explained_var=self.explained_var, ranks=ranks
        )

    def _ranks(self, net: nn.Module, names: list[str], example: Tensor) -> Any:
        """ASI's/WASI's per-layer activation ranks as JSON-able lists (``None`` otherwise)."""
        if self.method not in ("asi", "wasi"):
            return None
        budget = self.budget_bytes
        if self.budget_fraction is not None:
            budget = int(self.budget_fraction * self._uncompressed)
        if budget is None:
            ranks = self.ranks
            return {n: ranks[n] if isinstance(ranks, dict) else ranks for n in names}
        chosen = select_ranks(net, example, budget, layers=names)
        log.info("%s activation ranks under %d bytes: %s", self.method, budget, chosen)
        return {n: list(r) for n, r in chosen.items()}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._example is not None
        net = pl_module.net
        saved = saved_activation_bytes(net, self._example).activations
        analytic = sum(getattr(m, "saved_bytes", 0) for m in net.modules())
        logs = {"efficient/saved_mb": saved / 1e6, "efficient/analytic_mb": analytic / 1e6}
        if self._uncompressed:
            logs["efficient/uncompressed_mb"] = self._uncompressed / 1e6
            logs["efficient/compression"] = self._uncompressed / max(saved, 1)
        logs.update(self.step_ms())
        for key, value in logs.items():
            pl_module.log(key, float(value), on_epoch=True, sync_dist=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        if any(isinstance(m, _Compressed) for m in net.modules()):
            net = decompress_recorded(net)
        if any(isinstance(m, WASILinear) for m in net.modules()):
            net = unwasi_recorded(net)
        if any(isinstance(m, LoRALinear) for m in net.modules()):
            net = merge_lora_recorded(net)
        pl_module.net = net
        for p in pl_module.net.parameters():  # a later stage trains the whole model again
            p.requires_grad_(True)

    def state_dict(self) -> dict[str, Any]:
        return {"uncompressed": self._uncompressed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._uncompressed = int(state_dict.get("uncompressed", 0))


def _train_only(net: nn.Module, modules: list[str]) -> None:
    """Train the parameters of ``modules`` (names of modules or of parameters), freeze every
    other one; LoRA layers train their adapters only."""
    for name, p in net.named_parameters():
        p.requires_grad_(any(name == k or name.startswith(k + ".") for k in modules))
    for m in net.modules():
        if isinstance(m, LoRALinear):
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(False)


SWAPS = (*METHODS, "wasi", "lora", "none")
"""The methods of :class:`ActivationCompressionCallback`."""
_SWAPPED = (_Compressed, WASILinear, LoRALinear)
