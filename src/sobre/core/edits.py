"""Structure edits that are atomic, recorded, and replayable on the original architecture.

A structure edit (turn an activation into an identity, fold two layers, remove a block, shrink
channels) is a function ``fn(model, **params) -> model`` decorated with :func:`structural_edit`.
The decorator makes it atomic (it edits a deep copy and returns it, so a failure half-way leaves
the caller's model untouched) and appends ``{"op", "module", "params"}`` to the model's *edit log*.
Checkpoints store the log as JSON beside the weights; loading rebuilds the architecture from the
recipe, calls :func:`replay`, and only then loads the tensors: a pruned, folded model reloads
without pickling anything.

Params must be JSON-able (numbers, strings, lists, dicts); pass masks as lists.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from sobre.core.errors import CheckpointError, ConfigError
from sobre.core.registry import Registry

M = TypeVar("M", bound=nn.Module)
EditFn = Callable[..., nn.Module]

LOG_ATTR = "_sobre_edit_log"
EDITS: Registry[EditFn] = Registry("structure edit")


def edit_log(model: nn.Module) -> list[dict[str, Any]]:
    """The structure edits applied to ``model`` so far, oldest first (a copy)."""
    return copy.deepcopy(getattr(model, LOG_ATTR, []))


def structural_edit(name: str, *, runtime: Sequence[str] = ()) -> Callable[[EditFn], EditFn]:
    """Register ``fn(model, **params) -> model`` as the edit ``name``: atomic and recorded.

    The wrapped function receives a deep copy of the model; the caller's model is returned
    unchanged if it raises. Keyword arguments are the recorded params and must be JSON-able,
    except those named in ``runtime`` (e.g. example inputs used only to check or decide): they
    are passed on but not recorded, so the function must not need them to replay.
    """

    def deco(fn: EditFn) -> EditFn:
        @functools.wraps(fn)
        def wrapper(model: M, **kwargs: Any) -> M:
            params = {k: v for k, v in kwargs.items() if k not in runtime}
            try:
                json.dumps(params)
            except TypeError as err:
                raise ConfigError(
                    f"{name}: parameters must be JSON-able to be replayed ({err}); pass "
                    "tensors as lists"
                ) from None
            work = copy.deepcopy(model)
            out = fn(work, **kwargs)
            log = [
                *getattr(model, LOG_ATTR, []),
                {"op": name, "module": fn.__module__, "params": copy.deepcopy(params)},
            ]
            object.__setattr__(out, LOG_ATTR, log)
            return out

        EDITS.register(name)(wrapper)
        return wrapper

    return deco


MOVED = {"sobre.prune.compact": "sobre.core.compact"}
"""Modules that registered edits and have moved since: older edit logs name the old place."""


def replay(model: M, log: Sequence[Mapping[str, Any]]) -> M:
    """Apply a recorded edit log to a freshly built model (same architecture as the original).

    Raises:
        CheckpointError: an entry is malformed, its op is unknown, or it does not fit the model.
    """
    for i, entry in enumerate(log):
        if not isinstance(entry, Mapping) or not {"op", "params"} <= set(entry):
            raise CheckpointError(f"edit log entry {i} is malformed: {entry!r}")
        if entry.get("module"):
            module = MOVED.get(entry["module"], entry["module"])
            try:
                importlib.import_module(module)  # registers the op
            except ImportError as err:
                raise CheckpointError(
                    f"edit log entry {i} ({entry['op']}) needs module {module!r}, which "
                    f"cannot be imported ({err}); install the sobre extra that provides it"
                ) from None
        fn = EDITS.get(entry["op"])
        try:
            model = fn(model, **entry["params"])
        except (ConfigError, KeyError, AttributeError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"edit log entry {i} ({entry['op']} {entry['params']!r}) does not fit this "
                f"model: {err}; was the checkpoint made from a different architecture?"
            ) from None
    return model
