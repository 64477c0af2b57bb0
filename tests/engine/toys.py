"""Toy methods used by the engine tests (importable as ``toys`` by subprocess runs)."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from sobre.core import dist
from sobre.core.edits import structural_edit
from sobre.core.masks import attach_mask, iter_masks
from sobre.core.methods import Regularizer, StepContext
from sobre.core.taps import FeatureTap


class L2(Regularizer):
    """weight * Σ ||θ||²."""

    name = "l2"

    def __init__(self, weight: float = 1e-3) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ctx: StepContext) -> Tensor:
        return self.weight * sum(p.pow(2).sum() for p in ctx.model.parameters())


class Anchor(Regularizer):
    """weight * Σ ||θ - θ_ref||², θ_ref the final weights of the stage named ``from_stage``.

    ``bound`` (class-wide) records every reference it was handed, for the tests to inspect.
    """

    name = "anchor"
    bound: list[dict[str, Tensor]] = []  # noqa: RUF012 - shared record on purpose

    def __init__(self, from_stage: str, weight: float = 1e-2) -> None:
        super().__init__()
        self.from_stage, self.weight = from_stage, weight
        self.reference: dict[str, Tensor] = {}

    def bind_stage_model(self, model: nn.Module) -> None:
        self.reference = {k: v.detach().clone() for k, v in model.named_parameters()}
        Anchor.bound.append(self.reference)

    def forward(self, ctx: StepContext) -> Tensor:
        return self.weight * sum(
            (p - self.reference[k].to(p.device)).pow(2).sum()
            for k, p in ctx.model.named_parameters()
        )


class ActivationL1(Regularizer):
    """weight * mean |a| over the tapped ReLU outputs (uses the feature tap, graph attached)."""

    name = "act_l1"
    needs_features = ("features.relu*",)

    def __init__(self, weight: float = 1e-2) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        return {self.name: self.weight * sum(f.abs().mean() for f in ctx.features.values())}


class HalfFrozen:
    """Update selector: freezes the gradient of every other output channel of the first conv."""

    def setup(self, model: nn.Module) -> None:
        conv = model.features.conv1
        mask = torch.ones(conv.out_channels)
        mask[::2] = 0
        attach_mask(conv, kind="channel", mask=mask, target="grad")

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        return None

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        return None


class SharedChannelMask:
    """Masks conv2 channels whose activation mean, all-reduced over ranks, is below the median.

    Each rank sees different data; the decision must still be identical on every rank.
    """

    def setup(self, model: nn.Module) -> None:
        self.mask = attach_mask(model.features.conv2, kind="channel")

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        return None

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        with torch.no_grad(), FeatureTap(model, "features.conv2", mode="stats") as tap:
            model(ctx.inputs)
        mean = dist.all_reduce_mean(tap.stats["features.conv2"].mean.abs())
        self.mask.copy_((mean >= mean.median()).float())


class Crash(Callback):
    """Simulates a killed run: raises at the end of training epoch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.at:
            raise RuntimeError("killed")


def weights_digest(model: nn.Module) -> dict[str, object]:
    """sha-like digests of the weights and of every mask."""
    import hashlib

    def h(t: Tensor) -> str:
        return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    return {
        "weights": h(torch.cat([p.detach().flatten() for p in model.parameters()])),
        "masks": {f"{m.module}.{m.param}.{m.target}": h(m.mask) for m in iter_masks(model)},
    }


class ZeroHalfClassifier:
    """A ModelTransform for stage tests: masks half of the classifier's weights."""

    def apply(self, model: nn.Module) -> nn.Module:
        mask = torch.zeros_like(model.classifier.weight)
        mask.view(-1)[: mask.numel() // 2] = 1
        attach_mask(model.classifier, mask=mask)
        return model


@structural_edit("toy_identity")
def make_identity(model: nn.Module, site: str) -> nn.Module:
    """A recorded structure edit: the activation at ``site`` becomes an Identity."""
    parent, _, leaf = site.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    return model


class Linearize:
    """A ModelTransform made of a recorded edit (replayed on resume and on load)."""

    def __init__(self, site: str) -> None:
        self.site = site

    def apply(self, model: nn.Module) -> nn.Module:
        return make_identity(model, site=self.site)


class ProbeAndMask:
    """A data-dependent transform: reads the training loader, masks half the classifier, reports."""

    def __init__(self) -> None:
        self.batches = 0
        self.calls = 0

    def apply(self, model: nn.Module, loader) -> nn.Module:
        self.calls += 1
        self.batches = sum(1 for _ in loader)
        return ZeroHalfClassifier().apply(model)

    def report(self) -> dict[str, int]:
        return {"batches": self.batches, "calls": self.calls}


class EditAtLastEpoch(Callback):
    """A recorded structure edit made inside a fit, after the last epoch's validation."""

    def __init__(self, site: str) -> None:
        self.site = site

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            pl_module.net = make_identity(pl_module.net, site=self.site)


class EasierHalf:
    """A DatasetTransform for stage tests: keeps the half of the training set the model gets
    the lowest loss on. ``calls`` (class-wide) records "apply" / "restore" for the tests."""

    calls: list[str] = []  # noqa: RUF012 - shared record on purpose

    def apply_dataset(self, model: nn.Module, dataset) -> tuple[object, dict[str, Tensor]]:
        from torch.utils.data import DataLoader, Subset

        model.eval()
        with torch.no_grad():
            losses = torch.cat(
                [
                    nn.functional.cross_entropy(model(x), y, reduction="none")
                    for x, y in DataLoader(dataset, batch_size=64)
                ]
            )
        model.train()
        keep = losses.argsort()[: len(losses) // 2].sort().values
        EasierHalf.calls.append("apply")
        return Subset(dataset, keep.tolist()), {"indices": keep}

    def restore_dataset(self, dataset, state) -> object:
        from torch.utils.data import Subset

        EasierHalf.calls.append("restore")
        return Subset(dataset, state["indices"].tolist())
