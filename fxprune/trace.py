"""Tracing front end: ``nn.Module`` → ``torch.fx.GraphModule`` with shapes on every node.

Leaf policy: a module is kept as one ``call_module`` node when a rule is registered for its type (so the
rule can shrink it as a whole), when the user lists it in ``leaf_modules``, or when torch.fx would keep it
anyway (modules from ``torch.nn`` other than containers). Everything else is traced through. A call of a
plain ``nn.Identity`` (timm's and torchvision's placeholders for an absent attention, drop path or norm) gets
no node at all: its forward returns its input, and leaving it out makes a fifth to a third of a timm graph's
nodes disappear from every pass. It stays a node when listed in ``leaf_modules`` (by type or name) or when it
carries hooks; the class copy keeps the module itself, only the graph result has no such submodule.

The model is traced in **eval mode** on a private copy: torch.fx bakes ``if self.training`` branches into
the graph, and eval-mode graphs are the ones a pruned model is deployed with. Modules whose behaviour
depends on the mode (dropout, batch norm, stochastic depth) are leaves with rules, so ``train()`` still
works on the result. The analysis is front-end agnostic: it only needs a GraphModule whose nodes carry
``tensor_meta`` (:mod:`fxprune.shapes`); the torch.export front end (:mod:`fxprune.export`) produces the same.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize
from torch.fx import _symbolic_trace as _fx_trace
from torch.fx._lazy_graph_module import _LazyGraphModule as LazyGraphModule  # code generated when run/printed
from . import meta
from .clone import copy_module
from .errors import InputError, TraceError

__all__ = ["FxpruneTracer", "LazyGraphModule", "trace", "normalize_inputs", "copy_model", "eval_mode", "TRACE_THROUGH"]

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


_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
          ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def _describe(fn: Any) -> str:
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name} ({code.co_filename}:{code.co_firstlineno})" if code is not None else name


def check_model_state(model: nn.Module) -> None:
    """Refuse what a captured graph cannot carry, before any work: module hooks (a graph runs the ops, not
    ``Module.__call__``, so a hook would silently stop running), parametrizations (the graph would hold the
    computed weight, the result a different parameterisation) and parameters without values (meta device)."""
    if not isinstance(model, nn.Module):
        return
    for name, mod in model.named_modules():
        where = f"model.{name}" if name else "the model itself"
        for attr, what in _HOOKS:
            hooks = getattr(mod, attr, None) or {}
            for fn in hooks.values():
                if type(fn).__name__ == "WeightNorm":
                    raise InputError(f"{where} uses torch.nn.utils.weight_norm (a forward pre-hook the pruned graph "
                                     "would not run): call torch.nn.utils.remove_weight_norm on it before compiling "
                                     "(and weight_norm again on the result if you train further)")
                raise InputError(f"{where} has a {what} {_describe(fn)}: a captured graph does not run hooks, so "
                                 "the pruned model would silently compute something else. Remove it (the handle's "
                                 ".remove()) before compiling and register it again on res.module")
        if parametrize.is_parametrized(mod):
            kinds = ", ".join(f"{p} ({type(v[0]).__name__})" for p, v in mod.parametrizations.items())
            raise InputError(f"{where} has parametrized tensors {kinds}: fxprune prunes plain parameters. Call "
                             "torch.nn.utils.parametrize.remove_parametrizations(module, name, leave_parametrized=True)"
                             " before compiling (and parametrize the result again if you train further)")
        for k, t in itertools.chain(mod._parameters.items(), mod._buffers.items()):
            if t is not None and t.is_meta:
                pname = f"{name}.{k}" if name else k
                raise InputError(f"{pname} is on the meta device (no values): fxprune scores and slices real "
                                 "weights — load or initialise the model's weights first (e.g. "
                                 "model.to_empty(device='cpu') and load_state_dict)")


#: norm forwards that write their buffers (running statistics) only in training mode, as ``(module, qualname)``
#: of the forward function (libraries fxprune does not import are named, not imported): torch's batch and
#: instance norms, and timm's batch norm + activation (a copy of ``BatchNorm2d.forward``, then ``drop``/``act``)
_NORM_FORWARDS = {(f.__module__, f.__qualname__) for f in (nn.modules.batchnorm._BatchNorm.forward,
                                                             nn.modules.instancenorm._InstanceNorm.forward)} | {
    ("timm.layers.norm_act", "BatchNormAct2d.forward")}


def _norm_forward(cls: type) -> bool:
    """Whether ``cls.forward`` writes the module's own buffers only in training mode (a known norm's)."""
    f = cls.forward
    return (getattr(f, "__module__", None), getattr(f, "__qualname__", None)) in _NORM_FORWARDS


def copy_model(model: nn.Module, share_weights: bool = False, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy, so nothing fxprune does (tracing, shape propagation, eval()) touches the user's model.

    ``share_weights=True``: the copy's parameters are new ``nn.Parameter`` objects over the user's own
    storage, and the buffers of torch's own batch/instance norms (and timm's ``BatchNormAct2d``) views of the
    user's (their forward writes them only in training mode; every other buffer, which a forward might write in
    place, is copied). fxprune's compile reads such a copy only: the rewrite slices fresh tensors from it, and
    the passes that need gradients or write weights work on copies of their own (the test suite checks the
    user's tensors' version counters stay unchanged).
    ``memo``: objects (by id) to use as they are in the copy, e.g. submodules replaced by pruned ones."""
    memo = dict(memo or {})
    if share_weights:
        for mod in model.modules():
            for p in mod._parameters.values():
                if type(p) is nn.Parameter and id(p) not in memo:
                    memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
            if _norm_forward(type(mod)):
                for b in mod._buffers.values():
                    if type(b) is torch.Tensor and id(b) not in memo:
                        memo[id(b)] = b.detach()
    try:
        return copy_module(model, memo)
    except Exception as exc:  # deepcopy can fail on exotic attributes; keep the cause
        raise InputError(
            f"cannot copy the model ({type(exc).__name__}: {exc}); fxprune works on a copy so the "
            "original is never modified — make the model deep-copyable"
        ) from exc


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every submodule's own training flag restored after (errors too)."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags.items():
            m.training = t


