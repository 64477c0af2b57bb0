"""Ensemble outputs shared by the engine and the uncertainty family: the member-major layout.

An ensemble model (a packed network, a deep ensemble) declares ``num_members = M`` and returns
logits of shape ``(M·B, K)`` where rows ``m·B .. m·B + B - 1`` belong to member ``m``; training
repeats the targets the same way (the mean of the members' losses), evaluation averages the
members' softmaxes (never the softmax of mean logits).
"""

from __future__ import annotations

from torch import Tensor, nn

from sobre.core.errors import ConfigError


def num_members(model: nn.Module) -> int:
    """The ``num_members`` a model declares (1 for an ordinary model)."""
    m = getattr(model, "num_members", 1)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"{type(model).__name__}.num_members must be an integer >= 1, got {m!r}")
    return m


def split_members(logits: Tensor, num_members: int) -> Tensor:
    """Member-major ``(M·B, K)`` rows as ``(B, M, K)``.

    Raises:
        ConfigError: ``logits`` is not 2-D or its rows are not a multiple of ``num_members``.
    """
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
        raise ConfigError(f"num_members must be an integer >= 1, got {num_members!r}")
    if logits.ndim != 2 or logits.shape[0] % num_members:
        raise ConfigError(
            f"split_members expects member-major logits of shape (M·B, K) with M={num_members}, "
            f"got shape {tuple(logits.shape)}"
        )
    return logits.view(num_members, -1, logits.shape[1]).transpose(0, 1)


def member_targets(targets: Tensor, num_members: int) -> Tensor:
    """Targets repeated member-major, matching ``(M·B, K)`` logits."""
    return targets.repeat(num_members, *([1] * (targets.ndim - 1)))


def mean_probs(logits: Tensor, num_members: int) -> Tensor:
    """The members' mean softmax ``(B, K)`` (a plain softmax when ``num_members == 1``)."""
    if num_members == 1:
        return logits.softmax(-1)
    return split_members(logits, num_members).softmax(-1).mean(1)
