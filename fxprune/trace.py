"""Tracing front end: ``nn.Module`` → ``torch.fx.GraphModule`` with shapes on every node.

Leaf policy: a module is kept as one ``call_module`` node when a rule is registered for its type (so the
rule can shrink it as a whole), when the user lists it in ``leaf_modules``, or when torch.fx would keep it
anyway (modules from ``torch.nn`` other than containers). Everything else is traced through.

The model is traced in **eval mode** on a private copy: torch.fx bakes ``if self.training`` branches into
the graph, and eval-mode graphs are the ones a pruned model is deployed with. Modules whose behaviour
depends on the mode (dropout, batch norm, stochastic depth) are leaves with rules, so ``train()`` still
works on the result. The analysis is front-end agnostic: it only needs a GraphModule whose nodes carry
``tensor_meta``; a torch.export front end can produce the same (planned).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import operator
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from . import meta
from .errors import InputError, TraceError

__all__ = ["FxpruneTracer", "trace", "propagate_shapes", "normalize_inputs", "copy_model", "is_multi", "shape_of"]

log = logging.getLogger(__name__)

#: torch.nn composite modules that torch.fx would keep whole but fxprune traces through (their parts have
#: rules), each mapped to a traceable stand-in ``forward(module, *args, **kwargs)`` (torch's own forwards of
#: nn.TransformerEncoder/nn.Transformer branch on tensor properties) or to None (its forward is traceable).
#: Matched on the exact type, so a subclass with its own forward is left alone. Filled by fxprune.modules.
TRACE_THROUGH: dict[type, Callable[..., Any] | None] = {}


def normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Accept a tensor or a tuple/list of tensors; anything else is an :class:`InputError`."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 0:
            raise InputError("example_inputs is empty: pass a tensor or a tuple of tensors")
        for i, x in enumerate(example_inputs):
            if not isinstance(x, torch.Tensor):
                raise InputError(
                    f"example_inputs[{i}] is a {type(x).__name__}, not a tensor: fxprune traces tensor "
                    "inputs only (bake other arguments into the model, e.g. with functools.partial or a "
                    "wrapper module)"
                )
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, so nothing fxprune does (tracing, shape propagation, eval()) touches the user's model."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # deepcopy can fail on exotic attributes; keep the cause
        raise InputError(
            f"cannot copy the model ({type(exc).__name__}: {exc}); fxprune works on a copy so the "
            "original is never modified — make the model deep-copyable"
        ) from exc


class FxpruneTracer(fx.Tracer):
    """torch.fx tracer with fxprune's leaf policy; remembers the module being traced for error messages."""

    def __init__(self, is_rule_leaf: Callable[[nn.Module], bool], leaf_modules: Iterable[Any] = ()) -> None:
        super().__init__()
        self._is_rule_leaf = is_rule_leaf
        self._leaf_names = {x for x in leaf_modules if isinstance(x, str)}
        self._leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
        self._fxp_stack: list[str] = []
        self.failed_in: str | None = None  # innermost traced-through module where tracing failed
        # node.meta["stack_trace"] lets errors quote the user's source line; recording it on every node
        # dominates tracing time, so trace() records it only in a second trace made on demand
        self.record_stack_traces = False

    # torch.fx finds the name of a parameter or buffer met during tracing by scanning
    # root.named_parameters() / named_buffers() on every access, which is quadratic in the model size
    # (a fifth of compile time on timm models); these look the tensor up by identity instead.
    def _names(self) -> tuple[dict[int, str], dict[int, str]]:
        cached = getattr(self, "_fxp_names", None)
        if cached is None or cached[0] is not self.root:
            params: dict[int, str] = {}
            for n, p in self.root.named_parameters():
                params.setdefault(id(p), n)
            bufs: dict[int, str] = {}
            for n, b in self.root.named_buffers():
                bufs.setdefault(id(b), n)
            cached = self._fxp_names = (self.root, params, bufs)
        return cached[1], cached[2]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            name = self._names()[0].get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            params, bufs = self._names()
            name = params.get(id(a)) if isinstance(a, nn.Parameter) else bufs.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if self._is_rule_leaf(m):
            return True
        if type(m) in TRACE_THROUGH:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m) if not self.is_leaf_module(m, self.path_of_module(m)) else None
        if name is not None:
            self._fxp_stack.append(name)
            stand_in = TRACE_THROUGH.get(type(m))
            if stand_in is not None:
                forward = functools.partial(stand_in, m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None and name is not None:
                self.failed_in = name
            raise
        finally:
            if name is not None:
                self._fxp_stack.pop()


def trace(
    model: nn.Module,
    is_rule_leaf: Callable[[nn.Module], bool],
    leaf_modules: Iterable[Any] = (),
) -> fx.GraphModule:
    """Symbolically trace ``model`` (already a private copy, in eval mode) into a GraphModule."""
    tracer = FxpruneTracer(is_rule_leaf, leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        part = tracer.failed_in or ""
        where = f"module '{part}' ({type(model.get_submodule(part)).__name__})" if part else (
            f"the top-level module ({type(model).__name__})"
        )
        kind = type(model.get_submodule(part)).__name__ if part else ""
        leaf = (f"Make it a leaf with fxprune.compile(..., leaf_modules=[{kind}]) (every {kind}) or "
                f"leaf_modules=[{part!r}] (this instance) and register a rule for {kind} "
                "(fxprune.register_module_rule), or rewrite the control flow.") if part else (
                "Rewrite the control flow, or move it into a submodule that you make a leaf (leaf_modules=) "
                "and give a rule.")
        raise TraceError(
            f"torch.fx symbolic tracing failed inside {where}: {type(exc).__name__}: {exc}\n"
            "  hint: symbolic tracing cannot follow Python control flow on tensor values (if/for on "
            f"tensors, item assignment, data-dependent shapes). {leaf}"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)

    def sources() -> dict[str, str]:
        again = FxpruneTracer(is_rule_leaf, leaf_modules)
        again.record_stack_traces = True
        g = again.trace(model)
        return {n.name: n.meta["stack_trace"] for n in g.nodes if n.meta.get("stack_trace")}

    meta.set_source_finder(gm, sources)
    return gm


_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _tensor_metadata(t: torch.Tensor) -> TensorMetadata:
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
        node.meta["tensor_meta"] = _tensor_metadata(value)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        node.meta["tensor_meta"] = tuple(_tensor_metadata(v) for v in value)
    else:
        node.meta.pop("tensor_meta", None)
        if isinstance(value, (int, float, bool, torch.Size)) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, bool)) for v in value)
        ):
            meta.set_concrete_value(node, value)
        elif isinstance(value, (tuple, list)):
            # Mixed tuples (e.g. MultiheadAttention's (out, None)): keep per-item tensor metadata.
            node.meta["tensor_meta"] = tuple(
                _tensor_metadata(v) if isinstance(v, torch.Tensor) else None for v in value
            )


