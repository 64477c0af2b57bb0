"""What a model costs: parameters, FLOPs, latency, saved-activation and peak memory, depth.

Every function runs the model on ``inputs`` (a tensor, or a tuple of ``forward``'s positional
arguments) and leaves it as it found it: per-module training flags and buffers are restored, the
RNG is forked around training-mode runs, and every parameter's ``.grad`` is given back untouched
(backward passes write into fresh tensors that are then dropped). :func:`measure` bundles all of
them into a :class:`Measurement`.

Fused inference fast paths (``nn.TransformerEncoderLayer``/``nn.MultiheadAttention`` in eval mode)
hide their matmuls and activations inside one opaque op, so FLOP counting and :func:`depth` run with
a pass-through torch-function mode that switches them off; :func:`latency_ms` keeps them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.overrides import BaseTorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from sobre.core.errors import ConfigError, UnknownNameError
from sobre.core.registry import suggest

__all__ = [
    "DEFAULT_NONLINEAR",
    "SOFTMAX_OPS",
    "BackwardFlops",
    "Measurement",
    "SavedBytes",
    "backward_flops",
    "count_params",
    "depth",
    "flops",
    "latency_ms",
    "measure",
    "model_device",
    "peak_memory_bytes",
    "saved_activation_bytes",
]

#: aten ops (overload-packet names, in-place ``_`` suffix dropped) that :func:`depth` counts as one
#: non-linear site. ``F.relu6`` dispatches to ``hardtanh``, ``F.selu`` to ``elu``, ``F.prelu`` to
#: ``_prelu_kernel`` and ``F.logsigmoid`` to ``log_sigmoid_forward``.
DEFAULT_NONLINEAR: frozenset[str] = frozenset(
    {
        "relu",
        "gelu",
        "silu",
        "sigmoid",
        "tanh",
        "hardtanh",
        "hardswish",
        "hardsigmoid",
        "leaky_relu",
        "elu",
        "celu",
        "mish",
        "threshold",
        "softplus",
        "_prelu_kernel",
        "rrelu_with_noise",
        "glu",
        "log_sigmoid_forward",
        "hardshrink",
        "softshrink",
    }
)

#: Softmax-like ops, not counted by default (softmax normalises, it is not an activation layer);
#: pass ``nonlinear=DEFAULT_NONLINEAR | SOFTMAX_OPS`` to count them. Fused attention kernels are
#: listed because they hide their softmax.
SOFTMAX_OPS: frozenset[str] = frozenset(
    {
        "_softmax",
        "_safe_softmax",
        "_log_softmax",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    }
)

# Ops that read their tensor argument only for its shape/dtype/device: outputs carry no data path.
_METADATA_ONLY_PREFIX = "new_"
_METADATA_ONLY_SUFFIX = "_like"


# FlopCounterMode has formulas for the CUDA attention kernels only; the CPU kernel takes the same
# leading (grad_out,) query, key, value arguments, so torch's own (unwrapped) formulas apply to it.
_CPU_ATTENTION_FLOPS: dict[Any, Any] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        flop_counter.sdpa_backward_flop.__wrapped__
    ),
}


class SavedBytes(NamedTuple):
    """Bytes of the unique storages autograd saves for backward during one training forward.

    Attributes:
        activations: storages that are not parameters or buffers of the model (inputs, layer
            outputs, and tensors computed from parameters alone, e.g. a masked weight).
        parameters: storages of the model's parameters and buffers that backward needs.
    """

    activations: int
    parameters: int


def _as_args(inputs: Tensor | tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    """``inputs`` as the positional arguments of ``model.forward``."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, tuple | list):
        return tuple(inputs)
    raise ConfigError(
        f"inputs must be a Tensor or a tuple of forward()'s positional arguments, got "
        f"{type(inputs).__name__}; wrap several arguments in a tuple, e.g. (x, mask)"
    )


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors among the leaves of a (nested) tuple/list/dict."""
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without any)."""
    return _device(model, ())


def _device(model: nn.Module, args: tuple[Any, ...]) -> torch.device:
    """The device of the model's first parameter or buffer, else of the first input tensor."""
    for t in chain(model.parameters(), model.buffers(), _tensors(args)):
        return t.device
    return torch.device("cpu")


