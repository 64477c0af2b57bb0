"""Lightning side of the fairness family: ``BiasMetrics`` logs the bias metrics of every
validation and test epoch of an (x, y, b) datamodule, so runs report and select by them;
``PrivacyProbe`` measures after the test how well fresh probes read the private attribute b
from the trained model's features (the DisP / IRENE attack).

Imported on first use (``sobre.fairness.BiasMetrics``): the rest of the family is Lightning-free.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from sobre.core.errors import ConfigError
from sobre.core.labels import dataset_labels
from sobre.core.members import mean_probs, num_members
from sobre.fairness.metrics import AlignedBias, BiasReport, group_proportions
from sobre.fairness.probe import ProbeKind, features_of, probe_attack

STAGES = ("val", "test")
log = logging.getLogger(__name__)


class BiasMetrics(Callback):
    """Log ``<stage>/unbiased``, ``/worst_group``, ``/aligned``, ``/conflicting`` (and, at test,
    ``/average`` and ``test/group/y=..,b=..``) from the routine's predictions on (x, y, b)
    batches; at test also ``test/biased_acc`` on the datamodule's ``biased_test_dataset``.

    The predictions are the routine's eval-step outputs (no second forward); on several
    processes they are gathered first, so every rank logs the same numbers. Select the model by
    one of them with ``evaluate: {monitor: val/unbiased}`` in a recipe.

    Args:
        aligned: the bias value aligned with each class (default ``b == y``), see
            :func:`sobre.fairness.metrics.aligned_accuracy`.
        groups: log each group's test accuracy (``test/group/...``, for the report heat-map).
        average: also log ``test/average`` weighted by the training group proportions (read
            from the labels the training set stores, else by loading each sample once).
    """

    def __init__(
        self, aligned: AlignedBias = None, groups: bool = True, average: bool = True
    ) -> None:
        super().__init__()
        self.aligned, self.groups, self.average = aligned, groups, average
        self._seen: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {s: [] for s in STAGES}

    def _collect(self, stage: str, outputs: Any, batch: Any) -> None:
        if not isinstance(batch, list | tuple) or len(batch) < 3:
            raise ConfigError(
                "BiasMetrics needs (x, y, b) batches: use a dataset with bias labels "
                "(biased_mnist, colored_mnist, waterbirds, ...) or drop the callback"
            )
        if not isinstance(outputs, Tensor):
            raise ConfigError(
                "BiasMetrics reads the predicted classes the routine's validation/test step "
                f"returns; this LightningModule returned {type(outputs).__name__}"
            )
        self._seen[stage].append((outputs.detach(), batch[1].detach(), batch[2].detach()))

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._collect("val", outputs, batch)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect("test", outputs, batch)

    def _gathered(self, stage: str, pl_module: pl.LightningModule) -> tuple[Tensor, ...] | None:
        seen, self._seen[stage] = self._seen[stage], []
        if not seen:
            return None
        parts = [torch.cat(t) for t in zip(*seen, strict=True)]
        if pl_module.trainer.world_size > 1:  # equal-length shards (DistributedSampler pads)
            parts = [pl_module.all_gather(t).reshape(-1) for t in parts]
        return tuple(p.cpu() for p in parts)

    def _train_weights(self, trainer: pl.Trainer) -> Mapping[tuple[int, int], float] | None:
        data = getattr(trainer, "datamodule", None)
        train = getattr(data, "train_dataset", None) if data is not None else None
        if not self.average or train is None:
            return None
        try:
            y, b = dataset_labels(train, 1), dataset_labels(train, 2)
        except (IndexError, TypeError, ValueError) as err:
            log.warning(
                "BiasMetrics: no test/average: the training set's (y, b) are unreadable "
                "(%s); give it (x, y, b) samples or set average: false",
                err,
            )
            return None
        if bool((b < 0).any()):
            log.warning(
                "BiasMetrics: no test/average: %d training samples have an unknown bias "
                "label (b = -1), so the group proportions are unknown",
                int((b < 0).sum()),
            )
            return None
        return group_proportions(y, b)

    def _log(self, stage: str, pl_module: pl.LightningModule, report: BiasReport) -> None:
        values = {"unbiased": report.unbiased, "worst_group": report.worst_group}
        for key in ("aligned", "conflicting", "average"):
            value = getattr(report, key)
            if value is not None:
                values[key] = value
        if stage == "test" and self.groups:
            values.update({f"group/y={y},b={b}": a for (y, b), a in report.group_accuracy.items()})
        pl_module.log_dict({f"{stage}/{k}": float(v) for k, v in values.items()}, sync_dist=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        got = None if trainer.sanity_checking else self._gathered("val", pl_module)
        if got is not None:
            self._log("val", pl_module, BiasReport.from_predictions(*got, aligned=self.aligned))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        got = self._gathered("test", pl_module)
        if got is None:
            return
        report = BiasReport.from_predictions(
            *got, aligned=self.aligned, train_weights=self._train_weights(trainer)
        )
        self._log("test", pl_module, report)
        biased = getattr(getattr(trainer, "datamodule", None), "biased_test_dataset", None)
        if biased is not None and len(biased) > 0:
            pl_module.log("test/biased_acc", self._accuracy(pl_module, biased), sync_dist=False)

    @torch.no_grad()
    def _accuracy(self, pl_module: pl.LightningModule, dataset: Any) -> float:
        """Plain accuracy on a dataset (the biased test set), computed on every rank."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=512)
        hits = total = 0
        for batch in loader:
            logits = pl_module(batch[0].to(pl_module.device))
            m = num_members(getattr(pl_module, "net", pl_module))
            pred = mean_probs(logits, m).argmax(-1).cpu()
            hits += int((pred == batch[1]).sum())
            total += len(pred)
        return hits / total


