"""LaCoOT: layer collapse through optimal transport (paper #28, ICCV 2025).

Training adds ``lam * mean_{(a, b)} MSWD(F_a, F_b)`` to the task loss, where ``F_a`` is what a
shape-preserving block receives and ``F_b`` what it returns (batch features flattened to B x D),
and the max-sliced 2-Wasserstein distance is

    MSWD(X, Y) = max_{|θ|=1} W2(θ·X, θ·Y) ≈ max over ``n_projections`` random unit θ of
                 sqrt(mean_i (sort(Xθ)_i - sort(Yθ)_i)²).

Blocks whose output distribution stays close to their input's can then be replaced by the
identity after training, without fine-tuning: :func:`rank_blocks` measures the distance of each
pair on held-out data, :func:`remove_blocks` collapses the closest ones (recorded structure edits).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sobre.core.errors import ConfigError
from sobre.core.measure import model_device
from sobre.core.methods import Regularizer, StepContext
from sobre.core.taps import FeatureTap
from sobre.prune.surgery import remove_block

Pair = tuple[str, str]


def max_sliced_w2(
    x: Tensor, y: Tensor, n_projections: int = 50, generator: torch.Generator | None = None
) -> Tensor:
    """Max-sliced 2-Wasserstein distance between two equal-size batches of features.

    Args:
        x: features ``(B, ...)``, flattened to ``(B, D)``.
        y: features of the same shape.
        n_projections: random unit directions θ (POT's default 50).
        generator: the source of the directions (default: torch's global RNG).

    Returns:
        A differentiable scalar: the largest 1-D W2 distance over the directions.
    """
    if x.shape != y.shape:
        raise ConfigError(
            f"max_sliced_w2 compares equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}: "
            "pair a block's input with its output only for shape-preserving blocks"
        )
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    theta = torch.randn(
        x.shape[1],
        n_projections,
        generator=generator,
        dtype=x.dtype,
        device="cpu" if generator is not None else x.device,
    ).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return (px - py).square().mean(dim=0).sqrt().max()


def auto_pairs(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> list[Pair]:
    """The ``(producer of the block's input, block)`` pairs of every shape-preserving block.

    A block is a child of an ``nn.Sequential``/``nn.ModuleList`` that holds parameters in more
    than one submodule (a residual block, a transformer block) and whose input and output have the
    same shape on ``example_inputs``; the first name of each pair is the module whose output *is*
    the block's input (found by tensor identity during one forward pass), so both ends can be
    recorded by one output-capturing feature tap.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    producers: dict[int, str] = {}
    seen: dict[str, tuple[int, torch.Size, torch.Size]] = {}
    parents = {name: mod for name, mod in model.named_modules()}
    candidates = {
        name
        for name, mod in model.named_modules()
        if name
        and isinstance(parents[name.rpartition(".")[0]], nn.Sequential | nn.ModuleList)
        and sum(1 for m in mod.modules() if next(m.parameters(recurse=False), None) is not None) > 1
    }

    alive: list[Tensor] = []  # keeps ids unique during the probe

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, Tensor):
                alive.append(out)
                producers[id(out)] = name  # an enclosing module finishes last and wins
                if name in candidates and args and isinstance(args[0], Tensor):
                    seen[name] = (id(args[0]), args[0].shape, out.shape)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    pairs = [
        (producers[src], name) for name, (src, a, b) in seen.items() if a == b and src in producers
    ]
    if not pairs:
        raise ConfigError(
            f"{type(model).__name__} has no shape-preserving block with a module producing its "
            "input; pass pairs=[(input_module, block), ...] explicitly"
        )
    return pairs


class LaCoOT(Regularizer):
    """The LaCoOT penalty ``lam * mean over pairs of MSWD(input of block, output of block)``.

    Args:
        pairs: ``(a, b)`` module names whose outputs are compared, or ``"auto"``: every
            shape-preserving block (:func:`auto_pairs`), found in :meth:`setup` on zeros of
            ``input_shape``.
        lam: weight λ (paper: 5 for ResNet-18, 9 for MobileNetV2, 0.1-1 for Swin-T).
        n_projections: random directions per distance.
        input_shape: one sample's shape, e.g. ``[1, 28, 28]`` (only with ``pairs="auto"``).
    """

    name = "lacoot"

    def __init__(
        self,
        pairs: Sequence[Sequence[str]] | str = "auto",
        lam: float = 1.0,
        n_projections: int = 50,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if lam < 0 or n_projections < 1:
            raise ConfigError(
                f"LaCoOT needs lam >= 0 and n_projections >= 1, got {lam}, {n_projections}"
            )
        if pairs == "auto":
            if input_shape is None:
                raise ConfigError("LaCoOT(pairs='auto') needs input_shape, e.g. [1, 28, 28]")
            self.input_shape: tuple[int, ...] | None = tuple(input_shape)
            self.pairs: list[Pair] = []
        elif isinstance(pairs, str) or not pairs:
            raise ConfigError("LaCoOT needs pairs='auto' or a list of (input_module, block) pairs")
        else:
            self.input_shape = None
            self._set_pairs(pairs)
        self.lam, self.n_projections = lam, n_projections

    def _set_pairs(self, pairs: Sequence[Sequence[str]]) -> None:
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        self.needs_features = tuple(dict.fromkeys(n for p in self.pairs for n in p))

    def setup(self, model: nn.Module) -> None:
        """Find the pairs when ``pairs="auto"`` (call before training; the engine does)."""
        if self.input_shape is not None:
            device = model_device(model)
            self._set_pairs(auto_pairs(model, torch.zeros(2, *self.input_shape, device=device)))

    def forward(self, ctx: StepContext) -> Tensor:
        if not self.pairs:
            raise ConfigError("LaCoOT(pairs='auto') must be set up first: call setup(model)")
        feats = ctx.features
        dists = [max_sliced_w2(feats[a], feats[b], self.n_projections) for a, b in self.pairs]
        return self.lam * torch.stack(dists).mean()


@dataclass
class BlockDistance:
    """Mean MSWD between a block's input and output on held-out data."""

    block: str
    source: str
    distance: float


@torch.no_grad()
def rank_blocks(
    model: nn.Module,
    loader: Iterable[Any],
    pairs: Sequence[Sequence[str]],
    *,
    n_projections: int = 50,
    max_batches: int | None = None,
    seed: int = 0,
) -> list[BlockDistance]:
    """Distances of every pair on ``loader`` (eval mode, fixed directions), closest first."""
    totals = {b: 0.0 for _, b in pairs}
    batches = 0
    generator = torch.Generator().manual_seed(seed)
    training = model.training
    model.eval()
    device = model_device(model)
    try:
        with FeatureTap(model, [n for p in pairs for n in p]) as tap:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch[0] if isinstance(batch, list | tuple) else batch
                model(x.to(device))
                for a, b in pairs:
                    totals[b] += float(
                        max_sliced_w2(tap.features[a], tap.features[b], n_projections, generator)
                    )
                batches += 1
    finally:
        model.train(training)
    if batches == 0:
        raise ConfigError("rank_blocks got an empty loader")
    ranked = [BlockDistance(b, a, totals[b] / batches) for a, b in pairs]
    return sorted(ranked, key=lambda d: d.distance)


def _nested(a: str, b: str) -> bool:
    """Whether module ``a`` is ``b``, inside it or around it (dotted names)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def disjoint_blocks(ranked: Sequence[str], k: int) -> list[str]:
    """The first ``k`` of ``ranked`` skipping blocks inside or around one already chosen
    (e.g. MobileNetV2's depthwise unit inside its inverted residual)."""
    chosen: list[str] = []
    for block in ranked:
        if len(chosen) == k:
            break
        if not any(_nested(block, c) for c in chosen):
            chosen.append(block)
    return chosen


def remove_blocks(
    model: nn.Module, blocks: Sequence[str], *, example_inputs: Tensor | tuple[Tensor, ...]
) -> nn.Module:
    """Replace ``blocks`` by the identity: one recorded ``remove_block`` each, no fine-tune.

    Raises:
        ConfigError: two of ``blocks`` are nested (pick them with :func:`disjoint_blocks`).
    """
    for i, block in enumerate(blocks):
        for other in blocks[:i]:
            if _nested(block, other):
                raise ConfigError(
                    f"blocks {other!r} and {block!r} are nested: removing one removes or "
                    "changes the other; choose disjoint blocks (lacoot.disjoint_blocks)"
                )
    for block in blocks:
        model = remove_block(model, block=block, example_inputs=example_inputs)
    return model


class CollapseBlocks:
    """Stage transform: replace the ``k`` blocks closest to the identity (no fine-tuning).

    Nested candidates (a unit inside a block) are skipped once their parent or child is chosen.

    Blocks are ranked with :func:`rank_blocks` on the loader the engine passes (the training
    split; the paper ranks on validation data). Use after a stage trained with :class:`LaCoOT`,
    in a stage with ``max_epochs: 0`` to evaluate the collapsed model as it is.

    Args:
        k: number of blocks to remove.
        pairs: ``"auto"`` (every shape-preserving block) or explicit ``(input_module, block)``.
        n_projections: random directions per distance.
        max_batches: batches used for the ranking (all by default).
    """

    def __init__(
        self,
        k: int = 1,
        pairs: Sequence[Sequence[str]] | str = "auto",
        n_projections: int = 50,
        max_batches: int | None = None,
    ) -> None:
        if k < 1:
            raise ConfigError(f"CollapseBlocks needs k >= 1, got {k}")
        self.k, self.pairs = k, pairs
        self.n_projections, self.max_batches = n_projections, max_batches
        self._report: dict[str, Any] = {}

    def apply(self, model: nn.Module, loader: Iterable[Any]) -> nn.Module:
        first = next(iter(loader))
        example = (first[0] if isinstance(first, list | tuple) else first)[:2]
        example = example.to(model_device(model))
        pairs = auto_pairs(model, example) if self.pairs == "auto" else self.pairs
        ranked = rank_blocks(
            model, loader, pairs, n_projections=self.n_projections, max_batches=self.max_batches
        )
        removed = disjoint_blocks([d.block for d in ranked], self.k)
        if self.k > len(removed):
            raise ConfigError(
                f"CollapseBlocks(k={self.k}) but the model has only {len(removed)} disjoint "
                f"removable blocks: {[d.block for d in ranked]}"
            )
        self._report = {
            "removed": removed,
            "distances": {d.block: round(d.distance, 6) for d in ranked},
        }
        return remove_blocks(model, removed, example_inputs=example)

    def report(self) -> dict[str, Any]:
        """The blocks removed and every block's distance to the identity."""
        return dict(self._report)
