"""The Lightning routine for classification: task loss + any regularisers, torchmetrics per stage.

The routine knows no method. Its loss is composable: ``criterion(outputs, targets)`` plus the
named terms of every :class:`~sobre.core.Regularizer` it holds; features the regularisers ask
for come from one :class:`~sobre.core.taps.FeatureTap` per step. Training-time methods with
other hooks reach the loop through :class:`~sobre.engine.callbacks.MethodCallback`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from sobre.core.errors import ConfigError
from sobre.core.masks import restore_masks
from sobre.core.members import mean_probs, member_targets, num_members
from sobre.core.methods import Regularizer, SetupHook, StepContext, task_weight, total
from sobre.core.taps import FeatureTap

Stage = Literal["train", "val", "test"]


class ClassificationRoutine(pl.LightningModule):
    """Train, validate and test a classifier; the loss is cross-entropy + Σ regulariser terms.

    An ensemble network (``net.num_members = M``, member-major ``(M·B, K)`` logits: a packed
    model or a deep ensemble) trains on the targets repeated M times (the mean of the members'
    cross-entropies) and is validated and tested on the mean of its members' softmaxes:
    ``*/acc`` of that mean, ``*/loss`` its NLL.

    Args:
        arch: a name for :func:`sobre.models.create` (ignored when ``net`` is given).
        num_classes: number of classes (filled from the datamodule by recipes).
        in_channels: input channels (filled from the datamodule by recipes).
        arch_kwargs: extra keyword arguments for the architecture.
        net: an already built network (Python use); takes precedence over ``arch``.
        regularizers: loss terms added to the task loss, each logged as ``train/loss/<name>``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: learning rate.
        weight_decay: decoupled (AdamW) or L2 (Adam, SGD) weight decay.
        momentum: SGD momentum (Nesterov).
        scheduler: ``"cosine"`` (annealed to 0 over ``max_epochs``), ``"step"`` (x0.1 every
            third of ``max_epochs``), ``"multistep"`` (x``gamma`` at each epoch of
            ``milestones``), ``"onecycle"`` (per step: warm up to ``lr`` over the first 30 % of
            the fit's steps, then cosine down, Smith & Topin 2019) or ``"none"``.
        milestones: epochs at which ``"multistep"`` multiplies the LR by ``gamma``.
        gamma: the ``"multistep"`` factor.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        arch_kwargs: dict[str, Any] | None = None,
        net: nn.Module | None = None,
        regularizers: Sequence[Regularizer] | None = None,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: Literal["cosine", "step", "multistep", "onecycle", "none"] = "cosine",
        label_smoothing: float = 0.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if scheduler == "multistep" and not milestones:
            raise ConfigError(
                "scheduler 'multistep' needs milestones, the epochs at which the LR drops: e.g. "
                "milestones: [10]"
            )
        if not 0 < gamma <= 1:
            raise ConfigError(f"gamma must lie in (0, 1], got {gamma}: use e.g. 0.1")
        if net is None:
            from sobre.models import create

            net = create(
                arch, num_classes=num_classes, in_channels=in_channels, **(arch_kwargs or {})
            )
        self.net = net
        self.num_classes = num_classes
        self.regularizers = nn.ModuleList()
        for reg in regularizers or ():
            self.add_regularizer(reg)
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.momentum, self.scheduler_name = momentum, scheduler
        self.milestones, self.gamma = sorted(int(m) for m in milestones), gamma
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.acc = nn.ModuleDict(
            {
                f"{s}_acc": MulticlassAccuracy(num_classes, average="micro")
                for s in ("train", "val", "test")
            }
        )
        self.step_context: StepContext | None = None

    def add_regularizer(self, regularizer: Regularizer) -> None:
        """Add a loss term (before ``fit``); its parameters and buffers join the routine's."""
        if not isinstance(regularizer, nn.Module) or not callable(regularizer):
            raise ConfigError(
                f"{regularizer!r} is not a Regularizer: subclass "
                "sobre.core.Regularizer and implement forward(ctx)"
            )
        if any(r.name == regularizer.name for r in self.regularizers):
            raise ConfigError(
                f"two regularizers are named {regularizer.name!r}: give each a "
                "distinct `name` so their logged terms do not collide"
            )
        self.regularizers.append(regularizer)

    def remove_regularizers(self, regularizers: Sequence[Regularizer]) -> None:
        """Drop loss terms (a stage's own methods, once the stage has finished)."""
        gone = {id(r) for r in regularizers}
        self.regularizers = nn.ModuleList(r for r in self.regularizers if id(r) not in gone)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        """Let regularisers that resolve something from the model (``setup(model)``) do it."""
        for reg in self.regularizers:
            if isinstance(reg, SetupHook):
                reg.setup(self.net)

    def _tap(self) -> contextlib.AbstractContextManager[Any]:
        selectors = [s for r in self.regularizers for s in r.needs_features]
        if not selectors:
            return contextlib.nullcontext(None)
        return FeatureTap(self.net, list(dict.fromkeys(selectors)), detach=False)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, *extra = batch  # (x, y) or (x, y, b, ...): extras reach methods as ctx.extra
        with self._tap() as tap:
            logits = self.net(x)
        ctx = StepContext(
            self.net,
            x,
            y,
            logits,
            tap.features if tap else {},
            step=self.global_step,
            epoch=self.current_epoch,
            stage="train",
            extra=tuple(extra),
        )
        m = num_members(self.net)
        task = self.criterion(logits, member_targets(y, m) if m > 1 else y)  # mean over members
        terms = {"task": task_weight(self.regularizers) * task}
        for reg in self.regularizers:
            terms.update({k: v for k, v in reg.terms(ctx).items()})
        loss = total(terms)
        self.step_context = ctx
        self.acc["train_acc"](mean_probs(logits.detach(), m), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        if len(terms) > 1:
            self.log_dict(
                {f"train/loss/{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True
            )
        self.log("train/acc", self.acc["train_acc"], on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, ...], stage: Stage) -> Tensor:
        """Log the stage's loss and accuracy; the predicted classes go to callbacks' ``outputs``."""
        x, y = batch[0], batch[1]
        logits = self.net(x)
        m = num_members(self.net)
        probs = mean_probs(logits, m)
        self.acc[f"{stage}_acc"](probs, y)
        # the ensemble's NLL (of the mean probability); an ordinary model's cross-entropy
        loss = self.criterion(logits, y) if m == 1 else F.nll_loss(probs.clamp_min(1e-12).log(), y)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", self.acc[f"{stage}_acc"], on_epoch=True, prog_bar=True)
        return probs.argmax(-1)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def on_train_batch_end(self, *args: Any) -> None:
        self.step_context = None  # free the graph-holding features

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-attach the checkpoint's masks before Lightning loads the weights strictly."""
        restore_masks(self, checkpoint["state_dict"])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=self.momentum,
                nesterov=self.momentum > 0,
                weight_decay=self.weight_decay,
            )
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(1, self.trainer.max_epochs or 1) if self._trainer is not None else 1
        if self.scheduler_name == "cosine":
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        elif self.scheduler_name == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 3), gamma=0.1)
        elif self.scheduler_name == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, gamma=self.gamma)
        elif self.scheduler_name == "onecycle":
            steps = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=max(1, steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
