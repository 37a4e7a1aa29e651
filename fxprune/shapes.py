"""Shape propagation: every node of a captured graph gets torch's ``tensor_meta`` (or its concrete value).

The run uses the meta device (shapes and dtypes only, no arithmetic), so analysis cost does not grow with the
model's FLOPs; graphs that create CPU tensors mid-forward fall back to fake tensors, and graphs whose shapes
depend on data to a real run. The commonest shape-preserving modules and functions skip their meta kernels
(pure Python prims decompositions that dominate analysis time on deep networks): which functions keep their
operands' shape and dtype is the element-wise family's knowledge
(:data:`fxprune.rules.elementwise.SAME_DTYPE_FUNCTIONS`).
"""

from __future__ import annotations

import contextlib
import logging
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from . import meta
from .errors import InputError, node_location
from .rules.axes import submodule
from .rules.base import BASE_THEN_POSITIONWISE, class_name
from .rules.elementwise import SAME_DTYPE_FUNCTIONS, SAME_DTYPE_METHODS

__all__ = ["propagate_shapes", "tensor_metadata"]

log = logging.getLogger(__name__)

_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """torch's ``TensorMetadata`` of ``t``; the common case without torch's Python contiguity checks."""
    if t.is_quantized or t.layout != torch.strided:
        return _extract_tensor_metadata(t)
    fmt = None
    for f in _FORMATS:
        if t.dim() == {torch.channels_last: 4, torch.channels_last_3d: 5}.get(f, t.dim()) and t.is_contiguous(
            memory_format=f
        ):
            fmt = f
            break
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


def _record(node: fx.Node, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = tensor_metadata(value)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        node.meta["tensor_meta"] = tuple(tensor_metadata(v) for v in value)
    else:
        node.meta.pop("tensor_meta", None)
        if isinstance(value, (int, float, bool, torch.Size)) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, bool)) for v in value)
        ):
            meta.set_concrete_value(node, value)
        elif isinstance(value, (tuple, list)):
            # Mixed tuples (e.g. MultiheadAttention's (out, None)): keep per-item tensor metadata.
            node.meta["tensor_meta"] = tuple(
                tensor_metadata(v) if isinstance(v, torch.Tensor) else None for v in value
            )


class _ShapeInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise _failed(n, exc) from exc
        _record(n, value)
        return value


def _failed(n: fx.Node, exc: Exception) -> InputError:
    where = node_location(n)
    err = InputError(
        f"the model fails to run on the example inputs at node '{n.name}' "
        f"({n.op} {getattr(n.target, '__name__', n.target)}): {type(exc).__name__}: {exc}"
        + (f"\n  at {where}" if where else "")
    )
    err.node = n
    return err


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], fake: bool = True) -> Any:
    """Run ``gm`` on ``inputs`` (no grad) and store ``tensor_meta`` / concrete values on every node.

    By default the run uses fake tensors (shapes and dtypes only, no arithmetic), which makes analysis
    cost independent of the model's FLOPs; graphs whose shapes depend on data fall back to a real run.
    """
    if fake:
        try:  # cheapest: a copy of the module on the meta device
            out = _meta_run(gm, inputs)
            meta.put(gm, "shapes", True)
            return out
        except Exception as exc:  # ops that create CPU tensors mid-forward, data-dependent ops...
            log.debug("meta shape propagation failed (%s); trying fake tensors", exc)
        try:
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fins = [mode.from_tensor(x) for x in inputs]
                out = _ShapeInterpreter(gm).run(*fins)
            meta.put(gm, "shapes", True)
            return out
        except InputError as exc:
            if not _data_dependent(exc):
                raise
            log.debug("fake shape propagation failed (%s); running for real", exc)
    with torch.no_grad():
        out = _ShapeInterpreter(gm).run(*inputs)
    meta.put(gm, "shapes", True)
    return out


# Modules whose eval-mode output has the input's shape, dtype and device: the meta run skips their kernels
# (BatchNorm's meta path alone decomposes into dozens of prims) after checking the channel count.
_SAME_SHAPE_ACTS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)


_BN_DIMS: dict[type, tuple[int, ...]] = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _norm_then_acts(mod: nn.Module) -> type | None:
    """The base class of a :data:`~fxprune.rules.base.BASE_THEN_POSITIONWISE` module (timm's BatchNormAct2d)
    whose trailing submodules are all of :data:`_SAME_SHAPE_ACTS`: it keeps its input's shape as the base
    does."""
    cls = type(mod)
    then = BASE_THEN_POSITIONWISE.get(class_name(cls))
    if then is None or not isinstance(mod, then[0]):
        return None
    subs = [mod._modules.get(a) for a in then[1]]
    return then[0] if all(type(m) in _SAME_SHAPE_ACTS and type(m) is not nn.PReLU for m in subs) else None


