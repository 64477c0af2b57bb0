"""Deep Ensembles as one module with packed-model outputs, and the member-major ensemble loss.

A :class:`DeepEnsemble` holds M independently initialised networks of one architecture (the
baseline of Packed-Ensembles, #1) and returns their logits stacked member-major, shape
``(M·B, K)`` with rows ``m·B .. m·B+B-1`` from member ``m``: the layout of a packed model, so
:class:`EnsembleLoss`, ``split_members`` and the uncertainty metrics treat both alike.

Two execution modes give the same numbers (to float rounding), a third picks one of them:

- ``"sequential"``: one forward per member, outputs concatenated;
- ``"vmap"``: the members' parameters and buffers are stacked and one
  ``torch.func.functional_call`` of member 0 is vectorised over them with ``torch.func.vmap``
  (``randomness="different"``: each member draws its own dropout masks). The stack is
  ``torch.stack`` of the live parameters at every call, not ``torch.func.stack_module_state``,
  whose stacked copies are new leaves: gradients must reach each member's own parameters.
  Buffers updated in place (BatchNorm running statistics in train mode) are copied back to each
  member after the call. Forward hooks on the members see batched tensors (use
  ``"sequential"`` with feature taps). Modules that ``vmap`` cannot run (``.item()`` inside
  ``forward``, BatchNorm with ``momentum=None`` in train mode, data-dependent control flow)
  raise a :class:`~sobre.core.errors.ConfigError`.
- ``"auto"``: on the first call, times both modes on that input (no gradient, buffers and RNG
  restored afterwards: one warm-up round then three timed rounds, interleaved; the fastest round
  of each, which other jobs on a shared machine disturb least) and keeps the faster mode for
  good; if ``vmap`` fails it keeps ``"sequential"`` and logs why. The choice is in
  :attr:`DeepEnsemble.resolved_mode`. On the 2-core CPU of ``benchmarks/ensemble_speed.py``
  ``vmap`` is mostly the slower one (see ``benchmarks/results/ensemble_speed.json``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError
from sobre.core.members import member_targets
from sobre.core.registry import check_choice
from sobre.core.weights import fresh_weights

__all__ = ["DeepEnsemble", "Ensemble", "EnsembleLoss", "make_ensemble"]

log = logging.getLogger(__name__)

Mode = Literal["auto", "sequential", "vmap"]
MODES: tuple[str, ...] = ("auto", "sequential", "vmap")
_AUTO_ROUNDS = 3  # timed rounds of the "auto" choice, after one warm-up round


def _signature(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, tuple, str]]]:
    """Module types by name, and state-dict entries as (key, shape, dtype): the architecture."""
    modules = [(name, type(m).__qualname__) for name, m in model.named_modules()]
    state = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    return modules, state


def _check_members(models: Sequence[nn.Module]) -> None:
    """Raise a :class:`ConfigError` unless ``models`` are distinct modules of one architecture."""
    if len(models) < 1 or not all(isinstance(m, nn.Module) for m in models):
        raise ConfigError(
            "DeepEnsemble needs a non-empty sequence of nn.Module members, got "
            f"{[type(m).__name__ for m in models]}; build them with DeepEnsemble.from_factory"
        )
    if len({id(m) for m in models}) != len(models):
        raise ConfigError(
            "DeepEnsemble members must be distinct modules (the same module was passed twice, "
            "so two members would share their weights); build them with "
            "DeepEnsemble.from_factory(factory, num_members, seed)"
        )
    ref_modules, ref_state = _signature(models[0])
    for i, model in enumerate(models[1:], start=1):
        modules, state = _signature(model)
        for what, ref, got in (("module", ref_modules, modules), ("state", ref_state, state)):
            if ref != got:
                diff = next(
                    ((a, b) for a, b in zip(ref, got, strict=False) if a != b),
                    (f"{len(ref)} entries", f"{len(got)} entries"),
                )
                raise ConfigError(
                    f"DeepEnsemble members must share one architecture: member {i} differs from "
                    f"member 0 in its {what} entries ({diff[1]} vs {diff[0]}); build every member "
                    "with the same factory (DeepEnsemble.from_factory)"
                )


class DeepEnsemble(nn.Module):
    """M independently initialised networks run as one ensemble; logits are ``(M·B, K)``.

    Deep Ensembles (Lakshminarayanan et al., 2017): the ensemble prediction is the mean of the
    members' softmaxes, p̄ = (1/M) Σ_m softmax(f_m(x)) (average after ``split_members``).
    The members are kept in ``self.members`` (an ``nn.ModuleList``), so the state-dict keys are
    ``members.<m>.<member key>`` whatever the mode, and checkpoints load across modes.

    Args:
        models: the members, distinct modules of one architecture (checked).
        mode: ``"sequential"``, ``"vmap"`` or ``"auto"`` (see the module docstring).

    Raises:
        ConfigError: no member, a member passed twice, members of different architectures, or an
            unknown ``mode``.
    """

    def __init__(self, models: Sequence[nn.Module], mode: Mode = "auto") -> None:
        super().__init__()
        check_choice("mode", mode, MODES, "DeepEnsemble")
        models = list(models)
        _check_members(models)
        self.members = nn.ModuleList(models)
        self.mode: Mode = mode
        self.resolved_mode: str | None = None if mode == "auto" else mode

    @classmethod
    def from_factory(
        cls, factory: Callable[[], nn.Module], num_members: int, seed: int, mode: Mode = "auto"
    ) -> DeepEnsemble:
        """M members ``factory()`` built under ``torch.manual_seed(seed + m)``, m = 0..M-1.

        The global RNG state is restored afterwards, so building an ensemble does not change the
        random numbers drawn later.
        """
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ConfigError(f"num_members must be an integer >= 1, got {num_members!r}")
        members = []
        with torch.random.fork_rng(devices=[]):
            for m in range(num_members):
                torch.manual_seed(seed + m)
                members.append(factory())
        return cls(members, mode=mode)

    @property
    def num_members(self) -> int:
        """M, the number of members."""
        return len(self.members)

    def forward(self, x: Tensor) -> Tensor:
        """Member-major logits ``(M·B, K)``: rows ``m·B .. m·B+B-1`` are member ``m``'s."""
        if self.resolved_mode is None:
            self.resolved_mode = self._choose(x)
        if self.resolved_mode == "vmap":
            return self._forward_vmap(x)
        return self._forward_sequential(x)

    def _forward_sequential(self, x: Tensor) -> Tensor:
        return torch.cat([member(x) for member in self.members], dim=0)

    def _forward_vmap(self, x: Tensor) -> Tensor:
        members = list(self.members)
        param_names = [name for name, _ in members[0].named_parameters()]
        buffer_names = [name for name, _ in members[0].named_buffers()]
        params = [dict(m.named_parameters()) for m in members]
        buffers = [dict(m.named_buffers()) for m in members]
        stacked_params = {n: torch.stack([p[n] for p in params]) for n in param_names}
        with torch.no_grad():
            stacked_buffers = {n: torch.stack([b[n] for b in buffers]) for n in buffer_names}

        def call(p: dict[str, Tensor], b: dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(members[0], (p, b), (inputs,))

        try:
            out = vmap(call, in_dims=(0, 0, None), randomness="different")(
                stacked_params, stacked_buffers, x
            )
        except RuntimeError as err:
            raise ConfigError(
                f"this {type(members[0]).__name__} cannot run under torch.func.vmap ({err}); "
                "use DeepEnsemble(..., mode='sequential')"
            ) from err
        with torch.no_grad():  # in-place buffer updates (BN running stats) back to each member
            for n in buffer_names:
                for m, b in enumerate(buffers):
                    b[n].copy_(stacked_buffers[n][m])
        return out.flatten(0, 1)

    def _choose(self, x: Tensor) -> str:
        """Time both modes on ``x`` (no grad, buffers and RNG restored); the faster one."""
        snapshot = {n: b.detach().clone() for n, b in self.named_buffers()}
        runs = {"sequential": self._forward_sequential, "vmap": self._forward_vmap}
        times: dict[str, list[float]] = {name: [] for name in runs}
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        devices = [x.device] if x.is_cuda else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                for r in range(1 + _AUTO_ROUNDS):
                    for name in (("sequential", "vmap"), ("vmap", "sequential"))[r % 2]:
                        sync()
                        start = time.perf_counter()
                        runs[name](x)
                        sync()
                        if r:
                            times[name].append(time.perf_counter() - start)
        except ConfigError as err:
            log.warning("DeepEnsemble mode 'auto' uses 'sequential': %s", err)
            return "sequential"
        finally:
            with torch.no_grad():
                for n, b in self.named_buffers():
                    b.copy_(snapshot[n])
        best = {name: min(t) for name, t in times.items()}
        choice = min(best, key=best.__getitem__)
        log.info(
            "DeepEnsemble mode 'auto' uses %r for input %s (fastest round, ms: %s)",
            choice,
            tuple(x.shape),
            {k: round(v * 1e3, 3) for k, v in best.items()},
        )
        return choice

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, mode={self.mode!r}, resolved={self.resolved_mode}"


class EnsembleLoss(nn.Module):
    """The base loss on member-major ``(M·B, K)`` logits with targets repeated M times.

    With the mean-reduced cross-entropy this is L = (1/(M·B)) Σ_m Σ_i CE(f_m(x_i), y_i)
    = (1/M) Σ_m CE_m, the Packed-Ensembles / Deep-Ensembles training loss (#1, §1.2): members
    share the mini-batch and are trained independently (no member sees another's rows).

    For the user's own loops: ``sobre.engine``'s routine already repeats the targets of a net
    that declares ``num_members`` (as :class:`DeepEnsemble` does), so give it the plain loss.

    Args:
        base: the per-row loss (default ``nn.CrossEntropyLoss()``).
        num_members: M.

    Raises:
        ConfigError: (on call) the logits do not have M·B rows for B targets.
    """

    def __init__(self, base: nn.Module | None = None, *, num_members: int) -> None:
        super().__init__()
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ConfigError(f"num_members must be an integer >= 1, got {num_members!r}")
        self.base = base if base is not None else nn.CrossEntropyLoss()
        self.num_members = num_members

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``base(logits, target.repeat(M))`` (member-major), after checking the row count."""
        m, b = self.num_members, target.shape[0]
        if logits.shape[0] != m * b:
            raise ConfigError(
                f"EnsembleLoss(num_members={m}) expects {m}·{b} = {m * b} logit rows for {b} "
                f"targets (member-major), got {logits.shape[0]} rows; pass the ensemble's "
                "(M·B, K) output and the batch's B targets, with num_members = M"
            )
        return self.base(logits, member_targets(target, m))


@structural_edit("deep_ensemble")
def make_ensemble(
    model: nn.Module, *, num_members: int, seed: int = 0, mode: Mode = "sequential"
) -> DeepEnsemble:
    """A recorded edit: ``model`` becomes a :class:`DeepEnsemble` of ``num_members`` copies of its
    architecture, member ``m`` with :func:`~sobre.core.weights.fresh_weights` of ``seed + m``.

    Recorded, so a checkpoint of the ensemble reloads from the recipe's architecture.
    ``"sequential"`` by default: ``"auto"`` times both modes and may pick differently on two
    runs (same numbers up to float rounding, but not bit-identical resumes).
    """
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
        raise ConfigError(f"num_members must be an integer >= 1, got {num_members!r}")
    members = []
    for m in range(num_members):
        member = copy.deepcopy(model)
        member.load_state_dict(fresh_weights(member, seed + m), strict=False)
        members.append(member)
    return DeepEnsemble(members, mode=mode)


class Ensemble:
    """Stage transform: the model becomes a deep ensemble (:func:`make_ensemble`).

    Put it in the first stage of a recipe to train M independent members in one fit (the
    routine repeats the targets and evaluates the members' mean softmax).

    Args:
        num_members: M.
        seed: member m draws its weights with ``seed + m``.
        mode: execution mode of :class:`DeepEnsemble`.
    """

    def __init__(self, num_members: int = 4, seed: int = 0, mode: Mode = "sequential") -> None:
        self.num_members, self.seed, self.mode = num_members, seed, mode

    def apply(self, model: nn.Module) -> nn.Module:
        """The ensemble built from ``model``'s architecture."""
        return make_ensemble(model, num_members=self.num_members, seed=self.seed, mode=self.mode)
