"""Masks on weights, output channels and gradients that survive ``state_dict``, deepcopy and DDP.

A weight mask is a :mod:`torch.nn.utils.parametrize` parametrization holding the mask as a buffer,
so it is saved in ``state_dict`` and broadcast by DDP; the parameter itself lives on as
``<module>.parametrizations.<name>.original`` and gets zero gradient where the mask is 0.

State-dict keys (``kind`` is told apart by the buffer name, so :func:`restore_masks` can rebuild
the masks on a fresh model):

- ``<module>.parametrizations.<name>.0.mask``: element-wise mask (``kind="weight"``);
- ``<module>.parametrizations.<name>.0.channel_mask``: 1-D mask over dim 0 (``kind="channel"``);
  it also masks the module's ``bias`` (``<module>.parametrizations.bias.original``), whose
  parametrization reads the weight's buffer at call time and holds no tensor of its own;
- ``<module>.<name>_grad_mask`` / ``<module>.<name>_grad_channel_mask``: gradient masks
  (``target="grad"``), applied by a tensor hook on the parameter.

Masking a weight costs two passes over it per training step (forward and backward). For a
channel mask on an exact ``nn.Linear``/``nn.Conv1d/2d/3d``, a call whose output is smaller than
the weight masks the output instead (same values and gradients, since these layers are linear in
weight and bias); ``module.weight`` read outside ``forward`` is the masked weight either way.
Remove masks with :func:`remove_masks` or :func:`bake`, not with ``parametrize`` directly.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from sobre.core.errors import ConfigError
from sobre.core.registry import check_choice

Kind = Literal["weight", "channel"]
Target = Literal["weight", "grad"]
M = TypeVar("M", bound=nn.Module)

_GRAD_SUFFIX: dict[str, str] = {"weight": "_grad_mask", "channel": "_grad_channel_mask"}
_WEIGHT_KEY = re.compile(
    r"^(?:(?P<module>.+)\.)?parametrizations\.(?P<param>[^.]+)\.0\.(?P<buffer>mask|channel_mask)$"
)
_GRAD_KEY = re.compile(r"^(?:(?P<module>.+)\.)?(?P<param>[^.]+)_grad_(?P<channel>channel_)?mask$")


def _broadcast(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` shaped to multiply ``like``: a 1-D channel mask is spread over dims 1.."""
    if mask.ndim == like.ndim:
        return mask
    return mask.view((-1,) + (1,) * (like.ndim - 1))


class _MaskBase(nn.Module):
    """A weight parametrization ``w * mask`` whose mask is a buffer named :attr:`buffer`."""

    kind: ClassVar[str]
    buffer: ClassVar[str]

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer(self.buffer, mask)

    @property
    def values(self) -> Tensor:
        """The live mask buffer."""
        return self._buffers[self.buffer]  # type: ignore[return-value]

    def forward(self, w: Tensor) -> Tensor:
        return w * _broadcast(self.values, w)


class _WeightMask(_MaskBase):
    """Element-wise mask of the parameter's shape."""

    kind = "weight"
    buffer = "mask"


class _ChannelMask(_MaskBase):
    """1-D mask over dim 0 (output channels or neurons), broadcast over the other dims."""

    kind = "channel"
    buffer = "channel_mask"

    def __init__(self, mask: Tensor) -> None:
        super().__init__(mask)
        self.bypass = False  # True while _OutputChannelMask masks the current call's output

    def forward(self, w: Tensor) -> Tensor:
        return w if self.bypass else w * _broadcast(self.values, w)


class _ChannelBias(nn.Module):
    """Masks a bias with its weight's channel mask, read at call time.

    The source parametrization is stored outside ``_modules`` so the mask is neither registered
    twice nor saved twice (safetensors refuses tensors sharing storage).
    """

    def __init__(self, source: _ChannelMask) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)

    def forward(self, b: Tensor) -> Tensor:
        return b if self.source.bypass else b * self.source.values


_OUTPUT_MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _output_numel(module: nn.Module, x: Tensor) -> int:
    """About how many entries ``module(x)`` has (Linear or ConvNd; padding ignored)."""
    if isinstance(module, nn.Linear):
        return x.numel() // module.in_features * module.out_features
    conv: Any = module
    return x.numel() // conv.in_channels * conv.out_channels // math.prod(conv.stride)


