"""Rules for helper functions that torch and torchvision keep as single graph nodes (``torch.fx.wrap``), and
for tensor creation ops (``torch.zeros``, ``x.new_ones``, ``torch.arange``, ``zeros_like``...).

Creation ops (:class:`Creation`): a created tensor's size is either a literal (a constant: that output dim is
pinned, so nothing ever needs patching) or computed at run time from other tensors' shapes (``x.shape[1]``,
``x.size(1)``, ``x.shape``). A dim whose size is exactly one dim of another tensor *follows* it when the op
fills every position alike (zeros/ones/full/empty, and i.i.d. random fills): the two dims are tied, so
pruning that tensor's channels shrinks the created tensor at run time, consistently. Any other use of a
size computed at run time pins the dims it was read from: sizes that feed values (``arange(C)``,
``full(..., C)``, ``eye(C)``) or that went through arithmetic (``C // 2``) would change the computation if
those dims shrank. ``zeros_like(x)``-style ops have ``x``'s shape, dim for dim.

``torch._assert`` reads shapes only. torchvision's Swin helpers compute head counts and widths from the
input inside the function, so they are *opaque*: only the batch dim passes through and every other dim
they touch is pinned (the MLP widths between them stay prunable). Stochastic depth and drop-block are
element-wise.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Iterator

import torch
import torch.fx as fx

from .. import meta
from .base import RULES, Rule, RuleContext, patch_sizes
from .calls import aten_overloads, schema_args, set_schema_arg
from .elementwise import Unary

__all__ = ["NoOp", "Opaque", "Creation", "AtenCreation", "AtenFill", "Pinned", "size_source", "size_deps", "shape_sources"]


class NoOp(Rule):
    """Reads tensors only for their shapes/values and returns no tensor (assertions)."""

    name = "no_op"

    def analyze(self, node, rc: RuleContext) -> None:
        for x in rc.tensor_args():
            for ax in rc.all_dims(x):
                rc.free(ax)


class Opaque(Rule):
    """A known function whose internals fxprune does not model: ties the listed leading dims of its
    first input to the output, pins everything else."""

    name = "opaque"

    def __init__(self, name: str, tie_leading: int = 1) -> None:
        self.name = name
        self.tie_leading = tie_leading

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0)
        if not rc.is_tensor(x) or rc.out_shape() is None:
            return
        for d in range(min(self.tie_leading, len(rc.shape(x)), len(rc.out_shape()))):
            if rc.shape(x)[d] == rc.out_shape()[d]:
                rc.tie(rc.act(x, d), rc.out(d))


# ---------------------------------------------------------------------------------------------------------
# creation ops


def _is_shape_of(node: Any) -> fx.Node | None:
    """The tensor ``x`` when ``node`` is ``x.shape`` / ``x.size()`` (a whole torch.Size), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is builtins.getattr and len(node.args) == 2 \
            and node.args[1] == "shape" and isinstance(node.args[0], fx.Node):
        return node.args[0] if meta.tensor_meta(node.args[0]) is not None else None
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1 and "dim" not in node.kwargs:
        return node.args[0] if meta.tensor_meta(node.args[0]) is not None else None
    return None


def size_source(node: Any) -> tuple[fx.Node, int] | None:
    """``(x, d)`` when the int ``node`` is exactly ``x.size(d)`` / ``x.shape[d]``, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "size":
        x = node.args[0]
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        shp = meta.tensor_meta(x)
        if isinstance(d, int) and shp is not None and hasattr(shp, "shape"):
            return x, d % len(shp.shape)
        return None
    if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:  # the export spelling
        x, d = node.args[0], node.args[1]
        shp = meta.tensor_meta(x)
        return (x, d % len(shp.shape)) if shp is not None and hasattr(shp, "shape") else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        x = _is_shape_of(node.args[0])
        if x is not None:
            return x, node.args[1] % len(meta.tensor_meta(x).shape)
    return None


def shape_sources(node: Any) -> list[tuple[fx.Node, int] | None] | None:
    """Per position of a size *tuple* computed at run time (``x.shape``, ``x.shape[1:]``): its source
    (``size_source``), or None when the tuple's structure is unknown."""
    x = _is_shape_of(node)
    if x is not None:
        return [(x, d) for d in range(len(meta.tensor_meta(x).shape))]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and isinstance(node.args[1], slice):
        inner = shape_sources(node.args[0])
        return None if inner is None else inner[node.args[1]]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.add:
        parts = [shape_sources(a) if isinstance(a, fx.Node) else _literal_sources(a) for a in node.args]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]
    return None


