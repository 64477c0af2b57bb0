"""Loading local weight files into a model: safetensors, or a state dict read weights-only."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from sobre.core.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pt", ".pth")
_SHOWN = 5  # keys listed per kind of mismatch


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a local weights file, read without unpickling arbitrary objects.

    Args:
        path: A ``.safetensors`` file, or a ``.pt``/``.pth`` file holding a state dict.

    Raises:
        ConfigError: The suffix is not one of ``.safetensors``, ``.pt``, ``.pth``.
        CheckpointError: The file is missing, unreadable, or not a mapping of names to tensors.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(
            f"weights file {path} has an unsupported suffix {suffix!r}: "
            f"pass a {', '.join(WEIGHT_SUFFIXES)} file"
        )
    if not path.is_file():
        raise CheckpointError(
            f"weights file {path} does not exist: pass weights_path= an existing local file"
        )
    try:
        state = (
            load_file(path)
            if suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(
            f"cannot read weights file {path} ({err}): it is corrupted or not a state dict; "
            "save one with safetensors.torch.save_file(model.state_dict(), path)"
        ) from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"weights file {path} holds a {type(state).__name__}, not a state dict of tensors: "
            "save one with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
        )
    return dict(state)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local weights file into ``model`` strictly (every key, every shape) and return it.

    Args:
        model: The built model; it must have the architecture the weights were saved from.
        path: A ``.safetensors`` file, or a ``.pt``/``.pth`` state dict.

    Raises:
        CheckpointError: The file cannot be read, or its keys or shapes differ from the model's
            (the message names the missing, unexpected and mismatched keys).
    """
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{what} ({len(keys)}): {', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file != model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"weights file {path} does not match {type(model).__name__}: {'; '.join(problems)}. "
            "Build the model with the name, num_classes, in_channels and arguments the weights "
            "were saved with."
        )
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s", len(state), path)
    return model
