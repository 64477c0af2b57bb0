"""EASIER: make the lowest-entropy activation site an identity, fine-tune, repeat (spec §3).

Quétu et al., "The EASIER path to layer collapse" (#26, ECML-PKDD 2024). For k = 1..K the
authors train, measure per site the layer entropy H̄_l = mean over channels of the binary entropy
of P(ON) (spec §0, ``neuron="channel"``, per-batch entropies averaged), and replace the site of
minimum entropy by ``nn.Identity``: a site whose neurons are (nearly) always ON or always OFF is
(nearly) linear, so removing it costs least. The user keeps the deepest model within an accuracy
tolerance.

Differences from the authors' code, on purpose:

- They accumulate entropies during the *last training epoch* (train mode, augmented data, weights
  moving). :meth:`Easier.rank` runs a separate no-grad pass over the loader it is given, in eval
  mode by default; ``mode="train"`` puts BN/dropout in train mode for that pass (batch statistics,
  as the authors see them) without any weight update, and restores every buffer (BN running
  statistics) afterwards, so ranking never changes the model.
- A neuron is ON when its pre-activation ``z > 0``
  (:class:`~sobre.prune.entropy.ActivationEntropy`); the authors count ``z >= 0``. They differ
  only on exact zeros.

``Identity`` is exact only if no neuron of the site is ever OFF; dead (always-OFF) neurons start
passing their negative pre-activations, which is why EASIER fine-tunes after every removal
(:func:`~sobre.prune.surgery.linearize` is the exact edit for a zero-entropy site).
:meth:`Easier.report` says how many neurons of the removed site were always ON / always OFF on the
ranking data. Removing sites does not make an unfolded network faster by itself: fold the linear
layers that now meet (:func:`~sobre.prune.surgery.fold_linear`) and measure latency.

As a stage transform (``apply(model, loader)`` + ``report()``) one call removes one site, so a
recipe with ``repeat: k`` stages (fine-tuning between them) removes k sites.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from sobre.core.edits import edit_log
from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice
from sobre.prune.entropy import ActivationEntropy, EntropyReport, Estimator, Neuron
from sobre.prune.sites import find_sites
from sobre.prune.surgery import ChannelGate, get_module, replace_activation

log = logging.getLogger(__name__)

__all__ = ["MODES", "Easier", "removed_sites"]

Mode = Literal["eval", "train"]
MODES: tuple[str, ...] = ("eval", "train")
_LINEAR = (nn.Identity, ChannelGate)  # what a removed (linearised) site is now


def removed_sites(model: nn.Module) -> list[str]:
    """Sites made ``nn.Identity`` by ``replace_activation`` so far, oldest first (edit log).

    A site restored later (``replace_activation(kind="relu")``) leaves the list. Read from the
    model's edit log, so it survives checkpoint reloads and new :class:`Easier` objects.
    """
    removed: list[str] = []
    for entry in edit_log(model):
        if entry["op"] != "replace_activation":
            continue
        site = entry["params"]["site"]
        if site in removed:
            removed.remove(site)
        if entry["params"].get("kind", "identity") == "identity":
            removed.append(site)
    return removed


def _train_mode(module: nn.Module, _: Any) -> None:
    """Forward pre-hook: the whole model in train mode (inputs unchanged)."""
    module.train()


class Easier:
    """Entropy-guided depth reduction: rank activation sites by entropy, remove the lowest.

    Args:
        sites: ``"auto"`` (every activation site) or the candidate site names; sites already
            made linear (``Identity``/``ChannelGate``) are skipped.
        neuron: ``"channel"`` (the authors': P(ON) pooled over positions) or ``"unit"``.
        estimator: ``"batch_mean"`` (the authors': per-batch entropy averaged, biased low) or
            ``"dataset"`` (counts over the whole pass).
        max_batches: Batches of the loader used per ranking (default: all).
        mode: ``"eval"`` (default) or ``"train"`` (BN/dropout in train mode during the ranking
            pass, no weight update, buffers restored); see the module docstring.

    Raises:
        ConfigError: Unknown ``neuron``, ``estimator`` or ``mode``, bad ``sites`` or
            ``max_batches``.
    """

    def __init__(
        self,
        sites: str | Sequence[str] = "auto",
        neuron: Neuron = "channel",
        estimator: Estimator = "batch_mean",
        max_batches: int | None = None,
        mode: Mode = "eval",
    ) -> None:
        checked = ActivationEntropy(sites, neuron, estimator)  # validates the three
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"max_batches must be >= 1 (or None), got {max_batches}")
        check_choice("mode", mode, MODES, "Easier")
        self.sites = checked.sites
        self.neuron = neuron
        self.estimator = estimator
        self.max_batches = max_batches
        self.mode = mode
        self._last: dict[str, Any] | None = None

    def remaining(self, model: nn.Module) -> list[str]:
        """The candidate sites of ``model`` that are still non-linear, in execution order.

        Raises:
            ConfigError: A named site neither exists nor was made linear, or none is left.
        """
        found = [s.name for s in find_sites(model)]
        if self.sites == "auto":
            names = found
        else:
            current = set(found)
            names = []
            for name in self.sites:
                if name in current:
                    names.append(name)
                elif not self._is_linear(model, name):
                    ActivationEntropy([name]).resolve(model)  # raises "does not exist ..."
        if not names:
            raise ConfigError(
                f"no activation site of {type(model).__name__} is left to remove (removed so "
                f"far: {', '.join(removed_sites(model)) or 'none'})"
            )
        return names

    def entropy(self, model: nn.Module, loader: Iterable[Any]) -> EntropyReport:
        """Layer entropies of the remaining sites on ``loader`` (one no-grad pass, see ``mode``).

        Raises:
            ConfigError: Bad sites (see :meth:`remaining`), or a site without a module of its own
                (call ``sobre.prune.sites.uniquify_activations`` first).
            SobreError: The loader is empty.
        """
        meter = ActivationEntropy(self.remaining(model), self.neuron, self.estimator)
        if self.mode == "eval":
            return meter.compute(model, loader, max_batches=self.max_batches)
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        # compute() switches to eval mode and restores the flags; the hook switches back.
        handle = model.register_forward_pre_hook(_train_mode)
        try:
            return meter.compute(model, loader, max_batches=self.max_batches)
        finally:
            handle.remove()
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)

    def rank(self, model: nn.Module, loader: Iterable[Any]) -> list[tuple[str, float]]:
        """``(site, H̄_l)`` of the remaining sites, lowest entropy first (ties: execution order)."""
        return self.entropy(model, loader).ranking()

    def remove(self, model: nn.Module, site: str) -> nn.Module:
        """A copy of ``model`` with ``site`` replaced by ``nn.Identity`` (a recorded edit).

        Exact only if no neuron of the site is ever OFF on the inputs that matter.

        Raises:
            ConfigError: ``site`` was already made linear, is not an activation site (closest
                names listed), or has no module of its own (call ``uniquify_activations``).
        """
        if self._is_linear(model, site):
            raise ConfigError(
                f"site {site!r} is already linear ({type(get_module(model, site)).__name__}); "
                f"remaining sites: {', '.join(s.name for s in find_sites(model)) or 'none'}"
            )
        ActivationEntropy([site]).resolve(model)
        return replace_activation(model, site=site)

    def apply(self, model: nn.Module, loader: Iterable[Any]) -> nn.Module:
        """One EASIER iteration: rank the remaining sites on ``loader``, remove the lowest."""
        report = self.entropy(model, loader)
        ranking = report.ranking()
        site, entropy = ranking[0]
        out = self.remove(model, site)
        removed = removed_sites(out)
        self._last = {
            "removed": site,
            "entropy": entropy,
            "always_on": int(report.always_on(site).sum()),
            "always_off": int(report.always_off(site).sum()),
            "neurons": report.p_on[site].numel(),
            "ranking": [[name, h] for name, h in ranking],
            "layer_entropy": dict(report.layer_entropy),  # execution order, for the report plot
            "removed_so_far": removed,
            "remaining": len(ranking) - 1,
        }
        log.info(
            "EASIER removed %s (H=%.4f, %d of %d neurons always OFF); %d removed, %d left",
            site,
            entropy,
            self._last["always_off"],
            self._last["neurons"],
            len(removed),
            len(ranking) - 1,
        )
        return out

    def report(self) -> dict[str, Any]:
        """JSON-able summary of the last :meth:`apply` (``removed`` is ``None`` before any).

        Keys: ``removed`` (site), ``entropy`` (its H̄_l), ``always_on`` / ``always_off`` /
        ``neurons`` (its neurons on the ranking data; Identity was exact there iff
        ``always_on == neurons``), ``ranking`` (every remaining
        site with H̄_l, ascending), ``layer_entropy`` (the same in execution order),
        ``removed_so_far`` (edit log), ``remaining``, and the
        settings.
        """
        settings = {
            "neuron": self.neuron,
            "estimator": self.estimator,
            "mode": self.mode,
            "max_batches": self.max_batches,
        }
        if self._last is None:
            return {"removed": None, "ranking": [], "removed_so_far": [], **settings}
        return {**self._last, **settings}

    @staticmethod
    def _is_linear(model: nn.Module, name: str) -> bool:
        try:
            return isinstance(model.get_submodule(name), _LINEAR)
        except AttributeError:
            return False
