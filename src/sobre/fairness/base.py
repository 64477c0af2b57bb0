"""What every debiasing method shares: bias labels from the batch, and a plain training loop.

A debiasing loss is a :class:`~sobre.core.Regularizer` (it runs unchanged in the engine's
Lightning routine and in :func:`train`); the ones that need the bias label ``b`` subclass
:class:`BiasRegularizer` and read it with :meth:`BiasRegularizer.bias_labels` from the batch's
third element, ``(x, y, b)``. :func:`train` is the plain loop of ``sobre.core.methods`` for
(x, y, b) loaders; :func:`predict` and :func:`bias_report` evaluate on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import model_device
from sobre.core.methods import (
    EpochHook,
    GradientHook,
    Regularizer,
    SetupHook,
    StepContext,
    task_weight,
    total,
)
from sobre.core.taps import FeatureTap
from sobre.fairness.metrics import AlignedBias, BiasReport

UNSUPERVISED_HINT = (
    "use a dataset whose samples are (x, y, b) (biased_mnist, colored_mnist, ...), or infer "
    "pseudo bias labels without supervision (sobre.fairness.discovery, paper #17)"
)


class BiasRegularizer(Regularizer):
    """A regulariser that needs the bias (or private) label ``b`` of each training sample."""

    requires_bias_labels: bool = True
    layer: str = ""

    def bias_labels(self, ctx: StepContext) -> Tensor:
        """``b`` of the batch (its third element), checked: present, one per sample, known."""
        if not ctx.extra:
            raise ConfigError(
                f"{type(self).__name__} needs bias labels but the batch holds only (x, y); "
                + UNSUPERVISED_HINT
            )
        b = torch.as_tensor(ctx.extra[0])
        n = len(ctx.targets) if ctx.targets is not None else len(b)
        if b.dim() != 1 or len(b) != n:
            raise ConfigError(
                f"{type(self).__name__}: bias labels must be one integer per sample, got shape "
                f"{tuple(b.shape)} for a batch of {n}"
            )
        if (b < 0).any():
            raise ConfigError(
                f"{type(self).__name__}: {int((b < 0).sum())} samples have unknown bias label "
                f"(b = -1); " + UNSUPERVISED_HINT
            )
        return b.long()

    def tap_layer(self, layer: str) -> None:
        """Ask the training loop to record ``layer``'s output each step (``needs_features``)."""
        if not isinstance(layer, str) or not layer:
            raise ConfigError(
                f"{type(self).__name__}: layer must be a module name such as 'embedding', "
                f"got {layer!r}"
            )
        self.layer = layer
        self.needs_features = (layer,)

    def tapped(self, ctx: StepContext) -> Tensor:
        """The features of the tapped layer this step, flattened to (B, D)."""
        if self.layer not in ctx.features:
            raise ConfigError(
                f"{type(self).__name__}: no features recorded for layer {self.layer!r} "
                f"(recorded: {sorted(ctx.features) or 'none'}); name a module of "
                f"model.named_modules() that forward runs, e.g. layer='embedding' for "
                f"simple_conv, and train with a loop that taps needs_features "
                f"(sobre.fairness.base.train or the engine)"
            )
        return ctx.features[self.layer].flatten(1)


def check_weights(owner: str, **weights: float) -> None:
    """Loss weights are non-negative and not all 0 (else the regulariser does nothing)."""
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        given = ", ".join(f"{k}={v}" for k, v in weights.items())
        example = ", ".join(f"{k}=1.0" for k in weights)
        raise ConfigError(
            f"{owner}: {' and '.join(weights)} are non-negative weights, not all 0; got "
            f"{given}: pass e.g. {example}"
        )


