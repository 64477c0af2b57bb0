"""Neuron masks and an optimizer wrapper that keeps frozen neurons bit-identical.

A :class:`NeuronMask` says, per layer, which channels train (``True``) and which are frozen
(``False``): output channels (``dim="out"``: NEq, SCoTTi, the budgeted selection) or input
channels (``dim="in"``: TraDy, MeDyate). :class:`MaskedOptimizer` wraps any torch optimizer and
puts the frozen entries back after every ``step()``.

Why restore instead of masking the gradient (``sobre.core.masks.attach_mask(..., target="grad")``):
a zero gradient does not freeze a weight, since weight decay and momentum or Adam state still move
it. NEq's ``MaskedSGD`` zeroes the *update* after weight decay and after momentum; restoring the
saved entries after the step has the same effect for any optimizer, and is exact (bit for bit).

**What a channel covers** (the convention of :meth:`NeuronMask.count_params` and the optimizer):

- ``dim="out"``, Conv/Linear: weight row ``c`` (``weight[c]``) and bias entry ``c``; with a paired
  norm (``norms={"conv": "bn"}``), also that norm's affine entries ``c`` (``weight[c]``,
  ``bias[c]``). A BatchNorm/GroupNorm/LayerNorm may also be a layer of its own (NEq counts
  Conv2d and BatchNorm2d neurons separately): its channel ``c`` covers its affine entries ``c``
  (for LayerNorm, index ``c`` of ``normalized_shape[0]``).
- ``dim="in"``, Conv/Linear: weight column ``c`` (``weight[:, c]``; for a grouped conv, the
  column of channel ``c`` in the rows of its group). The bias has no input channel: ``in_bias=
  "freeze"`` (default) freezes it, ``"train"`` trains it whole in every masked layer.

Running statistics of BatchNorm are buffers, not parameters: in train mode they keep updating for
frozen channels, as in NEq.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.optim import Optimizer

from sobre.core.errors import ConfigError
from sobre.core.masks import raw_param
from sobre.core.registry import check_choice, suggest
from sobre.core.taps import Selector, resolve_modules

Dim = Literal["out", "in"]
InBias = Literal["freeze", "train"]

CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS: tuple[type[nn.Module], ...] = (*CONVS, nn.Linear)
"""Layers a mask may key in either ``dim`` (the default selection of ``from_model``)."""
NORMS: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)
"""Norms: keyed layers of their own (``dim="out"`` only) or paired with the layer they follow."""


def _width(module: nn.Module, dim: Dim) -> int:
    """Number of channels of ``module`` along ``dim``."""
    if isinstance(module, nn.Linear):
        return module.out_features if dim == "out" else module.in_features
    if isinstance(module, CONVS):
        conv: Any = module
        return int(conv.out_channels if dim == "out" else conv.in_channels)
    if isinstance(module, _BatchNorm):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    raise ConfigError(f"{type(module).__name__} has no channels a NeuronMask understands")


def _type_name(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


def _as_bool(name: str, values: Tensor | Sequence[bool]) -> Tensor:
    t = torch.as_tensor(values).detach().cpu()
    if t.ndim != 1:
        raise ConfigError(
            f"mask for layer {name!r} must be 1-D (one entry per channel), got shape "
            f"{tuple(t.shape)}"
        )
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ConfigError(
                f"mask for layer {name!r} must be boolean (True = trainable), got values "
                f"other than 0 and 1"
            )
        t = t != 0
    return t.clone()


_Slot = Literal["rows", "cols", "grouped", "frozen", "trained"]


@dataclass(frozen=True)
class _Part:
    """One parameter covered by a layer's mask and how channels map onto it."""

    where: str  # dotted name, for messages
    module: nn.Module
    param: Tensor
    slot: _Slot  # rows: dim 0; cols: dim 1; grouped: a grouped conv's input; frozen/trained: whole


def _group_index(module: nn.Module, channels: Tensor) -> tuple[Tensor, Tensor]:
    """Weight ``(rows, cols)`` of input ``channels`` in a grouped conv (each group's rows)."""
    conv: Any = module
    per_group_in = conv.in_channels // conv.groups
    per_group_out = conv.out_channels // conv.groups
    group, col = channels // per_group_in, channels % per_group_in
    rows = group[:, None] * per_group_out + torch.arange(per_group_out)
    return rows.reshape(-1), col.repeat_interleave(per_group_out)


