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

import logging
import statistics
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import backward_flops, saved_activation_bytes
from sobre.efficient.masks import MaskedOptimizer, NeuronMask
from sobre.efficient.sparse import ChannelSparseConv2d, ChannelSparseLinear, densify, sparsify

__all__ = ["ChannelFreezing"]

log = logging.getLogger(__name__)
Sparse = bool | Literal["auto"]
_SPARSE_TYPES = (nn.Conv2d, nn.Linear)


class ChannelFreezing(pl.Callback):
    """Base: apply a per-epoch :class:`NeuronMask` for real and log its counted and measured cost.

    Subclasses implement :meth:`build` (make the plain method object once the model and data are
    known), :meth:`mask_for_epoch` (the mask of the epoch about to start) and may implement
    :meth:`after_epoch` (observe the trained model, return extra scalars to log), ``state_dict``
    and ``load_state_dict`` (the method's state, so a resumed run decides the same).

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
        if sparse not in (True, False, "auto"):
            raise ConfigError(f"sparse must be true, false or 'auto', got {sparse!r}")
        if measure_batch is not None and measure_batch < 0:
            raise ConfigError(
                f"measure_batch must be >= 0 (0: no measurement), got {measure_batch}"
            )
        self.sparse = sparse
        self.measure_batch = measure_batch
        self.log_layers = log_layers
        self._masked: MaskedOptimizer | None = None
        self._saved: list[Any] | None = None
        self._swapped = False
        self._example: Tensor | None = None
        self._full_backward = 0
        self._times: list[float] = []
        self._t0 = 0.0

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

    # -- helpers for subclasses ------------------------------------------------------------
    @staticmethod
    def fixed_batches(trainer: pl.Trainer, n: int) -> list[tuple[Tensor, Tensor]]:
        """The first ``n`` training samples in dataset order (not the sharded, shuffled loader),
        as ``(input, label)`` batches of the datamodule's batch size: the same on every rank."""
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError(f"{n} fixed training samples need a datamodule passed to fit")
        data = dm.train_dataset
        size = min(n, len(data))
        if size == 0:
            raise ConfigError("the training split is empty: there is nothing to probe with")
        items = [data[i] for i in range(size)]
        bs = max(1, int(getattr(dm, "batch_size", 128)))
        return [
            (
                torch.stack([torch.as_tensor(x) for x, _ in items[i : i + bs]]),
                torch.as_tensor([int(y) for _, y in items[i : i + bs]]),
            )
            for i in range(0, size, bs)
        ]

    # -- Lightning hooks -------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.build(trainer, pl_module)
        dm = trainer.datamodule
        n = self.measure_batch if self.measure_batch is not None else getattr(dm, "batch_size", 0)
        if n and dm is not None:
            n = min(n, len(dm.train_dataset))
            self._example = dm.example_input(n).to(pl_module.device)
            full = backward_flops(pl_module.net, self._example)
            self._full_backward = full.backward

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
        if use_sparse:  # sparsify also updates layers already swapped in
            chosen = {
                name: mask[name]
                for name in mask
                if type(m := net.get_submodule(name)) in _SPARSE_TYPES
                or isinstance(m, ChannelSparseConv2d | ChannelSparseLinear)
            }
            if mask.dim == "out":
                sparsify(net, trainable=chosen)
            else:
                sparsify(net, trainable_in=chosen)
            self._swapped = True
        self._times = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._masked is not None:
            self._saved = self._masked.snapshot()

    def on_train_batch_end(self, *args: Any) -> None:
        if self._saved is not None:
            MaskedOptimizer.restore(self._saved)
            self._saved = None
        self._times.append(time.perf_counter() - self._t0)

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
        logs: dict[str, float] = {}
        if self._times:
            logs["efficient/step_ms"] = 1000 * statistics.median(self._times)
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
