"""Lightning callbacks: the one generic adapter for plain method objects, exact-resume RNG state,
and a one-line epoch summary for logs that are not a terminal."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from sobre.core.methods import EpochHook, Regularizer, SetupHook

log = logging.getLogger(__name__)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor) or v.numel() == 1
    }


class MethodCallback(pl.Callback):
    """Adapts any plain method object to Lightning, calling the same hooks a plain loop calls.

    ``setup(model)`` once before fitting, ``after_backward(model, ctx)`` after each backward,
    ``after_step(model, ctx)`` after each optimizer step, ``on_epoch_end(model, epoch, metrics)``
    after each training epoch (validation included). A :class:`~sobre.core.Regularizer` is added to
    the routine's loss. The method's ``state_dict`` (if any) is checkpointed with the run.

    Args:
        method: the plain method object (any of the hooks above is optional).
    """

    def __init__(self, method: Any) -> None:
        self.method = method
        self._set_up = False

    @property
    def state_key(self) -> str:
        return f"MethodCallback[{type(self.method).__name__}:{getattr(self.method, 'name', '')}]"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._set_up:
            return
        self._set_up = True
        if isinstance(self.method, Regularizer):
            pl_module.add_regularizer(self.method)
        elif isinstance(self.method, SetupHook):
            self.method.setup(pl_module.net)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hook = getattr(self.method, "after_backward", None)
        if hook is not None:
            hook(pl_module.net, pl_module.step_context)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        hook = getattr(self.method, "after_step", None)
        if hook is not None:
            hook(pl_module.net, pl_module.step_context)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.method, EpochHook):
            self.method.on_epoch_end(
                pl_module.net, trainer.current_epoch, _scalars(trainer.callback_metrics)
            )

    def state_dict(self) -> dict[str, Any]:
        if isinstance(self.method, Regularizer) or not hasattr(self.method, "state_dict"):
            return {}  # regularisers are saved with the routine
        return {"method": self.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "method" in state_dict:
            self.method.load_state_dict(state_dict["method"])


class RngState(pl.Callback):
    """Checkpoints the torch, numpy, python (and CUDA) RNG states and restores them as soon as a
    checkpoint is loaded, so a resumed run draws the same random numbers as an uninterrupted one."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        np.random.set_state(state_dict["numpy"])
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class EpochSummary(pl.Callback):
    """Logs one line per epoch (``epoch 3: val/acc=0.981 ...``) for non-interactive output."""

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = _scalars(trainer.callback_metrics)
        shown = "  ".join(
            f"{k}={v:.4g}"
            for k, v in sorted(metrics.items())
            if k.endswith(("acc", "loss")) and "_step" not in k
        )
        log.info("epoch %d/%s: %s", trainer.current_epoch + 1, trainer.max_epochs, shown)
