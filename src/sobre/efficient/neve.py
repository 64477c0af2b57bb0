"""NeVe (#48): neural velocity drives LR decay and early stopping, without a validation set.

Once before training and after every epoch, :class:`NeuralVelocity` forwards a fixed probe set
(by default 100 uniform-noise inputs, no data needed) through the model in eval mode, via the
shared :class:`~sobre.efficient.probe.ProbeOutputs`, and records every neuron's output. For
neuron ``i`` (an output channel of a ``Conv2d``, ``BatchNorm2d`` or ``Linear``), its outputs over
all probe samples and positions form one vector ``y_i^t`` and

- ``rho_i^t = cos(y_i^t, y_i^{t-1})``, clamped to [-1, 1]; both-zero (identical) vectors give
  ``rho = 1``, exactly one zero vector gives ``rho = 0``;
- ``v_i^t = 1 - (rho_i^t + mu * v_i^{t-1})`` with ``v^{-1} = 0`` and ``mu = 0.5``;
- model signals: ``V^t = sum_i |v_i^t|``, its mean over neurons, and
  ``M^t = mean over layers of MSE(v_layer^t, v_layer^{t-1})``.

:class:`VelocityPlateau` decays the LR when ``M^t`` stops decreasing and asks to stop once the
mean ``|v^t|`` falls below ``stop_below``. Both objects act at epoch end only; the training step is
unchanged. Typical loop::

    velocity = NeuralVelocity(model, input_shape=(1, 28, 28))
    plateau = VelocityPlateau(optimizer, patience=10)
    velocity.measure()  # the reference, before training
    for epoch in range(max_epochs):
        train_one_epoch(...)
        if plateau.step(velocity.measure()):
            break

How this differs from NEq (:mod:`sobre.efficient.neq`): NEq averages per-sample cosines and takes
the velocity of the *change* of that similarity, ``v = (phi^t - phi^{t-1}) - mu v^{t-1}``; NeVe
concatenates all samples into one vector per neuron, and its velocity is a dissimilarity
smoothed by ``mu``. With identical outputs ``rho = 1`` and ``v^t = -mu v^{t-1}``, so an unchanged
model decays geometrically to the fixed point 0 (exactly 0 from ``v^{t-1} = 0``).

Authors' code [EIDOSLAB/NeuralVelocity, ``src/neve/hooks.py``, ``src/neve/utils.py``,
``src/schedulers/scheduler.py``, ``src/classification.py``]: the scheduler is stepped on ``M^t``
(``model_metric_mse``), which exists from the second velocity on; it is a ReduceLROnPlateau copy
that, after a decay, forgets its best value ("local" plateau). Their early-stop test reads a key
one level above where it is stored, so it never fires; here it does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice
from sobre.core.taps import Selector
from sobre.efficient.probe import ProbeOutputs, cosine, noise_probe, probe_inputs

__all__ = [
    "NEVE_TARGETS",
    "NeuralVelocity",
    "VelocityPlateau",
    "VelocityReport",
    "neuron_similarity",
]

NEVE_TARGETS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
"""NeVe's neurons: output channels of every Conv2d, BatchNorm2d and Linear."""

_NOISE = ("uniform", "gaussian")


def neuron_similarity(current: Tensor, previous: Tensor) -> Tensor:
    """Per-neuron cosine ``rho_i = cos(y_i^t, y_i^{t-1})`` of NeVe, one neuron per row.

    Each row is flattened into one vector (all probe samples and positions concatenated). The
    cosine is accumulated in float64 and clamped to [-1, 1]; identical rows (both-zero ones
    included) give exactly 1, a zero row against a non-zero one gives 0.

    Args:
        current: ``(C, ...)`` outputs now.
        previous: ``(C, ...)`` outputs at the previous measurement, same shape.

    Returns:
        ``(C,)`` float64 similarities.
    """
    if current.shape != previous.shape:
        raise ConfigError(
            f"outputs changed shape between measurements: {tuple(previous.shape)} -> "
            f"{tuple(current.shape)}; keep the probe set and the model's layers fixed"
        )
    a = current.reshape(current.shape[0], -1).double()
    b = previous.reshape(previous.shape[0], -1).double()
    cos = cosine(a, b)
    return torch.where((a == b).all(dim=1), torch.ones_like(cos), cos)


@dataclass
class VelocityReport:
    """What one :meth:`NeuralVelocity.measure` call found.

    Attributes:
        epoch: Index of the measurement: -1 for the reference (the first call, before
            training), then 0, 1, ... (after each training epoch).
        rho: Layer name -> ``(C,)`` similarities ``rho^t``; ``None`` for the reference.
        velocity: Layer name -> ``(C,)`` velocities ``v^t``; ``None`` for the reference.
        mean_velocity: Mean of ``|v^t|`` over all neurons (the stop signal); ``None`` for the
            reference.
        total_velocity: ``V^t = sum_i |v_i^t|``; ``None`` for the reference.
        mse: ``M^t``, the mean over layers of ``layer_mse`` (the LR signal); ``None`` until two
            velocities exist (reference and epoch 0).
        layer_mse: Layer name -> ``MSE(v_layer^t, v_layer^{t-1})``; ``None`` when ``mse`` is.
    """

    epoch: int
    rho: dict[str, Tensor] | None = None
    velocity: dict[str, Tensor] | None = None
    mean_velocity: float | None = None
    total_velocity: float | None = None
    mse: float | None = None
    layer_mse: dict[str, float] | None = None

    @property
    def is_reference(self) -> bool:
        """Whether this is the reference measurement (no velocity yet)."""
        return self.velocity is None