def _literal_sources(v: Any) -> list[tuple[fx.Node, int] | None] | None:
    if isinstance(v, (tuple, list)):
        return [size_source(e) for e in v]
    return None


def size_deps(value: Any) -> Iterator[tuple[fx.Node, int | None]]:
    """Every ``(tensor, dim)`` whose size ``value`` (an int, a tuple, or graph values computed from them)
    was read from; ``dim`` None means all dims (``x.shape``, ``x.numel()``). Walks back through
    non-tensor nodes only: a tensor used for its *values* is not a size dependency."""
    todo: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: todo.append(n))
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if meta.tensor_meta(n) is not None:
            continue
        src = size_source(n)
        if src is not None:
            yield src
            continue
        x = _is_shape_of(n)
        if x is not None:
            yield x, None
            continue
        if n.op == "call_method" and n.target in ("numel", "nelement") or (
                n.op == "call_function" and n.target is torch.numel):
            yield n.args[0], None
            continue
        if n.op == "call_function" and n.target is builtins.len and meta.tensor_meta(n.args[0]) is not None:
            yield n.args[0], 0
            continue
        if n.op == "call_function" and n.target is builtins.getattr and meta.tensor_meta(n.args[0]) is not None:
            continue  # x.device, x.dtype: no size read
        todo.extend(n.all_input_nodes)


class Creation(Rule):
    """A new tensor (see the module docstring). ``kind``: ``"fill"`` (every position alike: zeros, ones,
    full, empty, rand...; sizes as varargs or one sequence, ``size_pos`` = index of the size argument after
    ``self`` for methods), ``"like"`` (the shape of argument 0) or ``"values"`` (arange, linspace, eye...:
    the values depend on the sizes, so every size read at run time pins its source)."""

    def __init__(self, name: str, kind: str, size_pos: int = 0, varargs: bool = True) -> None:
        if kind not in ("fill", "like", "values"):
            raise ValueError(f"unknown creation kind {kind!r}")
        self.name = name
        self.kind = kind
        self.size_pos = size_pos
        self.varargs = varargs

    def _split(self, node: fx.Node) -> tuple[Any, list[Any]]:
        """(size argument or None, the other arguments whose values matter)."""
        args = list(node.args[1:] if node.op == "call_method" else node.args)
        kw = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "device", "layout", "requires_grad",
                                                                  "pin_memory", "memory_format", "out")}
        if self.kind != "fill":
            return None, args + list(kw.values())
        if "size" in kw:
            return kw.pop("size"), args + list(kw.values())
        if self.varargs and (len(args) != 1 or not (isinstance(args[0], (list, tuple, torch.Size))
                                                    or _is_sequence_node(args[0]))):
            return tuple(args), list(kw.values())  # zeros(2, C, 3)
        return args[self.size_pos], args[: self.size_pos] + args[self.size_pos + 1 :] + list(kw.values())

    def analyze(self, node, rc: RuleContext) -> None:
        out = rc.out_shape()
        if node.op == "call_method":  # x.new_zeros(...): x gives dtype and device only
            for ax in rc.all_dims(node.args[0]):
                rc.free(ax)
        if out is None:
            return
        size, values = self._split(node)
        for x, d in size_deps(values):
            self._pin_source(rc, node, x, d, "feeds the values of")
        if self.kind == "like":
            x = node.args[0]
            if rc.is_tensor(x) and rc.shape(x) == out:
                rc.tie_same_shape(x)
            return
        if size is None:
            return
        sources = shape_sources(size) if isinstance(size, fx.Node) else _literal_sources(size)
        if sources is not None and len(sources) != len(out):
            sources = None
        if sources is None:  # a size tuple of unknown structure: every size it read is pinned
            for x, d in size_deps(size):
                self._pin_source(rc, node, x, d, "is used in the size of")
            return
        entries = list(size) if isinstance(size, (tuple, list)) else [None] * len(out)
        for d, (src, e) in enumerate(zip(sources, entries, strict=True)):
            if src is not None and self.kind == "fill":
                x, k = src
                rc.tie(rc.act(x, k), rc.out(d))  # follows the pruning at run time
            elif isinstance(e, fx.Node):
                for x, k in size_deps(e):
                    self._pin_source(rc, node, x, k, "is used in the size of")
            elif isinstance(e, int) and self.kind == "fill":
                rc.free(rc.out(d))  # every position alike: a literal size is patched when the dim is pruned

    def rewrite_node(self, node, old, rw) -> None:
        if self.kind != "fill":
            return
        size, _ = self._split(old)
        if not isinstance(size, (tuple, list)):
            return  # a size computed at run time follows the pruning by itself
        new = patch_sizes(self._split(node)[0], rw.new_shape(old))
        args = list(node.args)
        if "size" in node.kwargs:
            node.kwargs = {**node.kwargs, "size": type(node.kwargs["size"])(new)}
            return
        start = 1 if node.op == "call_method" else 0
        if self.varargs and (len(args) - start != 1 or not isinstance(args[start], (list, tuple, torch.Size))):
            node.args = (*args[:start], *new, *args[start + len(new):])
        else:
            pos = start + self.size_pos
            node.args = (*args[:pos], type(args[pos])(new) if isinstance(args[pos], (list, tuple)) else tuple(new),
                         *args[pos + 1:])

    @staticmethod
    def _pin_source(rc: RuleContext, node: fx.Node, x: fx.Node, d: int | None, how: str) -> None:
        dims = range(len(rc.shape(x))) if d is None else [d]
        for k in dims:
            rc.pin(rc.act(x, k), f"the size of {x.name} dim {k} {how} {node.name} ({node.target})")


