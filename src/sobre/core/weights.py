"""Weights derived from a model: fresh ones under a seed, and an eval-mode BatchNorm's affine map.

``fresh_weights`` re-initialises a pruned network (IMP's ``"reinit"`` mode) and builds the
independent members of a deep ensemble; ``bn_scale_shift`` is the arithmetic every BatchNorm
fold uses (pruning's ``fold_linear``, efficient training's ``fold_frozen_bn``).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from sobre.core.masks import remove_masks

log = logging.getLogger(__name__)


def fresh_weights(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """New values of the parameters and persistent buffers of ``model``, by plain name.

    Every module with a ``reset_parameters()`` re-draws its own tensors (in ``named_modules``
    order) under ``torch.manual_seed(seed)``, on a CPU copy without masks, leaving the global RNG
    and ``model`` untouched: the same seed always gives the same values, on any device.
    Model-level init schemes (e.g. torchvision's Kaiming fan-out) are not reproduced; tensors of
    modules without ``reset_parameters`` are absent from the result (a warning names them).
    """
    persistent = set(remove_masks(copy.deepcopy(model)).state_dict())
    values: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            if not callable(getattr(module, "reset_parameters", None)):
                continue
            fresh = remove_masks(copy.deepcopy(module)).cpu()
            fresh.reset_parameters()  # type: ignore[operator]
            prefix = f"{name}." if name else ""
            for key, value in (
                *fresh.named_parameters(recurse=False),
                *fresh.named_buffers(recurse=False),
            ):
                if prefix + key in persistent:  # non-persistent buffers are not weights
                    values[prefix + key] = value.detach().clone()
    params = {n for n, _ in remove_masks(copy.deepcopy(model)).named_parameters()}
    kept = sorted(params - set(values))
    if kept:
        log.warning(
            "fresh_weights: %d parameters have no reset_parameters and keep their values: %s",
            len(kept),
            kept[:5],
        )
    return values


def bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as ``y = scale · x + shift`` per channel, in float64:
    ``scale = γ / sqrt(running_var + ε)``, ``shift = β − running_mean · scale`` (γ = 1, β = 0
    without affine parameters). Folding it into the layer before it is then
    ``W' = scale · W``, ``b' = scale · b + shift``.
    """
    var, mean = bn.running_var.detach().double(), bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale
