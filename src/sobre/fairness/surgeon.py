"""Unbiased sub-networks of a frozen vanilla model: Debiasing surgeon (FFW, #44) and BISE (#9).

Both freeze every weight of a trained (biased) model and learn only a binary mask M = 1[S > 0]
(i.e. σ(S) > 0.5) over real scores S, with a straight-through gradient (∂L/∂S := ∂L/∂M); the
masked model computes f_{W ⊙ M}. A bias head h_b reads the features z at ``feature_layer`` and is
trained to predict the bias label b (CE, its own optimizer), alternating one step with one step
of the scores, which minimise (bias spec §3, §4)

    L(S) = CE_w(f_{W ⊙ M}(x), y) + γ · Î(b; h_b(z)) + η · mean σ(S)

- CE_w: plain cross-entropy (FFW), or weighted by w_i ∝ 1 / |group(y_i, b_i)| (BISE,
  ``reweight="group"``; group sizes counted on the training loader).
- Î, ``mi="confusion"``: plug-in mutual information of the soft confusion matrix
  P(b, b̂) = Σ_i w_i e_{b_i} softmax(h_b(z_i))ᵀ / Σ_i w_i with the group-balanced w_i;
  ``mi="entropy"``: H(b) − CE_w(h_b(z), b), the variational bound.
- η · mean σ(S): the L1 term ‖σ(S)‖₁ divided by the number of scores (scale free).
- ``keep_ratio`` κ (BISE's budget): each masked tensor (or channel group) keeps exactly its
  ⌈κ n⌉ best-scored entries (edge-popup's top-k) instead of the threshold; a soft penalty on
  mean σ(S) would move every score alike under Adam and drop whole layers at once.

Masks go through :mod:`sobre.core.masks`: each mask buffer is made a leaf that requires grad, so
backward leaves ∂L/∂M in ``mask.grad``, which the straight-through step adds to the scores.
``granularity="channel"`` gates the DepGraph channel groups of :func:`sobre.core.compact.
channel_groups` (the producing Conv/Linear and the BatchNorm reading them share one score per
channel), so a gated-off channel outputs exactly 0 and :func:`~sobre.core.compact.compact`
removes it (``MaskResult.apply(model, physically_prune=True)``).

The search works on a copy: the caller's model is never modified (its weights stay
bit-identical) and the masked model's ``original`` weights are the vanilla ones. BatchNorm uses
batch statistics during the search; its running statistics are then re-estimated on the
training loader with the final mask (with the vanilla statistics, masked models collapse; bias
spec, calibration).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sobre.core.compact import channel_groups, compact
from sobre.core.errors import ConfigError
from sobre.core.masks import attach_mask, get_mask, sparsity
from sobre.core.measure import model_device
from sobre.core.methods import StepContext
from sobre.core.registry import check_choice
from sobre.core.taps import FeatureTap
from sobre.fairness.base import BiasRegularizer, train
from sobre.fairness.metrics import group_counts

__all__ = [
    "BISE",
    "FantasticWeights",
    "GroupBalancedCE",
    "MaskResult",
    "MaskedSubnetwork",
    "confusion_mi",
    "entropy_mi",
    "group_weight_table",
    "reestimate_bn",
]

Granularity = Literal["weight", "channel"]
MIKind = Literal["confusion", "entropy"]
Reweight = Literal["group"] | None
Batch = Sequence[Any]

_EPS = 1e-12


# --------------------------------------------------------------------------- objectives


def group_weight_table(loader: Iterable[Batch]) -> Tensor:
    """Per-group weights ``table[y, b] = N / (G · n_(y,b))`` of an (x, y, b) loader.

    G is the number of non-empty groups, so the weights average 1 over the training set and
    every group weighs the same in total (empty groups get 0).

    Raises:
        ConfigError: batches without a bias label, unknown bias labels (b = -1), empty loader.
    """
    checker = GroupBalancedCE(torch.ones(1, 1))
    ys, bs = [], []
    for batch in loader:
        x, y, *extra = batch
        ys.append(torch.as_tensor(y))
        bs.append(checker.bias_labels(StepContext(nn.Identity(), x, ys[-1], extra=extra)))
    if not ys:
        raise ConfigError("group_weight_table: the loader yielded no batch")
    counts = group_counts(torch.cat(ys), torch.cat(bs))
    n_y = 1 + max(g[0] for g in counts)
    n_b = 1 + max(g[1] for g in counts)
    table = torch.zeros(n_y, n_b)
    total = sum(counts.values())
    for (y, b), n in counts.items():
        table[y, b] = total / (len(counts) * n)
    return table


class GroupBalancedCE(BiasRegularizer):
    """Group-reweighted cross-entropy Σ_i w_i CE_i / Σ_i w_i, w_i = ``table[y_i, b_i]`` (BISE).

    It replaces the task loss (``task_weight = 0``): pass it to :func:`sobre.fairness.base.train`
    to fine-tune with the reweighted objective.
    """

    name = "task_reweighted"
    task_weight = 0.0

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))

    def weights(self, y: Tensor, b: Tensor) -> Tensor:
        """w_i of each sample (0 for a group the table has not seen)."""
        n_y, n_b = self.table.shape
        inside = (y < n_y) & (b < n_b)
        w = self.table[y.clamp(max=n_y - 1), b.clamp(max=n_b - 1)]
        return torch.where(inside, w, torch.zeros_like(w))

    def loss(self, logits: Tensor, y: Tensor, b: Tensor) -> Tensor:
        """Σ_i w_i CE(logits_i, y_i) / Σ_i w_i."""
        w = self.weights(y, b)
        return (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum().clamp_min(_EPS)

    def forward(self, ctx: StepContext) -> Tensor:
        assert ctx.outputs is not None and ctx.targets is not None
        return self.loss(ctx.outputs, ctx.targets, self.bias_labels(ctx))


def confusion_mi(b: Tensor, probs: Tensor, weights: Tensor | None = None) -> Tensor:
    """Plug-in I(b; b̂) of the soft confusion matrix P = Σ_i w_i e_{b_i} p_iᵀ / Σ_i w_i.

    Args:
        b: (N,) bias labels in [0, K).
        probs: (N, K) predicted bias distributions p_i (rows sum to 1).
        weights: (N,) sample weights w_i (default 1).

    Returns:
        Σ_jk P_jk log(P_jk / (P_j· P_·k)) in nats, differentiable in ``probs``.
    """
    w = torch.ones_like(b, dtype=probs.dtype) if weights is None else weights.to(probs.dtype)
    onehot = F.one_hot(b, probs.shape[1]).to(probs.dtype)
    joint = (w[:, None] * onehot).T @ probs / w.sum().clamp_min(_EPS)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    return (joint * (torch.log(joint + _EPS) - torch.log(outer + _EPS))).sum()


def entropy_mi(b: Tensor, logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Variational I(b; b̂) ≈ H(b) − CE_w(h_b(z), b) (nats; H of the weighted batch labels)."""
    w = torch.ones_like(b, dtype=logits.dtype) if weights is None else weights.to(logits.dtype)
    prior = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    prior = prior.index_add(0, b, w) / w.sum().clamp_min(_EPS)
    entropy = -(prior * torch.log(prior + _EPS)).sum()
    ce = (w * F.cross_entropy(logits, b, reduction="none")).sum() / w.sum().clamp_min(_EPS)
    return entropy - ce


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: Iterable[Batch]) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them on ``loader``.

    Exact population averages over the batches (``momentum=None``), in train mode, no gradient;
    the model's mode and momenta are restored. Returns ``model``.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    device = model_device(model)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in loader:
            model(batch[0].to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return model


# --------------------------------------------------------------------------- masked copy


@dataclass
class _Site:
    """One score tensor and the masks it drives: ``(module, kind, positions)`` per member;
    ``positions`` maps each masked entry to its score (channel groups), ``None`` = same shape."""

    name: str
    size: tuple[int, ...]
    members: list[tuple[str, str, Tensor | None]] = field(default_factory=list)


class MaskedSubnetwork(nn.Module):
    """A frozen copy of ``model`` with learnable binary masks (scores S, M = 1[S > 0]).

    Args:
        model: The trained model (copied; never modified).
        granularity: ``"weight"`` (one score per weight entry of the included layers) or
            ``"channel"`` (one score per channel of each DepGraph channel group whose root is
            included: its producing layers and BatchNorms are gated together).
        include: Layer types that get masks.
        exclude: Module names (or name prefixes) left unmasked (default the classifier ``fc``).
        example_inputs: Inputs of ``forward`` (needed by ``"channel"`` to trace the groups).
        keep_ratio: κ ∈ (0, 1]: keep exactly the ⌈κ n⌉ best scores of each site instead of
            thresholding at 0.
        init: Initial score (1: σ(S) ≈ 0.73, every mask starts at 1).

    Build it on the model's device: moving it afterwards would detach the masks from the
    gradient (the mask buffers are leaves that require grad).

    Raises:
        ConfigError: unknown granularity, κ outside (0, 1], nothing to mask.
    """

    def __init__(
        self,
        model: nn.Module,
        granularity: Granularity = "weight",
        *,
        include: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear),
        exclude: Sequence[str] = ("fc",),
        example_inputs: Tensor | None = None,
        keep_ratio: float | None = None,
        init: float = 1.0,
    ) -> None:
        super().__init__()
        _check_granularity(granularity)
        if keep_ratio is not None and not 0 < keep_ratio <= 1:
            raise ConfigError(f"keep_ratio must be in (0, 1] or None, got {keep_ratio}")
        self.granularity = granularity
        self.keep_ratio = keep_ratio
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

        def wanted(name: str, module: nn.Module) -> bool:
            excluded = any(name == e or name.startswith(e + ".") for e in exclude)
            return isinstance(module, include) and not excluded

        sites: list[_Site] = []
        if granularity == "weight":
            for name, module in self.model.named_modules():
                if wanted(name, module):
                    sites.append(_Site(name, tuple(module.weight.shape), [(name, "weight", None)]))
        else:
            if example_inputs is None:
                raise ConfigError(
                    "granularity='channel' needs example_inputs to trace the channel groups; "
                    "pass a batch of inputs"
                )
            for group in channel_groups(self.model, example_inputs):
                root = self.model.get_submodule(group.root)
                if group.pinned or not wanted(group.root, root):
                    continue
                site = _Site(group.root, (group.size,))
                for member in group.members:
                    if member.role not in ("out", "both", "norm"):
                        continue
                    module = self.model.get_submodule(member.module)
                    if getattr(module, "weight", None) is None:  # BatchNorm without affine
                        continue
                    positions = torch.full((module.weight.shape[0],), -1, dtype=torch.long)
                    for r, idxs in enumerate(member.index):
                        positions[list(idxs)] = r
                    site.members.append((member.module, "channel", positions))
                sites.append(site)
        if not sites:
            raise ConfigError(
                f"MaskedSubnetwork: no layer to mask in {type(model).__name__} (include="
                f"{[t.__name__ for t in include]}, exclude={list(exclude)}); widen include or "
                "shorten exclude"
            )
        self.sites = sites
        self.scores = nn.ParameterList(
            nn.Parameter(torch.full(s.size, float(init), device=model_device(self.model)))
            for s in sites
        )
        for site in sites:
            for module, kind, _ in site.members:
                attach_mask(self.model.get_submodule(module), kind=kind).requires_grad_(True)  # type: ignore[arg-type]
        self.refresh()

    def _masks(self, i: int) -> list[Tensor]:
        """The live core mask buffers of site ``i``'s members."""
        found = [get_mask(self.model.get_submodule(m)) for m, _, _ in self.sites[i].members]
        return [m for m in found if m is not None]

    def hard(self, i: int) -> Tensor:
        """The binary mask of site ``i``: 1[S > 0], or its top-⌈κ n⌉ scores."""
        s = self.scores[i].detach()
        if self.keep_ratio is None:
            return (s > 0).to(s.dtype)
        k = max(1, math.ceil(self.keep_ratio * s.numel()))
        flat = torch.zeros(s.numel(), dtype=s.dtype, device=s.device)
        flat[s.flatten().topk(k).indices] = 1.0
        return flat.view_as(s)

    @torch.no_grad()
    def refresh(self) -> None:
        """Write the current binary masks into the core mask buffers."""
        for i, site in enumerate(self.sites):
            m = self.hard(i)
            for (_, _, positions), buf in zip(site.members, self._masks(i), strict=True):
                buf.copy_(m if positions is None else _spread(m, positions.to(m.device)))

    def straight_through(self) -> None:
        """Add ∂L/∂M, left by backward in the mask buffers, to the scores' gradients."""
        for i, site in enumerate(self.sites):
            score = self.scores[i]
            for (_, _, positions), buf in zip(site.members, self._masks(i), strict=True):
                if buf.grad is None:
                    continue
                g = buf.grad
                if positions is not None:
                    keep = positions >= 0
                    g = torch.zeros_like(score).index_add(
                        0, positions[keep].to(g.device), g[keep.to(g.device)]
                    )
                score.grad = g.clone() if score.grad is None else score.grad + g
                buf.grad = None

    def soft_l1(self) -> Tensor:
        """mean σ(S) over every score (the L1 term divided by the number of scores)."""
        total = sum(torch.sigmoid(s).sum() for s in self.scores)
        return total / sum(s.numel() for s in self.scores)  # type: ignore[return-value]

    def kept(self) -> float:
        """Fraction of scores whose mask is 1."""
        return sum(float(self.hard(i).sum()) for i in range(len(self.sites))) / sum(
            s.numel() for s in self.scores
        )

    def binary_masks(self) -> list[tuple[str, str, Tensor]]:
        """``(module, kind, mask)`` of every masked layer, detached copies."""
        return [
            (module, kind, mask.detach().clone())
            for i, site in enumerate(self.sites)
            for (module, kind, _), mask in zip(site.members, self._masks(i), strict=True)
        ]

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _spread(mask: Tensor, positions: Tensor) -> Tensor:
    """A site's channel mask on one member's channels (1 where the member is not gated)."""
    return torch.where(positions >= 0, mask[positions.clamp_min(0)], torch.ones_like(mask[:1]))


