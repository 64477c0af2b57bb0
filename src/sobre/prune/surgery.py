"""Exact depth surgery: activations to identities or gates, linear layers folded, blocks removed.

Spec §0 "Depth surgery": the edits that turn what EGP/NEPENTHE/EASIER (§1-§3) and LaCoOT (§4)
decide into a shallower network. Every edit is a :func:`sobre.core.edits.structural_edit`: it
works on a copy (the caller's model is untouched when it fails), is recorded in the model's edit
log with JSON-able params, and replays on a freshly built model of the original architecture so
that ``load_state_dict(strict=True)`` works. Modules and activation sites are dotted module names;
a site is an activation *module* called once (torchvision's BasicBlock calls one ``relu`` twice:
make its calls unique first, e.g. with ``sobre.prune.sites.uniquify_activations``).

- :func:`replace_activation`: a site becomes ``nn.Identity`` (EASIER) or another activation.
- :func:`linearize`: a zero-entropy site becomes a :class:`ChannelGate` (dead neurons masked,
  always-ON ones passed through), exact for ReLU on the data its ON/OFF pattern came from.
- :func:`fold_linear`: BN into the preceding conv/linear, Linear∘Linear, conv∘conv with a 1x1 on
  either side, after checking with ``torch.fx`` (or a probe run) that nothing non-linear sits
  between the two modules; kxk∘kxk only when exact or explicitly approximate (LayerFold); by
  default only where the merged layer costs fewer MACs than the pair.
- :func:`remove_block`: a shape-preserving block becomes ``nn.Identity`` (LaCoOT).

Fewer non-linear layers is not faster by itself (a 3x3∘3x3 pair folded into a 5x5 conv ran 7 %
slower on our CPU): report measured latency beside depth.

Edits take the model positionally and their parameters as keywords (``structural_edit``'s
convention): ``linearize(model, site="features.relu2", keep=[1, 0, 1])``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from sobre.core.compact import get_module
from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice
from sobre.core.weights import bn_scale_shift

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVATION_KINDS",
    "ChannelGate",
    "fold_linear",
    "get_module",
    "linearize",
    "remove_block",
    "replace_activation",
    "set_module",
]

#: What :func:`replace_activation` can put at a site (``kind``): identity, or an activation to
#: restore (with ``inplace=False``, so taps still see the pre-activation).
ACTIVATION_KINDS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}

# What :func:`replace_activation` accepts at a site (besides an earlier edit's Identity/gate).
_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Hardtanh,  # ReLU6 included
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)
# Activations whose OFF state (z < 0) is about 0, so ON/OFF neurons become identity/zero.
_RECTIFIERS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU)
_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUPPORTED_PAIRS = (
    "Conv{1,2,3}d -> BatchNorm, Linear -> BatchNorm1d, Linear -> Linear, Conv -> Conv of the same "
    "dimension (a 1x1 on either side is exact; kxk -> kxk is exact when the second conv does not "
    "pad, approximate otherwise)"
)


class ChannelGate(nn.Module):
    """``y = x * keep``: a linearised activation site (:func:`linearize`).

    ``keep`` (a buffer, so it is in the ``state_dict``) holds 1 for neurons that pass as identity
    (always ON) and 0 for dead ones (always OFF). Its shape is the neuron shape: with
    ``channel_dim=1`` it matches ``x.shape[1:1 + keep.dim()]`` (``(C,)`` per channel or
    ``(C, H, W)`` per unit of a conv map) and broadcasts over the remaining positions; with
    ``channel_dim=-1`` it matches the trailing dims (``(C,)`` for tokens ``(B, N, C)``).

    Args:
        keep: 0/1 tensor in neuron shape.
        channel_dim: 1 for ``(B, C, ...)`` inputs, -1 for channels-last tokens.
    """

    keep: Tensor

    def __init__(self, keep: Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        if channel_dim not in (1, -1):
            raise ConfigError(f"ChannelGate channel_dim must be 1 or -1, got {channel_dim}")
        self.channel_dim = channel_dim
        self.register_buffer("keep", keep)

    def forward(self, x: Tensor) -> Tensor:
        """Mask the dead neurons of ``x``; the others pass unchanged."""
        keep = self.keep.to(x.dtype)
        if self.channel_dim == -1:
            return x * keep
        flat = x.reshape(x.shape[0], keep.numel(), -1) * keep.reshape(-1, 1)
        return flat.reshape(x.shape)

    def extra_repr(self) -> str:
        dead = int((self.keep == 0).sum())
        return f"neurons={tuple(self.keep.shape)}, dead={dead}, channel_dim={self.channel_dim}"


# --------------------------------------------------------------------------- module access


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule ``name``; returns the module it replaced.

    Raises:
        ConfigError: ``name`` is empty (the model itself cannot be replaced in place).
        UnknownNameError: no such module; the message lists the closest names.
    """
    if not name:
        raise ConfigError("cannot replace the model itself; name one of its submodules")
    old = get_module(model, name)
    parent, _, leaf = name.rpartition(".")
    setattr(get_module(model, parent), leaf, new)
    return old


