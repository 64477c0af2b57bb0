"""The probe every velocity method shares: per-neuron outputs on a fixed probe set.

NEq (#11), SCoTTi (#38), NeVe (#48) and the velocity-ranked budget selection (#33) all watch
how each neuron's output on a small fixed input set changes from one epoch to the next. They
record it the same way, through :class:`ProbeOutputs`, which taps the selected modules with the
shared :class:`sobre.core.taps.FeatureTap`, forwards the probe set in eval mode without
gradients and returns, per module, a channel-major tensor ``(C, N, P)``: channel, probe
sample, position (``P = H * W`` for conv maps, 1 for vectors, ``L`` for ``(N, L, C)`` tokens).

Probe sets are a fixed list of input tensors (:func:`probe_inputs` takes them from a loader,
:func:`noise_probe` draws NeVe's noise images). Every rank of a distributed run forwards the same
probe set through the same (synchronised) weights, so every rank computes the same velocities
and decides the same masks without communication.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import model_device
from sobre.core.registry import check_choice
from sobre.core.taps import FeatureTap, Selector

__all__ = ["PROBED", "ProbeOutputs", "cosine", "noise_probe", "probe_inputs"]

PROBED: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.BatchNorm2d)
"""NEq's neurons: output channels of every Conv2d and every BatchNorm2d, counted separately."""


