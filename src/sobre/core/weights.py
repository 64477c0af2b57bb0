"""Fresh weights for a model: what every module's own initialisation draws under a seed.

Used to re-initialise a pruned network (IMP's ``"reinit"`` mode) and to build the independent
members of a deep ensemble from one architecture.
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
