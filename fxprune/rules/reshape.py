"""Reshapes: view/reshape/flatten/unflatten/(un)squeeze, expand and repeat, as methods, functions, modules and
ATen overloads.

Ties come from matching the input and output shapes (:func:`tie_reshape`): where one group of dims splits
into several, the channels follow one factor, chosen by :mod:`fxprune.rules.heads` (attention heads through
merged dims, channel shuffles), the others are pinned. Literal sizes in the graph (``x.view(-1, 400)``,
``aten.view(x, [s0, 2, 4])``) are patched on rewrite from the keep masks; symbolic sizes (``x.size(0)``) are
recomputed from the smaller tensors at run time, and a literal factor inside symbolic size arithmetic
(``s1 * 2`` with 2 heads per batch item under dynamic shapes) is rescaled. A target shape computed at run
time as one tuple (``x.reshape(shape + (-1,))``) has no literal to patch: every output dim keeps its size.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .. import meta
from ..meta import shape_of
from .base import RULES, Rule, RewriteContext, RuleContext, patch_sizes
from .calls import Bound, Family, aten_name, aten_overloads, schema_args, set_schema_arg
from .creation import size_source
from .heads import match_dims, merge_preference, split_preference

__all__ = ["tie_reshape", "patch_sizes", "ReshapeCall", "ReshapeFamily", "RepeatRule"]


def tie_reshape(rc: RuleContext, x: fx.Node, out_index: int | None = None,
                split_prefer: Callable[..., int | None] | None = None,
                merge_prefer: Callable[..., int | None] | None = None) -> None:
    """Tie a reshape's input dims to its output dims (any view/reshape/flatten/squeeze).

    Where one group of input dims splits into several output dims, the channels follow one factor:
    ``split_prefer(ins, outs, ins_nt, outs_nt, n_in)`` may name it (an index into ``outs_nt``; default: the
    outer factor). ``merge_prefer(ins_nt, xa)`` may name the factor a merged dim follows."""
    a, b = rc.shape(x), rc.out_shape(out_index)
    if 0 in a:
        return
    for ins, outs in match_dims(a, b):
        ins_nt = [d for d in ins if a[d] > 1]
        outs_nt = [d for d in outs if b[d] > 1]
        for d in ins:
            if a[d] == 1:
                rc.free(rc.act(x, d))
        for d in outs:
            if b[d] == 1:
                rc.free(rc.out(d, out_index))
        if not ins_nt:
            continue
        xa = [rc.act(x, d) for d in ins_nt]
        oa = [rc.out(d, out_index) for d in outs_nt]
        if len(xa) == 1 and len(oa) == 1:
            rc.tie(xa[0], oa[0])
        elif len(xa) == 1:
            prefer = split_prefer(ins, outs, ins_nt, outs_nt, 1) if split_prefer is not None else 0
            rc.tie_product(xa[0], oa, prefer=prefer)
        elif len(oa) == 1:
            rc.tie_product(oa[0], xa, prefer=merge_prefer(ins_nt, xa) if merge_prefer is not None else None)
        else:
            v = rc.virtual(f"reshape{ins_nt}", int(np.prod([ax.size for ax in xa])))
            rc.tie_product(v, xa)
            prefer = split_prefer(ins, outs, ins_nt, outs_nt, len(xa)) if split_prefer is not None else None
            rc.tie_product(v, oa, prefer=prefer)


@dataclass(frozen=True)
class ReshapeCall:
    """``sizes``: the size argument as written (None: nothing to patch); ``where``: how to write it back —
    ``("varargs", first)``, ``("list", pos)``, ``("kw", name)``, ``("schema", name)`` or ``("unflatten", name)``
    (the sizes of dims ``dim .. dim+len``); ``run_time``: the whole target shape is one value computed at run
    time (nothing to patch, the output keeps its sizes)."""

    input: fx.Node
    sizes: Any = None
    where: tuple = ()
    dim: int = 0
    run_time: bool = False
    expand: bool = False


_SIZE_ARITH = {operator.mul: operator.mul, operator.floordiv: operator.floordiv, operator.add: operator.add,
               operator.sub: operator.sub}


def _new_value(v: Any, rw: RewriteContext, depth: int = 0) -> int | None:
    """The value a size expression of the traced graph takes in the pruned graph (sizes read from tensors
    at their pruned sizes), or None when it is not plain size arithmetic."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if not isinstance(v, fx.Node) or depth > 16:
        return None
    src = size_source(v)
    if src is not None:
        return rw.new_shape(src[0])[src[1]]
    if v.op == "call_function" and v.target in _SIZE_ARITH and len(v.args) == 2:
        a, b = (_new_value(x, rw, depth + 1) for x in v.args)
        return None if a is None or b is None else _SIZE_ARITH[v.target](a, b)
    return None


