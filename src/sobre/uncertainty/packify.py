"""``packify``: any traceable model as a Packed-Ensemble; ``unpack_member`` (spec trust.md §1.2).

:func:`packify` traces the model with ``torch.fx`` and follows the *member layout* of every value
through the graph: the shared input, member-major packed channels (which dim holds them, see
:mod:`sobre.uncertainty.packed`), or the member-major rows ``(M·B, ...)`` after the classifier.
Layers reading the input become dense ``first=True`` layers, the classifier ``last=True``, every
other ``Conv1d/2d/3d`` and ``Linear`` an inner packed layer (``α·C`` channels in ``M·γ·g``
groups; depthwise convs stay depthwise with ``α·C`` groups and γ = 1), ``BatchNorm``,
``InstanceNorm``, ``GroupNorm`` (M·G groups) and ``PReLU`` are widened, ``LayerNorm`` becomes
:class:`PackedLayerNorm`, sobre's and timm's ViT attention :class:`PackedSelfAttention` (the
base heads in every member). Free tensors that meet packed channels (positional embeddings,
class tokens, layer scales) are widened along their channel dim. Every other op must provably
keep members apart — element-wise ops, dropout, pooling over non-channel dims, residual adds,
indexing of non-channel dims, ``cat`` (along the channels it becomes :func:`packed_cat`, which
keeps each member's blocks together: DenseNet, SqueezeNet), flatten whose first merged dim holds
the channels, transposes, ``x.view(x.size(0), -1)`` — and anything else raises a
:class:`ConfigError` naming the node, its module and the supported alternatives (channel
shuffles and splits, padding along channels, normalisation across channels, attention of unknown
classes, ``view`` with fixed sizes).

The packed model is a freshly initialised ensemble (a :class:`PackedEnsemble`, an
``fx.GraphModule`` with the base model's parameter names): packed layers take their per-group
default init, widened norms theirs, and widened free tensors are drawn from N(mean, std) of the
base tensor (a constant tensor stays constant). :func:`unpack_member` copies member m out of the
groups into an ordinary network of width α·C/M (the original attention classes included), whose
output equals ``split_members(packed(x), M)[:, m]``.
"""

from __future__ import annotations

import builtins
import copy
import inspect
import logging
import operator
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from sobre.core.edits import LOG_ATTR, structural_edit
from sobre.core.errors import ConfigError
from sobre.core.fx import third_party_leaves
from sobre.uncertainty.packed import (
    PackedConv1d,
    PackedConv2d,
    PackedConv3d,
    PackedLayerNorm,
    PackedLinear,
    PackedSelfAttention,
    _check_hparams,
    _PackedConvNd,
    _widen,
    packed_cat,
)

log = logging.getLogger(__name__)

__all__ = ["PackedEnsemble", "Packing", "packify", "unpack_member"]

Role = Literal["first", "inner", "last", "first_last", "norm", "layer_norm", "attention"]

_CONVS: dict[type[nn.Module], type[_PackedConvNd]] = {
    nn.Conv1d: PackedConv1d,
    nn.Conv2d: PackedConv2d,
    nn.Conv3d: PackedConv3d,
}
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.LogSigmoid,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.Upsample,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.PReLU,
)
# Per-sample (row-wise) modules outside torch.nn, kept as leaves: they never mix channels.
_ROWWISE_CLASSES = frozenset(
    {"timm.layers.drop.DropPath", "torchvision.ops.stochastic_depth.StochasticDepth"}
)
_SUPPORTED = (
    "packify follows Conv1d/2d/3d, Linear, BatchNorm, InstanceNorm, GroupNorm, LayerNorm, PReLU, "
    "sobre's and timm's ViT Attention, element-wise activations and dropout, pooling and padding "
    "of non-channel dims, add/mul, cat, indexing along non-channel dims, flatten whose first "
    "merged dim holds the channels, transpose/permute, softmax/mean over non-channel dims and "
    "x.view(x.size(0), -1)"
)

_ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.relu,
        F.relu_,
        torch.relu,
        torch.relu_,
        F.relu6,
        F.leaky_relu,
        F.elu,
        F.celu,
        F.selu,
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.softplus,
        F.logsigmoid,
        F.sigmoid,
        F.tanh,
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.abs,
        torch.neg,
        torch.sqrt,
        torch.clamp,
        operator.neg,
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
    }
)
_ELEMENTWISE_METHODS = frozenset(
    [
        "relu",
        "relu_",
        "sigmoid",
        "tanh",
        "exp",
        "abs",
        "neg",
        "sqrt",
        "clamp",
        "clamp_",
        "clamp_min",
        "contiguous",
        "clone",
        "detach",
        "float",
        "half",
        "bfloat16",
        "double",
        "to",
        "type_as",
    ]
)
_BINARY_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        operator.add,
        operator.iadd,
        operator.sub,
        operator.isub,
        operator.mul,
        operator.imul,
        operator.truediv,
        operator.itruediv,
        operator.pow,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.pow,
    }
)
_BINARY_METHODS = frozenset(
    ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_"]
)
_SPATIAL_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.interpolate,
    }
)
_OPS: dict[Any, str] = {
    **dict.fromkeys(_ELEMENTWISE_FUNCTIONS, "elementwise"),
    **dict.fromkeys(_BINARY_FUNCTIONS, "binary"),
    **dict.fromkeys(_SPATIAL_FUNCTIONS, "spatial"),
    torch.flatten: "flatten",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.permute: "permute",
    torch.reshape: "reshape",
    torch.mean: "reduce",
    torch.sum: "reduce",
    torch.amax: "reduce",
    torch.amin: "reduce",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    F.log_softmax: "softmax",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
    F.pad: "pad",
    F.layer_norm: "layer_norm",
    operator.getitem: "getitem",
    builtins.getattr: "getattr",
}
_METHOD_OPS: dict[str, str] = {
    **dict.fromkeys(_ELEMENTWISE_METHODS, "elementwise"),
    **dict.fromkeys(_BINARY_METHODS, "binary"),
    "flatten": "flatten",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "permute": "permute",
    "reshape": "reshape",
    "view": "reshape",
    "mean": "reduce",
    "sum": "reduce",
    "amax": "reduce",
    "amin": "reduce",
    "softmax": "softmax",
    "log_softmax": "softmax",
    "squeeze": "squeeze",
    "unsqueeze": "unsqueeze",
    "expand": "expand",
    "size": "size",
    "dim": "meta",
    "numel": "meta",
}
_FUNCTIONAL_LAYERS = frozenset(
    {F.linear, F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, F.instance_norm}
)
# Functions on Python values only (shape arithmetic, asserts): their results are not tensors.
_META_MODULES = frozenset({"_operator", "operator", "builtins", "math"})
_META_FUNCTIONS = frozenset({torch._assert, fx._symbolic_trace._assert_is_none})