class _ShapeInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as exc:
            from .errors import node_location

            where = node_location(n)
            err = InputError(
                f"the model fails to run on the example inputs at node '{n.name}' "
                f"({n.op} {getattr(n.target, '__name__', n.target)}): {type(exc).__name__}: {exc}"
                + (f"\n  at {where}" if where else "")
            )
            err.node = n
            raise err from exc
        _record(n, value)
        return value


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
            from torch._subclasses.fake_tensor import FakeTensorMode

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
    if cls in _BN_DIMS and not mod.training and x.dim() in _BN_DIMS[cls] and x.shape[1] == mod.num_features:
        return _meta_like(x)
    if cls is nn.LayerNorm and tuple(x.shape[x.dim() - len(mod.normalized_shape):]) == tuple(mod.normalized_shape):
        return _meta_like(x)
    if cls is nn.Linear and x.dim() >= 1 and x.shape[-1] == mod.in_features and x.dtype == mod.weight.dtype:
        return torch.empty((*x.shape[:-1], mod.out_features), dtype=x.dtype, device="meta")
    return None


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


_ELEMENTWISE_FNS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh,
    torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu, torch.nn.functional.silu,
    torch.nn.functional.hardswish, torch.nn.functional.hardsigmoid, torch.nn.functional.sigmoid,
})