def _typename(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (CPU float32 without any)."""
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


# --------------------------------------------------------------------------- fx tracing


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps :class:`ChannelGate` and masked (parametrized) modules whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, ChannelGate)
            or parametrize.is_parametrized(m)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _trace(model: nn.Module) -> fx.Graph | Exception:
    """The model's fx graph, or the exception that made symbolic tracing fail."""
    try:
        return _Tracer().trace(model)
    except Exception as err:  # any tracing failure means "use the probe"
        return err


def _calls(graph: fx.Graph, name: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_module" and n.target == name]


def _check_single_call(model: nn.Module, name: str) -> None:
    """Refuse a module that ``forward`` calls at several places (one site per call is needed)."""
    graph = _trace(model)
    if isinstance(graph, fx.Graph) and (n := len(_calls(graph, name))) > 1:
        raise ConfigError(
            f"module {name!r} is called at {n} places in {type(model).__name__}.forward, so it is "
            "not one site; give each call its own module first (sobre.prune.sites."
            "uniquify_activations)"
        )


# --------------------------------------------------------------------------- activations


@structural_edit("replace_activation")
def replace_activation(model: nn.Module, site: str, kind: str = "identity") -> nn.Module:
    """Replace the activation module at ``site`` by ``ACTIVATION_KINDS[kind]`` (EASIER, §3).

    ``kind="identity"`` is EASIER's plain removal of a site. It is exact only when no neuron of
    the site is ever OFF (for a ReLU: its pre-activation is never negative); when some neurons
    are dead, :func:`linearize` is the exact edit. Other kinds (``relu``, ``relu6``, ``gelu``,
    ``silu``) restore an activation, e.g. at a site an earlier edit made linear.

    Args:
        model: The model (a copy is edited).
        site: Dotted name of an activation module (or of an Identity/ChannelGate to restore).
        kind: A key of :data:`ACTIVATION_KINDS`.

    Raises:
        ConfigError: unknown ``kind``, a site that is not an activation, or a module called at
            several places.
        UnknownNameError: no module ``site`` (closest names listed).
    """
    check_choice("kind", kind, ACTIVATION_KINDS, "replace_activation")
    current = get_module(model, site)
    if not isinstance(current, (*_ACTIVATIONS, nn.Identity, ChannelGate)):
        raise ConfigError(
            f"site {site!r} is a {_typename(current)}, not an activation; name an activation "
            "module (ReLU, ReLU6, GELU, SiLU, ...) or an Identity/ChannelGate to restore"
        )
    _check_single_call(model, site)
    set_module(model, site, ACTIVATION_KINDS[kind]())
    return model


@structural_edit("linearize")
def linearize(model: nn.Module, site: str, keep: list[Any], channel_dim: int = 1) -> nn.Module:
    """Make a zero-entropy activation site linear: dead neurons masked, the others identity.

    Spec §0 ActivationEntropy: a site whose neurons are each always ON or always OFF on the data
    acts linearly there. The site becomes a :class:`ChannelGate` ``y = x * keep`` (``keep`` = 1
    for always-ON, 0 for always-OFF neurons), or ``nn.Identity`` when every ``keep`` is 1. For a
    ReLU this is exact on every input whose neurons keep that ON/OFF pattern; for ReLU6 only
    while ON inputs stay below 6, and for GELU/SiLU (ON/OFF by the sign of the pre-activation,
    NEPENTHE) it is an approximation, good when pre-activations are far from 0.

    Args:
        model: The model (a copy is edited).
        site: Dotted name of a ReLU, ReLU6, GELU or SiLU module.
        keep: 0/1 nested list in neuron shape: ``C`` per channel, ``C x H x W`` per unit of a
            conv map, ``C`` (or ``N x C`` per token unit) with ``channel_dim=-1``.
        channel_dim: Where the neuron dims start in the site's input (see :class:`ChannelGate`).

    Raises:
        ConfigError: ``keep`` is not a rectangular 0/1 list, the site is not a rectifier-like
            activation, or it is called at several places.
        UnknownNameError: no module ``site`` (closest names listed).
    """
    current = get_module(model, site)
    if not isinstance(current, _RECTIFIERS):
        raise ConfigError(
            f"site {site!r} is a {_typename(current)}; linearize needs one of "
            f"{[t.__name__ for t in _RECTIFIERS]} (their OFF state is about 0)"
        )
    device, dtype = _device_dtype(model)
    try:
        mask = torch.tensor(keep, dtype=dtype, device=device)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"linearize {site!r}: keep must be a rectangular list ({err})") from None
    if mask.dim() == 0 or mask.numel() == 0 or not ((mask == 0) | (mask == 1)).all():
        raise ConfigError(
            f"linearize {site!r}: keep must be a non-empty list of 0/1 in neuron shape (1 = "
            f"always ON, 0 = dead), got {keep!r:.80}"
        )
    gate = ChannelGate(mask, channel_dim)  # validates channel_dim
    _check_single_call(model, site)
    set_module(model, site, nn.Identity() if bool(mask.all()) else gate)
    return model


# --------------------------------------------------------------------------- folding


_PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, ChannelGate, _DropoutNd)


