"""What a method is: a plain-PyTorch object with small hook points, usable in any training loop.

A plain loop calls the hooks in this order (``sobre.engine``'s Lightning adapter does too)::

    method.setup(model)                                  # once, before training
    for epoch ...:
        for step, (x, y) in ...:
            with FeatureTap(model, method.needs_features, detach=False) as tap:
                out = model(x)
            ctx = StepContext(model, x, y, out, tap.features, step, epoch)
            loss = task_weight([method]) * criterion(out, y) + total(method.terms(ctx))
            loss.backward()
            method.after_backward(model, ctx)                 # GradientHook
            optimizer.step(); optimizer.zero_grad()
            method.after_step(model, ctx)                     # GradientHook
        method.on_epoch_end(model, epoch, metrics)            # EpochHook
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


@dataclass
class StepContext:
    """Everything a method may look at during one training step."""

    model: nn.Module
    inputs: Any
    targets: Tensor | None = None
    outputs: Tensor | None = None
    features: Mapping[str, Tensor] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    stage: str = "train"
    extra: tuple[Any, ...] = ()
    """Elements of the batch after ``(input, target)``, e.g. the bias label ``b`` of the
    fairness datasets' ``(x, y, b)`` samples."""


class Regularizer(nn.Module):
    """A loss term added to the task loss: ``forward(ctx)`` returns named terms (or one tensor).

    Weights and warm-ups are constructor arguments of the regulariser, never flags of the loop.
    ``needs_features`` lists :class:`~sobre.core.taps.FeatureTap` selectors whose outputs the loop
    must record (attached to the graph) and pass in ``ctx.features``. ``task_weight`` scales the
    task loss for objectives that replace part of it (``1 - α`` in knowledge distillation); the
    loop multiplies the task loss by the product of its regularisers' task weights.
    """

    name: str = "reg"
    needs_features: tuple[str, ...] = ()
    task_weight: float = 1.0

    def forward(
        self, ctx: StepContext
    ) -> dict[str, Tensor] | Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(ctx)")

    def terms(self, ctx: StepContext) -> dict[str, Tensor]:
        """``self(ctx)`` as a dict of named terms (a bare tensor is named after the regulariser)."""
        out = self(ctx)
        return {self.name: out} if isinstance(out, Tensor) else dict(out)


def task_weight(regularizers: Iterable[Regularizer]) -> float:
    """The factor on the task loss: the product of the regularisers' ``task_weight``."""
    return math.prod(r.task_weight for r in regularizers)


def total(terms: Mapping[str, Tensor]) -> Tensor:
    """Sum of named loss terms (0 when there are none)."""
    values = list(terms.values())
    return torch.stack([v.reshape(()) for v in values]).sum() if values else torch.zeros(())


@runtime_checkable
class SetupHook(Protocol):
    """Runs once before training (e.g. attach masks, record initial weights)."""

    def setup(self, model: nn.Module) -> None: ...


@runtime_checkable
class GradientHook(Protocol):
    """Acts on gradients after ``backward`` and on weights after the optimizer step."""

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None: ...

    def after_step(self, model: nn.Module, ctx: StepContext) -> None: ...


@runtime_checkable
class EpochHook(Protocol):
    """Decides at epoch ends (e.g. freeze neurons, prune a step, stop early)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None: ...


@runtime_checkable
class ModelTransform(Protocol):
    """A structure edit applied between fit stages: ``apply(model) -> model``."""

    def apply(self, model: nn.Module) -> nn.Module: ...


@runtime_checkable
class DatasetTransform(Protocol):
    """Rewrites the training set between fit stages from the model the last stage left (e.g.
    pseudo bias labels, upsampling the misclassified samples).

    ``apply_dataset`` returns the new training set and the tensors it was derived from; the
    engine saves them in the run folder, and a resumed run rebuilds the same set with
    ``restore_dataset`` instead of recomputing it from weights it no longer holds.
    """

    def apply_dataset(
        self, model: nn.Module, dataset: Dataset
    ) -> tuple[Dataset, dict[str, Tensor]]: ...

    def restore_dataset(self, dataset: Dataset, state: Mapping[str, Tensor]) -> Dataset: ...


@runtime_checkable
class NeedsStageModel(Protocol):
    """Uses a frozen copy of the model as an earlier fit stage left it (e.g. a teacher).

    ``from_stage`` names that stage; the engine loads the stage's final checkpoint and calls
    ``bind_stage_model`` before the first stage the method is active in (again after a resume).
    """

    from_stage: str | None

    def bind_stage_model(self, model: nn.Module) -> None: ...