class PrivacyProbe(Callback):
    """After the test, attack the trained encoder: fresh probes predict the private attribute b
    from the frozen features of ``layer`` (trust spec §4.3).

    The probes are trained on the first half of the test set and read on the second half; use
    a test split where b is independent of y (Biased-MNIST with ``rest: uniform`` tests at
    ρ = 0), or the probe may read b through the task. Logs ``test/probe_<kind>`` (accuracy;
    chance is 1 / number of attribute values) and ``test/probe_<kind>_mi`` (Î(Z; b) ≈ H(b) − CE,
    nats) for each probe kind.

    Args:
        layer: the module whose (pooled) output is attacked, e.g. ``embedding``.
        probes: probe kinds, ``"linear"`` and/or ``"mlp"``.
        epochs: probe training epochs (full batch, Adam).
    """

    def __init__(
        self,
        layer: str = "embedding",
        probes: tuple[ProbeKind, ...] | list[ProbeKind] = ("linear", "mlp"),
        epochs: int = 200,
    ) -> None:
        super().__init__()
        self.layer, self.probes, self.epochs = layer, tuple(probes), epochs

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = getattr(trainer, "datamodule", None)
        dataset = getattr(data, "test_dataset", None)
        if dataset is None:
            raise ConfigError("PrivacyProbe needs a datamodule with a test_dataset of (x, y, b)")
        loader = torch.utils.data.DataLoader(dataset, batch_size=500)
        net = getattr(pl_module, "net", pl_module)
        z, *rest = features_of(net, loader, self.layer)
        if len(rest) < 2:
            raise ConfigError(
                "PrivacyProbe needs (x, y, b) test samples: b is the private attribute it attacks"
            )
        # the test loop runs under inference mode: the probes train on ordinary copies
        with torch.inference_mode(False), torch.enable_grad():
            z, b = z.clone(), rest[1].clone()
            half = len(z) // 2
            results = {
                kind: probe_attack(
                    z[:half], b[:half], z[half:], b[half:], probe=kind, epochs=self.epochs
                )
                for kind in self.probes
            }
        for kind, result in results.items():
            pl_module.log(f"test/probe_{kind}", result.accuracy, sync_dist=False)
            pl_module.log(f"test/probe_{kind}_mi", result.mi_nats, sync_dist=False)
