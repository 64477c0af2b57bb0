"""``create``: one entry point for sobre's nets, torchvision classifiers and timm models.

Resolution of an unprefixed name: sobre's ``MODELS`` registry, then torchvision classification
models, then timm (if installed). ``tv:<name>`` and ``timm:<name>`` force the source. Every model is
randomly initialised; nothing is ever downloaded (weights come only from a local ``weights_path``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torchvision
from torch import nn

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.registry import closest
from sobre.models.registry import MODELS
from sobre.models.weights import load_weights

log = logging.getLogger(__name__)

TV_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
_TIMM_HINT = "timm is not installed: pip install 'sobre[timm]' to use timm models"


def names() -> list[str]:
    """The names of sobre's own nets (torchvision and timm names are not listed)."""
    return MODELS.names()


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    input_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a randomly initialised classifier by name, optionally loading local weights.

    Args:
        name: A sobre net (see :func:`names`), a torchvision classification model, or a timm model;
            ``tv:`` or ``timm:`` in front forces the source.
        num_classes: Number of outputs.
        in_channels: Input channels; torchvision models get their first conv replaced when != 3.
        pretrained: Ask for trained weights; they are read from ``weights_path`` only.
        weights_path: A local ``.safetensors`` file or a ``.pt``/``.pth`` state dict, loaded
            strictly after the model is built.
        input_size: Side of the square inputs. Used by size-dependent sobre nets (``lenet5``,
            ``mlp``, ``vit_tiny28``) and passed as ``img_size`` to timm models with a fixed input
            size (ViT, Swin, ...) unless ``img_size`` is in ``kwargs``; size-agnostic nets and
            torchvision models do not need it (torchvision ViTs take ``image_size=``).
        **kwargs: Extra constructor arguments of the chosen model (e.g. ``width=16``).

    Raises:
        ConfigError: Bad counts, ``pretrained=True`` without ``weights_path``, arguments the model
            rejects, or a timm name without timm installed.
        UnknownNameError: No source knows ``name``; the message lists close names.
        CheckpointError: ``weights_path`` is unreadable or does not match the model.
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value < 1:
            raise ConfigError(f"{arg} must be >= 1, got {value}")
    if input_size is not None and input_size < 1:
        raise ConfigError(f"input_size must be >= 1 (or None), got {input_size}")
    if pretrained and weights_path is None:
        raise ConfigError(
            "pretrained=True needs weights_path=: sobre never downloads weights. Pass "
            "weights_path= a local .safetensors file (or a .pt/.pth state dict, read with "
            "torch.load(weights_only=True)) saved from the same architecture."
        )
    source, bare = _resolve(name)
    if source == "sobre":
        model = _build_sobre(bare, num_classes, in_channels, input_size, kwargs)
    elif source == "torchvision":
        model = _build_torchvision(bare, num_classes, in_channels, kwargs)
    else:
        model = _build_timm(bare, num_classes, in_channels, input_size, kwargs)
    log.debug("built %s model %r", source, bare)
    return model if weights_path is None else load_weights(model, weights_path)


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Conv2d:
    """Swap the first ``nn.Conv2d`` of ``model`` (module order) for one with ``in_channels`` inputs.

    The new conv keeps every other hyper-parameter (out channels, kernel, stride, padding,
    dilation, groups, bias, padding mode, dtype, device) and the old bias; its weight is drawn
    from a normal distribution with the old weight's standard deviation, so the model's own init
    scale is kept. For torchvision models this is resnet's ``conv1``, mobilenet_v2's
    ``features.0.0``, vit's ``conv_proj``.

    Returns:
        The new conv (already set in ``model``).

    Raises:
        ConfigError: ``model`` has no ``nn.Conv2d``, or its groups do not divide ``in_channels``.
    """
    found = next(
        ((path, m) for path, m in model.named_modules() if path and isinstance(m, nn.Conv2d)), None
    )
    if found is None:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Conv2d to adapt to in_channels={in_channels}: "
            "use in_channels=3 or a model that starts with a conv"
        )
    path, old = found
    if in_channels % old.groups:
        raise ConfigError(
            f"the first conv {path!r} of {type(model).__name__} has groups={old.groups}, which "
            f"does not divide in_channels={in_channels}: use a multiple of {old.groups}"
        )
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.normal_(0.0, float(old.weight.std()))
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)
    return new


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _import_timm() -> ModuleType | None:
    try:
        import timm
    except ImportError:
        return None
    return timm


