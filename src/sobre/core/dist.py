"""All-reduce helpers so every rank takes the same decision; no-ops outside distributed runs.

Every helper returns a new tensor (the input is never modified) and works with gloo on the CPU
as well as with NCCL (CPU tensors are moved to the current GPU for the collective and back).
Process groups are created by Lightning or by the caller, never here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor
from torch import distributed as dist

P = ParamSpec("P")
R = TypeVar("R")


def is_distributed() -> bool:
    """Whether a default process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 outside distributed runs)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 outside distributed runs)."""
    return dist.get_rank() if is_distributed() else 0


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (always true outside distributed runs)."""
    return rank() == 0


def _collective_copy(t: Tensor) -> Tensor:
    """A detached contiguous copy of ``t`` on a device the active backend can communicate."""
    out = t.detach().clone(memory_format=torch.contiguous_format)
    if dist.get_backend() == "nccl" and out.device.type != "cuda":
        out = out.to(torch.device("cuda", torch.cuda.current_device()))
    return out


def _all_reduce(t: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
    if not is_distributed():
        return t.detach().clone()
    out = _collective_copy(t)
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Element-wise sum of ``t`` over all ranks (a copy of ``t`` outside distributed runs)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_sum_each(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`all_reduce_sum` of several tensors of one dtype in a single collective (flattened
    into one buffer); the sums come back in the tensors' own shapes."""
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    parts = flat.split([t.numel() for t in tensors])
    return [part.view_as(t) for part, t in zip(parts, tensors, strict=True)]


def all_reduce_mean(t: Tensor) -> Tensor:
    """Element-wise mean of ``t`` over all ranks; integer inputs give a floating result."""
    return _all_reduce(t, dist.ReduceOp.SUM) / world_size()


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over all ranks."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_reduce_min(t: Tensor) -> Tensor:
    """Element-wise minimum of ``t`` over all ranks."""
    return _all_reduce(t, dist.ReduceOp.MIN)


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s value of ``t`` on every rank (a copy of ``t`` outside distributed runs)."""
    if not is_distributed():
        return t.detach().clone()
    out = _collective_copy(t)
    dist.broadcast(out, src=src)
    return out.to(t.device)


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorator: ``fn`` runs on rank 0 only; other ranks get ``None`` without calling it."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if is_rank_zero() else None

    return wrapper