# -------------------------------------------------------------------------------------- states


@dataclass(frozen=True)
class _Input:
    """The shared, un-widened input (and anything computed from it alone)."""

    ndim: int | None = None


@dataclass(frozen=True)
class _Layout:
    """A tensor split into members: ``packed`` channels at ``axis``, or member-major ``output``
    rows (``axis`` 0). ``axis`` is ``-1`` when ``ndim`` is unknown (a Linear's last dim);
    ``channels``: the base model's channel count at ``axis`` (``None`` once merged)."""

    kind: Literal["packed", "output"]
    axis: int
    ndim: int | None
    channels: int | None = None

    def __str__(self) -> str:
        rank = "" if self.ndim is None else f" of a {self.ndim}-d tensor"
        if self.kind == "output":
            return f"member-major rows (M·B, ...){rank}"
        where = "the last dim" if self.ndim is None else f"dim {self.axis}"
        return f"member channels at {where}{rank}"


@dataclass(frozen=True)
class _Param:
    """A parameter or buffer of the model (possibly expanded)."""

    target: str


@dataclass(frozen=True)
class _Meta:
    """A Python value; ``batch``: the batch size (``x.shape[0]``, ``x.size(0)``)."""

    batch: bool = False


@dataclass(frozen=True)
class _Shape:
    """``x.shape`` / ``x.size()``."""


_State = _Input | _Layout | _Param | _Meta | _Shape
_TENSORS = (_Input, _Layout, _Param)


# ------------------------------------------------------------------------------ attention


def _sobre_attention(module: nn.Module) -> dict[str, Any]:
    return {"num_heads": module.heads}


def _timm_attention(module: nn.Module) -> dict[str, Any]:
    extras = [
        name
        for name in ("q_norm", "k_norm", "norm")
        if not isinstance(getattr(module, name, None), nn.Identity | None)
    ]
    if extras or getattr(module, "gate", None) is not None:
        raise ConfigError(
            f"packify: timm Attention with {', '.join(extras) or 'gate'} is not supported: "
            "packify handles qk_norm=False, no attention norm and no gate"
        )
    return {
        "num_heads": module.num_heads,
        "attn_drop": module.attn_drop.p,
        "proj_drop": module.proj_drop.p,
    }


def _set_sobre_heads(module: nn.Module, head_dim: int) -> None:
    """sobre's Attention reads the width from its input: nothing to change."""


def _set_timm_heads(module: nn.Module, head_dim: int) -> None:
    module.head_dim = head_dim
    module.scale = head_dim**-0.5
    if hasattr(module, "attn_dim"):
        module.attn_dim = module.num_heads * head_dim


# class path -> (packed-attention arguments, how to set a member's head size)
_ATTENTIONS: dict[str, tuple[Callable[[nn.Module], dict[str, Any]], Callable[..., None]]] = {
    "sobre.models.vit.Attention": (_sobre_attention, _set_sobre_heads),
    "timm.layers.attention.Attention": (_timm_attention, _set_timm_heads),
    "timm.models.vision_transformer.Attention": (_timm_attention, _set_timm_heads),
}


def _class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------- packing


@dataclass
class Packing:
    """How :func:`packify` packed a model (``packed.packing``).

    Attributes:
        num_members: M.
        alpha: α.
        gamma: γ of inner, non-depthwise layers.
        roles: Module path -> ``"first"``, ``"inner"``, ``"last"``, ``"first_last"``,
            ``"norm"`` (widened per-channel module), ``"layer_norm"`` or ``"attention"``.
        widened: Free tensors (positional embeddings, class tokens, ...) -> their member axis.
        axes: Every member-split parameter and buffer -> the axis holding M equal contiguous
            member blocks (parameters missing here are shared by all members: a shared stem).
        templates: Attention path -> the base attention module without its projections, from
            which :func:`unpack_member` rebuilds a member of the original class.
    """

    num_members: int
    alpha: float
    gamma: int
    roles: dict[str, Role]
    widened: dict[str, int]
    axes: dict[str, int] = field(default_factory=dict)
    templates: dict[str, nn.Module] = field(default_factory=dict)


class PackedEnsemble(fx.GraphModule):
    """The ``fx.GraphModule`` :func:`packify` returns; ``packing`` describes it.

    Its output is member-major ``(M·B, K)`` logits (``split_members`` -> ``(B, M, K)``).
    """

    @property
    def packing(self) -> Packing:
        """How the model was packed (kept in ``meta``, so it survives ``copy.deepcopy``)."""
        return self.meta["packing"]

    @property
    def num_members(self) -> int:
        """M (read by :func:`sobre.core.members.num_members`)."""
        return self.packing.num_members

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedEnsemble:
        """GraphModule's copy, keeping the structure-edit log (``GraphModule`` drops it)."""
        res = super().__deepcopy__(memo)
        if LOG_ATTR in self.__dict__:
            object.__setattr__(res, LOG_ATTR, copy.deepcopy(self.__dict__[LOG_ATTR], memo))
        return res


# ------------------------------------------------------------------------------- tracing