def _elementwise_output(target: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``empty_like`` for an element-wise op whose tensor operands all have one shape, dtype and layout."""
    if target not in _ELEMENTWISE_FNS or any(k not in ("inplace", "alpha", "approximate") for k in kwargs):
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(not isinstance(a, (torch.Tensor, int, float, bool)) for a in args):
        return None
    t0 = tensors[0]
    if any(t.device.type != "meta" or t.shape != t0.shape or t.dtype != t0.dtype or t.stride() != t0.stride()
           for t in tensors):
        return None
    if any(isinstance(a, float) for a in args) and not t0.is_floating_point():
        return None  # type promotion: let torch decide
    return _meta_like(t0)


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


class _MetaInterpreter(_ShapeInterpreter):
    """Runs ``gm`` with meta-device parameters/buffers substituted in; records metadata on its nodes.

    The commonest shape-preserving modules and functions skip their meta kernels (pure Python prims
    decompositions that dominate analysis time on deep networks)."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs:
            mod = self.fetch_attr(target)
            out = _same_shape_output(mod, args[0])
            if out is None:
                out = _conv_output(mod, args[0])
            if out is not None:
                return out
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = _elementwise_output(target, args, kwargs)
        if out is None and target is F.batch_norm:
            out = _batch_norm_output(args, kwargs)
        return out if out is not None else super().call_function(target, args, kwargs)


@contextlib.contextmanager
def _swapped_to_meta(gm: fx.GraphModule):
    """Temporarily replace every parameter, buffer and tensor attribute of ``gm`` by a meta tensor.

    Cheaper than deep-copying the GraphModule (which re-generates its code); ``gm`` is fxprune's private
    copy and everything is restored on exit, errors included."""
    saved: list[tuple[Any, str, str, Any]] = []
    swapped: dict[int, Any] = {}

    def meta_of(t: torch.Tensor) -> Any:
        if id(t) not in swapped:  # shared tensors stay shared
            m = torch.empty_like(t, device="meta")
            swapped[id(t)] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m
        return swapped[id(t)]

    try:
        for mod in gm.modules():
            for store in ("_parameters", "_buffers"):
                d = getattr(mod, store)
                for k, t in list(d.items()):
                    if t is not None:
                        saved.append((mod, store, k, t))
                        d[k] = meta_of(t)
            for k, t in list(vars(mod).items()):
                if isinstance(t, torch.Tensor):
                    saved.append((mod, "__dict__", k, t))
                    vars(mod)[k] = meta_of(t)
        yield
    finally:
        for mod, store, k, t in reversed(saved):
            (vars(mod) if store == "__dict__" else getattr(mod, store))[k] = t


def _meta_run(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Any:
    with torch.no_grad(), _swapped_to_meta(gm):
        return _MetaInterpreter(gm).run(*[x.to("meta") for x in inputs])


def _data_dependent(exc: BaseException) -> bool:
    cause = exc.__cause__
    name = type(cause).__name__ if cause is not None else ""
    return "DataDependent" in name or "Unsupported" in name or "DynamicOutputShape" in name or (
        cause is not None and "fake" in str(cause).lower()
    )


def is_multi(tm: Any) -> bool:
    """True when ``tm`` is the metadata of a tuple output (TensorMetadata itself is a NamedTuple)."""
    return isinstance(tm, (tuple, list)) and not isinstance(tm, TensorMetadata)


def shape_of(node: Any, index: int | None = None) -> tuple[int, ...] | None:
    """Static shape of ``node``'s output (``index`` selects an item of a tuple output)."""
    tm = meta.tensor_meta(node)
    if tm is None:
        return None
    if not is_multi(tm):
        return tuple(tm.shape) if index is None else None
    if index is None or index >= len(tm) or tm[index] is None:
        return None
    return tuple(tm[index].shape)
