"""Leakage probe: how well a fresh classifier reads an attribute from frozen features.

The post-hoc attack probe of DisP / IRENE (trust.md §4.3, §5.3) and ``bias_accuracy`` of bias.md
§0.3: freeze the encoder, record its features z at a named layer (``features_of``), train a new
probe g on (z_train, p_train) and report its accuracy on (z_test, p_test). Privacy / debiasing
is good when that accuracy falls to chance. Train and test on data where the attribute P is
independent of the target Y (ρ = 0), otherwise the probe can succeed from task information, and
report the MLP probe too: linear probes understate leakage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import model_device
from sobre.core.registry import check_choice
from sobre.core.taps import FeatureTap
from sobre.fairness.metrics import as_labels

ProbeKind = Literal["linear", "mlp"]

__all__ = ["ProbeKind", "ProbeResult", "features_of", "leakage", "probe_attack"]


@dataclass(frozen=True)
class ProbeResult:
    """What a probe reads on the test split: accuracy and Î(Z; P) ≈ H(P) − CE (trust spec §4.3)."""

    accuracy: float
    cross_entropy: float
    """Mean test cross-entropy of the probe, nats (infinite for a class unseen in training)."""
    entropy: float
    """Entropy H(P) of the test attributes' empirical distribution, nats."""

    @property
    def mi_nats(self) -> float:
        """The variational estimate Î(Z; P) = max(0, H(P) − CE), nats."""
        return max(0.0, self.entropy - self.cross_entropy)


def _features(values: object, arg: str) -> Tensor:
    z = torch.as_tensor(values)
    if z.dim() != 2:
        raise ConfigError(
            f"leakage: {arg} must be 2-D (N samples, D features), got shape {tuple(z.shape)}; "
            f"flatten or pool them first (features_of average-pools conv maps to (N, C))"
        )
    z = z.detach().float()
    if not torch.isfinite(z).all():
        raise ConfigError(f"leakage: {arg} holds NaN or infinite values; check the encoder")
    return z


