"""Lightning adapter: the uncertainty table at the end of every ``trainer.test``.

In a recipe, name the OOD and shifted sets (``sobre.data.OOD_SETS``) under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: sobre.uncertainty.callbacks.UncertaintyEvaluation
          init_args: {ood: [photo_crops, inverted_mnist], shift: [shifted_mnist]}

The test metrics then hold ``test/nll``, ``test/ece15``, ..., ``ood/<set>/<criterion>/auroc``
and ``shift/<set>/...``; in a sobre run folder ``uncertainty.json`` keeps the whole report for
``sobre report`` (reliability diagram, ID-vs-OOD score histograms).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from sobre.core.errors import ConfigError
from sobre.core.serialization import atomic_write_text
from sobre.data.ood import OOD_SETS, ood_dataset
from sobre.uncertainty.evaluate import REPORT_FILE, UncertaintyReport, evaluate

log = logging.getLogger(__name__)

SetSpec = Sequence[str] | Mapping[str, Mapping[str, Any]]


def _sets(spec: SetSpec | None, arg: str) -> dict[str, dict[str, Any]]:
    """``[name, ...]`` or ``{name: {kwargs}}`` as ``{name: kwargs}``, names checked."""
    if spec is None:
        return {}
    items = spec.items() if isinstance(spec, Mapping) else ((name, {}) for name in spec)
    out = {}
    for name, kwargs in items:
        OOD_SETS.get(name)  # unknown names fail here, with the closest known ones
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{arg}.{name} must map argument names to values, got {kwargs!r}")
        out[name] = dict(kwargs)
    return out


class UncertaintyEvaluation(pl.Callback):
    """Runs :func:`~sobre.uncertainty.evaluate.evaluate` when a test epoch ends.

    The ID set is the datamodule's test split; OOD and shifted sets are built with
    :func:`sobre.data.ood_dataset` to the datamodule's shape and normalisation.

    Args:
        ood: OOD set names, or ``{name: {builder kwargs}}``.
        shift: shifted set names (true labels), or ``{name: {builder kwargs}}``.
        criteria: OOD scores (default ``msp``, ``energy``, and ``mi`` for ensembles).
        n_bins: calibration bins.
        positive: FPR95 convention, ``"id"`` (default) or ``"ood"`` (torch-uncertainty's).
    """

    def __init__(
        self,
        ood: SetSpec | None = None,
        shift: SetSpec | None = None,
        criteria: Sequence[str] | None = None,
        n_bins: int = 15,
        positive: str = "id",
    ) -> None:
        self.ood, self.shift = _sets(ood, "ood"), _sets(shift, "shift")
        self.criteria, self.n_bins, self.positive = criteria, n_bins, positive
        self.report: UncertaintyReport | None = None

    def _loaders(self, sets: dict[str, dict[str, Any]], dm: Any) -> dict[str, DataLoader]:
        return {
            name: DataLoader(ood_dataset(name, like=dm, **kwargs), batch_size=dm.batch_size)
            for name, kwargs in sets.items()
        }

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError(
                "UncertaintyEvaluation needs a datamodule (trainer.test(model, datamodule=...)): "
                "its test split is the in-distribution set"
            )
        self.report = evaluate(
            pl_module.net,
            dm.test_dataloader(),
            self._loaders(self.ood, dm),
            self._loaders(self.shift, dm),
            criteria=self.criteria,
            n_bins=self.n_bins,
            positive=self.positive,  # type: ignore[arg-type]
        )
        for key, value in self.report.flat().items():
            pl_module.log(key, value, sync_dist=False)  # the same full-set value on every rank
        log.info("uncertainty (%d member(s)):\n%s", self.report.num_members, self.report.table())
        run_dir = Path(trainer.default_root_dir)
        if trainer.is_global_zero and (run_dir / "config.yaml").is_file():  # a sobre run
            atomic_write_text(run_dir / REPORT_FILE, json.dumps(self.report.to_dict(), indent=1))