#: argument types torch.fx stores in a node as they are
_PLAIN_ARGS = frozenset({int, float, bool, str, type(None)})


def _global_module_hooks() -> bool:
    """Whether any global ``nn.Module`` hook is registered (``register_module_forward_hook`` etc.)."""
    return any(getattr(_torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


class _PatchedClassAttr(_fx_trace._PatchedFnSetAttr):
    """A patch of a class attribute the class did not define itself (it inherited it): reverting deletes it."""

    def revert(self) -> None:
        delattr(self.frame_dict, self.fn_name)


class _HierarchyPatcher(_fx_trace._Patcher):
    """torch.fx's patcher, except for the two patches its tracer makes on ``nn.Module`` itself
    (``__getattr__``, ``__call__``: how it sees parameter reads and module calls). Those go on each module
    class of the traced hierarchy that inherits them from ``nn.Module`` (``classes``), which intercepts the
    same calls (a module outside the hierarchy is an error in torch.fx: not installed as a submodule, its
    parameters not the root's). When a class of the hierarchy defines the method itself (it may call
    ``nn.Module``'s through ``super()``), that patch goes on ``nn.Module`` as torch.fx makes it. Setting an
    attribute on ``nn.Module`` invalidates the type caches of every one of its subclasses (1350 with timm
    imported): 1.6 ms per trace (a compile traces once, or twice when it traces the class copy), and slower
    attribute lookups after it; a few dozen classes cost nothing."""

    def __init__(self, classes: list[type]) -> None:
        super().__init__()
        self._classes = classes

    def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
        if cls is not nn.Module or name not in ("__getattr__", "__call__"):
            return super().patch_method(cls, name, new_fn, deduplicate)
        inherited = getattr(nn.Module, name)  # torch's (or an enclosing trace's patch, which this one stacks on)
        if any(getattr(c, name) is not inherited for c in self._classes):
            return super().patch_method(cls, name, new_fn, deduplicate)  # a class defines its own
        new_fn.__fx_already_patched = deduplicate  # type: ignore[attr-defined]
        for c in self._classes:
            if getattr(c, name) is not inherited:
                continue  # a base class of the hierarchy already carries the patch
            own = c.__dict__.get(name)
            rec = _fx_trace._PatchedFnSetAttr(c, name, own, new_fn) if own is not None else \
                _PatchedClassAttr(c, name, None, new_fn)
            self.patches_made.append(rec)
            rec.patch()


@contextlib.contextmanager
def _patch_hierarchy(classes: list[type]) -> Iterator[_fx_trace._Patcher]:
    """What ``torch.fx._symbolic_trace._new_patcher`` does, with a :class:`_HierarchyPatcher`."""
    prior = _fx_trace.CURRENT_PATCHER
    patcher = _fx_trace.CURRENT_PATCHER = _HierarchyPatcher(classes)
    try:
        yield patcher
    finally:
        patcher.revert_all_patches()
        _fx_trace.CURRENT_PATCHER = prior


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

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """torch.fx's trace, with its ``nn.Module`` patches made on the classes of ``root``'s modules
        (:class:`_HierarchyPatcher`): the first patcher torch.fx asks for in this thread during the call."""
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        classes = list(dict.fromkeys(type(m) for m in root.modules()))
        fx_patcher, thread = _fx_trace._new_patcher, threading.get_ident()

        def new_patcher() -> Any:
            if threading.get_ident() != thread:
                return fx_patcher()
            _fx_trace._new_patcher = fx_patcher  # once: a trace nested in this one patches as torch.fx does
            return _patch_hierarchy(classes)

        _fx_trace._new_patcher = new_patcher
        try:
            return super().trace(root, concrete_args)
        finally:
            if _fx_trace._new_patcher is new_patcher:
                _fx_trace._new_patcher = fx_patcher

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
        t = type(a)
        if t is fx.Proxy:  # the common arguments, exactly as torch.fx lowers them (without its chain of checks)
            return a.node
        if t in _PLAIN_ARGS:
            return a
        if t is tuple:
            return tuple(self.create_arg(x) for x in a)
        if isinstance(a, torch.Tensor):
            params, bufs = self._names()
            name = params.get(id(a)) if isinstance(a, nn.Parameter) else bufs.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _inline_identity(self, m: nn.Module) -> bool:
        """Whether a call of the ``nn.Identity`` ``m`` is left out of the graph: it has no hooks (the graph
        would no longer run them), no global module hooks are set, and the user did not list it (or
        ``nn.Identity``) in ``leaf_modules``."""
        if any(getattr(m, attr, None) for attr, _ in _HOOKS) or _global_module_hooks():
            return False
        return not self._listed(m, self.path_of_module(m) if self._leaf_names else "")

    def _listed(self, m: nn.Module, path: str) -> bool:
        """Whether the user's ``leaf_modules`` name ``m`` (by its path) or its type."""
        return path in self._leaf_names or bool(self._leaf_types and isinstance(m, self._leaf_types))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._listed(m, module_qualified_name):
            return True
        if self._is_rule_leaf(m):
            return True
        if type(m) in TRACE_THROUGH:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if type(m) is nn.Identity and len(args) == 1 and not kwargs and self._inline_identity(m):
            return args[0]  # its forward returns its input: no node (a fifth to a third of timm graphs' nodes)
        path = self.path_of_module(m)
        name = path if not self.is_leaf_module(m, path) else None
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
    # the traced graph is read, rewritten and compared; its code is generated only if something runs it
    gm = LazyGraphModule(tracer.root, graph, type(model).__name__)

    def sources() -> dict[str, str]:
        again = FxpruneTracer(is_rule_leaf, leaf_modules)
        again.record_stack_traces = True
        g = again.trace(model)
        return {n.name: n.meta["stack_trace"] for n in g.nodes if n.meta.get("stack_trace")}

    meta.set_source_finder(gm, sources)
    return gm
