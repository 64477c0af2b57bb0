"""Weights derived from a model: fresh ones under a seed, and an eval-mode BatchNorm's affine map.

``fresh_weights`` re-initialises a pruned network (IMP's ``"reinit"`` mode) and builds the
independent members of a deep ensemble; ``bn_scale_shift`` is the arithmetic every BatchNorm
fold uses (pruning's ``fold_linear``, efficient training's ``fold_frozen_bn``).
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch
from torch import Tensor, nn

from sobre.core.masks import remove_masks

log = logging.getLogger(__name__)


def _takes_no_arguments(fn: object) -> bool:
    if not callable(fn):
        return False
    params = inspect.signature(fn).parameters.values()
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )


def fresh_weights(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """New values of the parameters and persistent buffers of ``model``, by plain name.

    On a CPU copy without masks, under ``torch.manual_seed(seed)``: every module with a
    ``reset_parameters()`` re-draws its own tensors (in ``named_modules`` order), then every
    module with an ``init_weights()`` re-applies its own scheme to its subtree, innermost first
    as its constructor did (sobre's models, timm's), so the new values follow the model's init
    distribution. The global RNG and ``model`` are left untouched and the same seed always gives
    the same values, on any device. Schemes a constructor applies without such a method
    (torchvision's Kaiming fan-out) are not reproduced; tensors neither re-drawn nor under a
    scheme are absent from the result (a warning names the parameters among them).
    """
    fresh = remove_masks(copy.deepcopy(model)).cpu()
    persistent = set(fresh.state_dict())
    covered: set[str] = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, module in fresh.named_modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()  # type: ignore[operator]
                prefix = f"{name}." if name else ""
                own = (
                    *module.named_parameters(recurse=False),
                    *module.named_buffers(recurse=False),
                )
                covered.update(prefix + key for key, _ in own)
        schemes = [
            (name, m)
            for name, m in fresh.named_modules()
            if _takes_no_arguments(getattr(m, "init_weights", None))
        ]
        for name, module in reversed(schemes):
            module.init_weights()  # type: ignore[operator]
            prefix = f"{name}." if name else ""
            covered.update(prefix + key for key in module.state_dict())
    state = fresh.state_dict()
    values = {k: state[k].detach().clone() for k in sorted(covered & persistent)}
    kept = sorted({n for n, _ in fresh.named_parameters()} - set(values))
    if kept:
        log.warning(
            "fresh_weights: %d parameters have no reset_parameters or init_weights and keep "
            "their values: %s",
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
