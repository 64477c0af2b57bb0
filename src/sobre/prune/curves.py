"""Accuracy-vs-sparsity curves and sparse double descent scores (DSD² #5, SDD in ViTs #21, #22).

:func:`sparsity_curve` runs iterative magnitude pruning from a trained dense model and records one
point per round: sparsity, the user's metrics and the mean activation entropy (DSD², spec §5).
Training stays the user's: ``retrain(model)`` is their loop, which restarts its optimizer and
learning-rate schedule each round (learning-rate rewinding, the DSD² and SDD-ViT code).

With label noise the test accuracy of such a curve falls, rises, then falls again: sparse double
descent (SDD). On a curve ``a_0, ..., a_n`` ordered by sparsity, for every point ``m``

    dip(m) = max_{i <= m} a_i - a_m,     rise(m) = max_{j >= m} a_j - a_m.

:func:`sdd_score` reports the *valley* ``m*`` maximising ``min(dip, rise)`` (a fall followed by a
recovery); :func:`is_monotone` asks that no point rises above an earlier one by more than ``tol``,
i.e. ``max_m rise(m) <= tol``. The spec's baseline (§5.5), 85.8 dense -> 71.5 at 99.3 % -> 79.2 at
99.7 % -> 72.3 at 99.9 %, has its valley at 99.3 %: dip 14.3, recovery 7.7, not monotone.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from sobre.core.errors import ConfigError
from sobre.core.registry import suggest
from sobre.prune.entropy import ActivationEntropy
from sobre.prune.imp import MagnitudePruner, Rewinder, global_sparsity

__all__ = ["is_monotone", "sdd_score", "sparsity_curve"]

_log = logging.getLogger(__name__)

RESERVED: tuple[str, ...] = ("round", "sparsity", "entropy", "layer_entropy")


def _metrics(values: Any, round_: int) -> dict[str, float]:
    """``evaluate``'s answer as plain floats, checked against the reserved keys."""
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"evaluate(model) must return a mapping such as {{'test_acc': 0.9}}, got "
            f"{type(values).__name__} at round {round_}"
        )
    out = {}
    for key, value in values.items():
        if not isinstance(key, str) or key in RESERVED:
            raise ConfigError(
                f"evaluate(model) returned the key {key!r}; keys must be strings other than the "
                f"curve's own {RESERVED}"
            )
        try:
            out[key] = float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"evaluate(model) returned {key!r}={value!r} at round {round_}; values must be "
                "numbers"
            ) from err
    return out