class _OutputChannelMask:
    """Applies a Linear/ConvNd channel mask to the output when the output is the smaller tensor.

    These layers are linear in weight and bias, with output channels on weight dim 0, so masking
    the output gives the same values and gradients as masking weight and bias, for two passes
    over the output instead of two over the weight: far cheaper on small inputs (CIFAR-sized
    ResNets on a CPU). Its forward pre-hook lets the parametrizations pass the raw tensors through
    for that one call; its forward hook (run first, and even when forward raises) masks the output
    and switches them back, so ``module.weight`` read outside forward is always masked.
    """

    def __init__(self, module: nn.Module) -> None:
        self.spatial = len(getattr(module, "kernel_size", ()))
        self.handles = [
            module.register_forward_pre_hook(self),
            module.register_forward_hook(self.after, prepend=True, always_call=True),
        ]

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        plist: Any = module.parametrizations.weight  # type: ignore[union-attr]
        x = args[0] if args and isinstance(args[0], Tensor) else None
        plist[0].bypass = (
            x is not None
            and not parametrize._cache_enabled  # a cached weight must stay the masked one
            and _output_numel(module, x) < plist.original.numel()
        )

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor | None:
        """Mask the output of a call that ran on raw tensors and switch the masking back on."""
        holder: Any = module.parametrizations.weight[0]  # type: ignore[union-attr,index]
        if not holder.bypass:
            return None
        holder.bypass = False
        if output is None:  # forward raised
            return None
        return output * holder.values.view((-1,) + (1,) * self.spatial)

    def remove(self) -> None:
        """Unregister both hooks."""
        for handle in self.handles:
            handle.remove()


def _mask_grad(module: nn.Module, buffer: str, grad: Tensor) -> Tensor:
    return grad * _broadcast(module._buffers[buffer], grad)  # type: ignore[arg-type]


class _GradMaskHook:
    """Forward pre-hook that keeps a gradient-masking tensor hook on the masked parameter(s).

    Tensor hooks are dropped by deepcopy and pickling, module hooks are not: a copy re-installs
    its tensor hooks on its first forward.
    """

    def __init__(self, buffer: str, params: tuple[str, ...]) -> None:
        self.buffer = buffer
        self.params = params
        self._hooked: list[tuple[Tensor, RemovableHandle]] = []

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.install(module)

    def install(self, module: nn.Module) -> None:
        """Register the tensor hooks unless they are already on these exact parameters."""
        params = [raw_param(module, p) for p in self.params]
        if len(params) == len(self._hooked) and all(
            p is q for p, (q, _) in zip(params, self._hooked, strict=True)
        ):
            return
        self.uninstall()
        hook = functools.partial(_mask_grad, module, self.buffer)
        self._hooked = [(p, p.register_hook(hook)) for p in params]

    def uninstall(self) -> None:
        """Remove the tensor hooks."""
        for _, handle in self._hooked:
            handle.remove()
        self._hooked = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_hooked": []}


@dataclass(frozen=True)
class MaskInfo:
    """One attached mask: where it is, what it masks, and the live mask tensor."""

    module: str
    param: str
    target: str
    kind: str
    mask: Tensor = field(repr=False)


def _type(module: nn.Module) -> type[nn.Module]:
    """The module's own class (not the subclass that parametrize injects)."""
    return parametrize.type_before_parametrizations(module)


def _param_names(module: nn.Module) -> list[str]:
    names = list(module._parameters)
    if parametrize.is_parametrized(module):
        names += list(module.parametrizations.keys())  # type: ignore[union-attr,operator]
    return names


def raw_param(module: nn.Module, name: str, required: bool = True) -> Tensor | None:
    """The stored parameter behind ``module.<name>`` (the original when parametrized, e.g.
    masked): what an optimizer holds. ``None`` when absent and not ``required``."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original  # type: ignore[index,union-attr,return-value]
    param = module._parameters.get(name)
    if param is None and required:
        raise ConfigError(
            f"{_type(module).__name__} has no parameter {name!r}; "
            f"pick one of {_param_names(module)}"
        )
    return param


def _own_mask(module: nn.Module, name: str) -> _MaskBase | None:
    if not parametrize.is_parametrized(module, name):
        return None
    first = module.parametrizations[name][0]  # type: ignore[index]
    return first if isinstance(first, _MaskBase) else None


H = TypeVar("H")


def _pre_hooks(module: nn.Module, cls: type[H]) -> Iterator[tuple[int, H]]:
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, cls):
            yield hook_id, hook


def _grad_hook_for(module: nn.Module, name: str) -> _GradMaskHook | None:
    for _, hook in _pre_hooks(module, _GradMaskHook):
        if hook.params[0] == name:
            return hook
    return None


def _kind_of_buffer(buffer: str) -> str:
    return "channel" if buffer.endswith(_GRAD_SUFFIX["channel"]) else "weight"


def _prepare(mask: Tensor | None, param: Tensor, kind: str, where: str) -> Tensor:
    """A fresh mask tensor (never aliasing ``mask``) with the param's device and float dtype."""
    if kind == "channel" and param.ndim == 0:
        raise ConfigError(f"{where} is a scalar; channel masks need a parameter with a dim 0")
    expected = tuple(param.shape) if kind == "weight" else (param.shape[0],)
    dtype = param.dtype if param.is_floating_point() else torch.float32
    if mask is None:
        return torch.ones(expected, dtype=dtype, device=param.device)
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != expected:
        what = "the parameter's shape" if kind == "weight" else "a 1-D mask over dim 0"
        raise ConfigError(
            f"mask for {where} (kind={kind!r}) must have shape {expected} ({what}), "
            f"got {tuple(mask.shape)}"
        )
    return mask.detach().to(device=param.device, dtype=dtype).clone()


