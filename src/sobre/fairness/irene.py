"""IRENE (#23, Tartaglione, arXiv 2210.00891): remove a private attribute's information at the
bottleneck by penalising an estimate of the mutual information I(Z; P).

A private head g_φ reads the bottleneck z (the tapped layer) and predicts the private label p
(the batch's third item). Each training step, as reconstructed in the trust spec §5.2:

1. head step: φ ← minimise CE(g_φ(z.detach()), p), ``head_steps`` Adam steps (a tight estimate);
2. penalty: the encoder minimises CE(y) + λ Î(Z; P) with φ fixed, where Î is either the
   variational bound ``H(P) − CE(g_φ(z), p)`` (H the batch's empirical entropy of p, clamped at
   0: the penalty stops pushing once the head is at chance instead of making it wrong, unlike
   gradient reversal) or the plug-in MI of the batch's joint table
   J = (1/B) Σ_i onehot(p_i) ⊗ softmax(g_φ(z_i)).

The head trains inside :meth:`IRENE.forward` with its own optimizer and its parameters have
``requires_grad=False`` outside that step, so any loop that optimises the trainable parameters of
the model and its regularisers (``sobre.fairness.base.train``, the engine's routine) leaves φ to
the head step and the penalty's gradient reaches only the encoder. The head's gradients are
averaged over ranks in a distributed fit, so every rank keeps the same head. The head's optimizer
state is part of ``state_dict`` (extra state): a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sobre.core import dist
from sobre.core.errors import ConfigError
from sobre.core.methods import StepContext
from sobre.core.registry import check_choice
from sobre.fairness.base import BiasRegularizer

__all__ = ["IRENE", "HeadKind", "MIKind", "mutual_information_estimate"]

HeadKind = Literal["linear", "mlp"]
MIKind = Literal["variational", "joint"]


def _check_private(p: Tensor, classes: int) -> None:
    if len(p) and (p.min() < 0 or p.max() >= classes):
        raise ConfigError(
            f"private labels span {int(p.min())}..{int(p.max())} but the head predicts "
            f"{classes} classes; set num_private to the number of private classes"
        )


def mutual_information_estimate(
    z: Tensor, p: Tensor, head: nn.Module, *, kind: MIKind = "variational"
) -> Tensor:
    """Î(Z; P) in nats on a batch, from the private head's logits ``head(z)`` (≥ 0).

    ``"variational"``: ``max(0, H(P) − CE(head(z), p))`` with H(P) the entropy of the batch's
    empirical distribution of p. ``"joint"``: the MI of the table
    ``J = (1/B) Σ_i onehot(p_i) ⊗ softmax(head(z_i))``, ``Σ J log(J / (J_row J_col))``. A head
    that ignores z (a chance head) gives 0 with either estimator.
    """
    check_choice("mi", kind, get_args(MIKind))
    logits = head(z)
    classes = logits.shape[1]
    _check_private(p, classes)
    onehot = F.one_hot(p, classes).to(logits.dtype)
    if kind == "variational":
        q = onehot.mean(0)
        entropy = -torch.special.xlogy(q, q).sum()
        return (entropy - F.cross_entropy(logits, p)).clamp_min(0.0)
    joint = onehot.T @ logits.softmax(1) / len(p)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    tiny = torch.finfo(joint.dtype).tiny  # 0 log 0 = 0, with a finite gradient at J = 0
    mi = joint * (joint.clamp_min(tiny).log() - outer.clamp_min(tiny).log())
    return mi.sum().clamp_min(0.0)


class IRENE(BiasRegularizer):
    """IRENE's penalty ``λ Î(Z; P)`` with a private head trained inside each step.

    Args:
        feature_dim: width D of the tapped features (128 for ``simple_conv``'s embedding).
        num_private: number of private classes (the head's outputs).
        lam: weight λ of the MI penalty (spec range 0.1-10; 0.1 is the stable CPU setting).
        head: ``"linear"`` or ``"mlp"`` (one hidden ReLU layer of ``hidden`` units).
        mi: ``"variational"`` (H(P) − CE) or ``"joint"`` (plug-in MI of the soft joint table).
        head_steps: Adam steps of the head on the detached batch before each penalty (k_φ).
        head_lr: the head's Adam learning rate.
        hidden: hidden width of the MLP head.
        warmup_epochs: first epochs with λ = 0 (the head still trains).
        layer: exact module name of the bottleneck (``embedding`` by default).

    After each training step, :attr:`last_mi` holds the batch's Î (nats, detached) and
    :attr:`last_head_loss` the head's last cross-entropy. A training Î far below the post-hoc
    probe's leakage means the head is too weak to be a valid attacker (trust spec §5.4).
    """

    name = "irene"

    def __init__(
        self,
        feature_dim: int,
        num_private: int,
        *,
        lam: float = 1.0,
        head: HeadKind = "linear",
        mi: MIKind = "variational",
        head_steps: int = 1,
        head_lr: float = 1e-3,
        hidden: int = 128,
        warmup_epochs: int = 0,
        layer: str = "embedding",
    ) -> None:
        super().__init__()
        check_choice("head", head, get_args(HeadKind), "IRENE")
        check_choice("mi", mi, get_args(MIKind), "IRENE")
        sizes = (("feature_dim", feature_dim, 1), ("num_private", num_private, 2))
        sizes += (("head_steps", head_steps, 1), ("hidden", hidden, 1))
        for key, value, least in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"IRENE: {key} must be an integer >= {least}, got {value!r}")
        if lam < 0 or head_lr <= 0 or warmup_epochs < 0:
            raise ConfigError(
                f"IRENE needs lam >= 0, head_lr > 0 and warmup_epochs >= 0; got lam={lam}, "
                f"head_lr={head_lr}, warmup_epochs={warmup_epochs}: e.g. lam=0.1, head_lr=1e-3"
            )
        self.feature_dim, self.num_private = feature_dim, num_private
        self.lam, self.kind, self.head_steps = float(lam), mi, head_steps
        self.warmup_epochs = warmup_epochs
        self.tap_layer(layer)
        self.head = (
            nn.Linear(feature_dim, num_private)
            if head == "linear"
            else nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_private)
            )
        )
        self.head.requires_grad_(False)  # trained by head_step only, never by the outer loop
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=head_lr)
        self.last_mi = torch.zeros(())
        self.last_head_loss = torch.full((), math.nan)

    @contextlib.contextmanager
    def _head_trainable(self) -> Iterator[None]:
        self.head.requires_grad_(True)
        try:
            yield
        finally:
            self.head.requires_grad_(False)

    def _average_head_grads(self) -> None:
        """Mean of the head's gradients over ranks (one collective), so every rank's φ agrees."""
        if not dist.is_distributed():
            return
        grads = [q.grad for q in self.head.parameters() if q.grad is not None]
        for g, total in zip(grads, dist.all_reduce_sum_each(grads), strict=True):
            g.copy_(total / dist.world_size())

    def head_step(self, z: Tensor, p: Tensor) -> Tensor:
        """``head_steps`` Adam steps of CE(g_φ(z.detach()), p); returns the last loss (detached).

        In a distributed fit the gradients are averaged over ranks before each step, as DDP does
        for the model, so the heads (and the penalty they define) stay identical on every rank.
        """
        z = z.detach()
        loss = torch.full((), math.nan)
        with torch.enable_grad(), self._head_trainable():
            for _ in range(self.head_steps):
                loss = F.cross_entropy(self.head(z), p)
                self.head_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._average_head_grads()
                self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def forward(self, ctx: StepContext) -> Tensor:
        p = self.bias_labels(ctx)
        z = self.tapped(ctx)
        if z.shape[1] != self.feature_dim:
            raise ConfigError(
                f"IRENE: layer {self.layer!r} gives {z.shape[1]} features per sample but "
                f"feature_dim={self.feature_dim}; set feature_dim={z.shape[1]}"
            )
        p = p.to(z.device)
        _check_private(p, self.num_private)
        if ctx.stage == "train":
            self.last_head_loss = self.head_step(z, p)
        mi = mutual_information_estimate(z, p, self.head, kind=self.kind)
        self.last_mi = mi.detach()
        lam = self.lam if ctx.epoch >= self.warmup_epochs else 0.0
        return lam * mi

    def get_extra_state(self) -> dict[str, Any]:
        """The head optimizer's state (moments, step counts), saved with ``state_dict``."""
        return {"head_optimizer": self.head_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # a copy: Optimizer.load_state_dict keeps the given moment tensors when no cast is needed
        self.head_optimizer.load_state_dict(copy.deepcopy(state["head_optimizer"]))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> IRENE:
        """Move or cast the head optimizer's moments with the head (``.to``, ``.cuda``, ...)."""
        super()._apply(fn, recurse)
        for state in self.head_optimizer.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, Tensor):
                    state[key] = fn(value)
        return self

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, mi={self.kind!r}, head_steps={self.head_steps}, "
            f"warmup_epochs={self.warmup_epochs}, layer={self.layer!r}"
        )