def _is_sequence_node(v: Any) -> bool:
    if not isinstance(v, fx.Node) or meta.tensor_meta(v) is not None:
        return False
    cv = meta.concrete_value(v)
    return isinstance(cv, (tuple, list, torch.Size)) or _is_shape_of(v) is not None


_fill = Creation("creation.fill", "fill")
RULES.register_function((torch.zeros, torch.ones, torch.empty, torch.rand, torch.randn), _fill)
RULES.register_method(("new_zeros", "new_ones", "new_empty"), _fill)
_full = Creation("creation.full", "fill", varargs=False)
RULES.register_function(torch.full, _full)
RULES.register_method("new_full", _full)
RULES.register_function((torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
                         torch.randn_like, torch.randint_like), Creation("creation.like", "like"))
RULES.register_function((torch.arange, torch.linspace, torch.logspace, torch.eye, torch.randperm, torch.randint,
                         torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.tril_indices,
                         torch.triu_indices), Creation("creation.values", "values"))


class MeshgridRule(Rule):
    """``torch.meshgrid(t0, t1, ...)``: output ``k`` at ``[i0, i1, ...]`` is ``t_k[i_k]``; dim ``j`` of every
    output is dim 0 of input ``j`` (with ``indexing="xy"`` the first two swap)."""

    name = "meshgrid"

    def analyze(self, node, rc: RuleContext) -> None:
        ins = [a for a in node.args if isinstance(a, fx.Node)]
        if len(ins) == 1 and not rc.is_tensor(ins[0]):
            return  # a list built at run time: everything pinned
        if len(node.args) == 1 and isinstance(node.args[0], (list, tuple)):
            ins = list(node.args[0])
        tm = node.meta.get("tensor_meta")
        if not all(rc.is_tensor(t) and len(rc.shape(t)) == 1 for t in ins) or tm is None:
            return
        order = list(range(len(ins)))
        if node.kwargs.get("indexing", "ij") == "xy" and len(ins) > 1:
            order[0], order[1] = 1, 0
        for k in range(len(tm)):
            for d, j in enumerate(order):
                rc.tie(rc.act(ins[j], 0), rc.out(d, k))


RULES.register_function(torch.meshgrid, MeshgridRule())
RULES.register_function(torch._assert, NoOp())
try:
    from torchvision.models import swin_transformer as _swin
    from torchvision.ops import drop_block as _db
    import importlib

    _sd = importlib.import_module("torchvision.ops.stochastic_depth")

    for _fn in ("shifted_window_attention", "_patch_merging_pad", "_get_relative_position_bias"):
        if hasattr(_swin, _fn):
            RULES.register_function(getattr(_swin, _fn), Opaque(f"swin.{_fn}", tie_leading=1))
    RULES.register_function((_sd.stochastic_depth, _db.drop_block2d, _db.drop_block3d), Unary("stochastic"))
except ImportError:  # pragma: no cover
    pass