def _is_leaf(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) or next(module.children(), None) is None


def _path_fx(graph: fx.Graph, model: nn.Module, first: str, second: str) -> list[str]:
    """Modules strictly between ``first`` and ``second`` on their only path (fx graph)."""
    nodes = {name: _calls(graph, name) for name in (first, second)}
    for name, found in nodes.items():
        if len(found) != 1:
            raise ConfigError(
                f"fold_linear: module {name!r} is called {len(found)} times in "
                f"{type(model).__name__}.forward; it must be called exactly once"
            )
    node, target, between = nodes[first][0], nodes[second][0], []
    while True:
        users = list(node.users)
        if len(users) != 1:
            uses = ", ".join(_describe_node(u) for u in users) or "nothing"
            raise ConfigError(
                f"fold_linear: the output of {node.target!r} feeds {uses}; it must feed only "
                f"{second!r} (through Identity, ChannelGate or Dropout at most)"
            )
        user = users[0]
        if user is target or (
            user.op == "call_module"
            and isinstance(get_module(model, str(user.target)), _PASS_THROUGH)
        ):
            if list(user.args) != [node] or user.kwargs:
                raise ConfigError(
                    f"fold_linear: {str(user.target)!r} reads more than the output of "
                    f"{node.target!r}; {first!r} and {second!r} are not adjacent"
                )
            if user is target:
                return between
            if len(_calls(graph, str(user.target))) != 1:
                raise ConfigError(
                    f"fold_linear: {str(user.target)!r} between {first!r} and {second!r} is "
                    "also called elsewhere; it must be called once"
                )
            between.append(str(user.target))
            node = user
            continue
        raise ConfigError(
            f"fold_linear: between {first!r} and {second!r} sits {_describe_node(user)}; only "
            "Identity, ChannelGate and Dropout may (a non-linearity or any other op makes the "
            "merge inexact)"
        )