def _check_granularity(granularity: str) -> None:
    if granularity not in ("weight", "channel"):
        raise ConfigError(
            f"granularity must be 'weight' (one score per weight) or 'channel' (one per "
            f"channel, prunable with compact), got {granularity!r}"
        )


# --------------------------------------------------------------------------- result


@dataclass
class MaskResult:
    """The masks found over a frozen model and what applying them needs.

    Attributes:
        granularity: ``"weight"`` or ``"channel"``.
        masks: ``(module, kind, mask)`` per masked layer (core.masks ``kind``).
        bn_stats: Re-estimated running statistics, per BatchNorm name.
        sparsity: Fraction of the masked layers' parameters masked out
            (:func:`sobre.core.masks.sparsity`).
        example_inputs: A small batch of inputs, for :func:`~sobre.core.compact.compact`.
        history: Per epoch: ``task``, ``mi``, ``l1``, ``bias_acc`` (the head's training
            accuracy) and ``kept`` (fraction of masks at 1).
    """

    granularity: str
    masks: list[tuple[str, str, Tensor]]
    bn_stats: dict[str, dict[str, Tensor]]
    sparsity: float
    example_inputs: Tensor
    history: list[dict[str, float]] = field(default_factory=list)

    def apply(self, model: nn.Module, physically_prune: bool = False) -> nn.Module:
        """A copy of ``model`` with the masks attached and the re-estimated BN statistics.

        With ``physically_prune`` the masks are baked and the gated-off channels removed by
        :func:`~sobre.core.compact.compact` (a smaller dense model, same outputs in eval mode).
        ``model`` itself is left untouched.
        """
        out = copy.deepcopy(model)
        for name, kind, mask in self.masks:
            attach_mask(out.get_submodule(name), mask=mask, kind=kind)  # type: ignore[arg-type]
        for name, stats in self.bn_stats.items():
            bn = out.get_submodule(name)
            for key, value in stats.items():
                getattr(bn, key).copy_(value)
        if physically_prune:
            out = compact(out, example_inputs=self.example_inputs.to(model_device(out)))
        return out