def _rescaled(node: fx.Node, s: Any, num: int, den: int, depth: int = 0) -> Any:
    """``s * num / den`` as a graph value, by rescaling one literal factor of the product ``s`` (``s0 * 8 * 7``:
    8 heads per batch item become 4), or None when no literal factor divides."""
    if not isinstance(s, fx.Node) or s.target is not operator.mul or len(s.args) != 2 or depth > 8:
        return None
    a, b = s.args
    for lit, other in ((a, b), (b, a)):
        if isinstance(lit, int) and not isinstance(lit, bool) and (lit * num) % den == 0:
            with node.graph.inserting_before(node):
                return node.graph.call_function(operator.mul, (other, lit * num // den))
    for inner, other in ((a, b), (b, a)):
        r = _rescaled(node, inner, num, den, depth + 1)
        if r is not None:
            with node.graph.inserting_before(node):
                return node.graph.call_function(operator.mul, (r, other))
    return None


def _rescale_symbolic(node: fx.Node, old: fx.Node, sizes: list[Any], old_sizes: Sequence[Any],
                      new_shape: tuple[int, ...], rw: RewriteContext, strict: bool) -> list[Any]:
    """Size entries computed at run time (``sizes``: the new graph's, ``old_sizes``: as traced) on a pruned dim:

    - size arithmetic that already gives the new size (``view(n, c // 2, ...)`` with ``c = y.shape[1]`` pruned
      alike): kept, it follows the pruning at run time;
    - a product with a literal factor (``s1 * 2``: 2 heads per batch item; ``s0 * 8 * 7 * 7``): one literal
      factor is rescaled (``s1 * 1``);
    - exactly a dim of a tensor that was not pruned alike (edgenext's ``reshape(B, N, C)`` with ``C = x.shape[2]``
      after its heads, or the input's channels, were pruned): the new size is written as a literal — one of
      the two dims holds channels, whose count is fixed by the parameters, and the model's own reshape says
      they are equal, so the traced value was a constant for every input the model accepts.

    Anything else on a pruned dim is an error when ``strict`` (the ATen spelling), else kept (the pruned graph's
    shape propagation then checks it: never a silent mismatch)."""
    old_shape = shape_of(old)
    out = list(sizes)
    for i, s in enumerate(sizes):
        if not isinstance(s, fx.Node):
            continue
        o = old_sizes[i] if i < len(old_sizes) else None
        v = _new_value(o, rw)
        if v == new_shape[i] or (v is None and old_shape[i] == new_shape[i]):
            continue  # follows the pruning at run time (or is not size arithmetic, on a dim that kept its size)
        num, den = (new_shape[i], v) if v else (new_shape[i], old_shape[i])
        g = math.gcd(num, den)
        r = _rescaled(node, s, num // g, den // g)
        if r is None and size_source(o) is not None:
            r = new_shape[i]
        if r is None and strict:
            raise NotImplementedError(
                f"{old.name}: size {i} is computed at run time ({s.format_node()}) and its dim was pruned "
                f"({old_shape[i]} -> {new_shape[i]}); fxprune cannot rewrite that expression")
        out[i] = s if r is None else r
    return out


class ReshapeFamily(Family):
    name = "reshape"
    reshapes = True
    local = "positional"

    def analyze(self, call: ReshapeCall, node: fx.Node, rc: RuleContext) -> None:
        x = call.input
        if not rc.is_tensor(x) or rc.out_shape() is None:
            return
        if call.expand:
            rc.tie_broadcast([x])
            return
        tie_reshape(rc, x, None, split_preference(node, x), merge_preference(rc, x))
        for other in rc.tensor_args():  # view_as / reshape_as read only the shape
            if other is not x:
                for ax in rc.all_dims(other):
                    rc.free(ax)
        if call.run_time:
            for d in range(len(rc.out_shape())):
                rc.pin(rc.out(d), f"{node.name}: target shape is computed at run time")

    def rewrite_node(self, call: ReshapeCall, node: fx.Node, old: fx.Node, rw: RewriteContext) -> None:
        if call.sizes is None or call.run_time:
            return
        new = rw.new_shape(old)
        kind, key = call.where
        if kind == "unflatten":
            d = call.dim % len(shape_of(call.input))
            new = new[d : d + len(call.sizes)]
        new_sizes = _live(node, call)
        patched = patch_sizes(tuple(new_sizes), tuple(new))
        if not call.expand and kind != "unflatten":
            patched = type(patched)(_rescale_symbolic(node, old, list(patched), tuple(call.sizes), tuple(new), rw,
                                                      strict=kind == "schema"))
        if kind == "schema":
            set_schema_arg(node, key, list(patched))
        elif kind == "unflatten" and aten_name(old):
            set_schema_arg(node, key, list(patched))
        elif kind == "unflatten":
            _set_arg(node, 2, key, patched)
        elif kind == "kw":
            node.kwargs = {**node.kwargs, key: patched}
        elif kind == "list":
            node.args = (*node.args[:key], list(patched) if isinstance(old.args[key], list) else patched,
                         *node.args[key + 1 :])
        else:  # varargs from position `key`
            node.args = (*node.args[:key], *patched)

    def rewrite_module(self, call, module, qualname, rw, nodes):
        new = copy.copy(module)
        if isinstance(module, nn.Unflatten) and nodes:
            shp = rw.new_shape(nodes[0])
            d = module.dim % len(shp)
            new.unflattened_size = tuple(shp[d : d + len(module.unflattened_size)])
        return new


def _set_arg(node: fx.Node, pos: int, name: str, value: Any) -> None:
    if pos < len(node.args):
        node.args = (*node.args[:pos], value, *node.args[pos + 1 :])
    else:
        node.kwargs = {**node.kwargs, name: value}


def _live(node: fx.Node, call: ReshapeCall) -> Any:
    """The size argument in the NEW graph (same structure as ``call.sizes``, nodes of the new graph)."""
    kind, key = call.where
    if kind in ("schema", "unflatten") and aten_name(node):
        return schema_args(node)[key]
    if kind == "unflatten":
        return node.args[2] if len(node.args) > 2 else node.kwargs[key]
    if kind == "kw":
        return node.kwargs[key]
    if kind == "list":
        return node.args[key]
    return tuple(node.args[key:])


RESHAPE = ReshapeFamily()


def _is_size_tuple(v: Any) -> bool:
    """One graph value that is a whole size tuple computed at run time."""
    return (isinstance(v, fx.Node) and v.meta.get("tensor_meta") is None
            and not isinstance(meta.concrete_value(v), int))


def bind_method(node: fx.Node, gm: fx.GraphModule) -> ReshapeCall | None:
    """x.view(*sizes) / x.view(sizes) / x.reshape(...) / torch.reshape(x, shape) / x.expand(...)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, fx.Node):
        return None
    expand = node.target == "expand"
    if "shape" in node.kwargs:
        sizes, where = node.kwargs["shape"], ("kw", "shape")
    elif "size" in node.kwargs:
        sizes, where = node.kwargs["size"], ("kw", "size")
    elif len(node.args) == 2 and isinstance(node.args[1], (list, tuple, torch.Size)):
        sizes, where = node.args[1], ("list", 1)
    else:
        sizes, where = tuple(node.args[1:]), ("varargs", 1)
    run_time = len(sizes) == 1 and _is_size_tuple(sizes[0]) if isinstance(sizes, (list, tuple)) else False
    return ReshapeCall(x, sizes, where, run_time=run_time, expand=expand)


def bind_shape_only(node: fx.Node, gm: fx.GraphModule) -> ReshapeCall | None:
    """squeeze / unsqueeze / flatten / view_as / reshape_as / nn.Flatten: no literal to patch."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    return ReshapeCall(x) if isinstance(x, fx.Node) else None


def bind_unflatten(node: fx.Node, gm: fx.GraphModule) -> ReshapeCall | None:
    if node.op == "call_module":
        return ReshapeCall(node.args[0])
    if aten_name(node):
        a = schema_args(node)
        return ReshapeCall(a["self"], a["sizes"], ("unflatten", "sizes"), a["dim"])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    sizes = node.args[2] if len(node.args) > 2 else node.kwargs["sizes"]
    return ReshapeCall(node.args[0], tuple(sizes), ("unflatten", "sizes"), dim)


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> ReshapeCall | None:
    a = schema_args(node)
    x = a.get("self")
    if not isinstance(x, fx.Node):
        return None
    name = aten_name(node)
    if name in ("expand", "expand_copy"):
        return ReshapeCall(x, a["size"], ("schema", "size"), expand=True)
    key = "size" if "size" in a else "shape"
    sizes = a.get(key)
    if not isinstance(sizes, (list, tuple)):
        return ReshapeCall(x)
    return ReshapeCall(x, sizes, ("schema", key))


class ExpandAs(Rule):
    """x.expand_as(y): broadcast ``x`` to ``y``'s shape (``y`` gives the shape only)."""

    name = "expand_as"
    expands = True
    local = "positional"

    def analyze(self, node, rc: RuleContext) -> None:
        rc.tie_broadcast(rc.tensor_args())


class RepeatRule(Rule):
    """x.repeat(*reps) / aten.repeat: output position p of a repeated dim is input position p mod n."""

    name = "repeat"
    local = "positional"

    def analyze(self, node, rc: RuleContext) -> None:
        x = node.args[0]
        shp, out = rc.shape(x), rc.out_shape()
        if shp is None or out is None:
            return
        lead = len(out) - len(shp)
        for d in range(len(shp)):
            a, o = rc.act(x, d), rc.out(lead + d)
            if shp[d] == out[lead + d]:
                rc.tie(a, o)
            else:
                pos = np.arange(o.size)
                rc.tie_map(a, pos % a.size, o, pos)


_view = Bound(RESHAPE, bind_method, "view")
RULES.register_method(("view", "reshape"), _view)
RULES.register_function((torch.reshape,), _view)
_expand = Bound(RESHAPE, bind_method, "expand")
_expand.reshapes, _expand.expands = False, True
RULES.register_method("expand", _expand)
_expand_as = ExpandAs()
RULES.register_method("expand_as", _expand_as)
RULES.register_function(aten_overloads("expand_as"), _expand_as)
_squeeze = Bound(RESHAPE, bind_shape_only, "squeeze")
RULES.register_function((torch.squeeze, torch.unsqueeze), _squeeze)
RULES.register_method(("squeeze", "unsqueeze", "squeeze_", "unsqueeze_", "view_as", "reshape_as"), _squeeze)
_flatten = Bound(RESHAPE, bind_shape_only, "flatten")
RULES.register_function(torch.flatten, _flatten)
RULES.register_method(("flatten", "ravel"), _flatten)
RULES.register_module(nn.Flatten, _flatten)
_unflatten = Bound(RESHAPE, bind_unflatten, "unflatten")
RULES.register_method("unflatten", _unflatten)
RULES.register_module(nn.Unflatten, _unflatten)
RULES.register_function(aten_overloads("unflatten"), Bound(RESHAPE, bind_unflatten, "aten.unflatten"))
RULES.register_function(aten_overloads("view", "reshape", "_unsafe_view", "view_copy"),
                        Bound(RESHAPE, bind_aten, "aten.view"))
_aten_expand = Bound(RESHAPE, bind_aten, "aten.expand")
_aten_expand.reshapes, _aten_expand.expands = False, True
RULES.register_function(aten_overloads("expand", "expand_copy"), _aten_expand)
RULES.register_function(aten_overloads("unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "unsqueeze_copy",
                                       "squeeze_copy", "flatten", "view_as", "reshape_as"),
                        Bound(RESHAPE, bind_shape_only, "aten.squeeze"))
_repeat = RepeatRule()
RULES.register_method("repeat", _repeat)
RULES.register_function(aten_overloads("repeat"), _repeat)
