"""NEq (#11): skip the update of neurons whose output has stopped changing ("at equilibrium").

Once per epoch the probe set Ξ is forwarded in eval mode (:class:`~sobre.efficient.probe.
ProbeOutputs`, the shared activation tap) and every neuron ``i`` (an output channel of each
Conv2d and, separately, of each BatchNorm2d; the final Linear always trains) gets

- the similarity ``φ_i^t = mean_ξ cos(ŷ_{i,ξ}^t, ŷ_{i,ξ}^{t-1})`` of its output map (flattened
  over positions) with the previous epoch's (both-zero vectors count as 1, one zero vector as 0);
- its change ``Δφ_i^t = φ_i^t - φ_i^{t-1}`` with ``φ^0 = 1`` (NEq's code starts its
  dissimilarity buffer ``1 - φ`` at zero);
- its velocity ``v_i^t = Δφ_i^t - μ v_i^{t-1}`` (``velocity_rule="paper"``, ``v^0 = 0``), or the
  repository's bookkeeping (``"code"``): threshold ``s + Δφ^t``, then ``s ← μ (s + Δφ^t) - Δφ^t``;

and is frozen for the next epoch iff ``|v_i^t| < ε``. The probe runs before epoch 0 (the
reference) and after every epoch; epochs ``0 .. warmup - 1`` train densely (the code's warm-up:
with ``warmup=1`` the first mask applies to epoch 1). Masks are recomputed every epoch (neurons
re-enter training), so NEq is a per-epoch :class:`~sobre.efficient.masks.NeuronMask` fed to a
:class:`~sobre.efficient.masks.MaskedOptimizer` (frozen rows stay bit-identical) and, when the
convs were swapped by :func:`~sobre.efficient.sparse.sparsify`, to the channel-sparse layers
(:func:`drive_sparse`), whose backward then skips the frozen rows' weight gradient for real.
:func:`backward_saving` gives the counted backward-FLOP saving of a mask, :func:`shuffle_mask`
the paper's random control (the same number of frozen neurons per layer, at random).

``threshold="learned"`` replaces the hand-set ε by a learned per-layer threshold τ_l (SCoTTi,
#38); see :class:`SCoTTi` for what that reconstruction is.

Driving it (plain loop or a callback)::

    neq = NEq(model, probe_inputs(train_loader, per_class=10), eps=1e-2)
    opt = neq.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    for epoch in range(epochs):
        neq.update(epoch)  # epoch 0: the reference forward; then the mask for this epoch
        train_one_epoch(model, opt)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import backward_flops
from sobre.core.registry import check_choice
from sobre.core.taps import Selector, resolve_modules
from sobre.efficient.masks import LAYERS, NORMS, MaskedOptimizer, NeuronMask
from sobre.efficient.probe import PROBED, ProbeOutputs, cosine, probe_inputs
from sobre.efficient.sparse import ChannelSparseConv2d, ChannelSparseLinear, set_trainable

__all__ = [
    "CRITERIA",
    "THRESHOLDS",
    "VELOCITY_RULES",
    "MaskDriver",
    "NEq",
    "SCoTTi",
    "backward_saving",
    "drive_sparse",
    "shuffle_mask",
    "similarity",
    "tau_step",
    "velocity_step",
]

Criterion = Literal["cosine", "pooled"]
VelocityRule = Literal["paper", "code"]
Threshold = Literal["fixed", "learned"]
CRITERIA: tuple[str, ...] = ("cosine", "pooled")
"""``"cosine"``: per-sample cosine over positions (the paper); ``"pooled"``: average each map
over positions first, then one cosine over the probe samples (the code's ``per-sample`` mode)."""
VELOCITY_RULES: tuple[str, ...] = ("paper", "code")
THRESHOLDS: tuple[str, ...] = ("fixed", "learned")


# --------------------------------------------------------------------------- the equations


def similarity(current: Tensor, previous: Tensor) -> Tensor:
    """``φ_i``: mean over probe samples of the cosine between two ``(C, N, P)`` output maps.

    Per channel ``i`` and sample ``ξ`` the cosine runs over the ``P`` positions; two all-zero
    vectors count as similarity 1 (nothing changed), one all-zero vector as 0 (NEq's code).

    Returns:
        ``(C,)`` float32 similarities in [-1, 1].

    Raises:
        ConfigError: The two maps differ in shape.
    """
    if current.shape != previous.shape:
        raise ConfigError(
            f"cannot compare outputs of shape {tuple(current.shape)} with the previous epoch's "
            f"{tuple(previous.shape)}; the probe set and the model must stay the same"
        )
    return cosine(current.float(), previous.float()).mean(dim=1)


def velocity_step(
    delta_phi: Tensor, state: Tensor, mu: float, rule: VelocityRule = "paper"
) -> tuple[Tensor, Tensor]:
    """One velocity update; returns ``(v, new_state)``, ``v`` being what is thresholded.

    ``"paper"``: ``v^t = Δφ^t - μ v^{t-1}`` (the state is ``v``). ``"code"`` (EIDOSLAB/NEq):
    ``v = s + Δφ^t`` is thresholded, then the state becomes ``μ v - Δφ^t``.
    """
    if rule == "paper":
        v = delta_phi - mu * state
        return v, v
    v = state + delta_phi
    return v, mu * v - delta_phi


def tau_step(
    tau: float,
    rel: Tensor,
    trained: Tensor,
    *,
    tradeoff: float,
    temperature: float,
    lr: float,
) -> float:
    """One SCoTTi step of a layer's relative threshold ``τ̂`` (see :class:`SCoTTi`).

    ``τ̂ + η mean_i m_i g_i (1 - g_i)(1 - λ v̂_i)`` clipped to [0, 1], with ``g_i = σ((v̂_i - τ̂)
    / T)``, ``v̂`` = ``rel`` (speeds over the layer's peak speed) and ``m`` = ``trained``: the
    gradient step on ``J = mean_i g_i (1 - λ v̂_i)`` preconditioned by ``T``.
    """
    gate = torch.sigmoid((rel - tau) / temperature)
    terms = gate * (1 - gate) * (1 - tradeoff * rel) * trained
    return min(max(tau + lr * float(terms.mean()), 0.0), 1.0)


def shuffle_mask(mask: NeuronMask, generator: torch.Generator) -> NeuronMask:
    """The random control of NEq ("stochastic" in the paper): in every layer, as many frozen
    channels as ``mask`` has, at positions drawn uniformly from ``generator``."""
    shuffled = {}
    for name, m in mask.items():
        perm = torch.randperm(m.numel(), generator=generator)
        shuffled[name] = m[perm]
    return mask.replace(shuffled)


def drive_sparse(model: nn.Module, mask: NeuronMask) -> list[str]:
    """Hand ``mask`` to the channel-sparse layers of ``model`` (:func:`~sobre.efficient.sparse.
    sparsify`), so their backward computes weight gradients only for the trainable channels.

    Layers of the mask that were not swapped (and the norms) are left to the masked optimizer.

    Returns:
        The names of the layers set.
    """
    sparse = {
        name: m
        for name, m in mask.items()
        if isinstance(model.get_submodule(name), ChannelSparseConv2d | ChannelSparseLinear)
    }
    if sparse:
        if mask.dim == "out":
            set_trainable(model, sparse)
        else:
            set_trainable(model, None, sparse)
    return list(sparse)


# --------------------------------------------------------------------------- shared driver


class MaskDriver:
    """Publishes a per-epoch :class:`NeuronMask` to the optimizers it wrapped and to the model's
    channel-sparse layers (shared by :class:`NEq` and the budgeted selector)."""

    model: nn.Module
    _mask: NeuronMask
    _optimizers: list[MaskedOptimizer]

    @property
    def mask(self) -> NeuronMask:
        """The mask in force (``True`` = trains this epoch)."""
        return self._mask

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> MaskedOptimizer:
        """A :class:`MaskedOptimizer` around ``optimizer`` whose masks follow every new mask."""
        wrapped = MaskedOptimizer(optimizer, self._mask, self.model)
        self._optimizers.append(wrapped)
        return wrapped

    def _publish(self, mask: NeuronMask) -> NeuronMask:
        for optimizer in self._optimizers:
            optimizer.set_masks(mask)
        drive_sparse(self.model, mask)
        self._mask = mask
        return mask


def _as_probe(probe: Sequence[Tensor] | Tensor | Iterable[Any]) -> list[Tensor]:
    if isinstance(probe, Tensor):
        return [probe]
    if isinstance(probe, Sequence) and all(isinstance(t, Tensor) for t in probe):
        return list(probe)
    return probe_inputs(probe)


def _targets(
    model: nn.Module,
    targets: Selector | Sequence[Selector],
    exclude: Selector | Sequence[Selector],
) -> list[str]:
    """Names of the neuron layers: the targets minus ``exclude`` and the model's last Linear."""
    chosen = [
        (n, m) for n, m in resolve_modules(model, targets) if isinstance(m, (*LAYERS, *NORMS))
    ]
    dropped = {n for n, _ in resolve_modules(model, exclude)} if exclude else set()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    dropped.update(linears[-1:])  # the classifier always trains
    names = [n for n, _ in chosen if n not in dropped]
    if not names:
        raise ConfigError(
            f"targets={targets!r} (minus exclude={exclude!r} and the final Linear) select no "
            f"Conv, Linear or norm layer of {type(model).__name__}; NEq needs neurons to freeze"
        )
    return names


def _check_state_tensors(
    what: str, state: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> None:
    """Raise unless ``state`` covers the layers of ``expected`` with the same shapes."""
    if set(state) != set(expected):
        raise ConfigError(
            f"the {what} covers layers {sorted(state)} but this model's targets are "
            f"{sorted(expected)}; build it for the same model and targets"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ConfigError(
                f"the {what} of layer {name!r} has shape {tuple(t.shape)} but this model needs "
                f"{tuple(expected[name].shape)}; build it for the same model and targets"
            )


def _reduce(outputs: Tensor, criterion: Criterion) -> Tensor:
    """``(C, N, P)`` -> the vectors the cosine compares: per sample over positions, or (pooled
    maps and scalar outputs) one vector over the probe samples, ``(C, 1, N)``."""
    if criterion == "pooled":
        outputs = outputs.float().mean(-1, keepdim=True)
    return outputs.transpose(1, 2) if outputs.shape[-1] == 1 else outputs


class NEq(MaskDriver):
    """Neurons at equilibrium (#11): per-epoch masks that freeze neurons whose velocity is below
    a threshold (see the module docstring for the equations).

    Args:
        model: The model (modules are found by name; the model is not copied).
        probe: The probe set Ξ: input tensors (:func:`~sobre.efficient.probe.probe_inputs`,
            :func:`~sobre.efficient.probe.noise_probe`) or a loader, read once into a fixed set.
        eps: ε, the velocity below which a neuron is frozen (``threshold="fixed"``).
        mu: μ, the velocity momentum.
        warmup: Epochs trained densely before masks apply (at least epoch 0, which has no
            velocity yet).
        targets: Modules whose output channels are neurons (names, globs or types); the last
            Linear of the model is never one.
        criterion: See :data:`CRITERIA`.
        velocity_rule: ``"paper"`` or ``"code"`` (:func:`velocity_step`).
        threshold: ``"fixed"`` (ε) or ``"learned"`` (per-layer τ_l, see :class:`SCoTTi`).
        tau_lr: η, the step size of the learned thresholds (one step per epoch).
        temperature: T of the soft gate, in units of each layer's peak mean ``|v|``.
        tradeoff: λ of the learned threshold's cost-vs-progress objective.
        exclude: Modules to leave out of ``targets`` (always trained).
        dtype: Storage dtype of the previous epoch's probe outputs.

    Raises:
        ConfigError: ``eps <= 0``, ``mu`` outside [0, 1), a negative warm-up, an unknown
            criterion, rule or threshold, an empty probe set, or targets selecting nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Sequence[Tensor] | Tensor | Iterable[Any],
        eps: float = 1e-3,
        mu: float = 0.5,
        warmup: int = 1,
        targets: Selector | Sequence[Selector] = PROBED,
        criterion: Criterion = "cosine",
        velocity_rule: VelocityRule = "paper",
        threshold: Threshold = "fixed",
        tau_lr: float = 0.3,
        temperature: float = 0.01,
        tradeoff: float = 20.0,
        exclude: Selector | Sequence[Selector] = (),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not (math.isfinite(eps) and eps > 0):
            raise ConfigError(
                f"eps must be a finite number > 0 (NEq freezes neurons with |v| < eps), got {eps}"
            )
        if not 0 <= mu < 1:
            raise ConfigError(f"mu must lie in [0, 1) (velocity momentum), got {mu}")
        if warmup < 0:
            raise ConfigError(f"warmup must be >= 0 epochs, got {warmup}")
        for what, value in (
            ("tau_lr", tau_lr),
            ("temperature", temperature),
            ("tradeoff", tradeoff),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{what} must be a finite number > 0, got {value}")
        owner = type(self).__name__
        self.criterion = check_choice("criterion", criterion, CRITERIA, owner)
        self.velocity_rule = check_choice("velocity_rule", velocity_rule, VELOCITY_RULES, owner)
        self.threshold = check_choice("threshold", threshold, THRESHOLDS, owner)
        self.model = model
        self.eps, self.mu, self.warmup = eps, mu, warmup
        self.tau_lr, self.temperature, self.tradeoff = tau_lr, temperature, tradeoff
        self.names = _targets(model, targets, exclude)
        self.probe = ProbeOutputs(model, _as_probe(probe), self.names, dtype=dtype)
        self._mask = NeuronMask.from_model(model, self.names)
        self._optimizers = []
        self.epoch: int | None = None
        self.measured = 0
        self._outputs: dict[str, Tensor] = {}
        self._phi: dict[str, Tensor] = {}
        self._state: dict[str, Tensor] = {}
        self._velocity: dict[str, Tensor] = {}
        self.tau: dict[str, float] = {}
        self._tau_rel: dict[str, float] = {}
        self._scale: dict[str, float] = {}
        self.tau_history: list[dict[str, float]] = []

    # -- per epoch -------------------------------------------------------------------------
    def update(self, epoch: int) -> NeuronMask:
        """Measure the probe outputs and return the mask for ``epoch`` (call it before each
        epoch; the first call records the reference outputs and trains every neuron).

        The mask is also set on every optimizer from :meth:`wrap_optimizer` and on the model's
        channel-sparse layers.

        Raises:
            ConfigError: ``epoch`` is not after the previous call's.
        """
        self.measure(epoch)
        if self.measured < max(self.warmup, 1):
            dense = {n: torch.ones_like(m) for n, m in self._mask.items()}
            return self._publish(self._mask.replace(dense))
        if self.threshold == "learned":
            return self._publish(self._mask.replace(self._learn_tau()))
        return self._publish(
            self._mask.replace({n: self._velocity[n].abs() >= self.eps for n in self.names})
        )

    def measure(self, epoch: int) -> dict[str, Tensor]:
        """Forward the probe set and update φ, Δφ and the velocities, without deciding a mask
        (what the budgeted selector needs); :meth:`update` calls it.

        Returns:
            :meth:`velocities` (empty after the first, reference call).

        Raises:
            ConfigError: ``epoch`` is not after the previous call's.
        """
        if self.epoch is not None and epoch <= self.epoch:
            raise ConfigError(
                f"update({epoch}) after update({self.epoch}): call update once per epoch, with "
                "increasing epochs"
            )
        outputs = {n: _reduce(t, self.criterion) for n, t in self.probe().items()}
        if not self._outputs:
            self._phi = {n: torch.ones(t.shape[0]) for n, t in outputs.items()}
            self._state = {n: torch.zeros(t.shape[0]) for n, t in outputs.items()}
        else:
            for name, out in outputs.items():
                phi = similarity(out, self._outputs[name])
                v, self._state[name] = velocity_step(
                    phi - self._phi[name], self._state[name], self.mu, self.velocity_rule
                )
                self._velocity[name], self._phi[name] = v, phi
            self.measured += 1
        self._outputs = outputs
        self.epoch = epoch
        return self.velocities()

    def _learn_tau(self) -> dict[str, Tensor]:
        """One step of every layer's threshold (SCoTTi); returns the binarised gates."""
        keep = {}
        for name in self.names:
            speed = self._velocity[name].abs()
            scale = max(self._scale.get(name, 0.0), float(speed.mean()))
            self._scale[name] = scale
            rel = speed / scale if scale > 0 else torch.zeros_like(speed)
            tau = tau_step(
                self._tau_rel.get(name, 1.0 / self.tradeoff),
                rel,
                self._mask[name],
                tradeoff=self.tradeoff,
                temperature=self.temperature,
                lr=self.tau_lr,
            )
            self._tau_rel[name] = tau
            self.tau[name] = tau * scale
            keep[name] = rel >= tau
        self.tau_history.append(dict(self.tau))
        return keep

    def velocities(self) -> dict[str, Tensor]:
        """Layer -> the last velocity ``v`` of each neuron (empty before the second update)."""
        return {n: v.clone() for n, v in self._velocity.items()}

    def stats(self) -> dict[str, Any]:
        """Frozen fraction overall and per layer, the threshold(s) and the epoch."""
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "frozen": 1.0 - self._mask.trainable_fraction(),
            "frozen_per_layer": {n: 1.0 - float(m.float().mean()) for n, m in self._mask.items()},
            "threshold": self.threshold,
        }
        if self.threshold == "learned":
            out["tau"] = dict(self.tau)
        else:
            out["eps"] = self.eps
        return out

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next :meth:`update` depends on (tensors and plain types): the previous
        probe outputs, φ, the velocity state, the learned thresholds and the mask in force."""
        return {
            "epoch": self.epoch,
            "measured": self.measured,
            "outputs": {n: t.clone() for n, t in self._outputs.items()},
            "phi": {n: t.clone() for n, t in self._phi.items()},
            "state": {n: t.clone() for n, t in self._state.items()},
            "velocity": self.velocities(),
            "tau_rel": dict(self._tau_rel),
            "scale": dict(self._scale),
            "tau_history": [dict(t) for t in self.tau_history],
            "mask": self._mask.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the mask is published again).

        Raises:
            ConfigError: Missing keys, or layers or widths that differ from this model's targets.
        """
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ConfigError(f"not an NEq state: keys {sorted(missing)} are missing")
        widths = {n: torch.empty(m.numel()) for n, m in self._mask.items()}
        mask = NeuronMask({}, dim="out")
        mask.load_state_dict(state["mask"])
        _check_state_tensors("mask", dict(mask.items()), widths)
        for key in ("phi", "state", "velocity"):
            if state[key]:
                _check_state_tensors(key, state[key], widths)
        if state["outputs"]:
            _check_state_tensors(
                "outputs", {n: t[:, 0, 0] for n, t in state["outputs"].items()}, widths
            )
        self.epoch, self.measured = state["epoch"], int(state["measured"])
        self._outputs = {n: t.clone() for n, t in state["outputs"].items()}
        self._phi = {n: t.clone() for n, t in state["phi"].items()}
        self._state = {n: t.clone() for n, t in state["state"].items()}
        self._velocity = {n: t.clone() for n, t in state["velocity"].items()}
        self._tau_rel, self._scale = dict(state["tau_rel"]), dict(state["scale"])
        self.tau = {n: self._tau_rel[n] * self._scale[n] for n in self._tau_rel}
        self.tau_history = [dict(t) for t in state["tau_history"]]
        self._publish(mask)

    def __repr__(self) -> str:
        bound = f"eps={self.eps}" if self.threshold == "fixed" else "threshold='learned'"
        return (
            f"{type(self).__name__}({len(self.names)} layers, {bound}, mu={self.mu}, "
            f"epoch={self.epoch}, frozen={self.stats()['frozen']:.1%})"
        )


class SCoTTi(NEq):
    """SCoTTi (#38, arXiv 2312.12483): NEq with a learned per-layer threshold instead of ε.

    **This is our reconstruction**: only the paper's abstract was available ("an optimizable
    threshold parameter" that cuts neuron updates), no code or equations. What we do:

    - Each layer ``l`` keeps its peak speed ``s_l = max_t mean_i |v_i^t|`` (its own velocity
      scale, so no absolute ε is set by hand) and a threshold ``τ̂_l`` in units of it
      (``τ_l = τ̂_l s_l``).
    - Soft gate ``g_i = σ((v̂_i - τ̂_l) / T)`` with ``v̂_i = |v_i| / s_l`` and ``T`` =
      ``temperature``.
    - Cost-vs-progress objective ``J_l = mean_i g_i (1 - λ v̂_i)``, λ = ``tradeoff``: ``mean_i
      g_i`` is the fraction of the layer's weight-gradient work spent (the same for every
      output channel of a layer, so it is the layer's counted backward cost relative to dense),
      ``λ mean_i g_i v̂_i`` the velocity (progress) kept. Its hard minimiser is the break-even
      speed ``τ̂ = 1/λ``: a neuron slower than ``s_l / λ`` costs more than the progress it keeps.
    - ``τ̂_l`` starts there and takes one gradient step per epoch, preconditioned by ``T``:
      ``τ̂_l ← clip(τ̂_l - η T ∂J_l/∂τ̂_l, 0, 1) = clip(τ̂_l + η mean_i m_i g_i (1 - g_i)(1 - λ
      v̂_i))``, η = ``tau_lr``, where ``m_i`` = 1 for the neurons that trained in the last epoch
      (a frozen neuron's velocity only reflects the layers below it, and counting it would let
      freezing feed on itself).
    - The mask is the binarised gate: a neuron trains iff ``v̂_i >= τ̂_l`` (``g_i >= 1/2``).

    λ is dimensionless, so one value serves layers whose velocities differ by orders of
    magnitude (NEq's single ε does not); the defaults (λ = 20, T = 0.01, η = 0.3) were set on
    the CPU protocol of NEq (ResNet-8, MNIST-5k), where τ̂ stays within about 10 % of 1/λ and
    settles. ``stats()["tau"]`` and :attr:`tau_history` give ``τ_l`` per epoch.

    Args:
        model: See :class:`NEq`.
        probe: See :class:`NEq`.
        **kwargs: Any other :class:`NEq` argument except ``threshold`` (``eps`` is unused).
    """

    def __init__(
        self, model: nn.Module, probe: Sequence[Tensor] | Tensor | Iterable[Any], **kwargs: Any
    ) -> None:
        if "threshold" in kwargs:
            raise ConfigError("SCoTTi always learns its threshold: drop threshold=")
        super().__init__(model, probe, threshold="learned", **kwargs)


def backward_saving(model: nn.Module, inputs: Tensor | tuple[Any, ...], mask: NeuronMask) -> float:
    """The counted backward-FLOP saving of ``mask`` on one training step: ``1 - masked /
    dense`` of :func:`sobre.core.measure.backward_flops` (grad-input plus grad-weight FLOPs).

    Only the mask's Conv/Linear layers count (a norm's affine update has no FLOPs in the count);
    at most about half the backward can be saved, the weight-gradient half. A counted saving is
    not time unless the layers skip the work (:func:`drive_sparse`).
    """
    layers = {n: m for n, m in mask.items() if isinstance(model.get_submodule(n), LAYERS)}
    dense = backward_flops(model, inputs).backward
    return 1.0 - backward_flops(model, inputs, layers).backward / dense if dense else 0.0