# --------------------------------------------------------------------------- methods


class FantasticWeights:
    """Debiasing surgeon (Fantastic weights, ECCV 2024, #44): a mask over frozen weights.

    Args:
        feature_layer: Module whose output the bias head reads (pooled over spatial dims),
            e.g. ``"embedding"`` of ``simple_conv_s``.
        granularity: ``"weight"`` or ``"channel"`` (see :class:`MaskedSubnetwork`).
        gamma: γ, weight of the MI term.
        l1: η, weight of mean σ(S).
        mi: ``"confusion"`` (plug-in MI of the soft confusion matrix) or ``"entropy"``.
        bias_head: Module mapping features to bias logits (default ``nn.Linear(d, K_b)``).
        steps_per_head: Head steps per score step.
        lr: Adam learning rate of the scores.
        head_lr: Adam learning rate of the bias head.
        reweight: ``None`` (plain CE) or ``"group"`` (CE weighted by 1 / group size).
        keep_ratio: κ, or ``None`` to threshold the scores at 0.
        include: Layer types that get masks.
        exclude: Module names left unmasked.
        init: Initial score.
        epochs: Search epochs of :meth:`fit` (default) and :meth:`apply`.
        physically_prune: What :meth:`apply` does with the found masks (see
            :meth:`MaskResult.apply`).

    As a stage transform of an engine recipe (``transforms:`` of a stage after the vanilla
    one, with ``max_epochs: 0`` so the masked weights are not trained), :meth:`apply` runs the
    search on the stage's training loader and returns the masked (or pruned) model.
    """

    def __init__(
        self,
        feature_layer: str,
        *,
        granularity: Granularity = "weight",
        gamma: float = 1.0,
        l1: float = 0.0,
        mi: MIKind = "confusion",
        bias_head: nn.Module | None = None,
        steps_per_head: int = 1,
        lr: float = 0.05,
        head_lr: float = 1e-2,
        reweight: Reweight = None,
        keep_ratio: float | None = None,
        include: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear),
        exclude: Sequence[str] = ("fc",),
        init: float = 1.0,
        epochs: int = 5,
        physically_prune: bool = False,
    ) -> None:
        _check_granularity(granularity)
        check_choice("mi", mi, ("confusion", "entropy"))
        check_choice("reweight", reweight, ("group", None))
        for arg, value in (("gamma", gamma), ("l1", l1)):
            if not value >= 0:
                raise ConfigError(f"{arg} must be >= 0, got {value}")
        for arg, value in (("lr", lr), ("head_lr", head_lr), ("steps_per_head", steps_per_head)):
            if not value > 0:
                raise ConfigError(f"{arg} must be > 0, got {value}")
        if keep_ratio is not None and not 0 < keep_ratio <= 1:
            raise ConfigError(f"keep_ratio must be in (0, 1] or None, got {keep_ratio}")
        self.feature_layer = feature_layer
        self.granularity = granularity
        self.gamma, self.l1, self.mi = gamma, l1, mi
        self.bias_head = bias_head
        self.steps_per_head = steps_per_head
        self.lr, self.head_lr = lr, head_lr
        self.reweight = reweight
        self.keep_ratio = keep_ratio
        self.include, self.exclude, self.init = include, tuple(exclude), init
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        self.epochs, self.physically_prune = epochs, physically_prune
        self.result: MaskResult | None = None

    def _labels(
        self, ce: GroupBalancedCE, batch: Batch, device: torch.device
    ) -> tuple[Tensor, ...]:
        x, y, *extra = batch
        y = torch.as_tensor(y)
        try:
            b = ce.bias_labels(StepContext(nn.Identity(), x, y, extra=tuple(extra)))
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: {err}") from None
        return x.to(device), y.to(device), b.to(device)

    def _features(self, tap: FeatureTap) -> Tensor:
        z = tap.features[self.feature_layer]
        return z.flatten(2).mean(2) if z.ndim > 2 else z

    def fit(
        self, model: nn.Module, loader: Iterable[Batch], epochs: int | None = None
    ) -> MaskResult:
        """Search the mask over a frozen copy of ``model`` (left bit-identical).

        Args:
            model: The trained (vanilla) model.
            loader: Training batches ``(x, y, b)``; ``b`` is required (true or pseudo labels).
            epochs: Passes over ``loader`` (default ``self.epochs``).

        Raises:
            ConfigError: missing or unknown bias labels, ``epochs < 1``, unknown layer.
        """
        epochs = self.epochs if epochs is None else epochs
        if epochs < 1:
            raise ConfigError(f"{type(self).__name__}.fit: epochs must be >= 1, got {epochs}")
        try:
            table = group_weight_table(loader)
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: {err}") from None
        device = model_device(model)
        balanced = GroupBalancedCE(table).to(device)
        first = next(iter(loader))[0][:2].to(device)
        net = MaskedSubnetwork(
            model,
            self.granularity,
            include=self.include,
            exclude=self.exclude,
            example_inputs=first,
            keep_ratio=self.keep_ratio,
            init=self.init,
        )
        try:
            with torch.no_grad(), FeatureTap(net.model, self.feature_layer) as tap:
                net(first)
                dim = self._features(tap).shape[1]
        except KeyError:
            raise ConfigError(
                f"{type(self).__name__}: feature_layer {self.feature_layer!r} produced no "
                "output; name a module that forward calls (e.g. 'embedding')"
            ) from None
        head = (
            nn.Linear(dim, table.shape[1])
            if self.bias_head is None
            else copy.deepcopy(self.bias_head)
        ).to(device)
        score_opt = torch.optim.Adam(net.scores.parameters(), lr=self.lr)
        head_opt = torch.optim.Adam(head.parameters(), lr=self.head_lr)
        history = []
        for _ in range(epochs):
            net.train()
            sums: dict[str, float] = {}
            batches = 0
            for batch in loader:
                x, y, b = self._labels(balanced, batch, device)
                w = balanced.weights(y, b)
                net.refresh()
                with FeatureTap(net.model, self.feature_layer, detach=False) as tap:
                    out = net(x)
                z = self._features(tap)
                for _ in range(self.steps_per_head):  # h_b: maximise its bias accuracy
                    head_opt.zero_grad(set_to_none=True)
                    F.cross_entropy(head(z.detach()), b).backward()
                    head_opt.step()
                logits_b = head(z)
                task = balanced.loss(out, y, b) if self.reweight else F.cross_entropy(out, y)
                if self.mi == "confusion":
                    mi = confusion_mi(b, logits_b.softmax(1), w)
                else:
                    mi = entropy_mi(b, logits_b, w)
                l1 = net.soft_l1()
                score_opt.zero_grad(set_to_none=True)
                (task + self.gamma * mi + self.l1 * l1).backward()
                net.straight_through()
                score_opt.step()
                terms = {
                    "task": float(task.detach()),
                    "mi": float(mi.detach()),
                    "l1": float(l1.detach()),
                    "bias_acc": float((logits_b.argmax(1) == b).float().mean()),
                }
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                batches += 1
            history.append({**{k: v / batches for k, v in sums.items()}, "kept": net.kept()})
        net.refresh()
        reestimate_bn(net.model, loader)
        bn_stats = {
            name: {k: v.detach().clone() for k, v in m.named_buffers(recurse=False)}
            for name, m in net.model.named_modules()
            if isinstance(m, _BatchNorm)
        }
        return MaskResult(
            self.granularity,
            net.binary_masks(),
            bn_stats,
            sparsity(net.model),
            first.cpu(),
            history,
        )

    def apply(self, model: nn.Module, loader: Iterable[Batch]) -> nn.Module:
        """Stage transform: :meth:`fit` on ``loader``, then the masked (or pruned) copy."""
        self.result = self.fit(model, loader)
        return self.result.apply(model, physically_prune=self.physically_prune)

    def report(self) -> dict[str, float]:
        """Sparsity and the last search epoch's terms (empty before :meth:`apply`)."""
        if self.result is None:
            return {}
        return {"sparsity": self.result.sparsity, **self.result.history[-1]}