@contextmanager
def _preserved(model: nn.Module, args: tuple[Any, ...], *, train: bool) -> Iterator[None]:
    """Put ``model`` in train/eval mode, then restore every module's flag (and, for a training run,
    the buffers, e.g. batch-norm statistics, and the CPU/CUDA RNG states)."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(b, b.detach().to("cpu", copy=True)) for b in model.buffers()] if train else []
    cuda = {
        t.device.index or 0
        for t in (*model.parameters(), *model.buffers(), *_tensors(args))
        if t.device.type == "cuda"
    }
    try:
        model.train(train)
        with torch.random.fork_rng(devices=sorted(cuda), enabled=train, device_type="cuda"):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, mode in modes:
            module.training = mode


def _train_step(model: nn.Module, args: tuple[Any, ...]) -> None:
    """One forward and a backward into every trainable parameter (not into the inputs).

    The gradients land in fresh ``.grad`` tensors that are then dropped: each parameter gets its
    previous ``.grad`` object back, untouched. (:func:`torch.autograd.grad` would avoid ``.grad``
    altogether but fails under FlopCounterMode's module hooks when a weight is parametrized.)
    """
    with torch.enable_grad():
        outputs = [t for t in _tensors(model(*args)) if t.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        if not outputs or not params:
            raise ConfigError(
                f"{type(model).__name__} has no trainable parameter behind its output, so a "
                "training step computes nothing; unfreeze a parameter or pass train_step=False"
            )
        grads = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            torch.autograd.backward(
                outputs, grad_tensors=[torch.ones_like(t) for t in outputs], inputs=params
            )
        finally:
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad


def count_params(model: nn.Module) -> tuple[int, int]:
    """Total parameters and non-zero entries of the effective weights.

    A weight parametrized with :mod:`torch.nn.utils.parametrize` (e.g. masked) counts once, as the
    tensor the module computes with (``module.weight``); its ``original`` and the parametrization's
    own tensors (mask buffers, mask scores) are not counted. Shared/tied parameters count once.

    Args:
        model: any module.

    Returns:
        ``(total, nonzero)``.
    """
    inner = {
        id(sub)
        for module in model.modules()
        if isinstance(module, parametrize.ParametrizationList)
        for sub in module.modules()
    }
    outer = [module for module in model.modules() if id(module) not in inner]
    seen: set[int] = set()
    total = nonzero = 0
    with torch.no_grad():
        # Parametrized tensors first, so a tied parameter is counted in its effective form.
        for module in outer:
            if not parametrize.is_parametrized(module):
                continue
            for name, plist in module.parametrizations.items():
                originals = {id(p) for p in plist.parameters(recurse=False)}
                if not originals or originals & seen:  # a parametrized buffer, or tied and counted
                    continue
                seen |= originals
                weight = getattr(module, name)
                total += weight.numel()
                nonzero += int(torch.count_nonzero(weight))
        for module in outer:
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
                    nonzero += int(torch.count_nonzero(p))
    return total, nonzero


def flops(model: nn.Module, inputs: Tensor | tuple[Any, ...], *, train_step: bool = False) -> int:
    """FLOPs of one forward in eval mode, or of a training forward+backward, as counted by
    :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; biases,
    norms and activations are not counted). MACs are ``flops // 2``.

    The backward computes every trainable parameter's gradient but no input's, so a stack of
    linear layers costs ``3x`` its forward minus the first layer's input gradient. FlopCounterMode
    only knows the CUDA attention kernels; the CPU one is counted with the same torch formulas.

    Args:
        model: the model.
        inputs: a tensor or a tuple of ``forward``'s positional arguments.
        train_step: count forward+backward (in training mode) instead of one eval forward.

    Returns:
        The FLOP count.
    """
    args = _as_args(inputs)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    if train_step:
        with _preserved(model, args, train=True), counter:
            _train_step(model, args)
    else:
        with (
            _preserved(model, args, train=False),
            torch.no_grad(),
            BaseTorchFunctionMode(),
            counter,
        ):
            model(*args)
    return counter.get_total_flops()


class BackwardFlops(NamedTuple):
    """Analytic FLOPs of the convolutions and linear layers in one training step.

    Attributes:
        forward: FLOPs of the forward.
        grad_input: FLOPs of the input gradients (1x a layer's forward, when its input needs one).
        grad_weight: FLOPs of the weight gradients (1x a layer's forward times the fraction of
            its weight that is updated).
    """

    forward: int
    grad_input: int
    grad_weight: int

    @property
    def backward(self) -> int:
        """``grad_input + grad_weight``."""
        return self.grad_input + self.grad_weight

    @property
    def step(self) -> int:
        """``forward + backward``."""
        return self.forward + self.backward


def _layer_flops(module: nn.Module, x: Tensor, out: Tensor) -> int:
    """Forward FLOPs of one Conv/Linear call, as :class:`FlopCounterMode` counts them."""
    if isinstance(module, nn.Linear):
        return 2 * x.numel() * module.out_features
    conv: Any = module
    kernel = math.prod(conv.kernel_size)
    if conv.transposed:
        return 2 * x.numel() * conv.out_channels // conv.groups * kernel
    return 2 * out.numel() * conv.in_channels // conv.groups * kernel


def _update_fraction(name: str, module: nn.Module, value: float | Tensor) -> float:
    """The updated fraction of ``module``'s weight from a float or a mask over output channels."""
    if isinstance(value, Tensor):
        rows = module.weight.shape[0]
        if value.dtype != torch.bool or value.shape != (rows,):
            raise ConfigError(
                f"backward_flops: the mask of {name!r} must be a bool tensor of shape ({rows},) "
                f"over its output channels, got {value.dtype} {tuple(value.shape)}; or pass the "
                "updated fraction of its weight as a float"
            )
        return float(value.float().mean())
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(
            f"backward_flops: the updated fraction of {name!r} must lie in [0, 1], got {value}"
        )
    return float(value)


def backward_flops(
    model: nn.Module,
    inputs: Tensor | tuple[Any, ...],
    trainable: Mapping[str, float | Tensor] | None = None,
) -> BackwardFlops:
    """Analytic FLOPs of one training step of every Conv (1d/2d/3d, transposed) and Linear.

    Per call of such a layer: the forward as :class:`~torch.utils.flop_counter.FlopCounterMode`
    counts it; the input gradient costs the forward again when the layer's input requires grad
    (not for the first layer, nor above a frozen prefix); the weight gradient costs the forward
    times the updated fraction of the weight. This is the *counted* saving of a frozen neuron;
    it becomes time only if the backward really skips the work (spec §0). With nothing frozen
    it equals :func:`flops` with ``train_step=True`` for models whose matmuls are all in such
    layers and whose convs are not grouped (FlopCounterMode's weight-gradient formula ignores
    ``groups`` and counts a grouped conv's ``groups`` times too high; this count does not);
    other matmuls (attention) are not counted.

    Args:
        model: the model; one training-mode forward is run (state restored, no backward).
        inputs: a tensor or a tuple of ``forward``'s positional arguments.
        trainable: layer name -> the updated part of its weight: a bool mask over output
            channels (True = updated), or the updated fraction in [0, 1]. Layers not named
            count as fully updated when ``weight.requires_grad``, else not at all.

    Returns:
        The :class:`BackwardFlops`.

    Raises:
        UnknownNameError: a name in ``trainable`` is not a Conv/Linear of the model.
        ConfigError: a mask of the wrong shape or dtype, or a fraction outside [0, 1].
    """
    args = _as_args(inputs)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | _ConvNd)}
    trainable = dict(trainable or {})
    for name in trainable:
        if name not in layers:
            raise UnknownNameError(
                f"backward_flops: {name!r} is not a Conv or Linear layer of "
                f"{type(model).__name__}{suggest(name, list(layers))}"
            )
    fractions = {
        name: _update_fraction(name, m, trainable[name])
        if name in trainable
        else float(m.weight.requires_grad)
        for name, m in layers.items()
    }
    totals = [0, 0, 0]

    def hook(name: str) -> Any:
        def record(module: nn.Module, x: tuple[Any, ...], out: Tensor) -> None:
            forward = _layer_flops(module, x[0], out)
            totals[0] += forward
            totals[1] += forward if x[0].requires_grad else 0
            totals[2] += round(forward * fractions[name])

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with _preserved(model, args, train=True), torch.enable_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return BackwardFlops(*totals)


