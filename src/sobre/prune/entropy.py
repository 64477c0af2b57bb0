"""Activation entropy of rectifier sites (EGP #3, NEPENTHE #40, EASIER #26, DSD² #5; spec §0).

A neuron is ON when its pre-activation ``z > 0`` (ReLU, ReLU6, GELU, SiLU, ... by the sign of
``z``). With ``p`` its probability of being ON over the data, its entropy in bits is

    H(p) = -p log2 p - (1 - p) log2 (1 - p),

and the entropy of a layer (site) is the mean over its neurons, H̄_l. A zero-entropy site has only
always-ON neurons (the activation is the identity on them) and always-OFF ones (dead): it can be
linearised. The pre-activations come from the core :class:`~sobre.core.taps.FeatureTap`
(``capture="input"`` on the site modules), so every site needs its own module: call
:func:`sobre.prune.sites.uniquify_activations` first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sobre.core import dist
from sobre.core.errors import ConfigError, SobreError
from sobre.core.measure import model_device
from sobre.core.registry import check_choice, suggest
from sobre.core.taps import FeatureTap
from sobre.prune.sites import Site, find_sites

__all__ = ["ActivationEntropy", "EntropyReport", "binary_entropy"]

Neuron = Literal["channel", "unit"]
Estimator = Literal["dataset", "batch_mean"]
NEURONS: tuple[str, ...] = ("channel", "unit")
ESTIMATORS: tuple[str, ...] = ("dataset", "batch_mean")


def binary_entropy(p: Tensor) -> Tensor:
    """``H(p) = -p log2 p - (1-p) log2(1-p)`` in bits, element-wise, in float64 (0 at p = 0, 1)."""
    p = p.double()
    return ((torch.special.entr(p) + torch.special.entr(1 - p)) / math.log(2)).clamp(0.0, 1.0)


@dataclass
class EntropyReport:
    """Per-site ON probabilities and entropies, sites in execution order.

    Attributes:
        p_on: Site -> P(z > 0) per neuron (float64; ``(C,)`` for ``neuron="channel"``, the
            pre-activation's shape without the batch dim for ``"unit"``).
        neuron_entropy: Site -> H per neuron in bits (float64, same shape); with
            ``estimator="batch_mean"`` the mean of the per-batch entropies.
        layer_entropy: Site -> mean of ``neuron_entropy`` (H̄_l).
        neuron: ``"channel"`` or ``"unit"``.
        estimator: ``"dataset"`` or ``"batch_mean"``.
        samples: Samples seen (all ranks).
        batches: Batches seen (all ranks).
    """

    p_on: dict[str, Tensor]
    neuron_entropy: dict[str, Tensor]
    layer_entropy: dict[str, float]
    neuron: str = "channel"
    estimator: str = "dataset"
    samples: int = 0
    batches: int = 0

    def _check(self, site: str) -> None:
        if site not in self.p_on:
            names = list(self.p_on)
            raise ConfigError(
                f"site {site!r} is not in this entropy report{suggest(site, names)} "
                f"Sites: {', '.join(names)}."
            )

    def zero_entropy_sites(self, eps: float = 1e-3) -> list[str]:
        """Sites with H̄_l <= ``eps`` (default 1e-3, the EGP threshold), in execution order."""
        if eps < 0:
            raise ConfigError(f"eps must be >= 0, got {eps}")
        return [name for name, h in self.layer_entropy.items() if h <= eps]

    def always_on(self, site: str) -> Tensor:
        """Boolean mask of the neurons of ``site`` that were ON on every input (p = 1)."""
        self._check(site)
        return self.p_on[site] == 1.0

    def always_off(self, site: str) -> Tensor:
        """Boolean mask of the neurons of ``site`` that were OFF on every input (p = 0, dead)."""
        self._check(site)
        return self.p_on[site] == 0.0

    def ranking(self) -> list[tuple[str, float]]:
        """``(site, H̄_l)`` sorted by layer entropy, lowest first (ties in execution order)."""
        return sorted(self.layer_entropy.items(), key=lambda item: item[1])

    def max_entropy_site(self) -> str:
        """The site of highest layer entropy (the first one on ties)."""
        return max(self.layer_entropy, key=self.layer_entropy.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: per site the layer entropy, counts of always-ON/OFF neurons, and the
        per-neuron ``p_on`` and ``neuron_entropy`` as (nested) lists of floats."""
        return {
            "neuron": self.neuron,
            "estimator": self.estimator,
            "samples": self.samples,
            "batches": self.batches,
            "sites": {
                name: {
                    "layer_entropy": self.layer_entropy[name],
                    "neurons": self.p_on[name].numel(),
                    "always_on": int(self.always_on(name).sum()),
                    "always_off": int(self.always_off(name).sum()),
                    "p_on": self.p_on[name].tolist(),
                    "neuron_entropy": self.neuron_entropy[name].tolist(),
                }
                for name in self.layer_entropy
            },
        }


@dataclass
class _Counts:
    """ON counts of one site, accumulated over batches."""

    on: Tensor | None = None  # per neuron, float64
    seen: float = 0.0  # observations per neuron
    entropy_sum: Tensor | None = None  # sum over batches of H per neuron (batch_mean only)
    batches: int = 0
    shape: tuple[int, ...] = field(default_factory=tuple)

    def add(self, name: str, on: Tensor, seen: int, *, per_batch: bool) -> None:
        if self.on is None:
            self.on, self.shape = torch.zeros_like(on), tuple(on.shape)
            self.entropy_sum = torch.zeros_like(on) if per_batch else None
        elif tuple(on.shape) != self.shape:
            raise ConfigError(
                f"site {name!r}: the neurons changed shape from {self.shape} to "
                f"{tuple(on.shape)} between batches; use neuron='channel' for inputs of "
                "varying size"
            )
        self.on += on
        self.seen += seen
        self.batches += 1
        if self.entropy_sum is not None:
            self.entropy_sum += binary_entropy(on / seen)

    def tensors(self) -> list[Tensor]:
        """What is all-reduced: the counts, the entropy sum (batch_mean), seen and batches."""
        extra = [] if self.entropy_sum is None else [self.entropy_sum]
        return [self.on, *extra, torch.tensor([self.seen, self.batches])]  # type: ignore[list-item]


class ActivationEntropy:
    """Per-neuron ON probability and binary entropy of activation sites (spec §0).

    ``neuron="channel"`` (EASIER, EGP): one neuron per channel, ON-probability pooled over
    positions/tokens; ``"unit"`` (DSD²'s ``entropy.py``): every channel x position is a neuron.
    ``estimator="dataset"`` (default): ON counts accumulated over the whole loader, then H;
    ``"batch_mean"`` (the authors' code): H per batch, averaged; by concavity of H it is biased
    low (an always-ON-in-one-batch, always-OFF-in-the-next neuron gets 0 instead of 1 bit).
    Counts are all-reduced over ranks, so every rank decides the same.

    Channel dimension: 1 for ``(N, C, ...)`` pre-activations; 3-D ones are taken as transformer
    tokens ``(N, L, C)`` with channels last. Pass ``channel_dim=1`` for ``(N, C, L)`` Conv1d nets.

    Memory: the pre-activations of one batch at all chosen sites (a training step holds more).

    Args:
        sites: ``"auto"`` (every site of :func:`~sobre.prune.sites.find_sites`) or site names.
        neuron: ``"channel"`` or ``"unit"``.
        estimator: ``"dataset"`` or ``"batch_mean"``.
        channel_dim: Channel dimension for every site (default: detected from the rank).

    Raises:
        ConfigError: Unknown ``neuron``/``estimator`` or a bad ``sites`` value.
    """

    def __init__(
        self,
        sites: str | Sequence[str] = "auto",
        neuron: Neuron = "channel",
        estimator: Estimator = "dataset",
        channel_dim: int | None = None,
    ) -> None:
        check_choice("neuron", neuron, NEURONS, "ActivationEntropy")
        check_choice("estimator", estimator, ESTIMATORS, "ActivationEntropy")
        if isinstance(sites, str):
            if sites != "auto":
                raise ConfigError(
                    f"sites must be 'auto' or a list of site names, got {sites!r}; for one site "
                    f"pass [{sites!r}]"
                )
        elif not sites or not all(isinstance(s, str) for s in sites):
            raise ConfigError(f"sites must be 'auto' or a non-empty list of names, got {sites!r}")
        self.sites: str | list[str] = sites if isinstance(sites, str) else list(sites)
        self.neuron = neuron
        self.estimator = estimator
        self.channel_dim = channel_dim

    def resolve(self, model: nn.Module) -> list[Site]:
        """The chosen sites of ``model``, in execution order.

        Raises:
            ConfigError: A name is not a site, no site was found, or a chosen site has no
                module of its own (call ``uniquify_activations`` first).
        """
        found = find_sites(model)
        if self.sites == "auto":
            chosen = found
        else:
            by_name = {s.name: s for s in found}
            for name in self.sites:
                if name not in by_name:
                    names = list(by_name)
                    raise ConfigError(
                        f"site {name!r} does not exist in {type(model).__name__}"
                        f"{suggest(name, names)} Sites: {', '.join(names) or 'none'}."
                    )
            wanted = set(self.sites)
            chosen = [s for s in found if s.name in wanted]
        if not chosen:
            raise ConfigError(
                f"{type(model).__name__} has no activation site (ReLU, ReLU6, LeakyReLU, PReLU, "
                "ELU, CELU, SELU, GELU, SiLU, Mish, Hardswish modules or functional calls)"
            )
        bad = [s for s in chosen if not s.unique]
        if bad:
            listed = ", ".join(f"{s.name} (calls {s.source})" for s in bad[:5])
            raise ConfigError(
                f"{len(bad)} activation site(s) of {type(model).__name__} have no module of their "
                f"own: {listed}{' ...' if len(bad) > 5 else ''}; call "
                "sobre.prune.sites.uniquify_activations(model) first"
            )
        return chosen

    def _counts(self, site: Site, z: Tensor) -> tuple[Tensor, int]:
        """ON counts per neuron of one batch of pre-activations, and observations per neuron."""
        if z.ndim < 2:
            raise ConfigError(
                f"site {site.name!r} received a tensor of shape {tuple(z.shape)}; expected a "
                "batch (N, C, ...) or tokens (N, L, C)"
            )
        on = site.is_on(z)
        if self.neuron == "unit":
            return on.sum(dim=0, dtype=torch.float64), z.shape[0]
        cdim = self.channel_dim if self.channel_dim is not None else (-1 if z.ndim == 3 else 1)
        if not -z.ndim <= cdim < z.ndim or cdim % z.ndim == 0:
            raise ConfigError(
                f"channel_dim={cdim} does not fit site {site.name!r} with input shape "
                f"{tuple(z.shape)}; use 1 for (N, C, ...) or -1 for (N, L, C) tokens"
            )
        cdim %= z.ndim
        dims = tuple(d for d in range(z.ndim) if d != cdim)
        return on.sum(dim=dims, dtype=torch.float64), z.numel() // z.shape[cdim]

    def compute(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        *,
        max_batches: int | None = None,
        device: torch.device | str | None = None,
    ) -> EntropyReport:
        """Run ``model`` over ``loader`` (eval mode, no grad) and measure the sites' entropy.

        Args:
            model: A model whose sites each have their own module (see :meth:`resolve`); its
                train/eval flags are restored afterwards.
            loader: Yields ``(x, y, ...)`` tuples or lists (``x`` is fed) or inputs ``x``.
            max_batches: Stop after this many batches (default: the whole loader).
            device: Where inputs are moved (default: the device of the model's first
                parameter or buffer, else the CPU); the model must already be there.

        Raises:
            ConfigError: Bad arguments or sites (see :meth:`resolve`).
            SobreError: The loader is empty or a site never ran.
        """
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"max_batches must be >= 1 (or None), got {max_batches}")
        sites = self.resolve(model)
        if device is None:
            device = model_device(model)
        counts = {s.name: _Counts() for s in sites}
        samples = batches = 0
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with (
                torch.no_grad(),
                FeatureTap(model, [s.name for s in sites], capture="input") as tap,
            ):
                for batch in loader:
                    if max_batches is not None and batches >= max_batches:
                        break
                    x = batch[0] if isinstance(batch, tuple | list) else batch
                    if isinstance(x, Tensor):
                        x = x.to(device)
                        samples += x.shape[0] if x.ndim else 1
                    model(x)
                    for site in sites:
                        z = tap.features.get(site.name)
                        if z is not None:
                            on, seen = self._counts(site, z)
                            counts[site.name].add(
                                site.name, on, seen, per_batch=self.estimator == "batch_mean"
                            )
                    tap.clear()
                    batches += 1
        finally:
            for m, training in flags:
                m.training = training
        return self._report(counts, samples, batches)

    def _report(self, counts: dict[str, _Counts], samples: int, batches: int) -> EntropyReport:
        """All-reduce the counts (one collective) and turn them into entropies."""
        if batches == 0:
            raise SobreError("ActivationEntropy.compute: the loader yielded no batch")
        missing = [name for name, c in counts.items() if c.on is None]
        if missing:
            raise SobreError(
                f"activation site(s) {', '.join(missing)} never ran on the data: are they "
                "reached by the model's forward?"
            )
        dev = next(iter(counts.values())).on.device  # type: ignore[union-attr]
        parts = [t.to(dev, torch.float64) for c in counts.values() for t in c.tensors()]
        totals = torch.tensor([samples, batches], device=dev, dtype=torch.float64)
        *sums, totals = (t.cpu() for t in dist.all_reduce_sum_each([*parts, totals]))
        report = EntropyReport(
            {}, {}, {}, self.neuron, self.estimator, int(totals[0]), int(totals[1])
        )
        reduced = iter(sums)
        for name, c in counts.items():
            chunks = [next(reduced).reshape(-1) for _ in c.tensors()]
            on, seen, nb = chunks[0], chunks[-1][0], chunks[-1][1]
            p = (on / seen).reshape(c.shape)
            if self.estimator == "dataset":
                h = binary_entropy(p)
            else:
                h = (chunks[1] / nb).reshape(c.shape)
            report.p_on[name] = p
            report.neuron_entropy[name] = h
            report.layer_entropy[name] = float(h.mean())
        return report