# ---------------------------------------------------------------------------------------------------------
# the torch.export spellings: creation ops, assertions, size arithmetic, ops whose index arithmetic is
# not modelled


class AtenCreation(NoOp):
    """ATen arange / eye / linspace / empty_strided ...: a new tensor whose values depend on its sizes; tensor
    arguments are read for dtype and device only (as :class:`NoOp` reads them), and the output is pinned by
    :meth:`~fxprune.rules.base.RuleContext.finish`, so no literal ever needs patching."""

    name = "aten.creation"


class AtenFill(NoOp):
    """ATen zeros / ones / full / empty / new_zeros ... (the export spelling of :class:`Creation`'s fills):
    every position alike, so each output dim is free (a literal size, patched when the dim is pruned: T5's
    zero position bias of ``n_heads`` rows), tied to the dim its symbolic size reads (``sym_size``), or pinned
    where the size went through arithmetic."""

    name = "aten.fill"

    def analyze(self, node, rc: RuleContext) -> None:
        super().analyze(node, rc)
        out = rc.out_shape()
        args = schema_args(node)
        if out is None or not isinstance(args.get("size"), (list, tuple)) or len(args["size"]) != len(out):
            return
        for x, k in size_deps(args.get("fill_value")):
            Creation._pin_source(rc, node, x, k, "feeds the values of")
        for d, e in enumerate(args["size"]):
            src = size_source(e)
            if isinstance(e, int):
                rc.free(rc.out(d))
            elif src is not None:
                rc.tie(rc.act(*src), rc.out(d))
            else:
                for x, k in size_deps(e):
                    Creation._pin_source(rc, node, x, k, "is used in the size of")

    def rewrite_node(self, node, old, rw) -> None:
        size = schema_args(node).get("size")
        if isinstance(size, (list, tuple)):
            set_schema_arg(node, "size", list(patch_sizes(list(size), rw.new_shape(old))))


class Pinned(Rule):
    """An op whose index arithmetic fxprune does not model (gather, advanced indexing, sort, item...):
    every dim it touches is pinned. Exact, never a guess."""

    def __init__(self, name: str) -> None:
        self.name = name

    def analyze(self, node, rc: RuleContext) -> None:
        return  # RuleContext.finish() pins every input and output dim

    def positional_dim(self, node) -> int | None:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return dim if isinstance(dim, int) and "index_select" in str(node.target) else None


_no_op = NoOp()
RULES.register_function(aten_overloads("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range",
                                       "sym_constrain_range_for_size", "_assert_async", "_functional_assert_async",
                                       "_functional_sym_constrain_range", "_functional_sym_constrain_range_for_size",
                                       "_print"), _no_op)
_pinned = Pinned("pinned")
_SYM = [getattr(torch, n) for n in ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite", "sym_sqrt",
                                     "sym_sum") if hasattr(torch, n)]
for _fn in _SYM + [math.ceil, math.floor, math.trunc, math.sqrt, builtins.max, builtins.min, builtins.round,
                   builtins.int, builtins.float, operator.floordiv, operator.truediv, operator.mod]:
    RULES.functions.setdefault(_fn, _pinned)  # arithmetic on sizes: no tensors, nothing to tie
RULES.register_function(aten_overloads(
    "empty_strided", "arange", "scalar_tensor", "eye", "linspace", "new_empty_strided", "rand", "randn", "randint",
    "tensor", "tril_indices", "triu_indices"), AtenCreation())
RULES.register_function(aten_overloads("zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full",
                                       "new_empty"), AtenFill())
RULES.register_function(aten_overloads(
    "index", "_unsafe_index", "index_select", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_",
    "masked_select", "nonzero", "sort", "argsort", "topk", "_local_scalar_dense", "item", "unfold", "triu", "tril",
    "diag", "diagonal", "bucketize", "searchsorted", "one_hot", "multinomial", "as_strided", "im2col", "col2im",
    "upsample_nearest2d_backward", "nll_loss_forward", "index_add", "index_copy", "index_fill", "masked_scatter",
    "embedding_bag", "_embedding_bag", "histc", "bincount", "unique_consecutive", "_unique2", "native_dropout", "stft",
    "fft_rfft", "fft_irfft", "fft_fft", "view_as_real", "view_as_complex", "_cdist_forward", "cdist",
    "_weight_norm_interface", "_weight_int4pack_mm", "meshgrid", "cartesian_prod"), _pinned)
