"""The torch.export front end, and the choice between front ends (``compile(..., frontend=)``).

``frontend="fx"`` is symbolic tracing (:func:`fxprune.trace.trace`): modules with rules stay modules, so
the pruned result is a GraphModule of smaller ``nn.Conv2d``/``nn.Linear``/... submodules whose mode-dependent
layers (dropout, batch norm) follow ``train()``/``eval()``.

``frontend="export"`` captures the model with ``torch.export.export(strict=False)``: Python control flow on
tensors (Hugging Face-style mask construction by item assignment, shape-dependent branches, iteration
over tensors in detection models) runs eagerly while the tensor ops are recorded as an fx graph of ATen
operators, which the rules of :mod:`fxprune.rules.aten` analyse. The batch dim, and every dim of inputs
with at most 3 dims (sequence length, features), are exported as ``Dim.AUTO`` (dynamic where the model
allows, static otherwise; an example batch of one is captured as a batch of two, since torch.export
specialises size-1 dims); the spatial dims of image and video inputs stay static (the result accepts other
batch sizes, but only the example's height and width) unless the model has the attribute
``fxprune_dynamic_shapes = True`` (the hierarchical front end sets it on detector heads, which see feature
maps of every size; symbolic size reasoning can take minutes on models that compute paddings from the
input size). A failed dynamic export is retried with static shapes; a model with the attribute
``fxprune_static_shapes = True`` is exported with static shapes only (faster to capture; the result then
accepts only the example shapes). The exported program is unlifted (``ExportedProgram.module()``, parameters
become ``get_attr`` attributes at their original qualified names), its input guards and pytree calling
convention are dropped, and the output structure (tensor, tuple, list, dict) is restored in the graph.

What the export path gives you: a plain ``torch.fx.GraphModule`` holding the (sliced) parameters at their
original names in a module hierarchy of plain ``nn.Module`` containers. It runs, trains (backward works;
``train()``/``eval()`` are accepted) and pickles with ``torch.save`` like any GraphModule, but the graph is
the model's **eval-mode** computation: dropout is absent and batch norm uses its running statistics in
both modes, and tensors the model created at run time (``torch.zeros(...)``, ``arange``) are placed on the
device used at capture time.

``frontend="whole"`` tries symbolic tracing first and falls back to export when tracing fails; if both
fail, one :class:`~fxprune.errors.TraceError` explains both failures. ``frontend="auto"`` (the default)
does the same and, when both fail, prunes the submodules that can be captured
(``frontend="hierarchical"``, :mod:`fxprune.hierarchical`): the result is then a copy of the user's model
(its own class and ``forward``) with those submodules replaced by pruned GraphModules; the TraceError
explaining both failures is raised only when no submodule can be captured either.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import operator
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConfigError, TraceError, summary
from .trace import trace

__all__ = ["FRONTENDS", "export_graph", "capture"]

log = logging.getLogger(__name__)

#: "whole" = the whole model as one graph (fx, else export); "auto" also falls back to the hierarchical front end
FRONTENDS = ("auto", "whole", "fx", "export", "hierarchical")

#: node.meta entries kept from the exported graph (the others hold fake tensors and export bookkeeping)
_KEEP_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def _dynamic_shapes(inputs: Sequence[torch.Tensor], spatial: bool = False) -> tuple[dict[int, Any], ...]:
    """``Dim.AUTO`` for every dim of inputs with up to 3 dims (batch, sequence, features); for image and video
    inputs (4 or more dims) only the batch dim, unless ``spatial``: symbolic reasoning over spatial sizes can
    take minutes (paddings computed from the input size, e.g. timm's Conv2dSame)."""
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in range(x.dim() if (spatial or x.dim() < 4) else min(x.dim(), 1))}
                 for x in inputs)


#: torch loggers that print the whole partial graph when an export attempt fails (fxprune reports the failure)
_NOISY = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
          "torch._subclasses.fake_tensor", "torch.fx.experimental.recording")