class _Tracer(fx.Tracer):
    """torch.nn modules, known attentions, per-sample drop modules and timm's no-trace modules
    are leaves."""

    def __init__(self) -> None:
        leaves, functions = third_party_leaves()
        super().__init__(autowrap_functions=functions)
        self.leaf_types = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        path = _class_path(m)
        if path in _ATTENTIONS or path in _ROWWISE_CLASSES or type(m) in self.leaf_types:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _concrete_defaults(model: nn.Module) -> dict[str, Any]:
    """``forward`` arguments after the input with a None/bool/number/str default."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and (p.default is None or isinstance(p.default, bool | int | float | str))
    }


def _trace(model: nn.Module) -> fx.Graph:
    """The graph of ``model``, identical in train and eval mode."""
    name = type(model).__name__
    flags = [(m, m.training) for m in model.modules()]
    codes, graphs = [], []
    try:
        for mode in (True, False):
            model.train(mode)
            graph = _Tracer().trace(model, concrete_args=_concrete_defaults(model) or None)
            codes.append(graph.python_code("self").src)
            graphs.append(graph)
    except Exception as err:  # tracing runs arbitrary user code: any failure means untraceable
        raise ConfigError(
            f"packify: torch.fx cannot trace {name} ({type(err).__name__}: {err}). packify "
            "needs a symbolically traceable forward (no data-dependent control flow or shape "
            "checks on tensors); make the offending module a plain nn.Module call or build "
            "the Packed-Ensemble from sobre.uncertainty.packed layers by hand"
        ) from err
    finally:
        for m, training in flags:
            m.training = training
    if codes[0] != codes[1]:
        raise ConfigError(
            f"packify: the forward of {name} depends on self.training, so one graph cannot "
            "serve training and evaluation; use nn.Dropout modules instead of "
            "F.dropout(..., self.training)"
        )
    return graphs[0 if model.training else 1]


# ------------------------------------------------------------------------------ analysis


def _where(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        what = f"module {node.target!r} ({type(model.get_submodule(str(node.target))).__name__})"
    elif node.op == "call_method":
        what = f"Tensor.{node.target}"
    else:
        target = node.target
        what = f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', target)}"
    stack = list(node.meta.get("nn_module_stack", {}).values())
    inside = f" in {stack[-1][0]!r}" if stack and node.op != "call_module" else ""
    return f"node {node.name!r} ({what}){inside}"


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (0 = the input / self) or keyword ``name`` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_layer(module: nn.Module) -> bool:
    return type(module) in _CONVS or type(module) is nn.Linear


def _last_candidate(graph: fx.Graph, model: nn.Module) -> fx.Node | None:
    """The Conv/Linear call the output is computed from through parameter-free ops."""
    (out,) = (n for n in graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            if _is_layer(module):
                return node
            if any(True for _ in module.parameters()):
                return None
        if node.op in ("placeholder", "get_attr"):
            return None
        node = next(iter(node.all_input_nodes), None)
    return None


class _Analysis:
    """Follows the member layout of every node (see the module docstring) and plans the edits."""

    def __init__(
        self,
        model: nn.Module,
        graph: fx.Graph,
        last: fx.Node | None,
        first: frozenset[str] | None,
    ) -> None:
        self.model, self.graph, self.last, self.first = model, graph, last, first
        self.states: dict[fx.Node, _State] = {}
        self.roles: dict[str, Role] = {}
        self.widened: dict[str, int] = {}
        self.layer_norm_nodes: list[tuple[fx.Node, str]] = []
        self.channel_cats: list[tuple[fx.Node, int]] = []

    def fail(self, node: fx.Node, why: str, fix: str = _SUPPORTED) -> ConfigError:
        return ConfigError(f"packify: {_where(node, self.model)} {why}. {fix}")

    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op == "placeholder":  # arguments fixed to their default are Python values
                self.states[node] = _Meta() if node.args else _Input()
            elif node.op == "get_attr":
                value = _get_attr(self.model, str(node.target))
                self.states[node] = (
                    _Param(str(node.target)) if isinstance(value, Tensor) else _Meta()
                )
            elif node.op == "call_module":
                self.states[node] = self.module(node)
            elif node.op in ("call_function", "call_method"):
                self.states[node] = self.function(node)
            else:
                self.output(node)

    def output(self, node: fx.Node) -> None:
        result = node.args[0]
        state = self.states.get(result) if isinstance(result, fx.Node) else None
        want = "output" if self.last is not None else "packed"
        if not isinstance(state, _Layout) or state.kind != want:
            raise ConfigError(
                f"packify: the model must return one tensor computed by the "
                f"{'classifier' if want == 'output' else 'packed layers'}, got {result!r}: "
                "packify supports single-tensor outputs"
            )

    # ---------------------------------------------------------------------- modules

    def module(self, node: fx.Node) -> _State:
        path = str(node.target)
        module = self.model.get_submodule(path)
        inputs = [self.states[n] for n in node.all_input_nodes]
        x = inputs[0] if inputs else _Meta()
        if any(isinstance(s, _Param) for s in inputs):
            raise self.fail(node, "takes a parameter as input")
        cls_path = _class_path(module)
        if _is_layer(module):
            return self.layer(node, path, module, x)
        if isinstance(module, _ELEMENTWISE_MODULES) or cls_path in _ROWWISE_CLASSES:
            return x
        if isinstance(module, _SPATIAL_MODULES):
            return self.spatial(node, x)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, module.start_dim, module.end_dim)
        if isinstance(module, nn.Softmax | nn.LogSoftmax):
            return self.softmax(node, x, module.dim)
        if isinstance(module, (*_NORMS, nn.LayerNorm)) or cls_path in _ATTENTIONS:
            return self.norm_or_attention(node, path, module, x)
        if isinstance(module, nn.MultiheadAttention):
            raise self.fail(
                node,
                "is nn.MultiheadAttention, which packify does not convert",
                "Supported attentions: sobre.models.vit.Attention and timm's ViT Attention "
                "(fused qkv Linear + proj Linear); build the model with one of them or from "
                "PackedSelfAttention by hand",
            )
        raise self.fail(node, "is a module packify cannot prove member-separable")

    def layer(self, node: fx.Node, path: str, module: nn.Module, x: _State) -> _State:
        conv = type(module) in _CONVS
        is_last = node is self.last
        if isinstance(x, _Input):
            if self.first is not None and path not in self.first:
                return x  # a shared stem before the named first layers
            role: Role = "first_last" if is_last else "first"
            ndim = x.ndim
        elif isinstance(x, _Layout) and x.kind == "packed":
            role = "last" if is_last else "inner"
            ndim = x.ndim
            if conv:
                want = module.weight.ndim
                if x.ndim != want or x.axis != 1:
                    raise self.fail(
                        node, f"needs packed channels at dim 1 of a {want}-d input, got {x}"
                    )
            elif not _is_last_axis(x):
                raise self.fail(node, f"needs packed features in the last dim, got {x}")
            size = module.in_channels if conv else module.in_features
            if x.channels is not None and x.channels != size:
                raise self.fail(node, f"expects {size} channels but its input has {x.channels}")
        elif isinstance(x, _Layout):
            raise self.fail(
                node,
                "comes after the classifier (the output is already member-major rows)",
                "Pass last='<name of the final layer>'",
            )
        else:
            raise self.fail(node, f"has an input packify cannot follow ({x})")
        self.set_role(node, path, role)
        if conv:
            ndim = module.weight.ndim
            out, axis = module.out_channels, 1
        else:
            out, axis = module.out_features, -1 if ndim is None else ndim - 1
        if is_last:
            return _Layout("output", 0, ndim)
        return _Layout("packed", axis, ndim, out)

    def norm_or_attention(self, node: fx.Node, path: str, module: nn.Module, x: _State) -> _State:
        if isinstance(x, _Input):
            if self.first is not None:
                return x
            raise self.fail(
                node,
                "has parameters and reads the shared input before any first layer, so all "
                "members would share it",
                "Pass first='<name of the first layer to pack>' to keep a shared stem",
            )
        if not isinstance(x, _Layout) or x.kind != "packed":
            raise self.fail(node, f"needs packed channels, got {x}")
        if isinstance(module, nn.LayerNorm) or _class_path(module) in _ATTENTIONS:
            if not _is_last_axis(x):
                raise self.fail(node, f"normalises or mixes the last dim but got {x}")
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                raise self.fail(
                    node,
                    f"normalises over {tuple(module.normalized_shape)}, across channels and "
                    "other dims together",
                    "Only LayerNorm over the last (channel) dim becomes a PackedLayerNorm",
                )
            role: Role = "layer_norm" if isinstance(module, nn.LayerNorm) else "attention"
        else:
            channel_first = x.axis == 1 or (x.ndim is None and isinstance(module, nn.BatchNorm1d))
            if not channel_first:
                raise self.fail(node, f"normalises dim 1 but the packed channels are {x}")
            if isinstance(module, nn.PReLU) and module.num_parameters == 1:
                raise self.fail(
                    node,
                    "is a PReLU with one slope shared by all channels, hence by all members",
                    "Use nn.PReLU(num_parameters=channels) or an activation without parameters",
                )
            role = "norm"
        self.set_role(node, path, role)
        return x

    def set_role(self, node: fx.Node, path: str, role: Role) -> None:
        if self.roles.setdefault(path, role) != role:
            raise self.fail(
                node,
                f"is called as a {self.roles[path]} and as a {role} layer",
                "Use one module per call",
            )

    # -------------------------------------------------------------------- functions

    def function(self, node: fx.Node) -> _State:
        table = _METHOD_OPS if node.op == "call_method" else _OPS
        kind = table.get(node.target)
        inputs = [self.states[n] for n in node.all_input_nodes]
        if kind is None:
            if node.op == "call_function" and not any(isinstance(s, _TENSORS) for s in inputs):
                target = node.target
                if (
                    target in _META_FUNCTIONS
                    or getattr(target, "__module__", None) in _META_MODULES
                ):
                    return _Meta()
            if node.target in _FUNCTIONAL_LAYERS:
                raise self.fail(
                    node,
                    "computes a layer functionally, which packify cannot pack",
                    "Call nn.Linear / nn.ConvNd / norm modules (wrap a bare layer in "
                    "nn.Sequential)",
                )
            raise self.fail(node, "is an operation packify cannot prove member-separable")
        return getattr(self, f"op_{kind}")(node, inputs)

    def first_input(self, node: fx.Node) -> _State:
        head = node.args[0] if node.args else next(iter(node.kwargs.values()))
        return self.states[head] if isinstance(head, fx.Node) else _Meta()

    def op_meta(self, node: fx.Node, inputs: list[_State]) -> _State:
        return _Meta()

    def op_getattr(self, node: fx.Node, inputs: list[_State]) -> _State:
        return _Shape() if node.args[1] == "shape" else _Meta()

    def op_size(self, node: fx.Node, inputs: list[_State]) -> _State:
        dim = _arg(node, 1, "dim")
        return _Shape() if dim is None else _Meta(batch=dim == 0)

    def op_getitem(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        if isinstance(x, _Shape):
            return _Meta(batch=node.args[1] == 0)
        if isinstance(x, _Meta):
            return _Meta()
        return self.index(node, x, node.args[1])

    def op_elementwise(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        if sum(isinstance(s, _TENSORS) for s in inputs) > 1:
            raise self.fail(node, "combines several tensors in an unsupported way")
        return x

    def op_binary(self, node: fx.Node, inputs: list[_State]) -> _State:
        tensors = [s for s in inputs if isinstance(s, _TENSORS)]
        layouts = [s for s in tensors if isinstance(s, _Layout)]
        params = [s for s in tensors if isinstance(s, _Param)]
        if not tensors:
            return _Meta()
        if not layouts:
            if params and any(isinstance(s, _Input) for s in tensors):
                if self.first is None:
                    raise self.fail(
                        node,
                        "applies a parameter to the shared input, so all members would share it",
                        "Pass first='<name of the first layer to pack>' to keep a shared stem",
                    )
                return _Input()
            if len(params) > 1:
                raise self.fail(node, "combines two parameters")
            return params[0] if params else tensors[0]
        if any(isinstance(s, _Input) for s in tensors):
            raise self.fail(node, "combines the shared input with member channels")
        kinds = {s.kind for s in layouts}
        axes = {_from_end(s) for s in layouts}
        if len(kinds) > 1 or len(axes) > 1:
            raise self.fail(node, f"combines tensors with different member layouts {layouts}")
        if params and layouts[0].kind == "output":
            raise self.fail(
                node,
                "applies a parameter to the member-major logits, so all members would share it",
            )
        for p in params:
            self.widen(node, p, layouts[0])
        return max(layouts, key=lambda s: -1 if s.ndim is None else s.ndim)

    def op_expand(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        if isinstance(x, _Param | _Input):
            return x
        raise self.fail(node, "expands a member-split tensor", "Expand parameters only")

    def op_cat(self, node: fx.Node, inputs: list[_State]) -> _State:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        states = [self.states[t] for t in tensors]
        layouts = [s for s in states if isinstance(s, _Layout)]
        if not layouts:
            if all(isinstance(s, _Input) for s in states):
                return _Input()
            raise self.fail(node, "concatenates parameters with the shared input")
        lay = layouts[0]
        same = {(s.kind, s.axis, s.ndim) for s in layouts} == {(lay.kind, lay.axis, lay.ndim)}
        if not same or any(isinstance(s, _Input) for s in states):
            raise self.fail(node, f"concatenates tensors with different member layouts {states}")
        if lay.kind == "output":
            raise self.fail(node, "concatenates member-major logits")
        axis = self.pos(node, lay.axis, lay)
        if self.pos(node, dim, lay) == axis:
            if len(layouts) != len(states):
                raise self.fail(node, "concatenates a parameter along the member channels")
            self.channel_cats.append((node, axis))  # -> packed_cat: member blocks side by side
            sizes = [s.channels for s in layouts]
            total = None if None in sizes else sum(sizes)  # type: ignore[arg-type]
            return _Layout("packed", lay.axis, lay.ndim, total)
        for s in states:
            if isinstance(s, _Param):
                self.widen(node, s, lay)
        return lay

    def op_flatten(self, node: fx.Node, inputs: list[_State]) -> _State:
        start = _arg(node, 1, "start_dim", 0)
        end = _arg(node, 2, "end_dim", -1)
        return self.flatten(node, self.first_input(node), start, end)

    def op_transpose(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        if isinstance(x, _Input):
            return x
        lay = self.layout(node, x)
        d0, d1 = (self.pos(node, d, lay) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
        order = list(range(_known(node, self, lay)))
        order[d0], order[d1] = order[d1], order[d0]
        return self.permuted(node, lay, order)

    def op_permute(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        if isinstance(x, _Input):
            return x
        lay = self.layout(node, x)
        dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], list | tuple):
            dims = tuple(dims[0])
        return self.permuted(node, lay, [self.pos(node, d, lay) for d in dims])

    def op_reshape(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        shape = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "shape"),)
        if len(shape) == 1 and isinstance(shape[0], list | tuple):
            shape = tuple(shape[0])
        if isinstance(x, _Input):
            return _Input(len(shape))
        lay = self.layout(node, x)
        head = shape[0] if shape else None
        batch = isinstance(head, fx.Node) and self.states.get(head) == _Meta(batch=True)
        if len(shape) == 2 and batch and shape[1] == -1:
            return self.flatten(node, lay, 1, -1)
        raise self.fail(
            node,
            f"reshapes to {shape}, which may mix the members' channel blocks",
            "Use torch.flatten(x, 1), nn.Flatten() or x.view(x.size(0), -1); inside attention "
            "use a supported attention module",
        )

    def op_reduce(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        dim = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if isinstance(x, _Input):
            return _Input()
        lay = self.layout(node, x)
        if dim is None:
            raise self.fail(node, "reduces over every dim, across members")
        dims = sorted(
            {self.pos(node, d, lay) for d in (dim if isinstance(dim, list | tuple) else [dim])}
        )
        axis = self.pos(node, lay.axis, lay)
        if axis in dims:
            raise self.fail(node, f"reduces over dim {axis}, which holds the members' blocks")
        if keepdim:
            return lay
        new_axis = axis - sum(d < axis for d in dims)
        return _Layout(lay.kind, new_axis, _known(node, self, lay) - len(dims), lay.channels)

    def op_softmax(self, node: fx.Node, inputs: list[_State]) -> _State:
        return self.softmax(node, self.first_input(node), _arg(node, 1, "dim"))

    def op_squeeze(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        dim = _arg(node, 1, "dim")
        if isinstance(x, _Input):
            return _Input()
        lay = self.layout(node, x)
        if not isinstance(dim, int):
            raise self.fail(node, "squeezes without a single explicit dim", "Pass the dim")
        d, axis = self.pos(node, dim, lay), self.pos(node, lay.axis, lay)
        if d == axis:
            raise self.fail(node, "squeezes the dim that holds the members' blocks")
        return _Layout(lay.kind, axis - (d < axis), _known(node, self, lay) - 1, lay.channels)

    def op_unsqueeze(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        dim = _arg(node, 1, "dim")
        if isinstance(x, _Input):
            return _Input()
        lay = self.layout(node, x)
        ndim = _known(node, self, lay) + 1
        d = self.pos(node, dim, _Layout(lay.kind, lay.axis, ndim))
        axis = self.pos(node, lay.axis, lay)
        return _Layout(lay.kind, axis + (d <= axis), ndim, lay.channels)

    def op_spatial(self, node: fx.Node, inputs: list[_State]) -> _State:
        return self.spatial(node, self.first_input(node))

    def op_pad(self, node: fx.Node, inputs: list[_State]) -> _State:
        x = self.first_input(node)
        pad = _arg(node, 1, "pad")
        if isinstance(x, _Input):
            return x
        lay = self.layout(node, x)
        k = _known(node, self, lay) - 1 - self.pos(node, lay.axis, lay)
        pair = list(pad[2 * k : 2 * k + 2]) if 2 * k < len(pad) else [0, 0]
        if any(p != 0 for p in pair):
            raise self.fail(
                node,
                f"pads dim {self.pos(node, lay.axis, lay)} by {pair}, which shifts the members' "
                "channel blocks (e.g. a zero-padding 'option A' ResNet shortcut)",
                "Pad non-channel dims only; use a 1x1 conv shortcut ('option B') instead",
            )
        return lay

    def op_layer_norm(self, node: fx.Node, inputs: list[_State]) -> _State:
        weight = _arg(node, 2, "weight")
        owner = str(weight.target).rpartition(".")[0] if isinstance(weight, fx.Node) else None
        module = self.model.get_submodule(owner) if owner is not None else None
        if (
            not isinstance(module, nn.LayerNorm)
            or weight.op != "get_attr"
            or tuple(_arg(node, 1, "normalized_shape")) != tuple(module.normalized_shape)
        ):
            raise self.fail(
                node,
                "is a functional layer_norm that packify cannot tie to an nn.LayerNorm module",
                "Use nn.LayerNorm (or a subclass calling F.layer_norm with its own weight)",
            )
        state = self.norm_or_attention(node, owner, module, self.first_input(node))
        self.layer_norm_nodes.append((node, owner))
        return state

    # --------------------------------------------------------------- layout helpers

    def layout(self, node: fx.Node, x: _State) -> _Layout:
        if not isinstance(x, _Layout):
            raise self.fail(node, f"has an input packify cannot follow ({x})")
        return x

    def pos(self, node: fx.Node, dim: Any, lay: _Layout) -> int:
        """``dim`` as a non-negative index of ``lay``'s tensor."""
        if not isinstance(dim, int):
            raise self.fail(node, f"uses a dim computed at run time ({dim})")
        if dim >= 0:
            return dim
        return dim + _known(node, self, lay)

    def flatten(self, node: fx.Node, x: _State, start: int, end: int) -> _State:
        if isinstance(x, _Input):
            return _Input(start + 1 if start >= 0 and end == -1 else None)
        lay = self.layout(node, x)
        if lay.kind == "output" and lay.ndim is None and start >= 1 and end == -1:
            return _Layout("output", 0, start + 1)
        s, e = self.pos(node, start, lay), self.pos(node, end, lay)
        axis = self.pos(node, lay.axis, lay)
        ndim = _known(node, self, lay) - (e - s)
        if s == e:
            return lay
        if axis < s:
            return _Layout(lay.kind, axis, ndim, lay.channels)
        if axis > e:
            return _Layout(lay.kind, axis - (e - s), ndim, lay.channels)
        if axis == s and lay.kind == "packed":
            return _Layout("packed", axis, ndim, None)
        raise self.fail(
            node,
            f"flattens dims {s}..{e} around dim {axis}, which holds the members' blocks, so "
            "they would interleave",
            "Flatten so that the channel dim is the first merged dim (torch.flatten(x, 1))",
        )

    def permuted(self, node: fx.Node, lay: _Layout, order: list[int]) -> _Layout:
        axis = self.pos(node, lay.axis, lay)
        if lay.kind == "output" and order[0] != 0:
            raise self.fail(node, "moves the member-major batch dim")
        return _Layout(lay.kind, order.index(axis), len(order), lay.channels)

    def index(self, node: fx.Node, x: _State, idx: Any) -> _State:
        if isinstance(x, _Input):
            return _Input()
        lay = self.layout(node, x)
        items = idx if isinstance(idx, tuple) else (idx,)
        if any(not isinstance(i, int | slice) for i in items):
            raise self.fail(node, f"indexes with {idx!r}", "Index with integers and slices only")
        axis = self.pos(node, lay.axis, lay)
        if axis < len(items) and items[axis] != slice(None):
            raise self.fail(node, f"indexes dim {axis}, which holds the members' blocks")
        dropped = [i for i, item in enumerate(items) if isinstance(item, int)]
        ndim = None if lay.ndim is None else lay.ndim - len(dropped)
        return _Layout(lay.kind, axis - sum(d < axis for d in dropped), ndim, lay.channels)

    def softmax(self, node: fx.Node, x: _State, dim: Any) -> _State:
        if isinstance(x, _Input):
            return x
        lay = self.layout(node, x)
        if dim is None or self.pos(node, dim, lay) == self.pos(node, lay.axis, lay):
            raise self.fail(node, f"normalises over dim {dim}, which holds the members' blocks")
        return lay

    def spatial(self, node: fx.Node, x: _State) -> _State:
        if isinstance(x, _Input):
            return x
        lay = self.layout(node, x)
        if lay.kind == "packed" and (lay.ndim is None or lay.axis != 1):
            raise self.fail(
                node,
                f"pools or pads the trailing dims but the packed channels are {lay}",
                "Pool (B, C, ...) feature maps only",
            )
        return lay

    def widen(self, node: fx.Node, p: _Param, lay: _Layout) -> None:
        """Record that parameter ``p`` must grow to α·C along the channel dim it meets."""
        tensor = _get_attr(self.model, p.target)
        axis = tensor.ndim + _from_end(lay)
        size = tensor.shape[axis] if axis >= 0 else 1
        if size != lay.channels or lay.channels is None:
            why = (
                "is broadcast over all channels, hence shared by all members"
                if size == 1
                else f"has size {size} along the channel dim, where packify cannot tell "
                "which member owns what"
            )
            raise self.fail(
                node,
                f"combines the parameter {p.target!r} {tuple(tensor.shape)} with member "
                f"channels; it {why}",
                "Give the parameter one entry per channel",
            )
        if self.widened.setdefault(p.target, axis) != axis:
            raise self.fail(node, f"meets parameter {p.target!r} along two different dims")