class BISE(FantasticWeights):
    """Bias-Invariant Subnetwork Extraction (CVPR 2026, #9): channel gates, group-reweighted CE,
    a κ channel budget, physical pruning with ``compact`` and optional fine-tuning.

    Args:
        feature_layer: Module whose output the bias head reads.
        reweight: ``"group"`` (w_i ∝ 1 / |group(y_i, b_i)|) or ``None``.
        gamma: γ, weight of the MI term.
        keep_ratio: κ, fraction of the channels of each group kept.
        finetune_epochs: Epochs of :meth:`finetune` (0: none).
        finetune_lr: Adam learning rate of :meth:`finetune` (weight decay 1e-4).
        physically_prune: Whether :meth:`apply` compacts the gated model (default yes).
        mi, l1, bias_head, steps_per_head, lr, head_lr, include, exclude, init, epochs: As in
            :class:`FantasticWeights`.
    """

    def __init__(
        self,
        feature_layer: str,
        *,
        reweight: Reweight = "group",
        gamma: float = 1.0,
        keep_ratio: float = 0.5,
        finetune_epochs: int = 0,
        finetune_lr: float = 1e-3,
        physically_prune: bool = True,
        mi: MIKind = "confusion",
        l1: float = 0.0,
        bias_head: nn.Module | None = None,
        steps_per_head: int = 1,
        lr: float = 0.05,
        head_lr: float = 1e-2,
        include: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear),
        exclude: Sequence[str] = ("fc",),
        init: float = 1.0,
        epochs: int = 5,
    ) -> None:
        if finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
        super().__init__(
            feature_layer,
            granularity="channel",
            reweight=reweight,
            gamma=gamma,
            keep_ratio=keep_ratio,
            physically_prune=physically_prune,
            mi=mi,
            l1=l1,
            bias_head=bias_head,
            steps_per_head=steps_per_head,
            lr=lr,
            head_lr=head_lr,
            include=include,
            exclude=exclude,
            init=init,
            epochs=epochs,
        )
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr

    def apply(self, model: nn.Module, loader: Iterable[Batch]) -> nn.Module:
        """Stage transform: search, prune (``physically_prune``), then :meth:`finetune`."""
        return self.finetune(super().apply(model, loader), loader)

    def finetune(self, model: nn.Module, loader: Iterable[Batch]) -> nn.Module:
        """A copy of ``model`` (e.g. the pruned one) trained ``finetune_epochs`` with the
        task loss of the search (group-reweighted CE when ``reweight="group"``)."""
        out = copy.deepcopy(model)
        for p in out.parameters():
            p.requires_grad_(True)
        if self.finetune_epochs == 0:
            return out
        regs = [GroupBalancedCE(group_weight_table(loader))] if self.reweight else []
        lr = self.finetune_lr
        train(
            out,
            loader,
            epochs=self.finetune_epochs,
            regularizers=regs,
            optimizer=lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=1e-4),
        )
        return out