def _quiet_export(model: nn.Module, inputs: tuple[torch.Tensor, ...], **kw: Any) -> torch.export.ExportedProgram:
    loggers = [logging.getLogger(n) for n in _NOISY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    err = io.StringIO()  # torch.export prints a failed attempt's partial graph to stderr: keep it at debug level
    try:
        with contextlib.redirect_stderr(err):
            return torch.export.export(model, inputs, strict=False, **kw)
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if err.getvalue():
            log.debug("torch.export printed:\n%s", err.getvalue())


def _widened(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
    """The example batch repeated to 2 when every input has batch 1 (None otherwise): torch.export
    specialises size-1 dims, so a graph captured on a batch of one would accept only batches of one
    (calibration batches, a DataLoader's batches, ``generate`` with several prompts)."""
    if not inputs or any(x.dim() == 0 or x.shape[0] != 1 for x in inputs):
        return None
    return tuple(torch.cat([x, x]) for x in inputs)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """(``model`` is an :class:`_OutputView`: its forward takes ``*args``, whose dynamic shapes go under
    that name.)"""
    if getattr(model, "fxprune_static_shapes", False):
        return _quiet_export(model, inputs)
    spatial = bool(getattr(model, "fxprune_dynamic_shapes", False))
    wide = _widened(inputs)
    if wide is not None:
        try:
            return _quiet_export(model, wide, dynamic_shapes={"args": _dynamic_shapes(wide, spatial)})
        except Exception as exc:  # a model that needs a batch of one: capture it as given
            log.debug("export on a batch of two failed (%s: %s); capturing the batch of one", type(exc).__name__, exc)
    try:
        return _quiet_export(model, inputs, dynamic_shapes={"args": _dynamic_shapes(inputs, spatial)})
    except Exception as exc:  # dynamic dims the model cannot support: retry with every size static
        if "DataDependent" in type(exc).__name__:
            raise  # a branch on a tensor's value: static sizes cannot help
        log.debug("export with dynamic dims failed (%s: %s); retrying static", type(exc).__name__, exc)
        return _quiet_export(model, inputs)


def _emittable(spec: pytree.TreeSpec) -> bool:
    """Whether the output structure can be written literally in an fx graph (tuple/list/dict of tensors)."""
    if spec.is_leaf():
        return True
    if spec.type not in (tuple, list, dict):
        return False
    return all(_emittable(spec.child(i)) for i in range(spec.num_children))


def tensors_only(out: Any, dropped: list[str], path: str = "output") -> Any:
    """``out`` with every leaf that is neither a tensor nor a plain constant dropped (a Hugging Face cache, a
    custom object: state the model hands back, not a result), mappings (``ModelOutput``) made plain dicts;
    the paths of what was dropped are appended to ``dropped``."""
    if isinstance(out, torch.Tensor) or out is None or isinstance(out, (bool, int, float, str)):
        return out
    if isinstance(out, Mapping):
        kept = {k: tensors_only(v, dropped, f"{path}.{k}") for k, v in out.items()}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(out, (tuple, list)):
        items = [tensors_only(v, dropped, f"{path}[{i}]") for i, v in enumerate(out)]
        return type(out)(items) if type(out) in (tuple, list) else tuple(items)
    dropped.append(f"{path} ({type(out).__name__})")
    return None


class _OutputView:
    """Makes a module's forward return :func:`tensors_only` of its output (for capture only)."""

    @staticmethod
    def of(module: nn.Module, dropped: list[str]) -> nn.Module:
        cls = type(module)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return tensors_only(cls.forward(self, *args, **kwargs), dropped)

        view_cls = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
        view = copy.copy(module)
        view.__class__ = view_cls
        return view


def export_graph(model: nn.Module, inputs: tuple[torch.Tensor, ...], name: str | None = None,
                 dropped: list[str] | None = None) -> fx.GraphModule:
    """Capture ``model`` (a private copy, in eval mode) with torch.export as a plain GraphModule of ATen ops.

    Outputs that are not tensors (a Hugging Face model's key/value cache) are dropped from the graph (their
    paths appended to ``dropped``). Raises whatever torch.export raises; :func:`capture` turns it into a
    :class:`TraceError`.
    """
    lost: list[str] = []
    ep = _export(_OutputView.of(model, lost), inputs)
    if dropped is not None:
        dropped.extend(dict.fromkeys(lost))
    unlifted = ep.module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    flat_out: list[Any] = []
    for node in unlifted.graph.nodes:
        if node.op == "call_module" and not node.users and "guard" in str(node.target):
            continue  # input-shape guards of the unlifted program (the pruned graph has its own shapes)
        if node.op == "output":
            flat_out = list(pytree.tree_leaves(node.args[0]))
            continue
        new = graph.node_copy(node, lambda n: env[n])
        new.meta = {k: v for k, v in node.meta.items() if k in _KEEP_META}
        env[node] = new
    outs = [env[n] if isinstance(n, fx.Node) else n for n in flat_out]
    spec = ep.call_spec.out_spec
    if spec is not None and _emittable(spec):
        result = pytree.tree_unflatten(outs, spec)
    else:
        result = tuple(outs)
        if spec is not None:
            log.warning("output structure %s cannot be reproduced in the graph; the pruned module returns a "
                        "flat tuple", spec.type)
    graph.output(result)
    graph.eliminate_dead_code()
    gm = fx.GraphModule(unlifted, graph, name or type(model).__name__)
    if _inline_autocast_off(gm) + _fills_on_tensors(gm):
        gm.recompile()
    gm.graph.lint()
    return gm


_FILLS = {"zeros": "new_zeros", "ones": "new_ones", "full": "new_full", "empty": "new_empty"}


def _fills_on_tensors(gm: fx.GraphModule) -> int:
    """Spell a fill whose size list starts with a literal and holds run-time sizes (``zeros([1, 2, s, t])``,
    T5's position bias) as ``new_zeros`` on the tensor a size is read from, with the fill's own dtype,
    device and layout. Same values; but torch cannot re-trace the first spelling (a GraphModule unpickles by
    re-tracing its code, and ATen's ``SymInt[]`` parser rejects a proxy after a literal), so without this
    ``torch.load`` of a saved result fails."""
    done = 0
    for node in list(gm.graph.nodes):
        name = getattr(getattr(node.target, "_schema", None), "name", "")
        new_name = _FILLS.get(name.removeprefix("aten::"))
        if node.op != "call_function" or new_name is None or not node.args:
            continue
        size = node.args[0]
        if not isinstance(size, (list, tuple)) or not size or isinstance(size[0], fx.Node) or \
                not any(isinstance(e, fx.Node) for e in size):
            continue
        ref, kwargs = _size_tensor(size), dict(node.kwargs)
        if kwargs.pop("memory_format", None) not in (None, torch.contiguous_format) or ref is None:
            continue
        if kwargs.get("dtype") is None:  # what the fill itself would have made, not the reference's dtype
            fill = node.args[1] if new_name == "new_full" else 0.0
            kwargs["dtype"] = torch.tensor(fill).dtype if not isinstance(fill, float) else torch.get_default_dtype()
        node.target = getattr(torch.ops.aten, new_name).default
        node.args = (ref, list(size), *node.args[1:])
        node.kwargs = kwargs
        done += 1
    return done


def _size_tensor(values: Sequence[Any], seen: set[fx.Node] | None = None) -> fx.Node | None:
    """The tensor whose ``sym_size`` one of ``values`` reads (through any size arithmetic), or None."""
    seen = set() if seen is None else seen
    for n in (v for v in values if isinstance(v, fx.Node) and v not in seen):
        seen.add(n)
        if n.op == "call_function" and "sym_size" in str(n.target) and isinstance(n.args[0], fx.Node):
            return n.args[0]
        found = _size_tensor(n.all_input_nodes, seen)
        if found is not None:
            return found
    return None


def _inline_autocast_off(gm: fx.GraphModule) -> int:
    """Inline the regions torch.export wraps in ``wrap_with_autocast(..., enabled=False, ...)`` (code run with
    autocast disabled, e.g. timm's EfficientViT attention): without autocast active, they are plain ops, which
    the rules can then see. Regions with autocast *enabled* are left alone (they change dtypes)."""
    done = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and getattr(node.target, "__name__", "") == "wrap_with_autocast"):
            continue
        _device, _dtype, enabled, _cache, sub_attr, *operands = node.args
        if enabled is not False or not isinstance(sub_attr, fx.Node) or sub_attr.op != "get_attr":
            continue
        sub = getattr(gm, str(sub_attr.target))
        if not isinstance(sub, fx.GraphModule) or any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes):
            continue
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            continue
        env.update(zip(placeholders, operands))
        outs: Any = None
        with gm.graph.inserting_before(node):
            for sn in sub.graph.nodes:
                if sn.op == "output":
                    outs = fx.map_arg(sn.args[0], lambda x: env[x])
                elif sn.op != "placeholder":
                    env[sn] = gm.graph.node_copy(sn, lambda x: env[x])
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:  # used as a whole: give it the tuple
            raise TraceError("cannot inline an autocast-disabled region used without indexing its outputs")
        gm.graph.erase_node(node)
        if not sub_attr.users:
            gm.graph.erase_node(sub_attr)
            delattr(gm, str(sub_attr.target))
        done += 1
    return done