def _infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    """One sample's shape, when the first layer fixes it (a ``Linear``); else a ConfigError."""
    first = next((m for m in model.modules() if next(m.parameters(False), None) is not None), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    layer = "no layer with parameters" if first is None else f"its first layer is {first}"
    raise ConfigError(
        f"cannot infer the input shape of {type(model).__name__} for a noise probe ({layer}, "
        "which does not fix the input size): pass input_shape=(C, H, W), e.g. (1, 28, 28), or "
        "pass probe= a DataLoader or a list of input tensors"
    )


class NeuralVelocity:
    """Measures NeVe's per-neuron velocity on a fixed probe set (module docstring).

    Args:
        model: The model being trained.
        probe: ``"noise"`` (``n_probe`` noise inputs of ``input_shape``), or any iterable of
            batches (a DataLoader of ``(input, label)`` or a list of input tensors), of which the
            first ``n_probe`` samples are kept.
        n_probe: Number of probe samples (NeVe's ``aux-samples``, 100).
        mu: Velocity momentum ``mu`` in [0, 1) (0.5).
        targets: Modules whose output channels are neurons (types, names or globs).
        input_shape: One sample's shape for the noise probe, e.g. ``(1, 28, 28)``; needed
            unless the model's first layer is a ``Linear``.
        noise: ``"uniform"`` in [0, 1) or ``"gaussian"`` N(0.5, 0.25^2) clipped to [0, 1].
        seed: Seed of the noise.
        dtype: Storage dtype of the recorded outputs (float16 halves the memory).

    Raises:
        ConfigError: Unknown ``probe``/``noise`` kind, no inferable input shape, an empty probe,
            ``n_probe < 1``, ``mu`` outside [0, 1), or targets that match no module.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Literal["noise"] | Iterable[Any] = "noise",
        *,
        n_probe: int = 100,
        mu: float = 0.5,
        targets: Selector | Sequence[Selector] = NEVE_TARGETS,
        input_shape: Sequence[int] | None = None,
        noise: Literal["uniform", "gaussian"] = "uniform",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if n_probe < 1:
            raise ConfigError(f"n_probe must be >= 1 probe samples, got {n_probe} (NeVe: 100)")
        if not 0.0 <= mu < 1.0:
            raise ConfigError(f"mu must be in [0, 1) for the velocity to settle, got {mu} (0.5)")
        check_choice("noise", noise, _NOISE, "NeuralVelocity")
        if isinstance(probe, str):
            if probe != "noise":
                raise ConfigError(
                    f"probe must be 'noise', a DataLoader or a list of input tensors, got "
                    f"{probe!r}; for Gaussian noise pass probe='noise', noise='gaussian'"
                )
            shape = tuple(input_shape) if input_shape is not None else _infer_input_shape(model)
            inputs = noise_probe(shape, n_probe, kind=noise, seed=seed)
        else:
            inputs = probe_inputs(probe, n=n_probe)
        self.mu = mu
        self.outputs = ProbeOutputs(model, inputs, targets, dtype=dtype)
        self._epoch = -1
        self._previous: dict[str, Tensor] | None = None
        self._velocity: dict[str, Tensor] | None = None

    @property
    def names(self) -> list[str]:
        """Names of the probed layers."""
        return self.outputs.names

    def measure(self) -> VelocityReport:
        """Forward the probe set and compare with the previous call (see :class:`VelocityReport`).

        Call it once before training (the reference: velocity undefined) and after each epoch.
        """
        current = self.outputs()
        report = VelocityReport(epoch=self._epoch)
        self._epoch += 1
        previous, self._previous = self._previous, current
        if previous is None:
            return report
        old = self._velocity
        report.rho = {name: neuron_similarity(current[name], previous[name]) for name in self.names}
        report.velocity = {
            name: 1.0 - (rho + self.mu * (old[name] if old is not None else 0.0))
            for name, rho in report.rho.items()
        }
        self._velocity = report.velocity
        speeds = torch.cat([v.abs() for v in report.velocity.values()])
        report.total_velocity = float(speeds.sum())
        report.mean_velocity = report.total_velocity / speeds.numel()
        if old is not None:
            report.layer_mse = {
                name: float((v - old[name]).square().mean()) for name, v in report.velocity.items()
            }
            report.mse = sum(report.layer_mse.values()) / len(report.layer_mse)
        return report

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue identically (tensors and plain types).

        It holds the probe set and the last outputs of every probed neuron on it, so its size
        is that of one measurement (``n_probe`` x positions x neurons values).
        """
        return {
            "epoch": self._epoch,
            "mu": self.mu,
            "probe": [t.clone() for t in self.outputs.probe],
            "previous": None if self._previous is None else dict(self._previous),
            "velocity": None if self._velocity is None else dict(self._velocity),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the probed layers must be the same."""
        for key in ("previous", "velocity"):
            saved = state[key]
            if saved is not None and sorted(saved) != sorted(self.names):
                raise ConfigError(
                    f"the saved {key!r} outputs cover layers {sorted(saved)}, but this "
                    f"NeuralVelocity probes {sorted(self.names)}: build it with the same model "
                    "and targets as the saved run"
                )
        self._epoch = int(state["epoch"])
        self.mu = float(state["mu"])
        self.outputs.probe = list(state["probe"])
        self._previous = None if state["previous"] is None else dict(state["previous"])
        self._velocity = None if state["velocity"] is None else dict(state["velocity"])

    def __repr__(self) -> str:
        return (
            f"NeuralVelocity({len(self.names)} layers, {self.outputs.num_samples} probe "
            f"samples, mu={self.mu})"
        )


class VelocityPlateau:
    """NeVe's LR and stop rule, stepped once per epoch with a :class:`VelocityReport`.

    LR: like ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode min, relative threshold) on
    ``M^t``: an epoch improves when ``M^t < best * (1 - threshold)``; after more than ``patience``
    epochs without improvement every group's LR becomes ``max(lr * factor, min_lr)``, the
    counter restarts and, as in the authors' ``ReduceLROnLocalPlateau``, the best value is
    forgotten. Reports without ``M`` (the reference and epoch 0) leave the LR alone.

    Stop: :attr:`should_stop` becomes (and stays) True once ``mean |v^t| < stop_below``.

    Args:
        optimizer: Any optimizer with ``param_groups``.
        factor: LR multiplier in (0, 1) (NeVe: 0.5).
        patience: Non-improving epochs tolerated before a decay (NeVe: 10).
        stop_below: Stop threshold on the mean ``|v|`` (1e-3); ``None`` never stops.
        threshold: Relative improvement an epoch needs (NeVe: 0).
        min_lr: The LR never decays below this.

    Raises:
        ConfigError: A value out of range, or an object without ``param_groups``.
    """

    _STATE = (
        "factor",
        "patience",
        "stop_below",
        "threshold",
        "min_lr",
        "best",
        "num_bad_epochs",
        "num_decays",
        "should_stop",
    )

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: float = 0.5,
        patience: int = 10,
        stop_below: float | None = 1e-3,
        threshold: float = 0.0,
        min_lr: float = 0.0,
    ) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise ConfigError(
                f"VelocityPlateau needs a torch optimizer (with param_groups), got "
                f"{type(optimizer).__name__}"
            )
        if not 0.0 < factor < 1.0:
            raise ConfigError(f"factor must be in (0, 1), got {factor}; NeVe halves the LR: 0.5")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"patience must be an int >= 0 epochs, got {patience!r} (NeVe: 10)")
        if stop_below is not None and not stop_below >= 0.0:
            raise ConfigError(f"stop_below must be >= 0 (or None), got {stop_below} (NeVe: 1e-3)")
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"threshold must be in [0, 1), got {threshold} (NeVe: 0)")
        if not min_lr >= 0.0:
            raise ConfigError(f"min_lr must be >= 0, got {min_lr}")
        self.optimizer = optimizer
        self.factor = factor
        self.patience = patience
        self.stop_below = stop_below
        self.threshold = threshold
        self.min_lr = min_lr
        self.best = math.inf
        self.num_bad_epochs = 0
        self.num_decays = 0
        self.should_stop = False

    def step(self, report: VelocityReport) -> bool:
        """Apply the LR rule to ``report.mse`` and the stop rule; returns :attr:`should_stop`."""
        if report.mse is not None:
            if report.mse < self.best * (1.0 - self.threshold):
                self.best = report.mse
                self.num_bad_epochs = 0
            else:
                self.num_bad_epochs += 1
            if self.num_bad_epochs > self.patience:
                self._decay()
                self.best = math.inf
                self.num_bad_epochs = 0
        if (
            self.stop_below is not None
            and report.mean_velocity is not None
            and report.mean_velocity < self.stop_below
        ):
            self.should_stop = True
        return self.should_stop

    def _decay(self) -> None:
        decayed = False
        for group in self.optimizer.param_groups:
            new = max(float(group["lr"]) * self.factor, self.min_lr)
            if new < group["lr"]:
                group["lr"] = new
                decayed = True
        self.num_decays += int(decayed)

    def state_dict(self) -> dict[str, Any]:
        """Counters and settings (plain types; the LR itself lives in the optimizer's state)."""
        return {key: getattr(self, key) for key in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if sorted(state) != sorted(self._STATE):
            raise ConfigError(
                f"not a VelocityPlateau state: keys {sorted(state)}, expected "
                f"{sorted(self._STATE)}; pass what VelocityPlateau.state_dict() returned"
            )
        for key, value in state.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return (
            f"VelocityPlateau(factor={self.factor}, patience={self.patience}, "
            f"stop_below={self.stop_below}, decays={self.num_decays}, stop={self.should_stop})"
        )