def _meta_like(x: torch.Tensor) -> torch.Tensor:
    # torch.empty_like on a meta tensor goes through the prims layer (~1 ms); this is ~50x cheaper
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _same_shape_output(mod: nn.Module, x: Any) -> torch.Tensor | None:
    """``empty_like(x)`` when ``mod`` provably preserves ``x``'s shape, else None (run the module).

    Exact types only: a subclass may override ``forward``."""
    if not (isinstance(x, torch.Tensor) and x.device.type == "meta"):
        return None
    cls = type(mod)
    if cls in _SAME_SHAPE_ACTS:
        if cls is nn.PReLU and mod.num_parameters != 1 and (x.dim() < 2 or x.shape[1] != mod.num_parameters):
            return None
        return _meta_like(x)
    bn = cls if cls in _BN_DIMS else _norm_then_acts(mod)
    if bn in _BN_DIMS and not mod.training and x.dim() in _BN_DIMS[bn] and x.shape[1] == mod.num_features:
        return _meta_like(x)
    if cls is nn.LayerNorm and tuple(x.shape[x.dim() - len(mod.normalized_shape):]) == tuple(mod.normalized_shape):
        return _meta_like(x)
    if cls is nn.Linear and x.dim() >= 1 and x.shape[-1] == mod.in_features and x.dtype == mod.weight.dtype:
        return torch.empty((*x.shape[:-1], mod.out_features), dtype=x.dtype, device="meta")
    k = _ADAPTIVE.get(cls)
    if k is not None and x.dim() in (k + 1, k + 2) and not getattr(mod, "return_indices", False) and \
            x.is_floating_point() and all(n > 0 for n in x.shape[-k:]):
        size = mod.output_size if isinstance(mod.output_size, (tuple, list)) else (mod.output_size,) * k
        if len(size) == k and all(isinstance(s, int) or s is None for s in size):
            out = [n if s is None else s for n, s in zip(x.shape[-k:], size, strict=True)]
            return torch.empty((*x.shape[:-k], *out), dtype=x.dtype, device="meta")
    return None


#: adaptive pooling modules -> the number of trailing dims they pool (their meta path is a Python decomposition)
_ADAPTIVE: dict[type, int] = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                              nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}


def _conv_output(mod: nn.Module, x: Any) -> torch.Tensor | None:
    """The output of a plain zero-padded Conv1d/2d/3d on meta input, by the shape formula."""
    if not (type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and isinstance(x, torch.Tensor)
            and x.device.type == "meta" and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)):
        return None
    nd = len(mod.kernel_size)
    if x.dim() != nd + 2 or x.shape[1] != mod.in_channels or x.dtype != mod.weight.dtype:
        return None
    size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(x.shape[2:], mod.padding, mod.dilation, mod.kernel_size, mod.stride, strict=True)
    ]
    if min(size) <= 0:
        return None  # let the real kernel raise its own error
    return torch.empty((x.shape[0], mod.out_channels, *size), dtype=x.dtype, device="meta")


_IN_PLACE = (operator.iadd, operator.imul)