def capture(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    is_rule_leaf: Callable[[nn.Module], bool],
    leaf_modules: Iterable[Any] = (),
    frontend: str = "auto",
) -> tuple[fx.GraphModule, str, str]:
    """Capture ``model`` (already a private copy in eval mode) with the chosen front end.

    Returns ``(graph module, front end used, note)``; ``note`` says why the fallback was taken ('' if none).
    """
    if frontend not in FRONTENDS:
        raise ConfigError(f"frontend must be one of {', '.join(map(repr, FRONTENDS))}, got {frontend!r}")
    if frontend == "fx":
        return trace(model, is_rule_leaf, leaf_modules), "fx", ""
    if frontend == "hierarchical":
        raise ConfigError("the hierarchical front end is used through fxprune.compile, not capture()")
    fx_error: TraceError | None = None
    if frontend in ("auto", "whole"):
        try:
            return trace(model, is_rule_leaf, leaf_modules), "fx", ""
        except TraceError as exc:
            fx_error = exc
            log.info("symbolic tracing failed; capturing with torch.export instead: %s", str(exc).splitlines()[0])
    try:
        dropped: list[str] = []
        gm = export_graph(model, inputs, name=type(model).__name__, dropped=dropped)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        if fx_error is None:
            raise TraceError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                             f"{first}") from exc
        fx_text = "\n".join("     " + ln if i else ln for i, ln in enumerate(str(fx_error).splitlines()))
        raise TraceError(
            f"neither front end can capture {type(model).__name__}:\n"
            f"  1. {fx_text}\n"
            f"  2. torch.export (non-strict) failed: {type(exc).__name__}: {first}\n"
            "     hint: torch.export runs the Python code but needs one graph: no branches on tensor values, "
            "no data-dependent shapes it cannot bound. Fixing either failure is enough."
        ) from exc
    notes = []
    if fx_error is not None:
        notes.append("captured with torch.export (ATen graph, eval-mode semantics) because symbolic tracing failed: "
                     f"{summary(fx_error)}")
    if dropped:
        notes.append(f"outputs that are not tensors were left out of the graph: {', '.join(dropped)}")
    note = "; ".join(notes)
    return gm, "export", note