def latency_ms(
    model: nn.Module, inputs: Tensor | tuple[Any, ...], *, runs: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one eval-mode, no-grad forward, in milliseconds.

    Each run is one :meth:`torch.utils.benchmark.Timer.timeit` call (which synchronises the
    accelerator around the call) with the process's current number of threads.

    Args:
        model: the model.
        inputs: a tensor or a tuple of ``forward``'s positional arguments.
        runs: timed forwards; the median is returned.
        warmup: untimed forwards first (allocator, cuDNN autotuning, lazy init).

    Returns:
        The median latency in ms.
    """
    if runs < 1 or warmup < 0:
        raise ConfigError(f"latency needs runs >= 1 and warmup >= 0, got {runs=}, {warmup=}")
    # Imported here: importing torch.utils.benchmark logs a CUDA_HOME warning on CPU-only hosts.
    from torch.utils.benchmark import Timer

    args = _as_args(inputs)
    timer = Timer(
        stmt="model(*args)",
        globals={"model": model, "args": args},
        num_threads=torch.get_num_threads(),
    )
    with _preserved(model, args, train=False), torch.no_grad():
        for _ in range(warmup):
            model(*args)
        samples = [timer.timeit(number=1).median for _ in range(runs)]
    return statistics.median(samples) * 1e3


def saved_activation_bytes(model: nn.Module, inputs: Tensor | tuple[Any, ...]) -> SavedBytes:
    """Bytes autograd keeps for backward after one training-mode forward.

    Every tensor saved for backward is recorded by a
    :func:`torch.autograd.graph.saved_tensors_hooks` pack hook; storages are counted once however
    many views of them are saved (a ReLU output saved by the ReLU and by the next layer counts
    once), and split into activations and the model's own parameters/buffers. No backward is run.

    Args:
        model: the model.
        inputs: a tensor or a tuple of ``forward``'s positional arguments.

    Returns:
        The activation and parameter bytes.
    """
    args = _as_args(inputs)

    def key(t: Tensor) -> tuple[torch.device, int]:
        return t.device, t.untyped_storage().data_ptr()

    state = {key(t) for t in (*model.parameters(), *model.buffers())}
    sizes: dict[tuple[torch.device, int], int] = {}
    alive: list[Tensor] = []  # keeps saved storages alive so no address is reused mid-forward

    def pack(t: Tensor) -> Tensor:
        alive.append(t)
        sizes[key(t)] = t.untyped_storage().nbytes()
        return t

    with (
        _preserved(model, args, train=True),
        torch.enable_grad(),
        saved_tensors_hooks(pack, lambda t: t),
    ):
        model(*args)
    params = sum(n for k, n in sizes.items() if k in state)
    return SavedBytes(activations=sum(sizes.values()) - params, parameters=params)


def peak_memory_bytes(
    model: nn.Module, inputs: Tensor | tuple[Any, ...], *, train_step: bool = True
) -> int | None:
    """Peak CUDA memory allocated during one forward (+backward when ``train_step``).

    The allocator peak is reset first, so the number includes everything resident on the device
    (weights, inputs, other tensors of the process) plus what the step allocates.

    Args:
        model: the model.
        inputs: a tensor or a tuple of ``forward``'s positional arguments.
        train_step: a training forward+backward instead of one eval no-grad forward.

    Returns:
        The peak in bytes, or None when the model is not on a CUDA device.
    """
    args = _as_args(inputs)
    device = _device(model, args)
    if device.type != "cuda":
        return None
    with _preserved(model, args, train=train_step):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if train_step:
            _train_step(model, args)
        else:
            with torch.no_grad():
                model(*args)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)


def _has_storage(t: Tensor) -> bool:
    """Whether ``t`` is a dense tensor with a storage :func:`depth` can key on."""
    return t.layout == torch.strided


class _DepthMode(TorchDispatchMode):
    """Propagates, per storage, the most non-linear ops on any path from the inputs.

    Storages are keyed by weak reference, so views share their base's depth and an in-place op
    updates every alias; a storage written in parts (slice assignment) keeps the max of its parts.
    Tensors not computed from the inputs (parameters, buffers, constants) are untracked and
    ignored, so e.g. a sigmoid soft mask on a weight adds no depth; so are outputs of ops that
    read a tensor only for its metadata (``*_like``, ``new_*``). Sparse tensors are not tracked.
    """

    def __init__(self, nonlinear: frozenset[str]) -> None:
        super().__init__()
        self.nonlinear = nonlinear
        self.depths: dict[StorageWeakRef, int] = {}

    def get(self, t: Tensor) -> int | None:
        """The depth of ``t``, None when it is not computed from the inputs."""
        return self.depths.get(StorageWeakRef(t.untyped_storage())) if _has_storage(t) else None

    def set(self, t: Tensor, depth: int) -> None:
        """Record ``depth`` for ``t``'s storage."""
        if _has_storage(t):
            self.depths[StorageWeakRef(t.untyped_storage())] = depth

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name.startswith(_METADATA_ONLY_PREFIX) or name.endswith(_METADATA_ONLY_SUFFIX):
            return out
        known = [d for t in _tensors((args, kwargs)) if (d := self.get(t)) is not None]
        if not known:
            return out
        new = max(known) + int(name.removesuffix("_") in self.nonlinear)
        mutated = [
            args[i] if i < len(args) else kwargs.get(arg.name)
            for i, arg in enumerate(func._schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write
        ]
        for t in _tensors((out, mutated)):
            self.set(t, new)
        return out


def depth(
    model: nn.Module,
    inputs: Tensor | tuple[Any, ...],
    *,
    nonlinear: frozenset[str] | set[str] = DEFAULT_NONLINEAR,
) -> int:
    """Number of non-linear sites on the longest path from the inputs to the outputs.

    This is the depth that layer-collapse/depth-reduction methods shrink: replacing a ReLU by an
    identity lowers it, a residual connection takes the max over its branches. One eval-mode
    no-grad forward runs under a dispatch mode in which each op's output gets the max depth of
    its input-derived tensor arguments, plus one if the op is in ``nonlinear``.

    Args:
        model: the model.
        inputs: a tensor or a tuple of ``forward``'s positional arguments.
        nonlinear: aten op names counted as one site (see :data:`DEFAULT_NONLINEAR`; softmax is
            not counted unless :data:`SOFTMAX_OPS` is added).

    Returns:
        The depth.
    """
    known = DEFAULT_NONLINEAR | SOFTMAX_OPS
    for name in nonlinear:
        if not hasattr(torch.ops.aten, name):
            raise ConfigError(
                f"{name!r} is not an aten op{suggest(name, sorted(known))}; name ops as they "
                "dispatch (e.g. 'hardtanh' for relu6), see sobre.core.measure.DEFAULT_NONLINEAR"
            )
    args = _as_args(inputs)
    mode = _DepthMode(frozenset(nonlinear))
    for t in _tensors(args):
        mode.set(t, 0)
    with _preserved(model, args, train=False), torch.no_grad(), BaseTorchFunctionMode(), mode:
        out = model(*args)
    depths = [d for t in _tensors(out) if (d := mode.get(t)) is not None]
    if not depths:
        raise ConfigError(
            f"no output of {type(model).__name__} is computed from the inputs; pass the "
            "tensors forward() reads as inputs (a tensor or a tuple of positional arguments)"
        )
    return max(depths)


_BYTES = ("B", "KB", "MB", "GB", "TB")
_COUNTS = ("", "K", "M", "G", "T", "P")


def _human(value: float, prefixes: tuple[str, ...], suffix: str) -> tuple[str, str]:
    """``value`` scaled by powers of 1000, as (number, prefix+suffix)."""
    step = 0
    while abs(value) >= 1000 and step < len(prefixes) - 1:
        value /= 1000
        step += 1
    number = str(int(value)) if step == 0 and float(value).is_integer() else f"{value:.2f}"
    return number, prefixes[step] + suffix


@dataclass
class Measurement:
    """Everything :func:`measure` reports about one model on one input.

    Attributes:
        params: total parameters (effective weights, tied ones once).
        nonzero_params: non-zero entries of those weights.
        flops_forward: FLOPs of one eval forward.
        macs_forward: ``flops_forward // 2``.
        flops_train_step: FLOPs of a training forward+backward (None when not measured).
        latency_ms: median eval forward latency (None when not measured).
        saved_activation_bytes: activation bytes saved for backward (None when not measured).
        saved_param_bytes: parameter/buffer bytes saved for backward (None when not measured).
        peak_memory_bytes: CUDA allocator peak of one step (None on CPU).
        depth: non-linear sites on the longest input-output path.
        input_shape: the shape of each input tensor.
        device: where the model lives, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    params: int
    nonzero_params: int
    flops_forward: int
    macs_forward: int
    flops_train_step: int | None
    latency_ms: float | None
    saved_activation_bytes: int | None
    saved_param_bytes: int | None
    peak_memory_bytes: int | None
    depth: int
    input_shape: tuple[tuple[int, ...], ...]
    device: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (shapes as lists); :meth:`from_dict` reads it back."""
        d = asdict(self)
        d["input_shape"] = [list(shape) for shape in self.input_shape]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        """The measurement written by :meth:`to_dict`.

        Raises:
            ConfigError: a key is missing or unknown.
        """
        names = {f.name for f in fields(cls)}
        missing, unknown = names - d.keys(), d.keys() - names
        if missing or unknown:
            raise ConfigError(
                f"not a Measurement dict: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                "pass what Measurement.to_dict() returned"
            )
        values = dict(d)
        values["input_shape"] = tuple(tuple(int(s) for s in shape) for shape in d["input_shape"])
        return cls(**values)

    def _rows(self) -> list[tuple[str, float | None, str, tuple[str, ...]]]:
        """(metric, raw value, unit suffix, unit prefixes) of every numeric row."""
        return [
            ("parameters", self.params, "", _COUNTS),
            ("non-zero parameters", self.nonzero_params, "", _COUNTS),
            ("forward FLOPs", self.flops_forward, "FLOPs", _COUNTS),
            ("forward MACs", self.macs_forward, "MACs", _COUNTS),
            ("train-step FLOPs", self.flops_train_step, "FLOPs", _COUNTS),
            ("latency", self.latency_ms, "ms", ("",)),
            ("saved activations", self.saved_activation_bytes, "", _BYTES),
            ("saved parameters", self.saved_param_bytes, "", _BYTES),
            ("peak memory", self.peak_memory_bytes, "", _BYTES),
            ("depth", self.depth, "non-linear", ("",)),
        ]

    def table(self, baseline: Measurement | None = None) -> str:
        """An aligned plain-text table (metric | value | unit), with a ``ratio vs baseline``
        column (``value / baseline value``) when ``baseline`` is given."""
        header = ["metric", "value", "unit"] + (["ratio vs baseline"] if baseline else [])
        base = {row[0]: row[1] for row in baseline._rows()} if baseline else {}
        rows = []
        for metric, value, suffix, prefixes in self._rows():
            number, unit = ("n/a", "") if value is None else _human(value, prefixes, suffix)
            row = [metric, number, unit]
            if baseline:
                ref = base[metric]
                ok = value is not None and ref is not None and ref != 0
                row.append(f"{value / ref:.2f}x" if ok else "n/a")
            rows.append(row)
        shapes = ", ".join("x".join(map(str, shape)) for shape in self.input_shape)
        rows.append(["input shape", shapes, ""] + ([""] if baseline else []))
        rows.append(["device", self.device, ""] + ([""] if baseline else []))
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            aligned = [
                c.rjust(w) if i in (1, 3) else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return " | ".join(aligned).rstrip()

        rule = "-+-".join("-" * w for w in widths)
        return "\n".join([line(header), rule, *(line(r) for r in rows)])

    def __str__(self) -> str:
        return self.table()


def measure(
    model: nn.Module,
    inputs: Tensor | tuple[Any, ...],
    *,
    latency: bool = True,
    train_step: bool = True,
    runs: int = 20,
) -> Measurement:
    """Measure everything about ``model`` on ``inputs``; the model is left unchanged.

    Args:
        model: the model (already on its device; inputs on the same device).
        inputs: a tensor or a tuple of ``forward``'s positional arguments.
        latency: time the forward (``runs`` runs).
        train_step: also count train-step FLOPs and saved bytes; the peak memory is then that of
            a training step, otherwise that of an eval forward.
        runs: timed runs for the latency.

    Returns:
        The :class:`Measurement`.
    """
    args = _as_args(inputs)
    params, nonzero = count_params(model)
    forward = flops(model, args)
    saved = saved_activation_bytes(model, args) if train_step else None
    return Measurement(
        params=params,
        nonzero_params=nonzero,
        flops_forward=forward,
        macs_forward=forward // 2,
        flops_train_step=flops(model, args, train_step=True) if train_step else None,
        latency_ms=latency_ms(model, args, runs=runs) if latency else None,
        saved_activation_bytes=saved.activations if saved else None,
        saved_param_bytes=saved.parameters if saved else None,
        peak_memory_bytes=peak_memory_bytes(model, args, train_step=train_step),
        depth=depth(model, args),
        input_shape=tuple(tuple(t.shape) for t in _tensors(args)),
        device=str(_device(model, args)),
    )