def _probe(kind: str, dim: int, classes: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, classes)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def probe_attack(
    features_train: Tensor,
    attr_train: Tensor,
    features_test: Tensor,
    attr_test: Tensor,
    *,
    probe: ProbeKind = "linear",
    hidden: int = 128,
    epochs: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
) -> ProbeResult:
    """A probe g trained to predict the attribute p from frozen features z, read on the test split.

    Features are standardised with the training mean and standard deviation (constant features
    are only centred); g is a linear layer or a one-hidden-layer ReLU MLP trained with Adam on
    the cross-entropy CE(g(z), p). The result depends only on the inputs and ``seed`` (the global
    RNG is left untouched). Compare it with chance, 1 / (number of classes) for a balanced p.

    Args:
        features_train: (N_train, D) features; tensors or numpy arrays.
        attr_train: (N_train,) integer attribute classes p ≥ 0, at least two distinct.
        features_test: (N_test, D) features.
        attr_test: (N_test,) attribute classes; a class never seen in training counts as wrong.
        probe: ``"linear"`` or ``"mlp"``.
        hidden: Hidden width of the MLP probe.
        epochs: Passes over the training features (one Adam step each when full-batch).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        batch_size: Mini-batch size; ``None`` trains full-batch.
        seed: Seed of the probe's initialisation and of the mini-batch order.

    Returns:
        The probe's test accuracy (in [0, 1]), test cross-entropy and H(P) of the test
        attributes: :attr:`ProbeResult.mi_nats` is the held-out estimate Î(Z; P) ≈ H(P) − CE.

    Raises:
        ConfigError: Features not 2-D, differing feature dimensions, lengths that differ from the
            attributes', negative or single-class training attributes, an unknown probe kind or
            non-positive sizes.
    """
    check_choice("probe", probe, get_args(ProbeKind), "leakage")
    if hidden < 1 or epochs < 1 or (batch_size is not None and batch_size < 1):
        raise ConfigError(
            f"leakage: hidden, epochs and batch_size must be >= 1, got hidden={hidden}, "
            f"epochs={epochs}, batch_size={batch_size}"
        )
    z_tr, z_te = (
        _features(features_train, "features_train"),
        _features(features_test, "features_test"),
    )
    p_tr, p_te = (
        as_labels(attr_train, "attr_train", "leakage"),
        as_labels(attr_test, "attr_test", "leakage"),
    )
    if z_tr.shape[1] != z_te.shape[1]:
        raise ConfigError(
            f"leakage: features_train has {z_tr.shape[1]} dimensions but features_test has "
            f"{z_te.shape[1]}; record both splits at the same layer"
        )
    for split, z, p in (("train", z_tr, p_tr), ("test", z_te, p_te)):
        if len(z) != len(p) or not len(p):
            raise ConfigError(
                f"leakage: features_{split} has {len(z)} rows but attr_{split} has {len(p)} "
                f"labels; pass one attribute per sample of a non-empty split"
            )
        if p.min() < 0:
            raise ConfigError(f"leakage: attr_{split} has negative classes; pass indices >= 0")
    present = torch.unique(p_tr).tolist()
    if len(present) < 2:
        raise ConfigError(
            f"leakage: attr_train has a single class {present} over {len(p_tr)} samples; "
            f"nothing to predict: train the probe on a split where the attribute varies"
        )
    mean, std = z_tr.mean(0), z_tr.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    device = z_tr.device
    z_tr, z_te = (z_tr - mean) / std, (z_te.to(device) - mean) / std
    classes = int(p_tr.max()) + 1
    p_tr, p_te = p_tr.to(device), p_te.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _probe(probe, z_tr.shape[1], classes, hidden).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(z_tr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(device) if batch_size else None
            for start in range(0, n, batch_size or n):
                idx = order[start : start + batch_size] if order is not None else slice(None)
                loss = nn.functional.cross_entropy(net(z_tr[idx]), p_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        logits = net(z_te)
        unseen = max(0, int(p_te.max()) + 1 - classes)
        ce = nn.functional.cross_entropy(
            nn.functional.pad(logits, (0, unseen), value=float("-inf")), p_te
        )
        q = torch.bincount(p_te).double() / len(p_te)
        entropy = -torch.special.xlogy(q, q).sum()
    return ProbeResult((logits.argmax(1) == p_te).double().mean().item(), ce.item(), entropy.item())


def leakage(
    features_train: Tensor,
    attr_train: Tensor,
    features_test: Tensor,
    attr_test: Tensor,
    **options: Any,
) -> float:
    """Test accuracy of a fresh probe predicting the attribute from frozen features.

    :func:`probe_attack`'s accuracy (same arguments and options); use :func:`probe_attack` for
    the held-out cross-entropy and Î(Z; P) too.
    """
    return probe_attack(features_train, attr_train, features_test, attr_test, **options).accuracy


def _pool(t: Tensor, layer: str) -> Tensor:
    """(N,) -> (N, 1); (N, D) as is; (N, C, *positions) -> (N, C) averaged over positions."""
    if t.dim() == 0:
        raise ConfigError(
            f"features_of: layer {layer!r} outputs a scalar, not one row per sample; "
            f"tap a layer whose output has a batch dimension"
        )
    if t.dim() == 1:
        return t.unsqueeze(1)
    return t.flatten(2).mean(2) if t.dim() > 2 else t


@torch.no_grad()
def features_of(
    model: nn.Module, loader: Iterable[Any], layer: str, *, max_batches: int | None = None
) -> tuple[Tensor, ...]:
    """Frozen features of ``layer`` over a loader, with the batches' labels alongside.

    The model runs in eval mode without gradients (its mode is restored afterwards); the
    layer's output is recorded with :class:`~sobre.core.taps.FeatureTap`. Conv maps
    (N, C, *positions) are average-pooled over their positions to (N, C) (global average
    pooling; token tensors (N, L, C) must be pooled by the caller); vectors (N, D) are kept and
    (N,) becomes (N, 1).

    Args:
        model: The (trained) encoder.
        loader: Batches ``x``, ``(x, y)`` or ``(x, y, b, ...)``.
        layer: Exact dotted module name (``model.named_modules()``), or a glob matching one module.
        max_batches: Read at most this many batches (``None``: all).

    Returns:
        ``(features, y, b, ...)``: the (N, D) float features on the CPU, then every other item
        of the batches concatenated over batches (just ``(features,)`` for bare inputs).

    Raises:
        ConfigError: ``layer`` matches no module or several, the loader yields no batch, the
            layer does not run in forward, or batches of different lengths.
    """
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"features_of: max_batches must be >= 1 or None, got {max_batches}")
    tap = FeatureTap(model, layer)
    if len(tap.names) != 1:
        raise ConfigError(
            f"features_of: layer {layer!r} matches {len(tap.names)} modules ({tap.names}); "
            f"name exactly one module"
        )
    name = tap.names[0]
    device = model_device(model)
    parts: list[list[Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        with tap:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                items = list(batch) if isinstance(batch, tuple | list) else [batch]
                if parts and len(items) != len(parts):
                    raise ConfigError(
                        f"features_of: batch {i} has {len(items)} items but earlier batches "
                        f"have {len(parts)}; yield the same (x, y, ...) structure every batch"
                    )
                tap.clear()
                model(items[0].to(device))
                if name not in tap.features:
                    raise ConfigError(
                        f"features_of: layer {name!r} produced no output in forward; tap a "
                        f"module that {type(model).__name__}.forward calls"
                    )
                z = _pool(tap.features[name], name).float().cpu()
                rest = [torch.as_tensor(v).detach().cpu() for v in items[1:]]
                parts = parts or [[] for _ in items]
                for store, value in zip(parts, [z, *rest], strict=True):
                    store.append(value)
    finally:
        tap.clear()
        model.train(was_training)
    if not parts:
        raise ConfigError("features_of: the loader yielded no batch; pass a non-empty loader")
    return tuple(torch.cat(p) for p in parts)