def _describe_node(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "output":
        return "the model's output"
    return f"{node.op} {getattr(node.target, '__name__', node.target)!r}"


class _FlowProbe(TorchFunctionMode):
    """Follows ``first``'s output through one forward, by tensor identity (untraceable models).

    Leaf modules are watched with hooks, the ops that containers run between them with a torch
    function mode; the chain ``first -> (Identity | ChannelGate | Dropout)* -> second`` is
    accepted only when each tensor on it has exactly one reader and none reaches the output.
    """

    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.between: list[str] = []
        self.calls = {first: 0, second: 0}
        self.watched: list[Tensor] = []  # strong refs: ids stay valid
        self.frontier: Tensor | None = None
        self.used = False
        self.pending: str | None = None
        self.reached = False
        self.stack: list[str] = []

    def _fail(self, reader: str) -> None:
        raise ConfigError(
            f"fold_linear: the output of {self.first!r} (or of an Identity/ChannelGate/Dropout "
            f"after it) is read by {reader}; {self.second!r} must read it alone, with only "
            "Identity, ChannelGate and Dropout in between, and it must feed nothing else"
        )

    def _read(self, tensors: list[Any], reader: str, passes: bool) -> None:
        """``reader`` reads ``tensors``; ``passes`` when it is an Identity/ChannelGate/Dropout."""
        for t in tensors:
            if not any(t is w for w in self.watched):
                continue
            if self.reached or t is not self.frontier or self.used or not passes:
                self._fail(reader)
            self.used = True
            self.pending = reader

    def pre_hook(self, name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        if not self.stack:
            if name in self.calls:
                self.calls[name] += 1
            leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
            if name != self.second:
                self._read(leaves, name, isinstance(module, _PASS_THROUGH))
            elif len(leaves) != 1 or leaves[0] is not self.frontier or self.used or self.reached:
                self._fail(f"nothing alone: {name!r} does not read only its output")
            else:
                self.used = self.reached = True
        self.stack.append(name)

    def hook(self, name: str, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        self.stack.pop()
        if self.stack:
            return
        if name == self.first or name == self.pending:
            if not isinstance(out, Tensor):
                self._fail(f"nothing: {name!r} does not return one tensor")
            if name == self.pending:
                self.between.append(name)
                self.pending = None
            elif self.watched:
                self._fail(f"a second call of {self.first!r}")
            self.frontier, self.used = out, False
            self.watched.append(out)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if not self.stack and self.watched:
            leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
            self._read(leaves, f"op {getattr(func, '__name__', func)!r}", passes=False)
        return func(*args, **kwargs)


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for a probe run; every module's training flag is restored."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _as_args(inputs: Tensor | tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _path_probe(model: nn.Module, first: str, second: str, inputs: Any) -> list[str]:
    """Modules strictly between ``first`` and ``second``, from one probe forward."""
    probe = _FlowProbe(first, second)
    handles = []
    for name, module in model.named_modules():
        if name and _is_leaf(module):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, k, n=name: probe.pre_hook(n, m, a, k), with_kwargs=True
                )
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, a, k, o, n=name: probe.hook(n, m, a, k, o), with_kwargs=True
                )
            )
    try:
        with _eval_no_grad(model), probe:
            out = model(*_as_args(inputs))
    finally:
        for handle in handles:
            handle.remove()
    for name, count in probe.calls.items():
        if count != 1:
            raise ConfigError(
                f"fold_linear: module {name!r} ran {count} times on example_inputs; it must run "
                "exactly once"
            )
    if not probe.reached:
        probe._fail(f"nothing: {second!r} never read it")
    if any(t is w for t in tree_leaves(out) for w in probe.watched):
        probe._fail("the model's output")
    return probe.between


def _conv_geometry(conv: nn.Module) -> dict[str, Any]:
    """Kernel, stride, numeric padding, dilation and padding mode of a conv."""
    padding = conv.padding
    if isinstance(padding, str):
        rev = conv._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        left, right = rev[-2::-2], rev[-1::-2]
        if left != right:
            raise ConfigError(
                f"fold_linear: padding={padding!r} pads asymmetrically here (even kernel); "
                "give the conv explicit symmetric padding"
            )
        padding = tuple(left)
    return {
        "kernel": tuple(conv.kernel_size),
        "stride": tuple(conv.stride),
        "padding": tuple(padding),
        "dilation": tuple(conv.dilation),
        "mode": conv.padding_mode,
    }


def _dense_weight(conv: nn.Module) -> Tensor:
    """The conv's weight as a dense ``(C_out, C_in, *k)`` tensor (grouped convs block-diagonal)."""
    w = conv.weight.detach().double()
    if conv.groups == 1:
        return w
    out_g, in_g = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    dense = w.new_zeros(conv.out_channels, conv.in_channels, *w.shape[2:])
    for g in range(conv.groups):
        rows = slice(g * out_g, (g + 1) * out_g)
        dense[rows, g * in_g : (g + 1) * in_g] = w[rows]
    return dense