def sparsity_curve(
    model: nn.Module,
    pruner: MagnitudePruner,
    rounds: int,
    retrain: Callable[[nn.Module], Any],
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    *,
    entropy: ActivationEntropy | None = None,
    loader: Iterable[Any] | None = None,
    rewinder: Rewinder | None = None,
) -> list[dict[str, Any]]:
    """Prune ``model`` in place for ``rounds`` rounds and record one point per round (spec §5).

    Round 0 is ``model`` as given (the trained dense network). Each round ``r >= 1`` runs
    ``pruner.step(model)``, then ``rewinder.apply(model)`` when given (weight rewinding or
    re-initialisation; masks are kept), then ``retrain(model)``, and records

        {"round": r, "sparsity": global_sparsity over the pruner's targets, **evaluate(model),
         "entropy": mean of the layer entropies, "layer_entropy": {site: H̄_l}}

    (the entropy keys only when ``loader`` is given). With ``amount = a`` the sparsity of round
    ``r`` is ``1 - (1 - a)^r`` up to rounding; DSD² uses ``a = 0.2`` and 34 rounds (99.95 %).

    Args:
        model: The trained dense (or already pruned) model; pruned and retrained in place.
        pruner: The per-round pruning step (DSD²: ``MagnitudePruner(0.2)``, global L1 over Conv
            and Linear weights; SDD in ViTs: ``targets=(nn.Linear,)``).
        rounds: Number of pruning rounds (>= 0).
        retrain: ``retrain(model)`` trains ``model`` in place after each pruning step, the user's
            loop; for the papers' learning-rate rewinding it builds a fresh optimizer and schedule
            at every call. Its return value is ignored.
        evaluate: ``evaluate(model) -> {"test_acc": ..., "train_acc": ...}``: numbers recorded
            under their keys (any key but ``round``, ``sparsity``, ``entropy``,
            ``layer_entropy``).
        entropy: The entropy estimator; default ``ActivationEntropy(neuron="unit")`` (every unit of
            every activation site, DSD²'s ``entropy.py``) when ``loader`` is given.
        loader: Data of the entropy (DSD²: the training set, evaluated in eval mode); ``None``:
            no entropy.
        rewinder: What happens to the weights after each pruning step (``None`` or
            ``Rewinder("lr_rewind")``: nothing, ``retrain`` restarts its schedule). A
            ``"weight_rewind"`` rewinder must hold its rewind point (``capture`` it during the
            dense training).

    Returns:
        ``rounds + 1`` JSON-able dicts (plain floats, ints, strings), in round order.

    Raises:
        ConfigError: ``rounds`` not a non-negative integer, ``entropy`` without ``loader``, a
            weight-rewinding ``rewinder`` without a rewind point, an ``evaluate`` answer that is
            not a mapping of numbers or uses a reserved key, and the pruner's own errors.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds must be an integer >= 0, got {rounds!r}")
    if entropy is not None and loader is None:
        raise ConfigError("entropy needs a loader: pass loader= (DSD²: the training set)")
    if rewinder is not None and rewinder.mode == "weight_rewind" and not rewinder.captured:
        raise ConfigError(
            "rewinder mode 'weight_rewind' has no rewind point: call rewinder.capture(model) "
            "at the rewind epoch of the dense training before sparsity_curve"
        )
    if loader is not None and entropy is None:
        entropy = ActivationEntropy(neuron="unit")

    def point(round_: int) -> dict[str, Any]:
        record: dict[str, Any] = {
            "round": round_,
            "sparsity": global_sparsity(model, pruner.targets, pruner.exclude),
            **_metrics(evaluate(model), round_),
        }
        if entropy is not None and loader is not None:
            layers = entropy.compute(model, loader).layer_entropy
            record["entropy"] = sum(layers.values()) / len(layers)
            record["layer_entropy"] = {name: float(h) for name, h in layers.items()}
        _log.info(
            "sparsity curve round %d: %s",
            round_,
            {k: v for k, v in record.items() if k != "layer_entropy"},
        )
        return record

    curve = [point(0)]
    for round_ in range(1, rounds + 1):
        pruner.step(model)
        if rewinder is not None:
            rewinder.apply(model)
        retrain(model)
        curve.append(point(round_))
    return curve


def _values(curve: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """The curve's ``(sparsities, values of key)``, ordered by sparsity (stable).

    Raises:
        ConfigError: An empty curve, a point without ``sparsity`` or ``key``, or a NaN value.
    """
    if not isinstance(key, str):
        raise ConfigError(f"key is the name of a curve metric, e.g. 'test_acc'; got {key!r}")
    if not curve:
        raise ConfigError("the curve is empty: pass the list returned by sparsity_curve")
    for index, record in enumerate(curve):
        for needed in ("sparsity", key):
            if needed not in record:
                names = [str(k) for k in record]
                raise ConfigError(
                    f"curve point {index} has no {needed!r}{suggest(needed, names)} "
                    f"Keys: {', '.join(names)}."
                )
            if not isinstance(record[needed], numbers.Real) or math.isnan(record[needed]):
                raise ConfigError(
                    f"curve point {index} has {needed}={record[needed]!r}; expected a number"
                )
    ordered = sorted(curve, key=lambda record: float(record["sparsity"]))
    return [float(r["sparsity"]) for r in ordered], [float(r[key]) for r in ordered]


def is_monotone(
    curve: Sequence[Mapping[str, Any]], key: str = "test_acc", tol: float = 0.01
) -> bool:
    """Whether ``key`` never rises by more than ``tol`` as sparsity grows.

    Precisely: for every pair of points with ``sparsity_i <= sparsity_j`` (ties in the given
    order), ``a_j - a_i <= tol``, i.e. ``max_m rise(m) <= tol`` (module docstring). Pairs, not
    neighbours: a slow climb of many small steps is a rise. A flat curve is monotone; the spec's
    SDD baseline (recovery 7.7 pt) is not at ``tol = 0.01`` on accuracies in [0, 1].

    Args:
        curve: Points with ``"sparsity"`` and ``key`` (as returned by :func:`sparsity_curve`).
        key: The metric; higher is better.
        tol: Largest allowed rise, in the metric's unit (0.01 = 1 pt of accuracy in [0, 1]).

    Raises:
        ConfigError: ``tol < 0`` or a bad curve (empty, missing keys, NaN).
    """
    if tol < 0:
        raise ConfigError(f"tol must be >= 0, got {tol}")
    _, values = _values(curve, key)
    low = math.inf
    for value in values:
        if value - low > tol:
            return False
        low = min(low, value)
    return True


def sdd_score(curve: Sequence[Mapping[str, Any]], key: str = "test_acc") -> dict[str, Any]:
    """Depth and recovery of the sparse double descent valley of a curve (spec §6, §7).

    With ``dip(m)`` and ``rise(m)`` of the module docstring, the valley is the point ``m*``
    maximising ``min(dip(m), rise(m))`` (ties: the larger rise, then the first point). Returns

    - ``dip``: the largest value up to the valley minus the valley's value;
    - ``recovery``: the largest value after the valley minus the valley's value;
    - ``score``: ``min(dip, recovery)``, the SDD strength, 0 for a monotone or flat curve;
    - ``peak_sparsity``, ``valley_sparsity``, ``recovery_sparsity``: where the maximum before the
      valley, the valley and the maximum after it are (first occurrence);

    all zeros and ``None`` sparsities when no fall is followed by a rise (score 0). Example (spec
    §5.5, accuracies in %): 85.8 dense -> ... -> 71.5 at 99.3 % -> 79.2 at 99.7 % -> 72.3 at 99.9 %
    gives dip 14.3 (85.8 - 71.5), recovery 7.7 (79.2 - 71.5), valley at 99.3 %, recovery at 99.7 %.
    A curve that only rises after the dense point (pruning helps, then accuracy falls) has no dip
    before its rise, so score 0, while :func:`is_monotone` still sees the rise.

    Args:
        curve: Points with ``"sparsity"`` and ``key``; ordered by sparsity here (stable).
        key: The metric; higher is better.

    Raises:
        ConfigError: A bad curve (empty, missing keys, NaN).
    """
    sparsities, values = _values(curve, key)
    n = len(values)
    peak_before = list(range(n))  # index of the running maximum up to m (first occurrence)
    for m in range(1, n):
        best = peak_before[m - 1]
        peak_before[m] = best if values[best] >= values[m] else m
    peak_after = list(range(n))  # index of the maximum from m on (first occurrence)
    for m in range(n - 2, -1, -1):
        best = peak_after[m + 1]
        peak_after[m] = best if values[best] > values[m] else m
    valley, best_key = None, (0.0, 0.0)
    for m in range(n):
        dip = values[peak_before[m]] - values[m]
        rise = values[peak_after[m]] - values[m]
        strength = (min(dip, rise), rise)
        if strength[0] > 0 and strength > best_key:
            valley, best_key = m, strength
    if valley is None:
        return {
            "dip": 0.0,
            "recovery": 0.0,
            "score": 0.0,
            "peak_sparsity": None,
            "valley_sparsity": None,
            "recovery_sparsity": None,
        }
    dip = values[peak_before[valley]] - values[valley]
    recovery = values[peak_after[valley]] - values[valley]
    return {
        "dip": dip,
        "recovery": recovery,
        "score": min(dip, recovery),
        "peak_sparsity": sparsities[peak_before[valley]],
        "valley_sparsity": sparsities[valley],
        "recovery_sparsity": sparsities[peak_after[valley]],
    }