def _bias_follows(module: nn.Module, name: str, kind: str, n_channels: int) -> bool:
    """Whether a channel mask on ``name`` also masks the module's bias (same length as dim 0)."""
    if kind != "channel" or name != "weight":
        return False
    if not parametrize.is_parametrized(module, "bias") and module._parameters.get("bias") is None:
        return False
    return tuple(raw_param(module, "bias").shape) == (n_channels,)


def attach_mask(
    module: nn.Module,
    name: str = "weight",
    mask: Tensor | None = None,
    *,
    kind: Kind = "weight",
    target: Target = "weight",
) -> Tensor:
    """Mask parameter ``name`` of ``module`` (or its gradient) and return the live mask buffer.

    Update the returned tensor in place (``mask.copy_(...)``) to change the mask; after moving
    the model to another device or dtype, fetch it again with :func:`get_mask`. Attaching again
    to the same ``(module, name, target)`` copies the new values into the existing mask.

    Args:
        module: The module owning the parameter.
        name: The parameter's name on ``module``.
        mask: Binary or soft (values in [0, 1]) mask; ``None`` means all ones.
        kind: ``"weight"``: the mask has the parameter's shape. ``"channel"``: a 1-D mask over
            dim 0 (output channels/neurons), broadcast over the other dims; when ``name`` is
            ``"weight"`` it also masks the module's bias of the same length.
        target: ``"weight"`` masks the parameter seen by ``forward`` (a parametrization);
            ``"grad"`` leaves it unchanged and multiplies its gradient by the mask.

    Raises:
        ConfigError: Unknown parameter, wrong mask shape, bad ``kind``/``target``, a mask of the
            other kind already attached, or a foreign parametrization already on the tensor.
    """
    check_choice("kind", kind, ("weight", "channel"), "attach_mask")
    check_choice("target", target, ("weight", "grad"), "attach_mask")
    where = f"{_type(module).__name__}.{name}"
    param = raw_param(module, name)
    values = _prepare(mask, param, kind, where)
    if target == "grad":
        return _attach_grad_mask(module, name, values, kind, where)

    existing = _own_mask(module, name)
    if existing is not None:
        if existing.kind != kind:
            raise ConfigError(
                f"{where} already has a {existing.kind} mask; call remove_masks(module) before "
                f"attaching a {kind} mask, or pass kind={existing.kind!r}"
            )
        existing.values.copy_(values)
        return existing.values
    if parametrize.is_parametrized(module, name):
        raise ConfigError(
            f"{where} already has a parametrization; attach masks before any other "
            "parametrization (e.g. weight or spectral norm)"
        )
    follows = _bias_follows(module, name, kind, values.shape[0])
    if follows and parametrize.is_parametrized(module, "bias"):
        raise ConfigError(
            f"{_type(module).__name__}.bias already has a parametrization or mask; a channel mask "
            "on the weight also masks the bias: call remove_masks(module) first"
        )
    holder: _MaskBase = _WeightMask(values) if kind == "weight" else _ChannelMask(values)
    parametrize.register_parametrization(module, name, holder)
    if follows:
        parametrize.register_parametrization(module, "bias", _ChannelBias(holder))  # type: ignore[arg-type]
    if kind == "channel" and name == "weight" and _type(module) in _OUTPUT_MASKABLE:
        _OutputChannelMask(module)
    return holder.values


def _attach_grad_mask(
    module: nn.Module, name: str, values: Tensor, kind: str, where: str
) -> Tensor:
    hook = _grad_hook_for(module, name)
    if hook is not None:
        old_kind = _kind_of_buffer(hook.buffer)
        if old_kind != kind:
            raise ConfigError(
                f"{where} already has a {old_kind} gradient mask; call remove_masks(module) "
                f"before attaching a {kind} one, or pass kind={old_kind!r}"
            )
        buf = module._buffers[hook.buffer]
        buf.copy_(values)  # type: ignore[union-attr]
        return buf  # type: ignore[return-value]
    buffer = f"{name}{_GRAD_SUFFIX[kind]}"
    module.register_buffer(buffer, values)
    params = (name, "bias") if _bias_follows(module, name, kind, values.shape[0]) else (name,)
    hook = _GradMaskHook(buffer, params)
    module.register_forward_pre_hook(hook)
    hook.install(module)
    return values