def _bias(module: nn.Module, size: int) -> Tensor:
    b = module.bias
    return b.detach().double() if b is not None else module.weight.new_zeros(size).double()


def _gate_vector(model: nn.Module, gates: list[str], channels: int, linear: bool) -> Tensor:
    """Product of the per-channel ChannelGates between the two modules (ones without any)."""
    g = torch.ones(channels, dtype=torch.float64, device=_device_dtype(model)[0])
    for name in gates:
        gate = get_module(model, name)
        if not isinstance(gate, ChannelGate):
            continue
        ok_dim = gate.channel_dim == 1 or linear
        if gate.keep.dim() != 1 or gate.keep.numel() != channels or not ok_dim:
            raise ConfigError(
                f"fold_linear: ChannelGate {name!r} (neurons {tuple(gate.keep.shape)}, channel_dim "
                f"{gate.channel_dim}) is not one entry per channel of the {channels} channels "
                "between the two modules; only per-channel gates fold into weights"
            )
        g = g * gate.keep.double()
    return g


def _set_params(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    like = module.weight
    module.weight = nn.Parameter(weight.to(like.dtype), requires_grad=like.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(like.dtype), requires_grad=like.requires_grad)
    return module


def _fold_bn(first: nn.Module, bn: _BatchNorm, g: Tensor, name: str) -> nn.Module:
    """``bn(g * first(x))`` as one module with ``first``'s type and geometry (eval statistics)."""
    out = first.out_channels if isinstance(first, _CONVS) else first.out_features
    if bn.num_features != out:
        raise ConfigError(
            f"fold_linear: {name!r} normalises {bn.num_features} channels but the layer before it "
            f"has {out}"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(
            f"fold_linear: {name!r} keeps no running statistics (track_running_stats=False); "
            "only eval-mode batch norm folds into a layer"
        )
    scale, shift = bn_scale_shift(bn)
    scale_w = (scale * g).reshape(-1, *[1] * (first.weight.dim() - 1))
    bias = scale * g * _bias(first, out) + shift
    return _set_params(copy.deepcopy(first), first.weight.detach().double() * scale_w, bias)


def _fold_linears(first: nn.Linear, second: nn.Linear, g: Tensor) -> nn.Linear:
    """``second(g * first(x))`` as one Linear: ``W2 diag(g) W1``, ``W2 (g b1) + b2``."""
    w2 = second.weight.detach().double()
    has_bias = first.bias is not None or second.bias is not None
    merged = nn.Linear(
        first.in_features,
        second.out_features,
        bias=has_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    weight = w2 @ (g[:, None] * first.weight.detach().double())
    bias = w2 @ (g * _bias(first, first.out_features)) + _bias(second, second.out_features)
    return _set_params(merged, weight, bias if has_bias else None)


def _merged_geometry(
    first: nn.Module, second: nn.Module, names: tuple[str, str], approximate: bool
) -> dict[str, Any]:
    """Geometry of the one conv equal to ``second(first(x))``; refuses what it cannot merge."""
    a, b = _conv_geometry(first), _conv_geometry(second)
    one_a, one_b = all(k == 1 for k in a["kernel"]), all(k == 1 for k in b["kernel"])
    if one_b and not any(b["padding"]):
        stride = tuple(s * t for s, t in zip(a["stride"], b["stride"], strict=True))
        geometry, exact = {**a, "stride": stride}, True
    elif one_a and not any(a["padding"]) and all(s == 1 for s in a["stride"]):
        geometry = b
        # structural (not weight-dependent) so that replay takes the same decision
        exact = not any(b["padding"]) or b["mode"] != "zeros" or first.bias is None
    else:
        dilated = [
            d
            for geo in (a, b)
            for d, k in zip(geo["dilation"], geo["kernel"], strict=True)
            if k > 1
        ]
        if any(s != 1 for s in a["stride"]) or any(d != 1 for d in dilated):
            raise ConfigError(
                f"fold_linear: cannot merge {names[0]!r} (stride {a['stride']}, dilation "
                f"{a['dilation']}) with {names[1]!r} (dilation {b['dilation']}); kxk -> kxk folds "
                "need stride 1 in the first conv and no dilation"
            )
        exact = not any(b["padding"])
        if not exact and (a["mode"] != "zeros" or b["mode"] != "zeros"):
            raise ConfigError(
                f"fold_linear: {names[0]!r} and {names[1]!r} pad with {a['mode']!r} and "
                f"{b['mode']!r}; an approximate kxk -> kxk merge needs zero padding"
            )
        geometry = {
            "kernel": tuple(k + m - 1 for k, m in zip(a["kernel"], b["kernel"], strict=True)),
            "stride": b["stride"],
            "padding": tuple(p + q for p, q in zip(a["padding"], b["padding"], strict=True)),
            "dilation": (1,) * len(a["kernel"]),
            "mode": a["mode"] if exact else "zeros",
        }
    if not exact and not approximate:
        why = (
            f"{names[1]!r} zero-pads its input, where the merged conv would still add the bias of "
            f"{names[0]!r}"
            if one_a
            else f"{names[1]!r} zero-pads its input, which the merged conv cannot reproduce"
        )
        raise ConfigError(
            f"fold_linear: merging {names[0]!r} (kernel {a['kernel']}) and {names[1]!r} (kernel "
            f"{b['kernel']}) into one {geometry['kernel']} conv is exact only away from the "
            f"borders: {why}. Pass allow_approximate=True to accept it (LayerFold); the merged "
            "conv can also be slower, so measure latency"
        )
    return geometry


def _fold_convs(
    first: nn.Module, second: nn.Module, g: Tensor, geometry: dict[str, Any]
) -> nn.Module:
    """``second(g * first(x))`` as one conv of ``geometry`` (groups expanded to a dense kernel)."""
    b1 = g * _bias(first, first.out_channels)
    dims = len(geometry["kernel"])
    w1 = g.reshape(-1, *[1] * (dims + 1)) * _dense_weight(first)  # (C1, C0, *k1)
    w2 = _dense_weight(second)  # (C2, C1, *k2)
    conv = getattr(F, f"conv{dims}d")
    k2 = w2.shape[2:]
    # full convolution of the kernels: W[o, i] = sum_m W2[o, m] * W1[m, i]
    weight = conv(
        w1.transpose(0, 1), w2.flip(list(range(2, 2 + dims))), padding=[k - 1 for k in k2]
    )
    weight = weight.transpose(0, 1)
    bias = w2.sum(dim=tuple(range(2, 2 + dims))) @ b1 + _bias(second, second.out_channels)
    has_bias = first.bias is not None or second.bias is not None
    merged = type(second)(
        first.in_channels,
        second.out_channels,
        geometry["kernel"],
        stride=geometry["stride"],
        padding=geometry["padding"],
        dilation=geometry["dilation"],
        bias=has_bias,
        padding_mode=geometry["mode"],
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    return _set_params(merged, weight, bias if has_bias else None)


def _pair_kind(a: nn.Module, b: nn.Module, names: tuple[str, str]) -> str:
    """``"bn"``, ``"linear"`` or ``"conv"``: which merge folds ``b`` after ``a``; refuses others."""
    for name, module in zip(names, (a, b), strict=True):
        if parametrize.is_parametrized(module):
            raise ConfigError(
                f"fold_linear: {name!r} carries masks; bake them first (sobre.core.masks.bake)"
            )
    if isinstance(b, _BatchNorm) and isinstance(a, (nn.Linear, *_CONVS)):
        return "bn"
    if type(a) is nn.Linear and type(b) is nn.Linear:
        return "linear"
    if type(a) in _CONVS and type(b) is type(a) and a.out_channels == b.in_channels:
        return "conv"
    raise ConfigError(
        f"fold_linear cannot merge {names[0]!r} ({_typename(a)}) with {names[1]!r} "
        f"({_typename(b)}); supported pairs: {_SUPPORTED_PAIRS}"
    )


def _macs(layer: nn.Module) -> int:
    """Multiply-accumulates of a Linear per input row, of a conv per output position."""
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    k = math.prod(layer.kernel_size)
    return layer.out_channels * layer.in_channels // layer.groups * k


def _fold_macs(
    a: nn.Module, b: nn.Module, kind: str, names: tuple[str, str], approximate: bool
) -> tuple[int, int]:
    """MACs of the pair and of the merged layer, per output position of the merged layer.

    A conv ``a`` runs on ``prod(stride of b)`` positions per output position; a BN costs one MAC
    per channel; borders are ignored (the count of a network is ``sum`` over positions).
    Raises what :func:`_merged_geometry` raises for a conv pair it cannot merge.
    """
    if kind == "bn":
        return _macs(a) + b.num_features, _macs(a)
    if kind == "linear":
        return _macs(a) + _macs(b), a.in_features * b.out_features
    kernel = _merged_geometry(a, b, names, approximate)["kernel"]
    merged = b.out_channels * a.in_channels * math.prod(kernel)
    return _macs(a) * math.prod(b.stride) + _macs(b), merged


def fold_linear(
    model: nn.Module,
    first: str,
    second: str,
    *,
    only_cheaper: bool = True,
    allow_approximate: bool = False,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
) -> nn.Module:
    """Merge two adjacent linear modules into one; ``first`` gets the merge, ``second`` Identity.

    Supported pairs (exact): ``Conv -> BatchNorm`` and ``Linear -> BatchNorm1d`` with the BN's
    running statistics (eval semantics: use the result for inference, or fine-tune with frozen
    BN statistics, since the BN no longer normalises batches), ``Linear -> Linear``
    (``W2 W1``, ``W2 b1 + b2``), and ``Conv -> Conv`` when either is a 1x1 (stride 1, no
    padding when it comes first; a following kxk that zero-pads is exact only if the first has
    no bias, as its bias would reach the padded border), or when the second kxk conv does not
    pad (the merged kernel is ``k1 + k2 - 1``). A kxk -> kxk pair whose second conv zero-pads
    is exact only away from the borders and is refused unless ``allow_approximate=True``
    (LayerFold's (2k-1)x(2k-1) merge; it can also be slower). Grouped convs are expanded into
    a dense merged kernel.

    Adjacency is verified before editing: ``second`` must read only ``first``'s output, through
    ``Identity``, ``ChannelGate`` (folded into the weights, then made Identity) or ``Dropout``
    (kept, and an identity in eval) at most, and that output must feed nothing else. The check
    uses ``torch.fx`` when the model traces, else one probe forward on ``example_inputs``.

    Fewer layers is not faster by itself (spec §0, LayerFold): with ``only_cheaper`` (the
    default) the pair is merged only when the merged layer costs fewer multiply-accumulates
    than the two layers, per output position (``Linear(a, b)`` then ``Linear(b, c)``: when
    ``a*c < a*b + b*c``; a depthwise 3x3 then a 1x1 gives a dense 3x3 and is kept apart). A BN
    fold always costs less. A costlier exact merge is not applied: a warning names both costs,
    and the recorded entry says ``folded: false``.

    The recorded edit (op ``fold_linear``) stores the modules found in between, both costs
    (``macs``: ``[pair, merged]``) and whether the merge was applied (``folded``), so replaying
    it needs neither tracing nor example inputs and takes the same decision.

    Args:
        model: The model (left untouched; the edited copy is returned, unchanged apart from its
            edit log when a costlier merge was skipped).
        first: Dotted name of the first module.
        second: Dotted name of the module that reads its output.
        only_cheaper: Skip a merge whose merged layer costs at least as many MACs as the pair;
            ``False`` forces every exact (or allowed approximate) merge.
        allow_approximate: Accept a merge that is inexact near the borders.
        example_inputs: Inputs of ``forward`` (a tensor or a tuple), needed only when the model
            cannot be traced with ``torch.fx``.

    Raises:
        ConfigError: not adjacent, something non-linear between, unsupported pair (the message
            lists the supported ones), an inexact merge without ``allow_approximate``, or an
            untraceable model without ``example_inputs``.
        UnknownNameError: no such module (closest names listed).
    """
    for name in (first, second):
        get_module(model, name)
    graph = _trace(model)
    if isinstance(graph, fx.Graph):
        between = _path_fx(graph, model, first, second)
    elif example_inputs is None:
        raise ConfigError(
            f"fold_linear: {type(model).__name__} cannot be traced by torch.fx ({graph}); pass "
            "example_inputs so a probe forward can check that the two modules are adjacent"
        )
    else:
        between = _path_probe(model, first, second, example_inputs)
    names = (first, second)
    a, b = get_module(model, first), get_module(model, second)
    pair, merged = _fold_macs(a, b, _pair_kind(a, b, names), names, allow_approximate)
    folded = merged < pair or not only_cheaper
    if not folded:
        log.warning(
            "fold_linear: %r and %r not merged: the merged %s would cost %d MACs per output "
            "position, the pair %d (x%.2f); pass only_cheaper=False to merge anyway",
            first,
            second,
            _typename(a),
            merged,
            pair,
            merged / pair,
        )
    return _fold_linear_edit(
        model,
        first=first,
        second=second,
        between=between,
        allow_approximate=allow_approximate,
        macs=[pair, merged],
        folded=folded,
    )


@structural_edit("fold_linear")
def _fold_linear_edit(
    model: nn.Module,
    first: str,
    second: str,
    between: list[str],
    allow_approximate: bool = False,
    macs: list[int] | None = None,
    folded: bool = True,
) -> nn.Module:
    """The recorded part of :func:`fold_linear` (adjacency checked, ``folded`` decided).

    ``macs`` (``[pair, merged]``) is informative only; ``folded=False`` leaves the model as is.
    """
    if not folded:
        return model
    a, b = get_module(model, first), get_module(model, second)
    kind = _pair_kind(a, b, (first, second))
    linear = isinstance(a, nn.Linear)
    channels = a.out_features if linear else getattr(a, "out_channels", 0)
    g = _gate_vector(model, between, channels, linear)
    if kind == "bn":
        merged = _fold_bn(a, b, g, second)
    elif kind == "linear":
        merged = _fold_linears(a, b, g)
    else:
        geometry = _merged_geometry(a, b, (first, second), allow_approximate)
        merged = _fold_convs(a, b, g, geometry)
    set_module(model, first, merged)
    set_module(model, second, nn.Identity())
    for name in between:
        if isinstance(get_module(model, name), ChannelGate):
            set_module(model, name, nn.Identity())
    return model


# --------------------------------------------------------------------------- blocks


def remove_block(
    model: nn.Module, block: str, *, example_inputs: Tensor | tuple[Any, ...]
) -> nn.Module:
    """Replace a shape-preserving block by ``nn.Identity`` (LaCoOT §4, block removal).

    The block's single tensor input and its output must have equal shapes on every call during
    one eval forward of ``example_inputs`` (a tensor or a tuple of positional arguments). The
    block's whole computation goes: for a torchvision/our ResNet BasicBlock that is
    ``relu(x + f(x))`` becoming ``x`` (the final ReLU goes too), so accuracy survives only when
    the block was trained to be close to the identity first (LaCoOT's MSWD penalty). The edit
    is recorded as op ``remove_block`` with the block's name only; replay needs no inputs.

    Raises:
        ConfigError: the block changes the shape (both shapes named), returns more than one
            tensor, takes several inputs, is the model itself, or does not run on the inputs.
        UnknownNameError: no module ``block`` (closest names listed).
    """
    if not block:
        raise ConfigError("remove_block: name a block inside the model, not the model itself")
    module = get_module(model, block)
    seen: list[tuple[list[Any], Any]] = []
    handle = module.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(([*args, *kwargs.values()], out)),
        with_kwargs=True,
    )
    try:
        with _eval_no_grad(model):
            model(*_as_args(example_inputs))
    finally:
        handle.remove()
    if not seen:
        raise ConfigError(f"remove_block: {block!r} did not run on example_inputs")
    for inputs, out in seen:
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
            raise ConfigError(
                f"remove_block: {block!r} takes {len(inputs)} inputs; only a block called with "
                "one tensor can become an Identity"
            )
        if not isinstance(out, Tensor):
            raise ConfigError(
                f"remove_block: {block!r} returns a {type(out).__name__}, not one tensor"
            )
        if inputs[0].shape != out.shape:
            raise ConfigError(
                f"remove_block: {block!r} is not shape-preserving: input "
                f"{tuple(inputs[0].shape)}, output {tuple(out.shape)}; only blocks whose input "
                "and output shapes are equal can be removed"
            )
    return _remove_block_edit(model, block=block)


@structural_edit("remove_block")
def _remove_block_edit(model: nn.Module, block: str) -> nn.Module:
    """The recorded part of :func:`remove_block` (shapes already checked)."""
    set_module(model, block, nn.Identity())
    return model
