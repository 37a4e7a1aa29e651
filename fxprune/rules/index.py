"""Indexing: split/chunk/unbind, narrow/slice, select, basic ``x[...]`` indexing, size queries, index_put.

* Split (:class:`SplitCall`; ``torch.split``/``chunk``/``unbind``, methods, ATen ``split``/
  ``split_with_sizes``/``tensor_split``/``chunk``/``unbind``): output ``i`` is the slice of ``dim`` after the
  earlier pieces (sizes read from the output shapes); rewritten as explicit sections, since equal chunks may
  no longer be equal after pruning. ``unbind`` reads single positions: its dim is pinned.
* Slices (:class:`SliceCall`; ``narrow``, ATen ``slice``/``narrow``, ``x[a:b]``): a contiguous slice ties to
  a range and its bounds are renumbered on rewrite; a strided slice pins its dim.
* ``select``/``x[i]``: the selected position is pinned; the index is renumbered on rewrite.
* Size queries (``x.size()``, ``x.shape``, ``len``, ATen ``sym_size``...) read the shape only.
* ``index_put``: the output is ``self`` with entries overwritten (indices and values address positions).
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..meta import is_multi, shape_of
from .base import RULES, Rule, RewriteContext, RuleContext
from .calls import Bound, Family, aten_name, aten_overloads, aten_self, call_arg, schema_args, set_schema_arg

A = torch.ops.aten

__all__ = ["SplitCall", "SplitFamily", "SliceCall", "SliceFamily", "tie_split", "tie_range", "GetItemRule",
           "ShapeQueryRule", "IndexPutRule"]


def tie_split(rc: RuleContext, x: fx.Node, dim: int, sizes: list[int], unbind: bool) -> None:
    """Output ``i`` of a split of ``x`` along ``dim`` into pieces of ``sizes`` is the slice starting at the
    sum of the earlier sizes; the other dims pass through. ``unbind`` (pieces of 1, ``dim`` dropped) selects
    single positions, so ``dim`` is pinned."""
    nd = len(rc.shape(x))
    offset = 0
    for i, s in enumerate(sizes):
        for d in range(nd):
            if d == dim:
                if unbind:
                    rc.pin(rc.act(x, d), "unbind selects single positions")
                else:
                    rc.tie_slice(rc.act(x, d), offset, rc.out(d, i))
            else:
                rc.tie(rc.act(x, d), rc.out(d if (not unbind or d < dim) else d - 1, i))
        offset += s


@dataclass(frozen=True)
class SplitCall:
    input: fx.Node
    dim: int
    sizes: tuple[int, ...]
    unbind: bool
    spelling: str  # "function" | "method" | "aten"


class SplitFamily(Family):
    name = "split"
    local = "positional"

    def analyze(self, call: SplitCall, node, rc: RuleContext) -> None:
        tie_split(rc, call.input, call.dim, list(call.sizes), call.unbind)

    def rewrite_node(self, call: SplitCall, node, old, rw: RewriteContext) -> None:
        if call.unbind or rw.keep_act(call.input, call.dim) is None:
            return
        sizes = [rw.new_shape(old, i)[call.dim] for i in range(len(call.sizes))]
        if call.spelling == "aten":
            node.target = A.split_with_sizes.default
        else:
            node.target = torch.split if call.spelling == "function" else "split"
        node.args = (node.args[0], sizes, call.dim)
        node.kwargs = {}

    def positional_dim(self, call, node) -> int | None:
        return call.dim


def _split_call(node: fx.Node, x: Any, dim: Any, unbind: bool, spelling: str) -> SplitCall | None:
    xs, tm = shape_of(x), node.meta.get("tensor_meta")
    if xs is None or not isinstance(dim, int) or not is_multi(tm):
        return None
    dim %= len(xs)
    sizes = tuple(1 for _ in tm) if unbind else tuple(int(m.shape[dim]) for m in tm)
    return SplitCall(x, dim, sizes, unbind, spelling)


def bind_split_torch(node: fx.Node, gm: fx.GraphModule) -> SplitCall | None:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    x = call_arg(node, 0, "input")
    dim = call_arg(node, 1 if name == "unbind" else 2, "dim", 0)
    return _split_call(node, x, dim, name == "unbind", "method" if node.op == "call_method" else "function")


def bind_split_aten(node: fx.Node, gm: fx.GraphModule) -> SplitCall | None:
    a = schema_args(node)
    return _split_call(node, a["self"], a.get("dim") or 0, aten_name(node) == "unbind", "aten")


SPLIT = SplitFamily()
_split = Bound(SPLIT, bind_split_torch, "split")
RULES.register_function((torch.split, torch.chunk, torch.unbind, torch.tensor_split), _split)
RULES.register_method(("split", "chunk", "unbind", "tensor_split"), _split)
RULES.register_function(aten_overloads("split", "split_with_sizes", "tensor_split", "chunk", "unbind", "split_copy",
                                       "split_with_sizes_copy", "unsafe_split", "unsafe_chunk"),
                        Bound(SPLIT, bind_split_aten, "aten.split"))


def tie_range(rc: RuleContext, node: fx.Node, a: Any, o: Any, start: int, step: int) -> None:
    """Output axis ``o`` is ``a[start::step]``: a contiguous slice ties to a range of ``a``; a strided one
    ties position by position and pins ``a`` (its positions no longer form whole channels)."""
    if step == 1:
        rc.tie_slice(a, start, o)
        return
    pos = np.arange(o.size)
    rc.tie_map(a, start + pos * step, o, pos)
    rc.pin(a, f"strided slice at {node.name}")


@dataclass(frozen=True)
class SliceCall:
    """``x`` sliced along ``dim`` (``start``, ``stop``, ``step`` resolved; None: bounds computed at run time);
    ``select``: one position, the dim dropped."""

    input: fx.Node
    dim: int
    bounds: tuple[int, int, int] | None
    select: bool
    spelling: str  # "narrow" | "aten"


class SliceFamily(Family):
    name = "slice"
    local = "positional"

    def analyze(self, call: SliceCall, node, rc: RuleContext) -> None:
        x, dim = call.input, call.dim
        shp = rc.shape(x)
        j = 0
        for d in range(len(shp)):
            if d == dim:
                if call.select:
                    if call.bounds is not None:
                        rc.pin(rc.act(x, d), f"indexed by a constant at {node.name}", idx=np.array([call.bounds[0]]))
                    continue
                j += 1
                continue
            rc.tie(rc.act(x, d), rc.out(j))
            j += 1
        if call.select or call.bounds is None:
            return  # the sliced dim stays pinned (symbolic bounds)
        tie_range(rc, node, rc.act(x, dim), rc.out(dim), call.bounds[0], call.bounds[2])

    def rewrite_node(self, call: SliceCall, node, old, rw: RewriteContext) -> None:
        k = rw.keep_act(call.input, call.dim)
        if k is None or call.bounds is None:
            return
        start, stop, step = call.bounds
        ns = int(k[:start].sum())
        if call.select:
            set_schema_arg(node, "index", ns)
        elif step != 1:
            return
        elif call.spelling == "aten" and aten_name(old) in ("slice", "slice_copy"):
            set_schema_arg(node, "start", ns)
            set_schema_arg(node, "end", ns + int(k[start:stop].sum()))
        elif call.spelling == "aten":
            set_schema_arg(node, "start", ns)
            set_schema_arg(node, "length", int(k[start:stop].sum()))
        else:  # torch.narrow / x.narrow(dim, start, length)
            node.args = (node.args[0], call.dim, ns, int(k[start:stop].sum()))
            node.kwargs = {}

    def dim_origins(self, call, node, dim):
        xs = shape_of(call.input)
        if xs is None:
            return []
        if call.select:
            src = dim if dim < call.dim else dim + 1
            return [(call.input, src)] if src < len(xs) else []
        if dim != call.dim or xs[dim] == shape_of(node)[dim]:
            return [(call.input, dim)]
        return []

    def positional_dim(self, call, node) -> int | None:
        return call.dim if call.select else None


def _bounds(start: Any, stop: Any, step: Any, size: int) -> tuple[int, int, int] | None:
    if any(isinstance(v, fx.Node) for v in (start, stop, step)):
        return None
    return slice(start, stop, step or 1).indices(size)


def bind_narrow(node: fx.Node, gm: fx.GraphModule) -> SliceCall | None:
    x, dim, start, length = (call_arg(node, i, n) for i, n in enumerate(("input", "dim", "start", "length")))
    xs = shape_of(x)
    if xs is None or not isinstance(dim, int) or not isinstance(start, int) or not isinstance(length, int):
        return None
    dim %= len(xs)
    s = start % xs[dim]
    return SliceCall(x, dim, (s, s + length, 1), False, "narrow")


def bind_slice_aten(node: fx.Node, gm: fx.GraphModule) -> SliceCall | None:
    bound = aten_self(node)
    if bound is None:
        return None
    a, x, xs = bound
    dim = int(a.get("dim") or 0) % len(xs)
    name = aten_name(node)
    if name in ("select", "select_copy"):
        i = a["index"]
        return SliceCall(x, dim, (i % xs[dim], i % xs[dim] + 1, 1) if isinstance(i, int) else None, True, "aten")
    if name in ("narrow", "narrow_copy"):
        s, n = a["start"], a["length"]
        b = None if isinstance(s, fx.Node) or isinstance(n, fx.Node) else (s % xs[dim], s % xs[dim] + n, 1)
        return SliceCall(x, dim, b, False, "aten")
    return SliceCall(x, dim, _bounds(a.get("start"), a.get("end"), a.get("step"), xs[dim]), False, "aten")


SLICE = SliceFamily()
_narrow = Bound(SLICE, bind_narrow, "narrow")
RULES.register_function(torch.narrow, _narrow)
RULES.register_method("narrow", _narrow)
RULES.register_function(aten_overloads("slice", "slice_copy", "select", "select_copy", "narrow", "narrow_copy"),
                        Bound(SLICE, bind_slice_aten, "aten.slice"))


class ShapeQueryRule(Rule):
    """size() / dim() / numel() / .shape / len() / ATen sym_size: read the shape only."""

    name = "shape_query"

    def analyze(self, node, rc: RuleContext) -> None:
        if rc.out_shape() is not None or is_multi(node.meta.get("tensor_meta")):
            return  # x.T, x.mT, x.data...: a tensor view this rule does not map -> everything pinned
        for x in rc.tensor_args():
            for ax in rc.all_dims(x):
                rc.free(ax)


_shape_query = ShapeQueryRule()
RULES.register_method(("size", "dim", "numel", "nelement", "ndimension", "element_size", "get_device"), _shape_query)
RULES.register_function((builtins.getattr, builtins.len, torch.numel), _shape_query)
RULES.register_function(aten_overloads("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "dim",
                                       "numel"), _shape_query)


def _index_entries(idx: Any, nd: int) -> list[Any]:
    entries = list(idx) if isinstance(idx, tuple) else [idx]
    consuming = sum(1 for e in entries if e is not None and e is not Ellipsis)
    out: list[Any] = []
    for e in entries:
        if e is Ellipsis:
            out += [slice(None)] * (nd - consuming)
        else:
            out.append(e)
    if Ellipsis not in entries:
        out += [slice(None)] * (nd - consuming)
    return out


def _dynamic(e: Any) -> bool:
    return isinstance(e, fx.Node) or (isinstance(e, slice) and any(isinstance(v, fx.Node) for v in (e.start, e.stop, e.step)))


class GetItemRule(Rule):
    """``operator.getitem``: item of a tuple output, or basic tensor indexing (ints, slices, None, ...)."""

    name = "getitem"
    local = "positional"

    def analyze(self, node, rc: RuleContext) -> None:
        src, idx = node.args[0], node.args[1]
        tm = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
        if is_multi(tm):  # picking one output of a multi-output op
            if isinstance(idx, int) and rc.out_shape() is not None:
                idx %= len(tm)  # spx[-1]: the axes are keyed by the item's position
                for d in range(len(rc.out_shape())):
                    rc.tie(rc.act(src, d, idx), rc.out(d))
            return
        if tm is None or rc.out_shape() is None:
            return
        shp = tuple(tm.shape)
        entries = _index_entries(idx, len(shp))
        if any(_dynamic(e) for e in entries):
            return  # advanced or dynamic indexing: everything stays pinned (finish())
        i = j = 0
        for e in entries:
            if e is None:
                rc.free(rc.out(j))
                j += 1
                continue
            a = rc.act(src, i)
            if isinstance(e, int):
                rc.pin(a, f"indexed by a constant at {node.name}", idx=np.array([e % shp[i]]))
                i += 1
                continue
            start, _, step = e.indices(shp[i])
            tie_range(rc, node, a, rc.out(j), start, step)
            i += 1
            j += 1

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        src, idx = old.args[0], old.args[1]
        tm = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
        if is_multi(tm) or tm is None:
            return
        shp = tuple(tm.shape)
        entries = _index_entries(idx, len(shp))
        new_entries = _index_entries(node.args[1], len(shp))  # same structure, nodes of the new graph
        new: list[Any] = []
        i = 0
        changed = False
        for e, e_new in zip(entries, new_entries, strict=True):
            if e is None:
                new.append(e)
                continue
            k = rw.keep_act(src, i) if not _dynamic(e) else None
            if k is not None and isinstance(e, int):
                new.append(int(k[: e % shp[i]].sum()))
                changed = True
            elif k is not None and isinstance(e, slice) and e != slice(None):
                start, stop, _ = e.indices(shp[i])
                ns = int(k[:start].sum())
                new.append(slice(ns, ns + int(k[start:stop].sum()), None))
                changed = True
            else:
                new.append(e_new)
            i += 1
        if changed:
            node.args = (node.args[0], tuple(new))

    def dim_origins(self, node, dim):
        src, idx = node.args[0], node.args[1]
        tm = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
        if tm is None or is_multi(tm):
            return []
        entries = _index_entries(idx, len(tm.shape))
        i = j = 0
        for e in entries:
            if e is None:
                j += 1
                continue
            if isinstance(e, int) or _dynamic(e):
                i += 1
                continue
            if j == dim:
                return [(src, i)] if e == slice(None) else []
            i += 1
            j += 1
        return []

    def positional_dim(self, node) -> int | None:
        src, idx = node.args[0], node.args[1]
        tm = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
        if tm is None or is_multi(tm):
            return None
        for i, e in enumerate(_index_entries(idx, len(tm.shape))):
            if isinstance(e, int):
                return i
        return None


RULES.register_function(operator.getitem, GetItemRule())


class IndexPutRule(Rule):
    """index_put(_)(self, indices, values): the output dims follow ``self``; the indices and values address
    positions (pinned)."""

    name = "aten.index_put"

    def analyze(self, node, rc: RuleContext) -> None:
        rc.tie_same_shape(node.args[0])


RULES.register_function(aten_overloads("index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"),
                        IndexPutRule())