def get_mask(module: nn.Module, name: str = "weight", target: Target = "weight") -> Tensor | None:
    """The live mask on ``module.<name>`` for ``target``, or ``None`` when there is none."""
    check_choice("target", target, ("weight", "grad"), "get_mask")
    if target == "weight":
        own = _own_mask(module, name)
        return None if own is None else own.values
    hook = _grad_hook_for(module, name)
    return None if hook is None else module._buffers[hook.buffer]


def iter_masks(model: nn.Module) -> Iterator[MaskInfo]:
    """Every mask attached in ``model`` (weight masks, then gradient masks, per module)."""
    for mod_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for pname in module.parametrizations:  # type: ignore[union-attr]
                own = _own_mask(module, pname)
                if own is not None:
                    yield MaskInfo(mod_name, pname, "weight", own.kind, own.values)
        for _, hook in _pre_hooks(module, _GradMaskHook):
            mask = module._buffers[hook.buffer]
            yield MaskInfo(mod_name, hook.params[0], "grad", _kind_of_buffer(hook.buffer), mask)  # type: ignore[arg-type]


def sparsity(model: nn.Module) -> float:
    """Fraction of weight entries masked out (mask == 0) among the weight-masked parameters.

    A channel mask counts every entry of a masked-out channel, bias included. Gradient masks
    do not mask weights and are not counted. Returns 0.0 when nothing is masked.
    """
    total = zeros = 0
    for info in iter_masks(model):
        if info.target != "weight":
            continue
        module = model.get_submodule(info.module)
        masked = [raw_param(module, info.param)]
        if info.kind == "channel" and _bias_follows(
            module, info.param, "channel", info.mask.numel()
        ):
            masked.append(raw_param(module, "bias"))
        off = int((info.mask == 0).sum())
        for p in masked:
            total += p.numel()
            zeros += off * (p.numel() // info.mask.numel())
    return zeros / total if total else 0.0


def _unshare_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` a class of its own before a property is removed from it.

    Deep copies share the class that parametrize injects, and removing a parametrization deletes
    the property from that class, which would break every copy.
    """
    cls = type(module)
    attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, attrs)


def _strip(model: M, *, bake: bool) -> M:
    for module in list(model.modules()):
        for _, output_hook in _pre_hooks(module, _OutputChannelMask):
            output_hook.remove()
        if parametrize.is_parametrized(module):
            for pname in list(module.parametrizations.keys()):  # type: ignore[union-attr]
                plist = module.parametrizations[pname]  # type: ignore[index]
                first = plist[0]
                if not isinstance(first, _MaskBase | _ChannelBias):
                    continue
                if isinstance(first, _ChannelMask):
                    first.bypass = False
                if bake:
                    with torch.no_grad():
                        plist.original.copy_(first(plist.original))
                del plist[0]
                if len(plist) == 0:
                    _unshare_class(module)
                    parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
        for hook_id, hook in _pre_hooks(module, _GradMaskHook):
            hook.uninstall()
            del module._forward_pre_hooks[hook_id]
            del module._buffers[hook.buffer]
    return model


def bake(model: M) -> M:
    """Write ``weight * mask`` into the plain parameters and remove every mask (idempotent).

    Gradient masks are removed too (they never changed the weights). Afterwards the state-dict
    keys are the plain ones (``conv.weight``). Parameters keep their identity, so an existing
    optimizer keeps working. Returns ``model``.
    """
    return _strip(model, bake=True)


def remove_masks(model: M) -> M:
    """Remove every mask without baking: the original (unmasked) weights come back."""
    return _strip(model, bake=False)


def restore_masks(model: M, state_dict: Mapping[str, Tensor]) -> M:
    """Re-attach, on a fresh ``model``, the masks recorded in a masked model's ``state_dict``.

    Afterwards ``model.load_state_dict(state_dict)`` works with ``strict=True``. Keys the model
    already has (its own buffers) are left alone. Returns ``model``.

    Raises:
        ConfigError: The state dict masks a module or parameter the model does not have.
    """
    own_keys = set(model.state_dict())
    for key, value in state_dict.items():
        if key in own_keys:
            continue
        if m := _WEIGHT_KEY.match(key):
            kind: Kind = "channel" if m["buffer"] == "channel_mask" else "weight"
            target: Target = "weight"
        elif m := _GRAD_KEY.match(key):
            kind, target = ("channel" if m["channel"] else "weight"), "grad"
        else:
            continue
        mod_name = m["module"] or ""
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            raise ConfigError(
                f"state_dict key {key!r} masks module {mod_name!r}, which {type(model).__name__} "
                "does not have; build the same architecture as the model that was saved"
            ) from None
        attach_mask(module, m["param"], value, kind=kind, target=target)
    return model
