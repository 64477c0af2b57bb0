"""Activation call sites: find them with torch.fx and give each its own module (spec §0).

Entropy-guided pruning and depth reduction (EGP, NEPENTHE, EASIER, DSD²) reason about
*activation call sites*: torchvision's ``BasicBlock`` calls one ``self.relu`` twice, which is two
sites, and ``F.relu(x)`` in a ``forward`` is a site without a module. :func:`find_sites` lists the
sites in execution order; :func:`uniquify_activations` (a recorded structure edit) gives each one
its own non-inplace module, so a feature tap sees every pre-activation and a site can be replaced
on its own.

Naming: a site keeps the module it calls when it is that module's first call; a later call of the
same module gets a copy named after it with a suffix (``layer1.0.relu`` -> ``layer1.0.relu_1``),
and a functional call gets a module named after its kind (``F.gelu`` in ``blocks.0.mlp`` ->
``blocks.0.mlp.gelu``), both in the module whose ``forward`` makes the call; the first free name
of ``base``, ``base_1``, ``base_2``, ... is taken. Inside a standard ``nn.Sequential`` a module
registered at several indices keeps each index (the copy goes to the index itself).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from sobre.core.edits import structural_edit
from sobre.core.errors import ConfigError
from sobre.core.fx import third_party_leaves

log = logging.getLogger(__name__)

__all__ = ["Site", "UniquifyActivations", "activation_kind", "find_sites", "uniquify_activations"]

_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.PReLU, "prelu"),
    (nn.ELU, "elu"),
    (nn.CELU, "celu"),
    (nn.SELU, "selu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Hardswish, "hardswish"),
)
# Third-party activation classes that do not subclass torch's (timm.layers.activations{,_me}).
_CLASS_NAME_KINDS: dict[str, str] = {
    "gelu": "gelu",
    "gelutanh": "gelu",
    "quickgelu": "gelu",
    "swish": "silu",
    "swishme": "silu",
    "silu": "silu",
    "mish": "mish",
    "mishme": "mish",
    "hardswish": "hardswish",
    "hardswishme": "hardswish",
}


@dataclass(frozen=True)
class _Functional:
    """How a functional activation becomes a module."""

    kind: str
    module: type[nn.Module]
    params: tuple[str, ...] = ()  # arguments after the input, in positional order
    inplace: bool = False  # the function always works in place (relu_, ...)


_RELU_ = _Functional("relu", nn.ReLU, inplace=True)
_FUNCTIONS: dict[Callable[..., Any], tuple[str, _Functional]] = {
    F.relu: ("F.relu", _Functional("relu", nn.ReLU, ("inplace",))),
    torch.relu: ("torch.relu", _Functional("relu", nn.ReLU)),
    torch.relu_: ("torch.relu_", _RELU_),
    F.relu6: ("F.relu6", _Functional("relu6", nn.ReLU6, ("inplace",))),
    F.leaky_relu: (
        "F.leaky_relu",
        _Functional("leaky_relu", nn.LeakyReLU, ("negative_slope", "inplace")),
    ),
    F.leaky_relu_: (
        "F.leaky_relu_",
        _Functional("leaky_relu", nn.LeakyReLU, ("negative_slope",), inplace=True),
    ),
    F.elu: ("F.elu", _Functional("elu", nn.ELU, ("alpha", "inplace"))),
    F.elu_: ("F.elu_", _Functional("elu", nn.ELU, ("alpha",), inplace=True)),
    F.celu: ("F.celu", _Functional("celu", nn.CELU, ("alpha", "inplace"))),
    F.selu: ("F.selu", _Functional("selu", nn.SELU, ("inplace",))),
    torch.selu: ("torch.selu", _Functional("selu", nn.SELU)),
    F.gelu: ("F.gelu", _Functional("gelu", nn.GELU, ("approximate",))),
    F.silu: ("F.silu", _Functional("silu", nn.SiLU, ("inplace",))),
    F.mish: ("F.mish", _Functional("mish", nn.Mish, ("inplace",))),
    F.hardswish: ("F.hardswish", _Functional("hardswish", nn.Hardswish, ("inplace",))),
}
_METHODS: dict[str, tuple[str, _Functional]] = {
    "relu": ("Tensor.relu", _Functional("relu", nn.ReLU)),
    "relu_": ("Tensor.relu_", _RELU_),
}

Action = Literal["keep", "slot", "copy", "function"]
_REWRITTEN: dict[tuple[type[nn.Module], str], type[nn.Module]] = {}


@dataclass(frozen=True)
class Site:
    """One activation call site.

    Attributes:
        name: Dotted path of the module that implements the site after
            :func:`uniquify_activations` (the module itself when the site is already unique).
        kind: ``"relu"``, ``"relu6"``, ``"leaky_relu"``, ``"prelu"``, ``"elu"``, ``"celu"``,
            ``"selu"``, ``"gelu"``, ``"silu"``, ``"mish"`` or ``"hardswish"``.
        owner: Dotted path of the module whose ``forward`` makes the call (``""``: the model).
        source: What is called now: a module path, or ``"F.relu"``, ``"Tensor.relu"``, ...
        shared: The called module serves several sites.
        traced: Found by torch.fx; ``False`` for sites found by module discovery (untraceable
            model, or inside a leaf module such as timm's ``BatchNormAct2d``), whose number of
            calls is unknown.
        on_threshold: The neuron is ON when its pre-activation ``z > on_threshold``: 0 for every
            kind (rectifiers, and GELU/SiLU by the sign of ``z``; spec §0).
    """

    name: str
    kind: str
    owner: str
    source: str
    shared: bool = False
    traced: bool = True
    on_threshold: float = 0.0

    @property
    def unique(self) -> bool:
        """Whether the site already has its own module, called at this site only."""
        return self.name == self.source and not self.shared

    def is_on(self, z: Tensor) -> Tensor:
        """The boolean ON pattern of pre-activations ``z``."""
        return z > self.on_threshold


def activation_kind(module: nn.Module) -> str | None:
    """The site kind of an activation module (see :class:`Site`), or ``None``."""
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return _CLASS_NAME_KINDS.get(type(module).__name__.lower())


class _SiteTracer(fx.Tracer):
    """Keeps activation modules, torch.nn modules and timm's no-trace modules as leaves.

    With ``shallow=True`` every submodule is a leaf (the graph of one ``forward``). Records how
    often each module is called and which ``forward`` arguments its callers pass.
    """

    def __init__(self, *, shallow: bool = False) -> None:
        leaves, functions = third_party_leaves()
        super().__init__(autowrap_functions=functions)
        self.shallow = shallow
        self.leaf_types = leaves
        self.calls: Counter[str] = Counter()
        self.passed: dict[str, set[str] | None] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.shallow or activation_kind(m) is not None or type(m) in self.leaf_types:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict
    ) -> Any:
        path = self.path_of_module(m)
        self.calls[path] += 1
        try:
            names = set(inspect.signature(m.forward).bind_partial(*args, **kwargs).arguments)
        except (TypeError, ValueError):
            names = None
        known = self.passed.setdefault(path, set())
        self.passed[path] = None if known is None or names is None else known | names
        return super().call_module(m, forward, args, kwargs)


def _fixed_defaults(module: nn.Module, passed: set[str] | None) -> dict[str, Any]:
    """``forward`` arguments with a None/bool/number/str default that no caller passes.

    They are traced as constants: a proxy would make ``if mask is not None:`` take the wrong
    branch silently, and ``if is_causal:`` fail.
    """
    if passed is None:
        return {}
    params = inspect.signature(type(module).forward).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in passed
        and (p.default is None or isinstance(p.default, bool | int | float | str))
    }


def _trace(module: nn.Module, tracer: _SiteTracer, concrete: dict[str, Any]) -> fx.Graph:
    """Trace a shallow copy of ``module`` (tensor constants land on the copy, not the model)."""
    root = copy.copy(module)
    graph = tracer.trace(root, concrete_args=concrete or None)
    # fx renames specialised placeholders ("mask" -> "mask_1"); keep the keyword callers use.
    names = {n.name for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        base = node.name.rsplit("_", 1)[0]
        if base in concrete and base not in names:
            node.name = node.target = base
    return graph


def _input(node: fx.Node) -> Any:
    """The tensor argument of an activation call node."""
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


def _functional(node: fx.Node) -> tuple[str, _Functional] | None:
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    if node.op == "call_method":
        return _METHODS.get(node.target)  # type: ignore[arg-type]
    return None


def _functional_args(node: fx.Node, fn: _Functional, where: str) -> tuple[dict[str, Any], bool]:
    """Constructor arguments of the module replacing a functional call; whether it is in place."""
    args = node.args[1:] if node.args else ()
    values = dict(zip(fn.params, args, strict=False))
    values.update({k: v for k, v in node.kwargs.items() if k not in ("input", "self")})
    unknown = set(values) - set(fn.params)
    if len(args) > len(fn.params) or unknown:
        raise ConfigError(
            f"activation call {node.format_node()} in {where} has arguments "
            f"{sorted(unknown) or list(args)} that {fn.module.__name__} does not take"
        )
    inplace = bool(values.pop("inplace", False)) or fn.inplace
    if any(isinstance(v, fx.Node) for v in values.values()):
        raise ConfigError(
            f"activation call {node.format_node()} in {where} takes arguments computed at run "
            f"time; use an {fn.module.__name__} module instead"
        )
    return values, inplace


@dataclass
class _Plan:
    """A site and what :func:`uniquify_activations` does to it."""

    site: Site
    action: Action
    reroute: bool  # in place while later nodes of the same forward still read its input
    module: nn.Module | None  # the module called now (module sites)
    escapes: str = ""  # a later reader of its in-place input outside that forward


@dataclass
class _Traced:
    plans: list[_Plan]
    calls: Counter[str]
    passed: dict[str, set[str] | None]


def _owner(node: fx.Node, *, leaf: bool) -> tuple[str, str]:
    """Path and stack key of the module whose ``forward`` makes this call (innermost non-leaf)."""
    stack = [(key, path) for key, (path, _) in node.meta.get("nn_module_stack", {}).items()]
    if leaf:
        stack = stack[:-1]
    key, path = stack[-1] if stack else ("", "")
    return path, key


def _join(owner: str, local: str) -> str:
    return f"{owner}.{local}" if owner else local


class _Namer:
    """Free attribute names per owner: ``base``, then ``base_1``, ``base_2``, ..."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.taken: dict[str, set[str]] = {}

    def fresh(self, owner: str, base: str) -> str:
        module = self.model.get_submodule(owner)
        taken = self.taken.setdefault(
            owner,
            set(module._modules)
            | set(module._parameters)
            | set(module._buffers)
            | set(vars(module)),
        )
        name, k = base, 0
        while name in taken or hasattr(type(module), name):
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return _join(owner, name)


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _plan(model: nn.Module, graph: fx.Graph, tracer: _SiteTracer) -> list[_Plan]:
    """Name every site of the traced ``graph`` (see the module docstring) and plan its edit."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    namer = _Namer(model)
    module_sites = [n for n in graph.nodes if n.op == "call_module"]
    uses = Counter(id(model.get_submodule(n.target)) for n in module_sites)  # type: ignore[arg-type]
    claimed: set[int] = set()
    slots: Counter[tuple[str, int]] = Counter()
    plans: list[_Plan] = []

    def readers(node: fx.Node, owner_key: str) -> tuple[bool, str]:
        """Whether nodes after ``node`` read its input inside its owner's forward; one outside."""
        src = _input(node)
        if not isinstance(src, fx.Node):
            return False, ""
        later = [u for u in src.users if u is not node and order[u] > order[node]]
        inside = [
            u for u in later if not owner_key or owner_key in u.meta.get("nn_module_stack", {})
        ]
        outside = [u.name for u in later if u not in inside]
        return bool(inside), outside[0] if outside else ""

    for node in graph.nodes:
        if node.op == "call_module":
            path = str(node.target)
            module = model.get_submodule(path)
            kind = activation_kind(module)
            if kind is None:
                plans.extend(_opaque(path, module, shared=tracer.calls[path] > 1))
                continue
            owner, owner_key = _owner(node, leaf=True)
            parent = model.get_submodule(owner)
            shared = uses[id(module)] > 1
            inplace = bool(getattr(module, "inplace", False))
            reroute, escapes = readers(node, owner_key) if inplace else (False, "")
            if _is_sequential(parent):
                keys = [k for k, v in parent._modules.items() if v is module]
                j = slots[(owner, id(module))]
                slots[(owner, id(module))] += 1
                name = source = _join(owner, keys[min(j, len(keys) - 1)])
                action: Action = "slot" if id(module) in claimed else "keep"
            elif id(module) in claimed:
                source = path
                name = namer.fresh(owner, path.rsplit(".", 1)[-1])
                action = "copy"
            else:
                name = source = path
                action = "keep"
            claimed.add(id(module))
            site = Site(name, kind, owner, source, shared=shared)
            plans.append(_Plan(site, action, reroute, module, escapes))
            continue
        found = _functional(node)
        if found is None:
            continue
        label, fn = found
        owner, owner_key = _owner(node, leaf=False)
        _, inplace = _functional_args(node, fn, owner or type(model).__name__)
        reroute, escapes = readers(node, owner_key) if inplace else (False, "")
        site = Site(namer.fresh(owner, fn.kind), fn.kind, owner, label)
        plans.append(_Plan(site, "function", reroute, None, escapes))
    return plans


def _opaque(path: str, module: nn.Module, *, shared: bool) -> Iterator[_Plan]:
    """Activation modules inside a leaf module the tracer did not enter."""
    for sub, m in module.named_modules():
        kind = activation_kind(m)
        if sub and kind is not None:
            name = f"{path}.{sub}"
            yield _Plan(Site(name, kind, path, name, shared=shared, traced=False), "keep", False, m)


def _discover(model: nn.Module) -> list[_Plan]:
    """Fallback: activation modules in registration order, each counted once."""
    return [
        _Plan(Site(name, kind, name.rpartition(".")[0], name, traced=False), "keep", False, m)
        for name, m in model.named_modules()
        if (kind := activation_kind(m)) is not None
    ]


def _trace_sites(model: nn.Module) -> _Traced | None:
    """Sites and call statistics of ``model``, or ``None`` (logged) when fx cannot trace it."""
    tracer = _SiteTracer()
    try:
        graph = _trace(model, tracer, _fixed_defaults(model, set()))
    except Exception as err:  # tracing runs arbitrary user code: any failure means "untraceable"
        log.warning(
            "find_sites: torch.fx cannot trace %s (%s: %s); falling back to module discovery, "
            "which counts a module called several times once, misses functional activations "
            "and lists modules in registration order",
            type(model).__name__,
            type(err).__name__,
            err,
        )
        return None
    return _Traced(_plan(model, graph, tracer), tracer.calls, tracer.passed)


def find_sites(model: nn.Module) -> list[Site]:
    """The activation call sites of ``model`` in execution order, found with torch.fx.

    A module called twice is two sites (torchvision's ``BasicBlock``: ``relu`` and ``relu_1``);
    ``F.relu``, ``torch.relu``, ``x.relu()``, ``F.gelu``, ``F.silu``, ... are sites too. Leaves
    of the trace: torch.nn modules, activation modules and timm's no-trace modules; activation
    modules inside such a leaf (timm's ``BatchNormAct2d``) are listed where the leaf is called,
    with ``traced=False``, as are functional activations inside them, which stay invisible
    (e.g. the default ``F.relu`` of ``nn.TransformerEncoderLayer``).

    Fallback: a model that torch.fx cannot trace (data-dependent control flow) is searched by
    module discovery with a logged warning: every activation *module* once, in registration
    order (``traced=False``). It cannot see a module called twice (one site instead of two),
    functional activations, or the execution order when it differs from registration.

    The model is not modified (tracing works on a shallow copy).
    """
    traced = _trace_sites(model)
    return [p.site for p in (traced.plans if traced is not None else _discover(model))]


def _not_inplace(module: nn.Module) -> nn.Module:
    if hasattr(module, "inplace"):
        module.inplace = False
    return module


def _owner_graph(
    owner: nn.Module, where: str, passed: set[str] | None
) -> tuple[fx.Graph, nn.Module]:
    """The graph of ``owner.forward`` alone (same in train and eval mode) and its traced root."""
    flags = [(m, m.training) for m in owner.modules()]
    graphs = []
    try:
        for mode in (True, False):
            owner.train(mode)
            tracer = _SiteTracer(shallow=True)
            graph = _trace(owner, tracer, _fixed_defaults(owner, passed))
            graphs.append((graph, tracer.root))
    except Exception as err:  # tracing runs arbitrary user code
        raise ConfigError(
            f"uniquify_activations: torch.fx cannot trace the forward of {where} "
            f"({type(owner).__name__}) to give its activations one module per call "
            f"({type(err).__name__}: {err}); register one activation module per call in it"
        ) from None
    finally:
        for m, training in flags:
            m.training = training
    (train, root), (evaluation, _) = graphs
    if train.python_code("self").src != evaluation.python_code("self").src:
        raise ConfigError(
            f"uniquify_activations: the forward of {where} ({type(owner).__name__}) depends on "
            "self.training, so it cannot be rewritten; register one activation module per call "
            "in it (and use nn.Dropout instead of F.dropout(..., self.training))"
        )
    return train, root


def _rewrite(model: nn.Module, owner: str, plans: list[_Plan], passed: set[str] | None) -> None:
    """Regenerate the ``forward`` of ``owner`` so that every site calls its own module."""
    module = model.get_submodule(owner)
    where = repr(owner) if owner else "the model"
    graph, root = _owner_graph(module, where, passed)
    nodes = [
        n
        for n in graph.nodes
        if (n.op == "call_module" and activation_kind(module.get_submodule(str(n.target))))
        or _functional(n) is not None
    ]
    if len(nodes) != len(plans):
        raise ConfigError(
            f"uniquify_activations: the forward of {where} makes {len(nodes)} activation calls "
            f"alone but {len(plans)} inside the model; register one activation module per call"
        )
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node, plan in zip(nodes, plans, strict=True):
        local = plan.site.name[len(owner) + 1 :] if owner else plan.site.name
        src = _input(node)
        readers = [u for u in src.users if order.get(u, -1) > order[node]] if plan.reroute else []
        out = node
        if plan.action == "copy":
            module.add_module(local, _not_inplace(copy.deepcopy(plan.module)))
            node.target = local
        elif plan.action == "function":
            _, fn = _functional(node)  # type: ignore[misc]
            kwargs, _ = _functional_args(node, fn, where)
            module.add_module(local, fn.module(**kwargs))
            with graph.inserting_after(node):
                out = graph.call_module(local, (src,))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        for reader in readers:  # the input of an in-place call is its output afterwards
            reader.replace_input_with(src, out)
    graph.lint()
    for node in graph.nodes:  # tensor constants that fx stored on the traced copy
        target = str(node.target)
        if node.op == "get_attr" and "." not in target and not hasattr(module, target):
            setattr(module, target, getattr(root, target))
    cls = type(module)
    key = (cls, graph.python_code("self").src)
    if key not in _REWRITTEN:  # one class per (class, code): replays get the same classes
        forward = type(fx.GraphModule(module, graph)).forward
        _REWRITTEN[key] = type(
            cls.__name__,
            (cls,),
            {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
    module.__class__ = _REWRITTEN[key]


@structural_edit("uniquify_activations")
def uniquify_activations(model: nn.Module) -> nn.Module:
    """One non-inplace activation module per call site (spec §0; a recorded structure edit).

    A module called at several sites gets copies (``layer1.0.relu_1``), functional activations
    become modules (``blocks.0.mlp.gelu``), and every site module gets ``inplace=False`` so that
    taps see the pre-activation; where an in-place call's input was read afterwards, the readers
    now read the call's output. Only the modules whose ``forward`` makes such calls are
    rewritten: their ``forward`` is regenerated by torch.fx with every submodule called by
    name, and their class becomes a same-named subclass (``isinstance`` still holds); the rest of
    the model, its classes and its state_dict keys are unchanged (PReLU copies add their weight).
    A model whose sites are already unique comes back equal apart from ``inplace`` flags.
    Deterministic, so ``replay`` rebuilds it on a fresh model. A regenerated ``forward`` freezes
    the Python values it reads (e.g. ``self.heads``) and the arguments with a None/bool/number/str
    default that no caller in the model passes (``mask=None``: passing a mask then raises); the
    model cannot be pickled (sobre never does: reload by rebuilding and replaying the edit log).

    A model that torch.fx cannot trace only gets ``inplace=False`` (logged by :func:`find_sites`).

    Raises:
        ConfigError: A shared activation cannot be split: it is inside a leaf module or a module
            called several times, or the calling ``forward`` cannot be traced on its own or
            depends on ``self.training``; or an in-place activation changes a tensor that is
            read later outside the calling ``forward``.
    """
    traced = _trace_sites(model)
    if traced is None:
        for _, m in model.named_modules():
            if activation_kind(m) is not None:
                _not_inplace(m)
        return model
    by_owner: dict[str, list[_Plan]] = {}
    for plan in traced.plans:
        if plan.escapes:
            raise ConfigError(
                f"uniquify_activations: the in-place activation {plan.site.name} changes a tensor "
                f"that {plan.escapes} reads later outside the forward of "
                f"{plan.site.owner or 'the model'}; a non-inplace activation would change the "
                "output: do not rely on the in-place update there"
            )
        if plan.site.traced:
            by_owner.setdefault(plan.site.owner, []).append(plan)
        elif plan.site.shared:
            raise ConfigError(
                f"uniquify_activations: {plan.site.name} is inside the leaf module "
                f"{plan.site.owner!r}, which is called several times; its activation cannot be "
                "split per call"
            )
    for owner, plans in by_owner.items():
        if all(p.action == "keep" and not p.reroute for p in plans):
            continue
        if traced.calls[owner] > 1:
            raise ConfigError(
                f"uniquify_activations: {owner!r} ({type(model.get_submodule(owner)).__name__}) is "
                f"called {traced.calls[owner]} times, so its activation calls "
                f"({', '.join(p.site.name for p in plans)}) cannot get one module per call; "
                "use one instance of it per call"
            )
        if any(p.action in ("copy", "function") or p.reroute for p in plans):
            _rewrite(model, owner, plans, traced.passed.get(owner) if owner else set())
    for plan in traced.plans:
        if plan.action == "slot":
            parent, _, key = plan.site.name.rpartition(".")
            model.get_submodule(parent)._modules[key] = copy.deepcopy(plan.module)
        _not_inplace(model.get_submodule(plan.site.name))
    return model


class UniquifyActivations:
    """Stage transform for recipes: :func:`uniquify_activations` before the first fit."""

    def apply(self, model: nn.Module) -> nn.Module:
        return uniquify_activations(model)