def train(
    model: nn.Module,
    loader: Iterable[Sequence[Any]],
    *,
    epochs: int,
    regularizers: Sequence[Regularizer] = (),
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` with cross-entropy plus ``regularizers`` (the ``core.methods`` loop).

    Args:
        loader: batches ``(x, y)`` or ``(x, y, b, ...)``; extras reach the methods as
            ``ctx.extra``.
        epochs: passes over ``loader``.
        regularizers: loss terms; their hooks (setup, after_backward / after_step,
            on_epoch_end) run where the ``core.methods`` loop says.
        optimizer: factory over the trainable parameters of the model and the regularisers
            (default Adam, lr 1e-3, weight decay 1e-4: the bias spec's SimpleConvNet setting).
        scheduler: factory of an epoch-wise LR scheduler.
        criterion: task loss (default mean cross-entropy).

    Returns:
        Per epoch, the mean of each logged term (``task`` and the regularisers' names).
    """
    if epochs < 1:
        raise ConfigError(f"train: epochs must be >= 1, got {epochs}")
    criterion = criterion or nn.CrossEntropyLoss()
    params = [p for m in (model, *regularizers) for p in m.parameters() if p.requires_grad]
    opt = (optimizer or (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4)))(params)
    sched = scheduler(opt) if scheduler is not None else None
    device = model_device(model)
    for reg in regularizers:
        reg.to(device)
        if isinstance(reg, SetupHook):
            reg.setup(model)
    selectors = list(dict.fromkeys(s for r in regularizers for s in r.needs_features))
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(epochs):
        model.train()
        sums: dict[str, float] = {}
        batches = 0
        for batch in loader:
            x, y, *extra = batch
            x, y = x.to(device), y.to(device)
            extra = [e.to(device) if isinstance(e, Tensor) else e for e in extra]
            if selectors:
                with FeatureTap(model, selectors, detach=False) as tap:
                    out = model(x)
                features = dict(tap.features)
            else:
                out, features = model(x), {}
            ctx = StepContext(model, x, y, out, features, step, epoch, extra=tuple(extra))
            terms = {"task": task_weight(regularizers) * criterion(out, y)}
            for reg in regularizers:
                terms.update(reg.terms(ctx))
            opt.zero_grad(set_to_none=True)
            total(terms).backward()
            for reg in regularizers:
                if isinstance(reg, GradientHook):
                    reg.after_backward(model, ctx)
            opt.step()
            for reg in regularizers:
                if isinstance(reg, GradientHook):
                    reg.after_step(model, ctx)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            batches += 1
            step += 1
        if batches == 0:
            raise ConfigError("train: the loader yielded no batch")
        if sched is not None:
            sched.step()
        metrics = {k: v / batches for k, v in sums.items()}
        for reg in regularizers:
            if isinstance(reg, EpochHook):
                reg.on_epoch_end(model, epoch, metrics)
        history.append(metrics)
    return history


@torch.no_grad()
def predictions(
    model: nn.Module, loader: Iterable[Sequence[Any]], *, items: int, need: str, fn: str
) -> list[Tensor]:
    """Predicted classes then the batches' items 1..``items - 1`` (y, b, ...), concatenated,
    in loader order, with ``model`` in eval mode (restored afterwards).

    Args:
        items: how many elements each batch must hold (2 for (x, y), 3 for (x, y, b)).
        need: the batch layout named in the error, e.g. ``"(x, y, b)"``.
        fn: the caller, named in the errors.
    """
    device, was_training = model_device(model), model.training
    model.eval()
    parts: list[list[Tensor]] = [[] for _ in range(items)]
    try:
        for batch in loader:
            if not isinstance(batch, tuple | list) or len(batch) < items:
                got = len(batch) if isinstance(batch, tuple | list) else 1
                raise ConfigError(
                    f"{fn} needs {need} batches; the loader yields {got} items per batch"
                )
            parts[0].append(model(batch[0].to(device)).argmax(1).cpu())
            for i in range(1, items):
                parts[i].append(torch.as_tensor(batch[i]).cpu())
    finally:
        model.train(was_training)
    if not parts[0]:
        raise ConfigError(f"{fn}: the loader yielded no batch; pass a non-empty loader")
    return [torch.cat(p) for p in parts]


def predict(model: nn.Module, loader: Iterable[Sequence[Any]]) -> tuple[Tensor, Tensor, Tensor]:
    """Predicted classes, labels ``y`` and bias labels ``b`` over an (x, y, b) loader (eval)."""
    pred, y, b = predictions(model, loader, items=3, need="(x, y, b)", fn="predict")
    return pred, y, b


def bias_report(
    model: nn.Module, loader: Iterable[Sequence[Any]], *, aligned: AlignedBias = None
) -> BiasReport:
    """The :class:`BiasReport` of ``model`` on an (x, y, b) loader."""
    return BiasReport.from_predictions(*predict(model, loader), aligned=aligned)