def _known(node: fx.Node, analysis: _Analysis, lay: _Layout) -> int:
    if lay.ndim is None:
        raise analysis.fail(
            node,
            "needs the rank of a tensor whose rank packify does not know (a Linear on the raw "
            "input)",
            "Flatten the input before the first Linear",
        )
    return lay.ndim


def _is_last_axis(lay: _Layout) -> bool:
    return lay.axis == -1 if lay.ndim is None else lay.axis == lay.ndim - 1


def _from_end(lay: _Layout) -> int:
    """The channel dim counted from the end (broadcasting aligns there)."""
    return -1 if lay.ndim is None else lay.axis - lay.ndim


def _get_attr(model: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(model.get_submodule(owner), name)


def _set_attr(model: nn.Module, target: str, value: Any) -> None:
    owner, _, name = target.rpartition(".")
    setattr(model.get_submodule(owner), name, value)


# ---------------------------------------------------------------------------- building


def _widen_like(tensor: Tensor, axis: int, alpha: float, num_members: int, what: str) -> Tensor:
    """A fresh tensor with α·C entries along ``axis``: constant if ``tensor`` is, else drawn
    from N(mean, std) of ``tensor``."""
    width = _widen(tensor.shape[axis], alpha, what, "packify")
    if width % num_members:
        raise ConfigError(
            f"packify: {what}: alpha·{tensor.shape[axis]} = {width} is not divisible by "
            f"num_members={num_members}: choose alpha and num_members so that it is"
        )
    shape = list(tensor.shape)
    shape[axis] = width
    flat = tensor.detach().flatten()
    new = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    if flat.numel() < 2 or bool((flat == flat[0]).all()):
        return new.fill_(float(flat[0]) if flat.numel() else 0.0)
    return new.normal_(float(flat.float().mean()), float(flat.float().std()))


def _pack_layer(
    module: nn.Module,
    role: Role,
    *,
    alpha: float,
    num_members: int,
    gamma: int,
    min_cpg: int | None,
) -> nn.Module:
    first, last = role in ("first", "first_last"), role in ("last", "first_last")
    common: dict[str, Any] = {
        "alpha": alpha,
        "num_members": num_members,
        "first": first,
        "last": last,
        "device": module.weight.device,
        "dtype": module.weight.dtype,
        "bias": module.bias is not None,
    }
    if isinstance(module, nn.Linear):
        return PackedLinear(
            module.in_features,
            module.out_features,
            gamma=1 if first or last else gamma,
            **common,
        )
    depthwise = module.groups == module.in_channels > 1
    return _CONVS[type(module)](
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        gamma=1 if first or last or depthwise else gamma,
        groups=module.groups,
        min_channels_per_group=min_cpg,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        padding_mode=module.padding_mode,
        **common,
    )


def _widen_norm(module: nn.Module, path: str, alpha: float, num_members: int) -> nn.Module:
    """A fresh per-channel module of the same kind for α·C channels (M·G groups)."""
    ref = next(iter(module.parameters()), None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    if isinstance(module, nn.GroupNorm):
        width = _widen(module.num_channels, alpha, f"{path}.num_channels", "packify")
        groups = num_members * module.num_groups
        if width % groups:
            raise ConfigError(
                f"packify: GroupNorm {path!r}: alpha·num_channels = {width} is not divisible by "
                f"num_members·num_groups = {groups}: choose alpha and num_members so that it is"
            )
        return nn.GroupNorm(groups, width, eps=module.eps, affine=module.affine, **factory)
    if isinstance(module, nn.PReLU):
        new = nn.PReLU(module.num_parameters, **factory)
        new.weight = nn.Parameter(
            _widen_like(module.weight, 0, alpha, num_members, f"{path}.weight")
        )
        new.num_parameters = new.weight.shape[0]
        return new
    width = _widen(module.num_features, alpha, f"{path}.num_features", "packify")
    if width % num_members:
        raise ConfigError(
            f"packify: {type(module).__name__} {path!r}: alpha·num_features = {width} is not "
            f"divisible by num_members={num_members}: choose alpha and num_members so that it is"
        )
    return type(module)(
        width,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        **factory,
    )


def _pack_attention(
    module: nn.Module, *, alpha: float, num_members: int, gamma: int
) -> tuple[PackedSelfAttention, nn.Module]:
    read, _ = _ATTENTIONS[_class_path(module)]
    qkv, proj = module.qkv, module.proj
    packed = PackedSelfAttention(
        qkv.in_features,
        alpha=alpha,
        num_members=num_members,
        gamma=gamma,
        attn_dim=proj.in_features,
        qkv_bias=qkv.bias is not None,
        proj_bias=proj.bias is not None,
        device=qkv.weight.device,
        dtype=qkv.weight.dtype,
        **read(module),
    )
    template = copy.deepcopy(module)
    template.qkv, template.proj = nn.Identity(), nn.Identity()
    return packed, template


def _rewrite_channel_cats(
    graph: fx.Graph, nodes: Iterable[tuple[fx.Node, int]], num_members: int
) -> None:
    """``torch.cat(xs, dim=channels)`` -> ``packed_cat(xs, dim, M)`` (``M=1``: a member's cat)."""
    for node, axis in nodes:
        node.target = packed_cat
        node.args = (_arg(node, 0, "tensors"), axis)
        node.kwargs = {"num_members": num_members}


def _rewrite_layer_norms(graph: fx.Graph, nodes: Iterable[tuple[fx.Node, str]]) -> None:
    """``F.layer_norm(x, shape, owner.weight, owner.bias, eps)`` -> ``owner(x)``."""
    for node, owner in nodes:
        with graph.inserting_before(node):
            call = graph.call_module(owner, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        inputs = [n for n in node.all_input_nodes if n.op == "get_attr"]
        graph.erase_node(node)
        for n in inputs:
            if not n.users:
                graph.erase_node(n)


@structural_edit("packify")
def packify(
    model: nn.Module,
    *,
    num_members: int,
    alpha: float,
    gamma: int = 1,
    first: str | Collection[str] = "auto",
    last: str | None = "auto",
    min_channels_per_group: int | None = None,
) -> PackedEnsemble:
    """Convert ``model`` into a Packed-Ensemble of ``num_members`` members (spec §1.2).

    The model is not modified; the result is freshly initialised (see the module docstring)
    and returns member-major logits ``(M·B, K)``. A recorded structure edit
    (:mod:`sobre.core.edits`): a checkpoint of the packed model reloads by rebuilding the base
    model and replaying the log, and its parameters keep the base model's names. ``forward``
    arguments with a None/bool/number/str default are fixed to that default.

    Args:
        model: A model ``torch.fx`` can trace symbolically, returning one tensor.
        num_members: Number of members M (>= 1).
        alpha: Width factor α (> 0): every packed layer has α times the base channels.
        gamma: Sub-groups per member γ (>= 1) of inner, non-depthwise layers; the first and
            last layers and depthwise convs use γ = 1. (torch-uncertainty's packed ResNets also
            keep γ = 1 in the first conv of each block; packify applies γ to every inner layer.)
        first: ``"auto"``: every Conv/Linear reading the input becomes a dense ``first=True``
            layer, and a parametrised module before it raises. Module names (one, or several
            for branches, e.g. a residual block's conv and its shortcut conv): these layers are
            the dense first layers, and the stem before them stays shared by all members (not
            packed, trained by all).
        last: ``"auto"``: the Conv/Linear the output is computed from becomes ``last=True``
            (the output is ``(M·B, ...)`` member-major rows). A module name: that layer. ``None``:
            no last layer; the output stays packed channels ``(B, α·C, ...)``.
        min_channels_per_group: Passed to the packed convs: lowers γ (with a logged warning)
            where a group would get fewer input channels; ``None`` never changes γ.

    Returns:
        A :class:`PackedEnsemble` (``.packing`` describes the conversion).

    Raises:
        ConfigError: Bad M, α, γ; a model torch.fx cannot trace or whose graph depends on
            ``self.training``; an op or module that packify cannot prove member-separable (the
            message names the node and the supported alternatives); non-divisible widths.
    """
    _check_hparams(alpha, num_members, gamma)
    if isinstance(model, PackedEnsemble):
        raise ConfigError("packify: the model is already packed")
    base = model  # structural_edit hands over a deep copy
    graph = _trace(base)
    layers = {
        str(n.target)
        for n in graph.nodes
        if n.op == "call_module" and _is_layer(base.get_submodule(str(n.target)))
    }
    if last == "auto":
        last_node = _last_candidate(graph, base)
        if last_node is None:
            raise ConfigError(
                f"packify: cannot find the classifier of {type(model).__name__}: its output is "
                "not computed from a Conv/Linear through parameter-free ops. Pass "
                "last='<name of the final layer>', or last=None to keep packed channels"
            )
    elif last is None:
        last_node = None
    else:
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == last]
        if len(calls) != 1 or last not in layers:
            raise ConfigError(
                f"packify: last={last!r} must name a Conv/Linear module the model calls "
                f"exactly once (called {len(calls)} times)"
            )
        last_node = calls[0]
    firsts = None if first == "auto" else frozenset([first] if isinstance(first, str) else first)
    if firsts is not None and not firsts <= layers:
        raise ConfigError(
            f"packify: first={sorted(firsts - layers)} must name Conv/Linear modules the model "
            "calls"
        )
    analysis = _Analysis(base, graph, last_node, firsts)
    analysis.run()
    missing = sorted(
        f for f in firsts or () if analysis.roles.get(f) not in ("first", "first_last")
    )
    if missing:
        raise ConfigError(
            f"packify: first={missing} {'is' if len(missing) == 1 else 'are'} not a Conv/Linear "
            "applied to the shared input (or to the stem before it)"
        )
    hp = {"alpha": alpha, "num_members": num_members}
    templates: dict[str, nn.Module] = {}
    for path, role in analysis.roles.items():
        module = base.get_submodule(path)
        if role == "norm":
            new = _widen_norm(module, path, **hp)
        elif role == "layer_norm":
            new = PackedLayerNorm(
                module.normalized_shape[0],
                eps=module.eps,
                elementwise_affine=module.elementwise_affine,
                bias=module.bias is not None,
                **hp,
            )
        elif role == "attention":
            new, templates[path] = _pack_attention(module, gamma=gamma, **hp)
        else:
            try:
                new = _pack_layer(module, role, gamma=gamma, min_cpg=min_channels_per_group, **hp)
            except ConfigError as err:
                raise ConfigError(f"packify: {role} layer {path!r}: {err}") from None
        _set_attr(base, path, new)
    for target, axis in analysis.widened.items():
        old = _get_attr(base, target)
        new = _widen_like(old, axis, alpha, num_members, target)
        _set_attr(
            base,
            target,
            nn.Parameter(new, requires_grad=old.requires_grad)
            if isinstance(old, nn.Parameter)
            else new,
        )
    _rewrite_layer_norms(graph, analysis.layer_norm_nodes)
    _rewrite_channel_cats(graph, analysis.channel_cats, num_members)
    graph.lint()
    packed = PackedEnsemble(base, graph, class_name=f"Packed{type(model).__name__}")
    axes = {
        f"{path}.{name}": 0
        for path in analysis.roles
        for name, t in [
            *packed.get_submodule(path).named_parameters(),
            *packed.get_submodule(path).named_buffers(),
        ]
        if t.ndim >= 1
    }
    packed.meta["packing"] = Packing(
        num_members,
        alpha,
        gamma,
        dict(analysis.roles),
        dict(analysis.widened),
        {**axes, **analysis.widened},
        templates,
    )
    log.info(
        "packify: %s -> %d members (alpha=%g, gamma=%d): %d -> %d parameters",
        type(model).__name__,
        num_members,
        alpha,
        gamma,
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in packed.parameters()),
    )
    return packed


# ------------------------------------------------------------------------------ members


def _norm_member(module: nn.Module, m: int, num_members: int) -> nn.Module:
    """Member m's slice of a widened per-channel module."""
    new = copy.deepcopy(module)
    with torch.no_grad():
        for name, t in [*module.named_parameters(recurse=False)]:
            new._parameters[name] = nn.Parameter(t.chunk(num_members)[m].clone())
        for name, t in [*module.named_buffers(recurse=False)]:
            if t.ndim >= 1:
                new._buffers[name] = t.chunk(num_members)[m].clone()
    for attr in ("num_features", "num_channels", "num_parameters"):
        if hasattr(new, attr):
            setattr(new, attr, getattr(new, attr) // num_members)
    if isinstance(new, nn.GroupNorm):
        new.num_groups //= num_members
    return new


def _attention_member(module: PackedSelfAttention, template: nn.Module, m: int) -> nn.Module:
    one = module.member(m)
    member = copy.deepcopy(template)
    member.qkv, member.proj = one.qkv, one.proj
    _ATTENTIONS[_class_path(template)][1](member, module.head_dim)
    return member


def unpack_member(packed: nn.Module, m: int) -> nn.Module:
    """Member m of a packed model as a standalone network of width α·C/M (the test oracle).

    Args:
        packed: A :class:`PackedEnsemble` from :func:`packify`, or one packed layer.
        m: Member index in ``[0, M)``.

    Returns:
        For a packed model, an ``fx.GraphModule`` running the same graph with ordinary layers
        (``nn.ConvNd``, ``nn.Linear``, ``nn.LayerNorm``, norms of α·C/M channels, attentions of
        the original class), so that ``unpack_member(packed, m)(x)`` equals
        ``split_members(packed(x), M)[:, m]``; for a layer, ``layer.member(m)``.

    Raises:
        ConfigError: ``packed`` is neither, or ``m`` is out of range.
    """
    if isinstance(packed, PackedLinear | _PackedConvNd | PackedLayerNorm | PackedSelfAttention):
        return packed.member(m)
    if not isinstance(packed, PackedEnsemble):
        raise ConfigError(
            f"unpack_member needs a model returned by packify or a packed layer, got "
            f"{type(packed).__name__}"
        )
    info = packed.packing
    if not 0 <= m < info.num_members:
        raise ConfigError(f"member index {m} is out of range for num_members={info.num_members}")
    parts: dict[str, Any] = {}
    for node in packed.graph.nodes:
        target = str(node.target)
        if node.op == "call_module":
            module = packed.get_submodule(target)
            role = info.roles.get(target)
            if role == "norm":
                parts[target] = _norm_member(module, m, info.num_members)
            elif role == "attention":
                parts[target] = _attention_member(module, info.templates[target], m)
            elif role is not None:
                parts[target] = module.member(m)
            else:
                parts[target] = copy.deepcopy(module)
        elif node.op == "get_attr":
            value = _get_attr(packed, target)
            if target in info.widened:
                value = value.detach().chunk(info.num_members, info.widened[target])[m].clone()
                if isinstance(_get_attr(packed, target), nn.Parameter):
                    value = nn.Parameter(value)
            parts[target] = copy.deepcopy(value)
    graph = copy.deepcopy(packed.graph)
    for node in graph.nodes:
        if node.target is packed_cat:
            node.kwargs = {"num_members": 1}
    name = type(packed).__name__.removeprefix("Packed")
    return fx.GraphModule(parts, graph, class_name=f"{name}Member{m}")


class Packify:
    """Stage transform: the model becomes a Packed-Ensemble (:func:`packify`, a recorded edit).

    Put it in the first stage of a recipe; the routine then trains on repeated targets and
    evaluates the members' mean softmax.

    Args:
        num_members: M.
        alpha: width factor α.
        gamma: sub-groups γ of the inner layers.
        first: ``"auto"`` or the names of the dense first layers.
        last: ``"auto"``, the name of the last layer, or ``None``.
        min_channels_per_group: see :func:`packify`.
    """

    def __init__(
        self,
        num_members: int = 4,
        alpha: float = 2.0,
        gamma: int = 1,
        first: str | list[str] = "auto",
        last: str | None = "auto",
        min_channels_per_group: int | None = None,
    ) -> None:
        self.kwargs = {
            "num_members": num_members,
            "alpha": alpha,
            "gamma": gamma,
            "first": first,
            "last": last,
            "min_channels_per_group": min_channels_per_group,
        }

    def apply(self, model: nn.Module) -> nn.Module:
        """The packed model."""
        return packify(model, **self.kwargs)
