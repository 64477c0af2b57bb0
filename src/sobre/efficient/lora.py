"""LoRA: low-rank adapters on frozen linear layers, the peer arm of WASI (#46) (Hu et al., 2022).

:class:`LoRALinear` computes ``y = W x + b + s · B (A dropout(x))`` with the base ``W``, ``b``
frozen, ``A`` (r x in, Kaiming-uniform) and ``B`` (out x r, zeros, so the output is unchanged at
the start) trainable and the scale ``s = alpha / r``. :func:`add_lora` swaps ``nn.Linear`` layers
in place (``state_dict`` keys ``weight``, ``bias`` plus ``lora_a``, ``lora_b``);
:func:`merge_lora` folds ``W ← W + s · B A`` and swaps back to ``nn.Linear``. PEFT is not a
dependency: this is the minimal adapter the WASI baselines need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError
from sobre.efficient.compress import layer_names

__all__ = ["LoRALinear", "add_lora", "add_lora_recorded", "merge_lora", "merge_lora_recorded"]

M = TypeVar("M", bound=nn.Module)


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a trainable low-rank update ``s · B A`` on a frozen base (module doc).

    Usually made by :func:`add_lora` (``module.__class__`` swap); built directly, it takes
    ``nn.Linear``'s arguments plus the keywords below.

    Args:
        *args: ``nn.Linear``'s arguments.
        rank: ``r``, the inner dimension of ``B A``.
        alpha: the scale numerator, ``s = alpha / r``.
        dropout: dropout probability on the adapter's input.
        **kwargs: ``nn.Linear``'s keyword arguments.
    """

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    lora_dropout: nn.Module
    scale: float

    def __init__(
        self, *args: Any, rank: int = 8, alpha: float = 16, dropout: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._configure(rank, alpha, dropout)

    def _configure(self, rank: int, alpha: float, dropout: float) -> None:
        """Freeze the base, add ``A`` (Kaiming-uniform) and ``B`` (zeros)."""
        like = self.weight.detach()
        self._base_grad = tuple(p.requires_grad for p in (self.weight, self.bias) if p is not None)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features).to(like))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank).to(like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)
        return super().forward(x) + self.scale * update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def add_lora(
    model: M,
    rank: int = 8,
    alpha: float = 16,
    layers: Sequence[str] | str = "all",
    dropout: float = 0.0,
) -> M:
    """Swap the selected ``nn.Linear`` layers for :class:`LoRALinear`, in place.

    Only the swapped layers' ``weight`` and ``bias`` are frozen; every other parameter keeps its
    ``requires_grad`` (freeze the backbone or not yourself). Outputs are unchanged (``B = 0``).

    Args:
        model: the model, edited in place.
        rank: ``r`` >= 1.
        alpha: scale numerator (``s = alpha / r``).
        layers: ``"all"``, ``"last:N"``, one module name or a list of names.
        dropout: adapter input dropout in [0, 1).

    Returns:
        ``model``.

    Raises:
        UnknownNameError: a name that is not a plain ``nn.Linear`` module (closest names listed).
        ConfigError: ``rank`` < 1 or ``dropout`` outside [0, 1).
    """
    if rank < 1 or not 0 <= dropout < 1:
        raise ConfigError(
            f"add_lora: rank={rank} must be >= 1 and dropout={dropout} in [0, 1); e.g. rank=8, "
            "dropout=0"
        )
    for name in layer_names(model, layers, lambda m: type(m) is nn.Linear, "plain nn.Linear"):
        module = model.get_submodule(name)
        module.__class__ = LoRALinear
        module._configure(rank, alpha, dropout)  # type: ignore[operator]
    return model


@torch.no_grad()
def merge_lora(model: M) -> M:
    """Fold ``W ← W + s · B A`` into every :class:`LoRALinear` and swap it back to ``nn.Linear``
    (same ``weight``/``bias`` objects, their ``requires_grad`` from before :func:`add_lora`)."""
    for module in list(model.modules()):
        if isinstance(module, LoRALinear):
            module.weight.add_(module.scale * module.lora_b @ module.lora_a)
            params = [p for p in (module.weight, module.bias) if p is not None]
            for p, flag in zip(params, module._base_grad, strict=True):
                p.requires_grad_(flag)
            del module.lora_a, module.lora_b, module.lora_dropout
            del module.rank, module.alpha, module.scale, module._base_grad
            module.__class__ = nn.Linear
    return model


@structural_edit("add_lora")
def add_lora_recorded(
    model: nn.Module, layers: list[str], rank: int = 8, alpha: float = 16
) -> nn.Module:
    """:func:`add_lora` as a recorded structure edit (a mid-fit checkpoint holds ``lora_a``,
    ``lora_b``; replaying the log rebuilds them before loading)."""
    return add_lora(model, rank, alpha, layers)


@structural_edit("merge_lora")
def merge_lora_recorded(model: nn.Module) -> nn.Module:
    """:func:`merge_lora` as a recorded structure edit (the pair of :func:`add_lora_recorded`)."""
    return merge_lora(model)
