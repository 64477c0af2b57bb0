"""``make_trainer``: a Lightning Trainer with sobre's defaults for one fit stage of a run.

Defaults: safetensors checkpoints (best by ``val/acc`` and last, every epoch), RNG state in every
checkpoint (exact resume), CSV and TensorBoard loggers, a rich progress bar on a terminal and one
log line per epoch elsewhere, deterministic algorithms (warn-only), one device.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger

from sobre.engine.callbacks import EpochSummary, RngState
from sobre.engine.checkpoint import SafeModelCheckpoint, SafetensorsCheckpointIO

DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "max_epochs": 10,
    "deterministic": "warn",
    "log_every_n_steps": 10,
    "enable_model_summary": False,
    # our samplers shard themselves by rank with an order that depends on (seed, epoch) only
    "use_distributed_sampler": False,
}


def _log_version(run_dir: Path, stage: str) -> str:
    """``stage``, or ``stage.resume<n>`` when the stage already has logs (a resumed fit), because
    Lightning's CSV logger deletes an existing ``metrics.csv`` instead of appending to it."""
    logs = run_dir / "logs"
    n = sum(
        1 for p in logs.glob(f"{stage}*") if p.name == stage or p.name.startswith(f"{stage}.resume")
    )
    return stage if n == 0 else f"{stage}.resume{n}"


def _loggers(log_dir: Path, stage: str) -> list[Logger]:
    stage = _log_version(log_dir, stage)
    loggers: list[Logger] = [CSVLogger(log_dir, name="logs", version=stage)]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(
            TensorBoardLogger(log_dir, name="tb", version=stage, default_hp_metric=False)
        )
    except ModuleNotFoundError:  # tensorboard is optional (installed with sobre[dev])
        pass
    return loggers


def make_trainer(
    run_dir: str | Path,
    *,
    stage: str = "train",
    callbacks: Sequence[Callback] = (),
    info: Callable[[], dict[str, Any]] | None = None,
    monitor: str = "val/acc",
    mode: str = "max",
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A Trainer writing into ``run_dir`` (logs/<stage>/metrics.csv, checkpoints/<stage>/).

    Args:
        run_dir: the run folder.
        stage: name of the fit stage (sub-folder of logs and checkpoints).
        callbacks: extra callbacks (methods, user callbacks).
        info: metadata for every checkpoint's JSON sidecar (see SafetensorsCheckpointIO).
        monitor: metric selecting the ``best`` checkpoint; ``mode``: ``"max"`` or ``"min"``.
        **trainer_kwargs: any ``lightning.pytorch.Trainer`` argument; overrides the defaults.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints" / stage
    kwargs = {**DEFAULTS, **trainer_kwargs}
    ours: list[Callback] = [
        SafeModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        SafeModelCheckpoint(
            dirpath=ckpt_dir,
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
        ),
        RngState(),
        EpochSummary(),
    ]
    interactive = sys.stderr.isatty()
    if kwargs.get("enable_progress_bar") is None:
        kwargs["enable_progress_bar"] = interactive
    if kwargs["enable_progress_bar"] and interactive:
        ours.append(RichProgressBar())
    user = kwargs.pop("callbacks", None) or []
    kwargs.setdefault("logger", _loggers(run_dir, stage))
    if kwargs["logger"] is True:
        kwargs["logger"] = _loggers(run_dir, stage)
    plugins = [*(kwargs.pop("plugins", None) or []), SafetensorsCheckpointIO(info)]
    return pl.Trainer(
        default_root_dir=run_dir, callbacks=[*ours, *user, *callbacks], plugins=plugins, **kwargs
    )