def _require_timm() -> ModuleType:
    timm = _import_timm()
    if timm is None:
        raise ConfigError(_TIMM_HINT)
    return timm


def _resolve(name: str) -> tuple[str, str]:
    """``(source, bare name)`` with source one of ``sobre``, ``torchvision``, ``timm``."""
    if name.startswith(TV_PREFIX):
        bare = name.removeprefix(TV_PREFIX)
        if bare not in _torchvision_names():
            hint = _hint(bare, {"torchvision": _torchvision_names()})
            raise UnknownNameError(
                f"unknown torchvision model {bare!r}. {hint}"
                "See torchvision.models.list_models() for the names."
            )
        return "torchvision", bare
    if name.startswith(TIMM_PREFIX):
        bare = name.removeprefix(TIMM_PREFIX)
        timm = _require_timm()
        if not timm.is_model(bare):
            raise UnknownNameError(
                f"unknown timm model {bare!r}. {_hint(bare, {'timm': timm.list_models()})}"
                "See timm.list_models() for the names."
            )
        return "timm", bare
    if name in MODELS:
        return "sobre", name
    if name in _torchvision_names():
        return "torchvision", name
    timm = _import_timm()
    if timm is not None and timm.is_model(name):
        return "timm", name
    sources: dict[str, list[str] | tuple[str, ...]] = {
        "sobre": MODELS.names(),
        "torchvision": _torchvision_names(),
    }
    if timm is not None:
        sources["timm"] = timm.list_models()
    raise UnknownNameError(
        f"unknown model {name!r}. {_hint(name, sources)}sobre's nets: {', '.join(MODELS.names())}; "
        f"prefix a name with {TV_PREFIX!r} or {TIMM_PREFIX!r} to pick torchvision or timm"
        f"{'' if timm is not None else f' ({_TIMM_HINT})'}."
    )


def _hint(name: str, sources: dict[str, list[str] | tuple[str, ...]]) -> str:
    """``Did you mean 'a', 'b' (sobre); 'c' (timm)? `` with up to 3 names per source, or ``""``."""
    parts = [
        f"{', '.join(repr(h) for h in hits)} ({source})"
        for source, choices in sources.items()
        if (hits := closest(name, choices))
    ]
    return f"Did you mean {'; '.join(parts)}? " if parts else ""


def _build_sobre(
    name: str, num_classes: int, in_channels: int, input_size: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    builder = MODELS.get(name)
    params = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(
            f"model {name!r} does not take {', '.join(unknown)}: "
            f"its arguments are {', '.join(params)}"
        )
    args: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels, **kwargs}
    if input_size is not None and "input_size" in params:
        args["input_size"] = input_size
    return builder(**args)


def _build_torchvision(
    name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]
) -> nn.Module:
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(
            f"torchvision model {name!r} rejected its arguments ({err}): "
            "fix the keyword arguments given to sobre.models.create"
        ) from err
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model


def _build_timm(
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: int | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    timm = _require_timm()
    config = timm.models.get_pretrained_cfg(name)
    if (
        input_size is not None
        and "img_size" not in kwargs
        and getattr(config, "fixed_input_size", False)
    ):
        kwargs = {**kwargs, "img_size": input_size}
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except TypeError as err:
        raise ConfigError(
            f"timm model {name!r} rejected its arguments ({err}): "
            "fix the keyword arguments given to sobre.models.create"
        ) from err