class NeuronMask(Mapping[str, Tensor]):
    """Per-layer boolean masks over channels: ``True`` trains the channel, ``False`` freezes it.

    A read-only mapping from module name to a 1-D CPU bool tensor; build a new mask (e.g. with
    :meth:`replace`) instead of editing the tensors in place. The model is not stored:
    :meth:`check`, :meth:`count_params` and :class:`MaskedOptimizer` take it.

    Args:
        masks: Module name -> one boolean (or 0/1) entry per channel.
        dim: ``"out"``: output channels (NEq); ``"in"``: input channels (TraDy, MeDyate).
        norms: Layer name -> name of the norm that follows it; the norm's affine entries follow
            the layer's output channels (``dim="out"`` only).
        in_bias: For ``dim="in"``: ``"freeze"`` or ``"train"`` the biases of masked layers.

    Raises:
        ConfigError: A mask that is not 1-D boolean, a bad ``dim``/``in_bias``, norms with
            ``dim="in"``, a norm paired twice or both paired and masked on its own.
    """

    def __init__(
        self,
        masks: Mapping[str, Tensor | Sequence[bool]],
        *,
        dim: Dim = "out",
        norms: Mapping[str, str] | None = None,
        in_bias: InBias = "freeze",
    ) -> None:
        check_choice("dim", dim, ("out", "in"), "NeuronMask")
        check_choice("in_bias", in_bias, ("freeze", "train"), "NeuronMask")
        norms = dict(norms or {})
        if norms and dim == "in":
            raise ConfigError(
                "norms follow output channels: pair norms only with dim='out' (an input-channel "
                "mask leaves the norms that follow a layer alone)"
            )
        for layer, norm in norms.items():
            if layer not in masks:
                raise ConfigError(
                    f"norms pairs {norm!r} with layer {layer!r}, which the mask does not "
                    f"hold{suggest(layer, list(masks))}"
                )
            if norm in masks:
                raise ConfigError(
                    f"norm {norm!r} is both a masked layer and paired with {layer!r}: keep one"
                )
        if len(set(norms.values())) != len(norms):
            raise ConfigError(f"a norm is paired with several layers in norms={norms}")
        self.dim: Dim = dim
        self.in_bias: InBias = in_bias
        self.norms: dict[str, str] = norms
        self._masks = {str(name): _as_bool(str(name), v) for name, v in masks.items()}

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        select: Selector | Sequence[Selector] = LAYERS,
        *,
        dim: Dim = "out",
        norms: bool | Mapping[str, str] = False,
        in_bias: InBias = "freeze",
        trainable: bool = True,
    ) -> NeuronMask:
        """A mask over the selected layers of ``model``, every channel ``trainable``.

        Args:
            model: The model.
            select: Module names, globs or types (:func:`sobre.core.taps.resolve_modules`); the
                matched Conv1d/2d/3d, Linear (and, for ``dim="out"``, norm) modules are kept.
            dim: Output or input channels.
            norms: ``True`` pairs each Conv with the BatchNorm, GroupNorm or LayerNorm registered
                right after it, and each Linear with a following BatchNorm1d, when the widths
                match (the conv-BN layout of ResNets and MobileNets; a Linear is not paired with
                a LayerNorm, which in pre-norm transformers belongs to the next block). A dict
                gives the pairs explicitly. Paired norms are not keyed on their own.
            in_bias: See the class.
            trainable: Initial value of every entry.

        Raises:
            ConfigError: Nothing maskable selected, or a selector that matches nothing.
        """
        keyable = LAYERS if dim == "in" else (*LAYERS, *NORMS)
        chosen = [(n, m) for n, m in resolve_modules(model, select) if isinstance(m, keyable)]
        if not chosen:
            raise ConfigError(
                f"select={select!r} picks no maskable module of {type(model).__name__}; "
                f"NeuronMask(dim={dim!r}) masks {', '.join(t.__name__ for t in keyable)}"
            )
        if norms is not False and dim == "in":
            raise ConfigError(
                "norms follow output channels: use norms=False with dim='in' (an input-channel "
                "mask leaves the norms that follow a layer alone)"
            )
        if norms is True:
            pairs = _follower_norms(model, [(n, m) for n, m in chosen if isinstance(m, LAYERS)])
        else:
            pairs = dict(norms or {})
        paired = set(pairs.values())
        masks = {
            n: torch.full((_width(m, dim),), trainable, dtype=torch.bool)
            for n, m in chosen
            if n not in paired
        }
        mask = cls(masks, dim=dim, norms=pairs, in_bias=in_bias)
        mask.check(model)
        return mask

    # -- mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._masks[name]
        except KeyError:
            raise ConfigError(
                f"the mask has no layer {name!r}{suggest(name, list(self._masks))}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NeuronMask) and self.state_dict() == other.state_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        on = sum(int(m.sum()) for m in self._masks.values())
        total = sum(m.numel() for m in self._masks.values())
        return (
            f"NeuronMask(dim={self.dim!r}, layers={len(self)}, trainable={on}/{total}, "
            f"norms={len(self.norms)})"
        )

    def replace(self, masks: Mapping[str, Tensor | Sequence[bool]]) -> NeuronMask:
        """A mask with these channel masks and the same ``dim``, ``in_bias`` and norm pairs
        (pairs of layers absent from ``masks`` are dropped), e.g. a selector's choice."""
        norms = {k: v for k, v in self.norms.items() if k in masks}
        return NeuronMask(masks, dim=self.dim, norms=norms, in_bias=self.in_bias)

    # -- counts ----------------------------------------------------------------------------
    def trainable_fraction(self) -> float:
        """Fraction of masked channels that train (1.0 when the mask holds no channel)."""
        total = sum(m.numel() for m in self._masks.values())
        on = sum(int(m.sum()) for m in self._masks.values())
        return on / total if total else 1.0

    def channel_params(self, model: nn.Module) -> dict[str, Tensor]:
        """Per layer, the parameters each channel covers (int64, one entry per channel).

        This is the cost table of a parameter :class:`~sobre.efficient.select.Budget`; biases
        trained whole under ``in_bias="train"`` are not per channel and not included.
        """
        out = {}
        for name, mask in self._masks.items():
            per = sum(
                p.param.numel() // mask.numel()
                for p in self._parts(model, name)
                if p.slot in ("rows", "cols", "grouped")
            )
            out[name] = torch.full((mask.numel(),), per, dtype=torch.int64)
        return out

    def count_params(self, model: nn.Module) -> int:
        """Parameters the mask leaves trainable, by the convention of the module docstring."""
        total = 0
        for name, per in self.channel_params(model).items():
            total += int(per[self._masks[name]].sum())
            total += sum(p.param.numel() for p in self._parts(model, name) if p.slot == "trained")
        return total

    # -- checks ----------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise :class:`ConfigError` unless every layer and norm exists with matching widths."""
        for name in self._masks:
            self._parts(model, name)

    def _module(self, model: nn.Module, name: str, role: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            known = [n for n, m in model.named_modules() if isinstance(m, (*LAYERS, *NORMS))]
            raise ConfigError(
                f"NeuronMask {role} {name!r} is not a module of {type(model).__name__}"
                f"{suggest(name, known)}"
            ) from None

    def _parts(self, model: nn.Module, name: str) -> list[_Part]:
        """The parameters layer ``name`` covers, after checking type and widths."""
        mask = self._masks[name]
        module = self._module(model, name, "layer")
        keyable = LAYERS if self.dim == "in" else (*LAYERS, *NORMS)
        if not isinstance(module, keyable):
            raise ConfigError(
                f"NeuronMask(dim={self.dim!r}) layer {name!r} is a {_type_name(module)}; it "
                f"masks {', '.join(t.__name__ for t in keyable)}"
            )
        width = _width(module, self.dim)
        if mask.numel() != width:
            raise ConfigError(
                f"mask for layer {name!r} has {mask.numel()} entries but {_type_name(module)} "
                f"{name!r} has {width} {self.dim}put channels; rebuild the mask for this model"
            )
        parts = _own_parts(name, module, self.dim, self.in_bias)
        norm_name = self.norms.get(name)
        if norm_name is not None:
            norm = self._module(model, norm_name, "norm")
            if not isinstance(norm, NORMS):
                raise ConfigError(
                    f"norms pairs {norm_name!r} with {name!r}, but it is a {_type_name(norm)}; "
                    "pair BatchNorm, GroupNorm or LayerNorm modules"
                )
            if _width(norm, "out") != width:
                raise ConfigError(
                    f"norm {norm_name!r} paired with {name!r} has {_width(norm, 'out')} "
                    f"channels but the layer has {width} output channels"
                )
            parts += _own_parts(norm_name, norm, "out", self.in_bias)
        return parts

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: masks as ``"0"``/``"1"`` strings, one character per channel."""
        return {
            "dim": self.dim,
            "in_bias": self.in_bias,
            "norms": dict(self.norms),
            "masks": {n: "".join("1" if b else "0" for b in m.tolist()) for n, m in self.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this mask's contents with a :meth:`state_dict`."""
        unknown = set(state) - {"dim", "in_bias", "norms", "masks"}
        if unknown or "masks" not in state:
            raise ConfigError(
                f"not a NeuronMask state: expected keys dim, in_bias, norms, masks; got "
                f"{sorted(state)}"
            )
        masks = {}
        for name, bits in state["masks"].items():
            if not isinstance(bits, str) or set(bits) - {"0", "1"}:
                raise ConfigError(f"mask for layer {name!r} must be a string of 0 and 1")
            masks[name] = torch.tensor([b == "1" for b in bits], dtype=torch.bool)
        new = NeuronMask(
            masks,
            dim=state.get("dim", "out"),
            norms=state.get("norms"),
            in_bias=state.get("in_bias", "freeze"),
        )
        self.__dict__.update(new.__dict__)


def _own_parts(name: str, module: nn.Module, dim: Dim, in_bias: InBias) -> list[_Part]:
    """The parameters of one module that its channel mask covers, with their slot."""
    parts = []
    weight = raw_param(module, "weight", required=False)
    bias = raw_param(module, "bias", required=False)
    grouped = getattr(module, "groups", 1) > 1
    if weight is not None:
        slot: _Slot = "rows" if dim == "out" else ("grouped" if grouped else "cols")
        parts.append(_Part(f"{name}.weight" if name else "weight", module, weight, slot))
    if bias is not None:
        bias_slot: _Slot = (
            "rows" if dim == "out" else ("frozen" if in_bias == "freeze" else "trained")
        )
        parts.append(_Part(f"{name}.bias" if name else "bias", module, bias, bias_slot))
    return parts


def _follower_norms(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Each layer's norm: the next module registered after it, when it is a matching norm."""
    named = list(model.named_modules())
    index = {n: i for i, (n, _) in enumerate(named)}
    pairs = {}
    for name, layer in layers:
        later = (item for item in named[index[name] + 1 :] if not item[0].startswith(name + "."))
        nxt = next(later, None) if name else None  # the root module has nothing after it
        if nxt is None:
            continue
        norm_name, norm = nxt
        follows = (
            isinstance(norm, NORMS)
            if isinstance(layer, CONVS)
            else isinstance(norm, nn.BatchNorm1d)
        )
        if follows and _width(norm, "out") == _width(layer, "out"):
            pairs[name] = norm_name
    return pairs


@dataclass(frozen=True)
class _Restore:
    """Entries of one parameter to put back after a step (``index=None``: all of them)."""

    param: Tensor
    index: tuple[Tensor | slice, ...] | None


def _restore(part: _Part, mask: Tensor) -> _Restore | None:
    """What to put back in ``part`` after each step (``None``: nothing is frozen there)."""
    if part.slot == "trained":
        return None
    if part.slot == "frozen":
        return _Restore(part.param, None)
    off = (~mask).nonzero().flatten()
    if off.numel() == 0:
        return None
    if part.slot == "rows":
        index: tuple[Tensor | slice, ...] = (off,)
    elif part.slot == "cols":
        index = (slice(None), off)
    else:
        index = _group_index(part.module, off)
    device = part.param.device
    return _Restore(part.param, tuple(i.to(device) if isinstance(i, Tensor) else i for i in index))


class MaskedOptimizer(Optimizer):
    """Wraps any torch optimizer so that the channels a :class:`NeuronMask` freezes never move.

    ``step()`` saves the frozen entries (weight rows or columns, bias entries, paired-norm affine
    entries), runs the wrapped optimizer, and writes them back: after the step they are
    bit-identical to before it, whatever momentum, Adam moments or (decoupled) weight decay did.
    Trainable entries get exactly the wrapped optimizer's update.

    Optimizer state of frozen entries *does advance*: the wrapped optimizer is not modified, so
    momentum buffers, Adam moments and step counts see the frozen rows' gradients as usual; a
    channel that trains again resumes from that state. (NEq's ``MaskedSGD`` zeroes the update
    after weight decay, so its frozen momentum decays instead; the weights stay put either way.)
    Optimizers that call the closure several times per step (LBFGS) see frozen entries move within
    the step; they are restored after it.

    ``param_groups``, ``state``, ``defaults``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` are the wrapped optimizer's (the masks are not in the state dict: save
    :meth:`NeuronMask.state_dict` with the method that made them). It is an ``Optimizer``, so LR
    schedulers and Lightning's ``configure_optimizers`` accept it.

    Args:
        base: The optimizer to wrap; it must hold every parameter the masks cover.
        masks: Which channels train.
        model: The model the masks name.

    Raises:
        ConfigError: The masks do not fit the model (see :meth:`NeuronMask.check`), the optimizer
            lacks a covered parameter, or it updates a parameter of a masked layer that the mask
            does not cover (e.g. an extra parameter of a custom layer).
    """

    def __init__(self, base: Optimizer, masks: NeuronMask, model: nn.Module) -> None:
        # Optimizer's hook registries and step profiling, without re-registering the parameters.
        Optimizer.__setstate__(self, {"optimizer": base, "model": model})
        self.optimizer = base
        self.model = model
        self.set_masks(masks)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def masks(self) -> NeuronMask:
        """The masks in force (change them with :meth:`set_masks`)."""
        return self._masks

    def set_masks(self, masks: NeuronMask) -> None:
        """Use ``masks`` from the next step on (checked against the model and the optimizer)."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        plan: list[_Restore] = []
        owner: dict[int, str] = {}
        for name, mask in masks.items():
            parts = masks._parts(self.model, name)
            covered = {id(p.param) for p in parts}
            for part in parts:
                if id(part.param) not in held:
                    raise ConfigError(
                        f"the optimizer does not hold {part.where!r}, which the mask of layer "
                        f"{name!r} covers; build the optimizer over every parameter of the "
                        f"masked layers (e.g. model.parameters()) or drop {name!r} from the mask"
                    )
                if id(part.param) in owner:
                    raise ConfigError(
                        f"{part.where!r} is shared by masked layers {owner[id(part.param)]!r} "
                        f"and {name!r}; mask only one of them"
                    )
                owner[id(part.param)] = name
                restore = _restore(part, mask)
                if restore is not None:
                    plan.append(restore)
            for mod_name in (name, masks.norms.get(name)):
                if mod_name is None:
                    continue
                for pname, p in self.model.get_submodule(mod_name).named_parameters():
                    if id(p) in held and id(p) not in covered:
                        raise ConfigError(
                            f"the optimizer updates {mod_name}.{pname}, a parameter of masked "
                            f"layer {name!r} that the mask does not cover (it covers weight, "
                            "bias and paired-norm affine entries); leave it out of the "
                            f"optimizer or drop {name!r} from the mask"
                        )
        self._masks = masks
        self._plan = plan

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def snapshot(self) -> list[tuple[_Restore, tuple[Tensor | slice, ...] | None, Tensor]]:
        """Copies of the frozen entries, for :meth:`restore` after a step taken elsewhere (a
        Lightning callback snapshots before the trainer's step and restores after it)."""
        saved: list[tuple[_Restore, tuple[Tensor | slice, ...] | None, Tensor]] = []
        with torch.no_grad():
            for r in self._plan:
                if r.index is None:
                    saved.append((r, None, r.param.clone()))
                else:
                    index = tuple(
                        i.to(r.param.device) if isinstance(i, Tensor) else i for i in r.index
                    )
                    saved.append((r, index, r.param[index]))
        return saved

    @staticmethod
    def restore(saved: list[tuple[_Restore, tuple[Tensor | slice, ...] | None, Tensor]]) -> None:
        """Write a :meth:`snapshot` back: the frozen entries are bit-identical to it again."""
        with torch.no_grad():
            for r, index, values in saved:
                if index is None:
                    r.param.copy_(values)
                else:
                    r.param[index] = values

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One step of the wrapped optimizer, frozen entries restored afterwards."""
        saved = self.snapshot()
        loss = self.optimizer.step(closure)
        self.restore(saved)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the wrapped optimizer's state dict."""
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"MaskedOptimizer({self.optimizer!r}, {self._masks!r})"