def probe_inputs(
    loader: Iterable[Any],
    n: int | None = None,
    *,
    per_class: int | None = None,
    num_classes: int | None = None,
) -> list[Tensor]:
    """A fixed probe set taken from a loader of ``(input, label)`` batches (or bare inputs).

    Args:
        loader: Any iterable of batches; read once, in order.
        n: Keep the first ``n`` samples (``None``: all of them, unless ``per_class`` is set).
        per_class: Keep the first ``per_class`` samples of each label instead (NEq: one image
            per class is enough; the CPU protocol uses 10).
        num_classes: With ``per_class``: stop reading once this many labels are full.

    Returns:
        The probe batches, as CPU tensors.

    Raises:
        ConfigError: The loader yields nothing, ``per_class`` without labels, or bad counts.
    """
    if n is not None and n < 1:
        raise ConfigError(f"n must be >= 1 probe samples, got {n}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    kept: list[Tensor] = []
    counts: dict[int, int] = {}
    total = 0
    for batch in loader:
        if isinstance(batch, (tuple, list)):  # (input, label, ...) or [input] (a TensorDataset(x))
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        x = x.detach().cpu()
        if per_class is not None:
            if y is None:
                raise ConfigError(
                    "per_class needs (input, label) batches; the loader yields bare inputs: pass "
                    "n= instead"
                )
            take = []
            for i, label in enumerate(y.tolist()):
                if counts.get(label, 0) < per_class:
                    counts[label] = counts.get(label, 0) + 1
                    take.append(i)
            if take:
                kept.append(x[take])
            full = sum(c >= per_class for c in counts.values())
            if num_classes is not None and full >= num_classes:
                break
        else:
            room = x.shape[0] if n is None else n - total
            kept.append(x[:room])
            total += kept[-1].shape[0]
            if n is not None and total >= n:
                break
    if not kept or sum(t.shape[0] for t in kept) == 0:
        raise ConfigError(
            "the probe loader yielded no samples: pass a non-empty loader (e.g. a few training "
            "images per class) or use a noise probe (sobre.efficient.probe.noise_probe)"
        )
    return kept


def noise_probe(
    shape: Sequence[int],
    n: int = 100,
    *,
    kind: Literal["uniform", "gaussian"] = "uniform",
    seed: int = 0,
    batch_size: int = 100,
) -> list[Tensor]:
    """NeVe's probe: ``n`` noise inputs of one sample's ``shape`` (no data needed).

    ``"uniform"`` draws from [0, 1); ``"gaussian"`` draws N(0.5, 0.25²) clipped to [0, 1] (NeVe's
    code casts raw Gaussian floats to image bytes, which wraps negative values around; we clip).
    """
    check_choice("kind", kind, ("uniform", "gaussian"), "noise_probe")
    if n < 1 or batch_size < 1:
        raise ConfigError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    g = torch.Generator().manual_seed(seed)
    full = (n, *shape)
    if kind == "uniform":
        x = torch.rand(full, generator=g)
    else:
        x = (0.5 + 0.25 * torch.randn(full, generator=g)).clamp_(0.0, 1.0)
    return list(x.split(batch_size))


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of ``a`` and ``b`` along their last dimension, in their dtype, with the
    convention of the velocity methods: two all-zero vectors count as 1 (nothing changed), one
    all-zero vector as 0; clamped to [-1, 1]."""
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    nonzero = (na > 0) & (nb > 0)
    cos = (a * b).sum(-1) / (na * nb).where(nonzero, torch.ones_like(na))
    return torch.where(nonzero, cos.clamp(-1.0, 1.0), ((na == 0) & (nb == 0)).to(cos.dtype))


def _channel_major(t: Tensor, channel_dim: int) -> Tensor:
    """``(N, C, ...)`` (or ``(N, ..., C)``) -> ``(C, N, P)``."""
    if t.ndim == 1:
        t = t.unsqueeze(1)
    cdim = channel_dim % t.ndim
    t = t.movedim(cdim, 1)
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(0, 1)


class ProbeOutputs:
    """Forwards a fixed probe set and returns every tapped module's outputs, channel-major.

    Args:
        model: The model (its train/eval mode is restored afterwards).
        probe: The probe batches (:func:`probe_inputs`, :func:`noise_probe`).
        select: Modules whose output channels are neurons (names, globs or types; default:
            every Conv2d and BatchNorm2d, NEq's choice).
        channel_dim: Channel dimension of the outputs (1 for ``(N, C, ...)``, -1 for tokens).
        dtype: Storage dtype of the recorded outputs (float16 halves the memory; the cosines
            are computed in float32 either way).

    Raises:
        ConfigError: An empty probe set, or a selector that matches nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Sequence[Tensor],
        select: Selector | Sequence[Selector] = PROBED,
        *,
        channel_dim: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not probe or sum(t.shape[0] for t in probe) == 0:
            raise ConfigError(
                "the probe set is empty: pass at least one input (probe_inputs(loader, n=...) or "
                "noise_probe(shape))"
            )
        self.model = model
        self.probe = list(probe)
        self.channel_dim = channel_dim
        self.dtype = dtype
        self.tap = FeatureTap(model, select, channel_dim=channel_dim)

    @property
    def names(self) -> list[str]:
        """Names of the probed modules, in ``named_modules`` order."""
        return self.tap.names

    @property
    def num_samples(self) -> int:
        """Number of probe samples."""
        return sum(t.shape[0] for t in self.probe)

    @torch.no_grad()
    def __call__(self) -> dict[str, Tensor]:
        """Module name -> ``(C, N, P)`` outputs on the probe set (eval mode, no gradients)."""
        was_training = self.model.training
        device = model_device(self.model)
        parts: dict[str, list[Tensor]] = {name: [] for name in self.names}
        self.model.eval()
        try:
            with self.tap:
                for x in self.probe:
                    self.tap.clear()
                    self.model(x.to(device))
                    for name in self.names:
                        if name in self.tap.features:
                            t = _channel_major(self.tap.features[name], self.channel_dim)
                            parts[name].append(t.to("cpu", self.dtype))
        finally:
            self.tap.clear()
            self.model.train(was_training)
        missing = [name for name, p in parts.items() if not p]
        if missing:
            raise ConfigError(
                f"probed modules {missing} produced no output on the probe set: they are not "
                "called in forward; select modules that run"
            )
        return {name: torch.cat(p, dim=1) for name, p in parts.items()}

    def __repr__(self) -> str:
        return f"ProbeOutputs({len(self.names)} modules, {self.num_samples} samples)"