def _elementwise_output(target: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``empty_like`` for an element-wise op whose tensor operands all have one shape, dtype and layout."""
    if target not in SAME_DTYPE_FUNCTIONS or any(k not in ("inplace", "alpha", "approximate") for k in kwargs):
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(not isinstance(a, (torch.Tensor, int, float, bool)) for a in args):
        return None
    t0 = tensors[0]
    if not t0.is_floating_point() or any(t.device.type != "meta" or t.dtype != t0.dtype for t in tensors):
        return None  # integer arithmetic promotes (int / int is float): let torch decide
    if all(t.shape == t0.shape and t.stride() == t0.stride() for t in tensors):
        return _meta_like(t0)
    if target not in _IN_PLACE and all(t.is_contiguous() for t in tensors):
        # broadcasting contiguous operands gives a contiguous result
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        except RuntimeError:
            return None  # let the real kernel raise its own error
        return torch.empty(shape, dtype=t0.dtype, device="meta")
    return None


_REDUCTION_METHODS = ("mean", "sum", "amax", "amin")
_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin)


def _reduction_output(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``x.mean(dims, keepdim)`` (and sum/amax/amin, function or method) of a contiguous floating meta tensor
    over explicit dims: the reduced shape, contiguous (squeeze-and-excitation's pooling; the meta path is a
    Python decomposition)."""
    if not args or set(kwargs) - {"dim", "keepdim"} or len(args) > 3:
        return None
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not (isinstance(x, torch.Tensor) and x.device.type == "meta" and x.is_floating_point() and x.dim() > 0
            and x.is_contiguous() and isinstance(keep, bool)):
        return None
    dims = (dim,) if isinstance(dim, int) else dim
    if not (isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) and -x.dim() <= d < x.dim()
                                                            for d in dims)):
        return None
    dims = {d % x.dim() for d in dims}
    if len(dims) != len(dim if isinstance(dim, (tuple, list)) else (dim,)):
        return None  # a repeated dim: let the real kernel raise its own error
    shape = [1 if i in dims else n for i, n in enumerate(x.shape) if keep or i not in dims]
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _layer_norm_output(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` of a floating meta tensor: a contiguous tensor
    of ``x``'s shape (the kernel's output is contiguous whatever the input's layout; its meta path is a
    Python decomposition, ~1 ms a call) once the trailing dims, weight and bias are checked to match."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    if len(args) > 5 or set(kwargs) - set(names[len(args):]):
        return None
    a = dict(zip(names, args, strict=False)) | kwargs
    x, shape = a.get("input"), a.get("normalized_shape")
    if not (isinstance(x, torch.Tensor) and x.device.type == "meta" and x.is_floating_point()):
        return None
    if isinstance(shape, int):
        shape = (shape,)
    if not (isinstance(shape, (tuple, list, torch.Size)) and 0 < len(shape) <= x.dim()
            and tuple(x.shape[x.dim() - len(shape):]) == tuple(shape)):
        return None
    for t in (a.get("weight"), a.get("bias")):
        if t is not None and not (isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) and t.dtype == x.dtype
                                  and t.device.type == "meta"):
            return None
    if not isinstance(a.get("eps", 1e-5), float):
        return None
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _batch_norm_output(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.batch_norm`` (timm's BatchNormAct2d) keeps its input's shape: skip its prims decomposition
    (about 1 ms a call on meta tensors) once the per-channel tensors are checked to match."""
    x = args[0] if args else kwargs.get("input")
    if not (isinstance(x, torch.Tensor) and x.device.type == "meta" and 2 <= x.dim() <= 5):
        return None
    names = ("running_mean", "running_var", "weight", "bias")
    per_channel = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names, start=1)]
    if any(t is not None and not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == x.shape[1]
                                  and t.dtype == x.dtype) for t in per_channel):
        return None
    return _meta_like(x)


def _attention_output(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, None] | None:
    """``(output, None)`` of ``nn.MultiheadAttention`` / fxprune's ``PrunedMultiheadAttention`` called with
    ``need_weights=False`` and no mask (their meta path decomposes scaled dot-product attention: ~3 ms)."""
    names = _ATTENTION_DIMS.get(type(mod).__name__) if type(mod).__module__ in _ATTENTION_MODULES else None
    if names is None or set(kwargs) - {"need_weights"}:
        return None
    q, k, v = args
    dims = [getattr(mod, n, None) for n in names]
    if not all(isinstance(t, torch.Tensor) and t.device.type == "meta" and t.dtype == q.dtype for t in (q, k, v)):
        return None
    if q.dim() not in (2, 3) or k.dim() != q.dim() or v.dim() != q.dim() or k.shape[:-1] != v.shape[:-1] or \
            [q.shape[-1], k.shape[-1], v.shape[-1]] != dims or q.dtype != mod.out_proj.weight.dtype:
        return None
    batch = 0 if getattr(mod, "batch_first", False) else 1
    if q.dim() == 3 and q.shape[batch] != k.shape[batch]:
        return None
    e = mod.out_proj.out_features
    if q.dim() == 3 and batch == 0:  # batch_first: the result is the transposed (sequence-major) buffer
        out = torch.empty((q.shape[1], q.shape[0], e), dtype=q.dtype, device="meta").transpose(0, 1)
    else:
        out = torch.empty((*q.shape[:-1], e), dtype=q.dtype, device="meta")
    return out, None


_ATTENTION_MODULES = ("torch.nn.modules.activation", "fxprune.modules.mha")
#: attention module class -> its query, key and value width attributes
_ATTENTION_DIMS = {"MultiheadAttention": ("embed_dim", "kdim", "vdim"),
                   "PrunedMultiheadAttention": ("query_dim", "key_dim", "value_dim")}


class _MetaInterpreter(_ShapeInterpreter):
    """Runs ``gm`` with meta-device parameters/buffers substituted in; records metadata on its nodes.

    The commonest shape-preserving modules and functions skip their meta kernels (pure Python prims
    decompositions that dominate analysis time on deep networks)."""

    def run(self, *args: Any, initial_env: Any = None, enable_io_processing: bool = True) -> Any:
        """:meth:`fx.Interpreter.run` without its per-node bookkeeping (context managers, freeing dead
        values: meta tensors hold no memory), the same values and errors."""
        with self._swaps:
            if initial_env is not None or not enable_io_processing or type(self.graph._codegen) is not fx.graph.CodeGen:
                # (a pytree code generator restructures inputs and outputs: torch's own loop does that)
                return super().run(*args, initial_env=initial_env, enable_io_processing=enable_io_processing)
            self.env = env = {}
            self.args_iter = iter(args)
            load = env.__getitem__
            for n in self.graph.nodes:
                try:
                    value = getattr(self, n.op)(n.target, fx.node.map_arg(n.args, load),
                                                fx.node.map_arg(n.kwargs, load))
                except Exception as exc:
                    raise _failed(n, exc) from exc
                _record(n, value)
                if n.op == "output":
                    return value
                env[n] = value
            return None

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self._swaps = contextlib.ExitStack()
        self._meta: dict[int, Any] = {}  # tensor id -> its meta stand-in (shared tensors stay shared)
        self._on_meta: set[int] = set()  # modules whose tensors are swapped for the rest of the run

    def _to_meta(self, mod: nn.Module) -> nn.Module:
        if id(mod) not in self._on_meta:
            self._swaps.enter_context(_swapped_to_meta(mod, self._meta, self._on_meta))
        return mod

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        v = self.fetch_attr(target)
        if isinstance(v, torch.Tensor):
            return _meta_of(v, self._meta)
        return self._to_meta(v) if isinstance(v, nn.Module) else v

    def fetch_attr(self, target: str) -> Any:
        owner, _, name = target.rpartition(".")
        return getattr(submodule(self.module, owner), name)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs:
            mod = self.fetch_attr(target)
            out = _same_shape_output(mod, args[0])
            if out is None:
                out = _conv_output(mod, args[0])
            if out is not None:
                return out
        elif len(args) == 3 and kwargs.get("need_weights") is False:
            out = _attention_output(self.fetch_attr(target), args, kwargs)
            if out is not None:
                return out
        return self._to_meta(self.fetch_attr(target))(*args, **kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = _elementwise_output(target, args, kwargs)
        if out is None and target is F.batch_norm:
            out = _batch_norm_output(args, kwargs)
        if out is None and target in _REDUCTIONS:
            out = _reduction_output(args, kwargs)
        if out is None and target is F.layer_norm:
            out = _layer_norm_output(args, kwargs)
        return out if out is not None else super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = None
        if target in _REDUCTION_METHODS:
            out = _reduction_output(args, kwargs)
        elif target in SAME_DTYPE_METHODS:
            out = _elementwise_output(getattr(torch, target), args, kwargs)
        return out if out is not None else super().call_method(target, args, kwargs)


def _meta_of(t: torch.Tensor, swapped: dict[int, Any]) -> Any:
    if id(t) not in swapped:  # shared tensors stay shared
        m = _meta_like(t) if t.layout == torch.strided else torch.empty_like(t, device="meta")
        swapped[id(t)] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m
    return swapped[id(t)]


@contextlib.contextmanager
def _swapped_to_meta(root: nn.Module, swapped: dict[int, Any], done: set[int]):
    """Temporarily replace every parameter, buffer and tensor attribute of ``root``'s modules (those not in
    ``done``, which they join) by meta tensors (``swapped``: tensor id -> stand-in).

    Only the modules the meta run really calls are swapped (the shape shortcuts read no tensor data):
    cheaper than deep-copying the GraphModule; ``gm`` is fxprune's private copy and everything is
    restored on exit, errors included."""
    saved: list[tuple[Any, str, str, Any]] = []
    try:
        for mod in root.modules():
            if id(mod) in done:
                continue
            done.add(id(mod))
            for store in ("_parameters", "_buffers"):
                d = getattr(mod, store)
                for k, t in list(d.items()):
                    if t is not None:
                        saved.append((mod, store, k, t))
                        d[k] = _meta_of(t, swapped)
            for k, t in list(vars(mod).items()):
                if isinstance(t, torch.Tensor):
                    saved.append((mod, "__dict__", k, t))
                    vars(mod)[k] = _meta_of(t, swapped)
        yield
    finally:
        for mod, store, k, t in reversed(saved):
            (vars(mod) if store == "__dict__" else getattr(mod, store))[k] = t
        for mod in root.modules():
            done.discard(id(mod))


def _meta_run(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Any:
    with torch.no_grad():
        return _MetaInterpreter(gm).run(*[x.to("meta") for x in inputs])


def _data_dependent(exc: BaseException) -> bool:
    cause = exc.__cause__
    name = type(cause).__name__ if cause is not None else ""
    return "DataDependent" in name or "Unsupported" in name or "DynamicOutputShape" in name or (
        cause is not None and "fake" in str(cause).lower()
    )
