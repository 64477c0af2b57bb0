"""Compact: zeroed output channels and neurons become smaller dense layers (spec §0 ``compact``).

Masks give no speed-up; :func:`compact` removes what they zeroed. Ideas from EIDOSLAB/simplify
(constants of dead channels moved into the next bias), dependency groups from Torch-Pruning's
DepGraph (Fang et al., CVPR 2023; ``pip install sobre[prune]``).

What is removed, and why it is exact (eval mode):

- **Zero by weights.** Group channel ``r`` of a DepGraph group (channels coupled by residual
  sums, concatenations, depthwise convs, flattening) is a candidate only when every layer that
  *computes* it (Conv/Linear output channel, depthwise conv included) has an all-zero weight
  slice for it after masks are baked: no input can reach it. Data never decides removability.
- **Constants are folded.** Such a channel still emits a constant: its bias, shifted by BN and
  passed through the activation (``act(beta - mean * gamma / sqrt(var + eps))``). The constant
  ``k`` seen by each reading layer is added to that layer's bias (``b += W[:, r] k``, a bias
  is created when the layer has none): exact for ``nn.Linear`` (a per-feature constant is
  enough, e.g. after flatten) and for a conv that does not zero-pad (no padding, or a
  non-``"zeros"`` padding mode). A kxk conv that zero-pads (depthwise included) sees the padding
  instead of ``k`` at the borders, so such a channel is kept unless ``k == 0`` (or the reading
  weights are zero). The constants are read on probe runs (``example_inputs`` and a perturbed
  copy) and must agree exactly across batch, positions and probes, or the channel is kept.
- **Coupled channels go together.** A channel leaves every layer of its group or none. Groups
  that reach the model's output, or that contain a layer we cannot slice (LayerNorm, GroupNorm,
  PReLU, attention, embeddings, free parameters, transposed convs), are pinned. Grouped convs
  (``1 < groups``, not depthwise) are sliced by us per group (Torch-Pruning 1.6 slices their
  inputs wrongly), keeping the same number of channels in every conv group (at least one).
  Every group keeps at least one channel.
- **Checked.** The compacted model is compared with the (masked) model on both probes; groups
  whose removal changes the outputs by more than ``rtol * max|reference|`` (a channel-mixing op
  that DepGraph took for element-wise, e.g. a softmax over channels) are kept and logged.

BN layers are sliced, not fused: the result is exact in eval mode, i.e. for inference or for
fine-tuning with frozen BN statistics (in train mode BN would use batch statistics and the
folded constants would differ). Masks are baked: kept weights keep their zeros but no mask.
Models Torch-Pruning cannot trace (e.g. ``channel_shuffle``, ShuffleNet: ZeroDivisionError in
DependencyGraph 1.6) get a :class:`~sobre.core.errors.ConfigError` and stay untouched.

The recorded edit (op ``compact``) holds the kept indices of every sliced module (``{"module":
{"out": [...], "in": [...], "bias": true}}``, BN features under ``"out"``), so
``replay(fresh_model, edit_log(compacted))`` rebuilds the shapes without example inputs or
Torch-Pruning; the values then come from ``load_state_dict``. :func:`compact_report` measures
parameters, FLOPs and the channels removed per layer.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils._pytree import tree_leaves

from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.masks import bake
from sobre.core.measure import count_params, flops
from sobre.core.registry import suggest

__all__ = [
    "ChannelGroup",
    "CompactReport",
    "GroupMember",
    "channel_groups",
    "compact",
    "compact_report",
    "get_module",
]

log = logging.getLogger(__name__)

Inputs = Tensor | tuple[Any, ...]

#: Relative spread below which a probed channel counts as one constant (float32 rounding of
#: pooled constants stays far below it; real features vary far above it).
CONSTANT_RTOL = 1e-6
#: Ops DepGraph takes for element-wise (autograd names, lower case) that may mix or permute
#: channels: groups holding one are pinned (``torch.norm`` is ``NormBackward``; batch norm, per
#: channel, is fine). Others are caught by the final output check.
_MIXING_OPS = (
    "softmax",
    "layernorm",
    "groupnorm",
    "vectornorm",
    "shuffle",
    "index",
    "gather",
    "cumsum",
    "cumprod",
    "sort",
    "topk",
    "unknown",
)
_PASS_TYPES = ("ELEMENTWISE", "RESHAPE", "CONCAT", "SPLIT", "SLICE")
_KEYS = frozenset({"out", "in", "bias"})


@dataclass(frozen=True)
class GroupMember:
    """One module's part in a :class:`ChannelGroup`.

    Attributes:
        module: Dotted module name.
        role: ``"out"`` (Conv/Linear output channels: it computes the group's channels),
            ``"in"`` (Conv/Linear input channels: it reads them), ``"both"`` (a depthwise conv:
            reads and computes the same channels) or ``"norm"`` (BatchNorm features).
        index: For each group channel, the module's indices along that role's dim (a flattened
            map gives several input features per channel).
    """

    module: str
    role: str
    index: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that Torch-Pruning's DepGraph couples: they are removed together or not at all.

    Attributes:
        root: The Conv/Linear whose output channels define the group channels.
        size: Number of group channels.
        members: Every Conv, Linear and BatchNorm touching them.
        pinned: Why the group cannot shrink (``None`` when it can).
    """

    root: str
    size: int
    members: tuple[GroupMember, ...]
    pinned: str | None = None

    def producers(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Modules computing the group's channels (roles ``out``/``both``): zero these slices
        (e.g. with core channel masks) to make group channels removable."""
        return {m.module: m.index for m in self.members if m.role in ("out", "both")}


@dataclass(frozen=True)
class CompactReport:
    """Cost before and after :func:`compact`, from :func:`compact_report`.

    Attributes:
        params_before: Parameters of the model before (effective weights, masks not counted).
        params_after: Parameters after.
        flops_before: FLOPs of one eval forward before (``sobre.core.measure.flops``).
        flops_after: FLOPs after.
        removed: Per module whose shape changed, channels removed by role (``"out"``, ``"in"``;
            BatchNorm features under ``"out"``).
    """

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    removed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def flops_ratio(self) -> float:
        """``flops_after / flops_before``."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields plus both ratios."""
        return {**asdict(self), "params_ratio": self.params_ratio, "flops_ratio": self.flops_ratio}


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted, as in ``named_modules``; ``""`` is the model).

    Raises:
        UnknownNameError: no such module; the message lists the closest names.
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise UnknownNameError(
            f"module {name!r} does not exist in {type(model).__name__}{suggest(name, names)}"
        ) from None


# --------------------------------------------------------------------------- dependency groups


def _as_args(inputs: Inputs | list[Any]) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise ConfigError(
            "compact needs Torch-Pruning's DependencyGraph: install sobre[prune] "
            "(pip install 'sobre[prune]')"
        ) from None
    return torch_pruning


@contextmanager
def _trainable(model: nn.Module) -> Iterator[None]:
    """Every parameter requires grad (DepGraph traces autograd), flags restored afterwards."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _member(graph: Any, item: Any, names: Mapping[Any, str], size: int) -> GroupMember | str:
    """The :class:`GroupMember` of one DepGraph group item, ``""`` for a parameter-free op, or
    the reason (non-empty) why the item pins its group."""
    node, module = item.dep.target, item.dep.target.module
    kind = node.type.name
    if kind == "OUTPUT":
        return "its channels are a model output"
    if None in item.root_idxs:
        return f"{node.name} maps channels without a root index"
    if kind in _PASS_TYPES:
        op = str(getattr(module, "_grad_fn", "")).lower()
        if kind == "ELEMENTWISE" and (op.startswith("norm") or any(w in op for w in _MIXING_OPS)):
            return f"op {op} may mix channels"
        return "" if node.outputs else f"{node.name} is a model output"
    name = names.get(module) if kind in ("CONV", "DEPTHWISE_CONV", "LINEAR", "BN") else None
    if name is None:
        return f"{node.name} ({kind}) cannot be sliced by compact"
    if isinstance(module, _ConvNd) and module.transposed:
        return f"{name} is a transposed conv"
    index: dict[int, list[int]] = defaultdict(list)
    for idx, root in zip(item.idxs, item.root_idxs, strict=True):
        index[root].append(idx)
    if kind == "BN":
        role = "norm"
    elif kind == "DEPTHWISE_CONV":
        if not module.in_channels == module.out_channels == module.groups:
            return f"{name} is a depthwise conv with a channel multiplier"
        role = "both"
    else:
        role = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
    if role != "in" and not node.outputs:
        return f"{name} is a model output"
    return GroupMember(name, role, tuple(tuple(index[r]) for r in range(size)))


def channel_groups(model: nn.Module, example_inputs: Inputs) -> list[ChannelGroup]:
    """The DepGraph groups of ``model``'s Conv/Linear output channels (masks baked on a copy).

    Args:
        model: The model (left untouched).
        example_inputs: Inputs of ``forward``: a tensor or a tuple of positional arguments.

    Raises:
        ConfigError: Torch-Pruning is missing, or cannot trace the model on the inputs (the
            message names the cause, e.g. ``channel_shuffle``).
    """
    return _groups(bake(copy.deepcopy(model)), _as_args(example_inputs))


def _groups(model: nn.Module, args: tuple[Any, ...]) -> list[ChannelGroup]:
    tp = _torch_pruning()
    names = {m: n for n, m in model.named_modules()}
    modes = [(m, m.training) for m in model.modules()]
    try:
        with _trainable(model):
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=args, forward_fn=lambda m, a: m(*a), verbose=False
            )
            raw = list(graph.get_all_groups(root_module_types=(_ConvNd, nn.Linear)))
    except Exception as err:
        raise ConfigError(
            f"compact: Torch-Pruning's DependencyGraph cannot trace {type(model).__name__} on "
            f"example_inputs ({type(err).__name__}: {err}). Known cause: channel_shuffle "
            "(ShuffleNet) makes DependencyGraph 1.6 divide by zero; such models cannot be "
            "compacted (the model is left unchanged). Check that forward(*example_inputs) runs."
        ) from err
    finally:
        for m, mode in modes:
            m.training = mode
    groups = []
    for group in raw:
        members, reasons = [], []
        size = len(group.items[0].idxs)
        for item in group.items:
            found = _member(graph, item, names, size)
            if isinstance(found, GroupMember):
                members.append(found)
            elif found:
                reasons.append(found)
        root = names[group.items[0].dep.target.module]
        pinned = "; ".join(dict.fromkeys(reasons)) or None
        groups.append(ChannelGroup(root, size, tuple(members), pinned))
    return groups


# --------------------------------------------------------------------------- decisions


def _zero_rows(module: nn.Module) -> Tensor:
    """Which output rows of a Conv/Linear weight are entirely zero."""
    return (module.weight.detach().flatten(1) == 0).all(1)


class _Probe:
    """Per-feature min and max of what the reading layers receive, over every probe run."""

    def __init__(self, model: nn.Module, readers: set[str]) -> None:
        self.low: dict[str, Tensor] = {}
        self.high: dict[str, Tensor] = {}
        self.handles = [
            get_module(model, name).register_forward_pre_hook(self._hook(name)) for name in readers
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            dim = 1 if isinstance(module, _ConvNd) else x.ndim - 1
            x = x.movedim(dim, 0).flatten(1)
            low, high = x.amin(1), x.amax(1)
            if name in self.low:
                low, high = low.minimum(self.low[name]), high.maximum(self.high[name])
            self.low[name], self.high[name] = low, high

        return hook

    def constants(self, name: str) -> Tensor | None:
        """Per-feature constant (NaN where the input varied), ``None`` if never called."""
        if name not in self.low:
            return None
        low, high = self.low[name], self.high[name]
        spread_ok = (high - low) <= CONSTANT_RTOL * torch.maximum(low.abs(), high.abs())
        return torch.where(spread_ok, (low + high) / 2, torch.full_like(low, float("nan")))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _perturbed(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A second probe: floating-point tensors get seeded noise of their own scale."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point():
            noise = torch.randn(a.shape, generator=gen, dtype=a.dtype).to(a.device)
            a = a + noise * (float(a.std()) if a.numel() > 1 and float(a.std()) > 0 else 1.0)
        out.append(a)
    return tuple(out)


def _zero_pads(conv: _ConvNd) -> bool:
    """Whether the conv reads zeros beyond the borders (a constant map is not constant there)."""
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)  # type: ignore[union-attr]


def _readers_of(conv: _ConvNd, i: int) -> tuple[slice, int]:
    """The output rows of ``conv`` that read input channel ``i``, and its column there."""
    width_in, width_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    q = i // width_in
    return slice(q * width_out, (q + 1) * width_out), i % width_in


def _foldable(module: nn.Module, idxs: Sequence[int], consts: Tensor) -> bool:
    """Whether constant inputs ``consts`` at features ``idxs`` can move into the bias exactly."""
    k = consts[list(idxs)]
    if torch.isnan(k).any():
        return False
    if isinstance(module, nn.Linear) or not _zero_pads(module):  # type: ignore[arg-type]
        return True
    weight = module.weight.detach()
    for i, ki in zip(idxs, k.tolist(), strict=True):
        rows, col = _readers_of(module, i)  # type: ignore[arg-type]
        if ki != 0 and bool((weight[rows, col] != 0).any()):
            return False
    return True


def _candidates(model: nn.Module, group: ChannelGroup, probe: _Probe) -> set[int]:
    """Group channels zero in every producer and foldable in every reader (one always kept)."""
    zero = {
        m: _zero_rows(get_module(model, m.module))
        for m in group.members
        if m.role in ("out", "both")
    }
    chosen = {
        r
        for r in range(group.size)
        if all(bool(rows[list(m.index[r])].all()) for m, rows in zero.items())
    }
    for m in group.members:
        if m.role != "in" or not chosen:
            continue
        consts = probe.constants(m.module)
        module = get_module(model, m.module)
        chosen = {r for r in chosen if consts is not None and _foldable(module, m.index[r], consts)}
    if len(chosen) == group.size:
        chosen.discard(0)
    return chosen


def _balance(model: nn.Module, groups: list[ChannelGroup], removal: list[set[int]]) -> None:
    """Shrink ``removal`` until every grouped conv keeps equal channel counts per conv group
    (and at least one); depthwise convs drop whole conv groups and need nothing."""
    changed = True
    while changed:
        changed = False
        slots: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
        for gi, (group, chosen) in enumerate(zip(groups, removal, strict=True)):
            for m in group.members:
                module = get_module(model, m.module)
                if m.role in ("in", "out") and isinstance(module, _ConvNd) and module.groups > 1:
                    slots[m.module, m.role] += [(gi, r, i) for r in chosen for i in m.index[r]]
        for (name, role), taken in slots.items():
            conv = get_module(model, name)
            width = (conv.in_channels if role == "in" else conv.out_channels) // conv.groups
            per: dict[int, list[tuple[int, int]]] = {q: [] for q in range(conv.groups)}
            for gi, r, i in taken:
                per[i // width].append((gi, r))
            target = min(min(len(v) for v in per.values()), width - 1)
            for v in per.values():
                for gi, r in sorted(set(v))[target:]:
                    if r in removal[gi]:
                        removal[gi].discard(r)
                        changed = True


# --------------------------------------------------------------------------- building


def _fold(
    model: nn.Module, groups: list[ChannelGroup], removal: list[set[int]], probe: _Probe
) -> set[str]:
    """Add the constants of removed channels to their readers' biases; returns the names of
    modules that got a new bias."""
    deltas: dict[str, Tensor] = {}
    for group, chosen in zip(groups, removal, strict=True):
        for m in group.members:
            if m.role != "in" or not chosen:
                continue
            module = get_module(model, m.module)
            idxs = [i for r in sorted(chosen) for i in m.index[r]]
            k = probe.constants(m.module)[idxs].to(module.weight)  # type: ignore[index]
            weight = module.weight.detach()
            if isinstance(module, nn.Linear):
                delta = weight[:, idxs] @ k
            else:  # a constant map meets the summed kernel: (groups, out/groups, in/groups)
                groups = module.groups
                summed = weight.flatten(2).sum(2).view(groups, -1, weight.shape[1])
                full = torch.zeros(module.in_channels, dtype=k.dtype, device=k.device)
                full[idxs] = k
                delta = torch.einsum("gow,gw->go", summed, full.view(groups, -1)).flatten()
            deltas[m.module] = deltas.get(m.module, 0) + delta
    created = set()
    for name, delta in deltas.items():
        if not bool((delta != 0).any()):
            continue
        module = get_module(model, name)
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(delta), module.weight.requires_grad)
            created.add(name)
        with torch.no_grad():
            module.bias.add_(delta)
    return created


def _keep_lists(
    model: nn.Module, groups: list[ChannelGroup], removal: list[set[int]], biased: set[str]
) -> dict[str, dict[str, Any]]:
    dropped: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for group, chosen in zip(groups, removal, strict=True):
        for m in group.members:
            idxs = {i for r in chosen for i in m.index[r]}
            roles = ("out", "in") if m.role == "both" else ("out" if m.role == "norm" else m.role,)
            for role in roles:
                dropped[m.module][role] |= idxs
    keep: dict[str, dict[str, Any]] = {}
    for name in sorted(set(dropped) | biased):
        module = get_module(model, name)
        spec: dict[str, Any] = {}
        for role, idxs in dropped.get(name, {}).items():
            if idxs:
                spec[role] = [i for i in range(_width(module, role)) if i not in idxs]
        if name in biased:
            spec["bias"] = True
        if spec:
            keep[name] = spec
    return keep


def _width(module: nn.Module, role: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    if isinstance(module, _ConvNd):
        return module.out_channels if role == "out" else module.in_channels
    return module.num_features


def _max_error(out: Any, ref: Any) -> float:
    """Max |out - ref| over every output tensor relative to max |ref| (inf on shape mismatch)."""
    outs, refs = tree_leaves(out), tree_leaves(ref)
    if len(outs) != len(refs):
        return float("inf")
    err, scale = 0.0, 0.0
    for o, r in zip(outs, refs, strict=True):
        if not isinstance(r, Tensor):
            continue
        if not isinstance(o, Tensor) or o.shape != r.shape:
            return float("inf")
        err = max(err, float((o.float() - r.float()).abs().max()) if r.numel() else 0.0)
        scale = max(scale, float(r.float().abs().max()) if r.numel() else 0.0)
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def compact(model: nn.Module, *, example_inputs: Inputs, rtol: float = 1e-4) -> nn.Module:
    """Turn channels/neurons zeroed by weights into smaller dense layers (exact in eval mode).

    See the module docstring for what is removed and why it is exact. The edit is recorded as
    op ``compact`` with the kept indices of every sliced module; replay needs no inputs.

    Args:
        model: The model, masked or not (left untouched; masks are baked on the copy).
        example_inputs: Inputs of ``forward`` (a tensor or a tuple of positional arguments):
            traced by DepGraph and used as probes for the constants and the final check.
        rtol: Allowed output change relative to ``max|reference|`` on the probes.

    Returns:
        The compacted copy, with the caller's training flags.

    Raises:
        ConfigError: Torch-Pruning missing or unable to trace the model, ``rtol`` not positive,
            or outputs that still differ after the per-group fallback.
    """
    if not rtol > 0:
        raise ConfigError(f"compact: rtol must be > 0, got {rtol}")
    args = _as_args(example_inputs)
    work = bake(copy.deepcopy(model))
    modes = {name: m.training for name, m in work.named_modules()}
    groups = _groups(work, args)
    work.eval()
    probes = (args, _perturbed(args))
    with torch.no_grad():
        refs = [work(*p) for p in probes]
    readers = {m.module for g in groups if not g.pinned for m in g.members if m.role == "in"}
    probe = _Probe(work, readers)
    try:
        with torch.no_grad():
            for p in probes:
                work(*p)
    finally:
        probe.close()
    removal = [set() if g.pinned else _candidates(work, g, probe) for g in groups]
    _balance(work, groups, removal)
    for group in groups:
        if group.pinned:
            log.debug("compact: group of %s pinned: %s", group.root, group.pinned)

    def build(chosen: list[set[int]]) -> tuple[nn.Module, float]:
        staged = copy.deepcopy(work)
        biased = _fold(staged, groups, chosen, probe)
        out = _compact_edit(staged, keep=_keep_lists(staged, groups, chosen, biased))
        with torch.no_grad():
            error = max(_max_error(out(*p), r) for p, r in zip(probes, refs, strict=True))
        return out, error

    def alone(gi: int) -> bool:
        """Whether removing group ``gi``'s chosen channels alone keeps the outputs."""
        try:
            ok = build([c if j == gi else set() for j, c in enumerate(removal)])[1] <= rtol
        except ConfigError:
            ok = False
        if not ok:
            log.warning(
                "compact: removing %d channels of the group of %s changed the outputs (an op "
                "DepGraph took for element-wise?); they are kept",
                len(removal[gi]),
                groups[gi].root,
            )
        return ok

    out, error = build(removal)
    if error > rtol:
        removal = [c if c and alone(gi) else set() for gi, c in enumerate(removal)]
        out, error = build(removal)
        if error > rtol:
            raise ConfigError(
                f"compact: the compacted {type(model).__name__} differs from the original by "
                f"{error:.2e} x max|output| (> rtol={rtol}); please report this model"
            )
    for name, m in out.named_modules():
        m.training = modes.get(name, m.training)
    log.info(
        "compact: %d channels removed from %d groups (output change %.1e x max|output|)",
        sum(map(len, removal)),
        sum(map(bool, removal)),
        error,
    )
    return out


# --------------------------------------------------------------------------- slicing (replayed)


def _indices(spec: Mapping[str, Any], key: str, width: int, name: str) -> list[int]:
    idxs = spec.get(key)
    if idxs is None:
        return list(range(width))
    ok = (
        isinstance(idxs, list)
        and idxs
        and all(isinstance(i, int) and 0 <= i < width for i in idxs)
        and idxs == sorted(set(idxs))
    )
    if not ok:
        raise ConfigError(
            f"compact: kept {key!r} indices of {name!r} must be a sorted, non-empty list of "
            f"distinct ints in [0, {width})"
        )
    return idxs


def _param(value: Tensor, like: Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


def _slice_conv(conv: _ConvNd, name: str, spec: Mapping[str, Any]) -> None:
    out = _indices(spec, "out", conv.out_channels, name)
    ins = _indices(spec, "in", conv.in_channels, name)
    groups = conv.groups
    width_in, width_out = conv.in_channels // groups, conv.out_channels // groups
    per_in: dict[int, list[int]] = defaultdict(list)
    for i in ins:
        per_in[i // width_in].append(i % width_in)
    per_out: dict[int, int] = defaultdict(int)
    for o in out:
        per_out[o // width_out] += 1
    if (
        set(per_in) != set(per_out)
        or len({len(v) for v in per_in.values()}) > 1
        or (len(set(per_out.values())) > 1)
    ):
        raise ConfigError(
            f"compact: {name!r} has groups={groups}: the kept input and output channels must "
            "fill the same conv groups, with equal counts in each"
        )
    local = torch.tensor([per_in[o // width_out] for o in out], device=conv.weight.device)
    weight = conv.weight.detach()[out]
    shape = local.shape + (1,) * (weight.ndim - 2)
    weight = weight.gather(1, local.view(shape).expand(-1, -1, *weight.shape[2:]))
    conv.weight = _param(weight, conv.weight)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[out], conv.bias)
    conv.in_channels, conv.out_channels, conv.groups = len(ins), len(out), len(per_out)


def _slice_linear(linear: nn.Linear, name: str, spec: Mapping[str, Any]) -> None:
    out = _indices(spec, "out", linear.out_features, name)
    ins = _indices(spec, "in", linear.in_features, name)
    linear.weight = _param(linear.weight[out][:, ins], linear.weight)
    if linear.bias is not None:
        linear.bias = _param(linear.bias[out], linear.bias)
    linear.in_features, linear.out_features = len(ins), len(out)


def _slice_bn(bn: _BatchNorm, name: str, spec: Mapping[str, Any]) -> None:
    if set(spec) - {"out"}:
        raise ConfigError(f"compact: BatchNorm {name!r} takes only 'out' (its features)")
    keep = _indices(spec, "out", bn.num_features, name)
    if bn.affine:
        bn.weight = _param(bn.weight[keep], bn.weight)
        bn.bias = _param(bn.bias[keep], bn.bias)
    if bn.running_mean is not None and bn.running_var is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


@structural_edit("compact")
def _compact_edit(model: nn.Module, keep: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """The recorded part of :func:`compact`: add the listed zero biases, slice to kept indices."""
    bake(model)
    for name, spec in keep.items():
        module = get_module(model, name)
        if not isinstance(spec, Mapping) or set(spec) - _KEYS:
            raise ConfigError(
                f"compact: entry of {name!r} must map some of {sorted(_KEYS)} to kept indices"
            )
        if spec.get("bias") and isinstance(module, (_ConvNd, nn.Linear)) and module.bias is None:
            module.bias = nn.Parameter(
                module.weight.new_zeros(module.weight.shape[0]), module.weight.requires_grad
            )
        if isinstance(module, _ConvNd) and not module.transposed:
            _slice_conv(module, name, spec)
        elif isinstance(module, nn.Linear):
            _slice_linear(module, name, spec)
        elif isinstance(module, _BatchNorm):
            _slice_bn(module, name, spec)
        else:
            raise ConfigError(
                f"compact: cannot slice {name!r} ({type(module).__name__}); supported: "
                "Conv1d/2d/3d, Linear, BatchNorm1d/2d/3d"
            )
    return model


# --------------------------------------------------------------------------- report


def _shape(module: nn.Module) -> dict[str, int] | None:
    if isinstance(module, nn.Linear):
        return {"out": module.out_features, "in": module.in_features}
    if isinstance(module, _ConvNd):
        return {"out": module.out_channels, "in": module.in_channels}
    if isinstance(module, _BatchNorm):
        return {"out": module.num_features}
    return None


def compact_report(before: nn.Module, after: nn.Module, example_inputs: Inputs) -> CompactReport:
    """Parameters, FLOPs and channels removed per layer by :func:`compact`.

    Args:
        before: The model given to :func:`compact` (masked or not).
        after: What :func:`compact` returned.
        example_inputs: Inputs of ``forward`` for the FLOP count (a tensor or a tuple).
    """
    args = _as_args(example_inputs)
    shapes_after = {name: _shape(m) for name, m in after.named_modules()}
    removed: dict[str, dict[str, int]] = {}
    for name, module in before.named_modules():
        old, new = _shape(module), shapes_after.get(name)
        if old and new:
            diff = {k: old[k] - new[k] for k in old if old[k] != new[k]}
            if diff:
                removed[name] = diff
    return CompactReport(
        params_before=count_params(before)[0],
        params_after=count_params(after)[0],
        flops_before=flops(before, args),
        flops_after=flops(after, args),
        removed=removed,
    )
