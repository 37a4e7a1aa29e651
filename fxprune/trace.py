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

import copy
import logging
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from . import meta
from .errors import InputError, TraceError

__all__ = ["FxpruneTracer", "trace", "propagate_shapes", "normalize_inputs", "copy_model", "is_multi", "shape_of"]

log = logging.getLogger(__name__)


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
        self.record_stack_traces = True  # node.meta["stack_trace"]: errors quote the user's source line

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if self._is_rule_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m) if not self.is_leaf_module(m, self.path_of_module(m)) else None
        if name is not None:
            self._fxp_stack.append(name)
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
    return gm


def _record(node: fx.Node, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        node.meta["tensor_meta"] = tuple(_extract_tensor_metadata(v) for v in value)
    else:
        node.meta.pop("tensor_meta", None)
        if isinstance(value, (int, float, bool, torch.Size)) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, bool)) for v in value)
        ):
            meta.set_concrete_value(node, value)
        elif isinstance(value, (tuple, list)):
            # Mixed tuples (e.g. MultiheadAttention's (out, None)): keep per-item tensor metadata.
            node.meta["tensor_meta"] = tuple(
                _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else None for v in value
            )


class _ShapeInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as exc:
            from .errors import node_location

            where = node_location(n)
            raise InputError(
                f"the model fails to run on the example inputs at node '{n.name}' "
                f"({n.op} {getattr(n.target, '__name__', n.target)}): {type(exc).__name__}: {exc}"
                + (f"\n  at {where}" if where else "")
            ) from exc
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


class _MetaInterpreter(_ShapeInterpreter):
    """Runs a meta-device copy but records metadata on the original graph's nodes."""

    def __init__(self, module: fx.GraphModule, target: fx.GraphModule) -> None:
        super().__init__(module)
        self._targets = dict(zip(module.graph.nodes, target.graph.nodes, strict=True))

    def run_node(self, n: fx.Node) -> Any:
        value = fx.Interpreter.run_node(self, n)
        _record(self._targets[n], value)
        return value


def _meta_run(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Any:
    memo: dict[int, Any] = {}
    for t in [*gm.parameters(), *gm.buffers()]:
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m
    for name, t in gm.__dict__.items():  # plain tensor attributes (constants)
        if isinstance(t, torch.Tensor) and id(t) not in memo:
            memo[id(t)] = torch.empty_like(t, device="meta")
    mgm = copy.deepcopy(gm, memo)
    with torch.no_grad():
        return _MetaInterpreter(mgm, gm).run(*[x.to("meta") for x in inputs])


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
