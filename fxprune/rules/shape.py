"""Shape ops: flatten/view/reshape, permute/transpose, squeeze, expand/repeat, cat/stack, split/chunk,
narrow, indexing, size queries, and ops that move positions within dims (roll, flip, channel shuffle).

Literal sizes in the graph (``x.view(-1, 400)``, ``torch.split(x, [3, 5], 1)``, ``x[:, :64]``) are
patched by :meth:`rewrite_node` from the keep masks; symbolic sizes (``x.size(0)``) are left alone,
since they are recomputed from the smaller tensors at run time.
"""

from __future__ import annotations

from .. import meta
from ..trace import is_multi

import builtins
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .base import RULES, Rule, RuleContext, RewriteContext
from .examples import ex_cat, ex_flatten_view, ex_getitem, ex_permute, ex_split, ex_expand

__all__ = ["match_dims", "ViewRule", "FlattenRule", "PermuteRule", "CatRule", "SplitRule", "GetItemRule",
           "PermuteWithin"]


def match_dims(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up dims of two shapes with equal element count into groups of equal products.

    >>> match_dims((2, 16, 5, 5), (2, 400))
    [([0], [0]), ([1, 2, 3], [1])]
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        ins: list[int] = []
        outs: list[int] = []
        pa = pb = 1
        if i < len(a):
            pa *= a[i]
            ins.append(i)
            i += 1
        if j < len(b):
            pb *= b[j]
            outs.append(j)
            j += 1
        while pa != pb:
            if (pa < pb and i < len(a)) or j >= len(b):
                if i >= len(a):
                    raise ValueError(f"shapes {a} and {b} have different sizes")
                pa *= a[i]
                ins.append(i)
                i += 1
            else:
                pb *= b[j]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    return groups


def tie_reshape(rc: RuleContext, x: fx.Node, out_index: int | None = None,
                split_prefer: Callable[..., int | None] | None = None,
                merge_prefer: Callable[..., int | None] | None = None) -> None:
    """Tie a reshape's input dims to its output dims (any view/reshape/flatten/squeeze).

    Where one group of input dims splits into several output dims, the channels follow one factor:
    ``split_prefer(ins, outs, ins_nt, outs_nt, n_in)`` may name it (an index into ``outs_nt``); by default a
    single dim follows its outer factor (whole blocks, e.g. attention heads), or the inner one when the
    reshape starts a channel shuffle. ``merge_prefer(ins_nt, xa)`` may name the factor a merged dim follows."""
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
            if split_prefer is not None:
                prefer = split_prefer(ins, outs, ins_nt, outs_nt, 1)
            else:
                # channel shuffle (view -> transpose -> view): units are "channel j of every group", which
                # keeps the shuffle valid after pruning; otherwise whole outer blocks (e.g. attention heads)
                prefer = len(oa) - 1 if _feeds_shuffle(rc.node) else 0
            rc.tie_product(xa[0], oa, prefer=prefer)
        elif len(oa) == 1:
            rc.tie_product(oa[0], xa, prefer=merge_prefer(ins_nt, xa) if merge_prefer is not None else None)
        else:
            v = rc.virtual(f"reshape{ins_nt}", int(np.prod([ax.size for ax in xa])))
            rc.tie_product(v, xa)
            prefer = split_prefer(ins, outs, ins_nt, outs_nt, len(xa)) if split_prefer is not None else None
            rc.tie_product(v, oa, prefer=prefer)


_PERMUTES = ("permute", "transpose", torch.permute, torch.transpose)
_RESHAPES = ("view", "reshape", "flatten", torch.reshape, torch.flatten)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) != 1:
        return None
    u = users[0]
    if u.target == "contiguous":
        return _only_user(u)
    return u


def _feeds_shuffle(node: fx.Node) -> bool:
    """node -> permute/transpose -> view/reshape/flatten: the channel-shuffle idiom."""
    u = _only_user(node)
    if u is None or u.target not in _PERMUTES:
        return False
    v = _only_user(u)
    return v is not None and v.target in _RESHAPES


def _patch_sizes(sizes: Any, new: tuple[int, ...]) -> Any:
    """Replace literal ints (except -1) in a size list by the new sizes; keep Nodes and -1."""
    out = []
    for s, n in zip(sizes, new, strict=True):
        out.append(n if isinstance(s, int) and s != -1 else s)
    return type(sizes)(out) if isinstance(sizes, tuple) else out


def _shape_args(node: fx.Node) -> tuple[int, Any]:
    """(start index in args, sizes) for view/reshape/expand-like calls with sizes as varargs or a list."""
    first = 1
    if len(node.args) == first + 1 and isinstance(node.args[first], (list, tuple, torch.Size)):
        return first, node.args[first]
    if "shape" in node.kwargs:
        return -1, node.kwargs["shape"]
    if "size" in node.kwargs:
        return -2, node.kwargs["size"]
    return first, tuple(node.args[first:])


def _whole_shape_node(node: fx.Node) -> bool:
    """True when the whole size argument is one graph value (a tuple computed at run time)."""
    _, sizes = _shape_args(node)
    return (len(sizes) == 1 and isinstance(sizes[0], fx.Node) and sizes[0].meta.get("tensor_meta") is None
            and not isinstance(meta.concrete_value(sizes[0]), int))


def _set_shape_args(node: fx.Node, old: fx.Node, new_shape: tuple[int, ...]) -> None:
    start, sizes = _shape_args(node)  # the new node's args: same structure, nodes of the new graph
    patched = _patch_sizes(tuple(sizes), new_shape)
    if start == -1:
        node.kwargs = {**node.kwargs, "shape": patched}
    elif start == -2:
        node.kwargs = {**node.kwargs, "size": patched}
    elif len(old.args) == 2 and isinstance(old.args[1], (list, tuple, torch.Size)):
        node.args = (node.args[0], list(patched) if isinstance(old.args[1], list) else patched)
    else:
        node.args = (node.args[0], *patched)


class ViewRule(Rule):
    """view / reshape / squeeze / unsqueeze: shape matching; literal sizes patched on rewrite."""

    name = "view"
    example = staticmethod(ex_flatten_view)

    def __init__(self, patch: bool = True, name: str = "view") -> None:
        self.patch = patch
        self.name = name

    def analyze(self, node, rc: RuleContext) -> None:
        tie_reshape(rc, rc.arg(0, "input"))
        for other in rc.tensor_args()[1:]:  # view_as / reshape_as read only the shape
            for ax in rc.all_dims(other):
                rc.free(ax)
        if self.patch and _whole_shape_node(node) and rc.out_shape() is not None:
            # x.reshape(shape + (-1,)): the sizes are one tuple computed at run time, with no literal to
            # patch; which of them are constants is unknown, so every dim keeps its size
            for d in range(len(rc.out_shape())):
                rc.pin(rc.out(d), f"{node.name}: target shape is computed at run time")

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        if self.patch and not _whole_shape_node(old):
            _set_shape_args(node, old, rw.new_shape(old))


class ExpandRule(Rule):
    """expand(*sizes) / expand_as: broadcast; literal sizes patched."""

    name = "expand"
    example = staticmethod(ex_expand)

    def analyze(self, node, rc: RuleContext) -> None:
        rc.tie_broadcast(rc.tensor_args())

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        if old.target == "expand":
            _set_shape_args(node, old, rw.new_shape(old))


class RepeatRule(Rule):
    """x.repeat(*reps): output position p of a repeated dim is input position p mod n."""

    name = "repeat"

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        shp, out = rc.shape(x), rc.out_shape()
        lead = len(out) - len(shp)
        for d in range(len(shp)):
            a, o = rc.act(x, d), rc.out(lead + d)
            if shp[d] == out[lead + d]:
                rc.tie(a, o)
            else:
                pos = np.arange(o.size)
                rc.tie_map(a, pos % a.size, o, pos)


class FlattenRule(Rule):
    name = "flatten"
    example = staticmethod(ex_flatten_view)

    def analyze(self, node, rc: RuleContext) -> None:
        tie_reshape(rc, rc.arg(0, "input"))


class UnflattenRule(Rule):
    """nn.Unflatten / Tensor.unflatten(dim, sizes): patch the literal sizes."""

    name = "unflatten"

    def analyze(self, node, rc: RuleContext) -> None:
        tie_reshape(rc, rc.arg(0, "input"))

    def rewrite_module(self, module, qualname, rw, nodes=()):
        import copy

        new = copy.copy(module)
        if nodes:
            shp = rw.new_shape(nodes[0])
            d = module.dim % len(shp)
            new.unflattened_size = tuple(shp[d : d + len(module.unflattened_size)])
        return new

    def rewrite_node(self, node, old, rw) -> None:
        if old.op != "call_method":
            return
        dim = old.args[1] if len(old.args) > 1 else old.kwargs["dim"]
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs["sizes"]
        shp = rw.new_shape(old)
        d = dim % len(shp)
        patched = _patch_sizes(tuple(sizes), tuple(shp[d : d + len(sizes)]))
        if len(old.args) > 2:
            node.args = (node.args[0], node.args[1], patched, *node.args[3:])
        else:
            node.kwargs = {**node.kwargs, "sizes": patched}


def _perm(node: fx.Node, nd: int) -> list[int]:
    t = node.target
    args = node.args[1:]
    if t in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not dims:
            dims = node.kwargs["dims"]
        return [d % nd for d in dims]
    if t in ("t", torch.t):
        return list(range(nd))[::-1]
    a = args[0] if args else node.kwargs.get("dim0", node.kwargs.get("source"))
    b = args[1] if len(args) > 1 else node.kwargs.get("dim1", node.kwargs.get("destination"))
    if t in ("movedim", torch.movedim):
        order = [d for d in range(nd) if d != a % nd]
        order.insert(b % nd, a % nd)
        return order
    p = list(range(nd))
    p[a % nd], p[b % nd] = p[b % nd], p[a % nd]
    return p


class PermuteRule(Rule):
    """permute / transpose / swapaxes / t / movedim: output dim i is input dim perm[i]."""

    name = "permute"
    example = staticmethod(ex_permute)

    @staticmethod
    def perm(node: fx.Node, nd: int) -> list[int]:
        """Output dim i is input dim ``perm[i]`` (front ends with other argument layouts override this)."""
        return _perm(node, nd)

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        nd = len(rc.shape(x))
        for i, d in enumerate(self.perm(node, nd)):
            rc.tie(rc.act(x, d), rc.out(i))


def _ex_roll() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    class M(nn.Module):
        """Swin-style shifted windows: roll/flip the spatial dims of an NHWC tensor (channels last)."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Linear(8, 6)
            self.c = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = self.a(x).permute(0, 2, 3, 1)  # NHWC
            y = torch.roll(y, shifts=(-1, 2), dims=(1, 2)).flip(1)
            z = torch.flip(self.b(y), [2]).roll(1, 1).permute(0, 3, 1, 2)
            return self.c(torch.flipud(z))  # batch dim: channels stay prunable

    return M(), (torch.randn(2, 3, 5, 6),)


def _moved_dims_fx(node: fx.Node, nd: int) -> list[int] | None:
    """Dims whose positions ``node`` (a torch-level roll/flip/channel shuffle) moves; None = every dim."""
    t = node.target if node.op != "call_module" else None
    args, kw = node.args[1:], node.kwargs
    if t in ("roll", torch.roll):
        dims = args[1] if len(args) > 1 else kw.get("dims")
    elif t in ("flip", torch.flip):
        if len(args) > 1 or (len(args) == 1 and isinstance(args[0], int)):
            dims = list(args)  # x.flip(1, 2)
        else:
            dims = args[0] if args else kw.get("dims")
    elif t in ("fliplr", torch.fliplr):
        dims = 1
    elif t in ("flipud", torch.flipud):
        dims = 0
    else:  # channel_shuffle (function or nn.ChannelShuffle): channels of (N, C, ...)
        dims = 1
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None
    if isinstance(dims, int):
        return [dims % nd]
    if all(isinstance(d, int) for d in dims):
        return [d % nd for d in dims]
    return None  # dims computed at run time: treat every dim as moved


class PermuteWithin(Rule):
    """roll / flip / fliplr / flipud / channel_shuffle: the output has the input's shape and positions move
    *within* some dims. Those dims are pinned whole (their channel order is not preserved); every other dim
    passes through channel for channel. ``torch.roll`` without ``dims`` rolls the flattened tensor: every
    dim is pinned. Front ends with other argument layouts override :meth:`moved_dims` (the ATen rule does).
    """

    name = "permute_within"
    example = staticmethod(_ex_roll)

    def moved_dims(self, node: fx.Node, nd: int) -> list[int] | None:
        """Dims (non-negative) whose positions the op moves; None = every dim."""
        return _moved_dims_fx(node, nd)

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        nd = len(rc.shape(x))
        dims = self.moved_dims(node, nd)
        moved = set(range(nd)) if dims is None else {d % nd for d in dims}
        for d in range(nd):
            rc.tie(rc.act(x, d), rc.out(d))
            if d in moved:
                rc.pin(rc.act(x, d), f"{node.name} moves positions along dim {d}")


def _tensor_list(rc: RuleContext, arg: Any) -> list[tuple[fx.Node, int | None]]:
    if isinstance(arg, (list, tuple)):
        return [(x, None) for x in arg if rc.is_tensor(x)]
    if isinstance(arg, fx.Node):
        tm = arg.meta.get("tensor_meta")
        if is_multi(tm):
            return [(arg, i) for i in range(len(tm))]
    return []


class CatRule(Rule):
    name = "cat"
    example = staticmethod(ex_cat)

    def analyze(self, node, rc: RuleContext) -> None:
        items = _tensor_list(rc, rc.arg(0, "tensors"))
        dim = rc.arg(1, "dim", 0)
        out = rc.out_shape()
        nd = len(out)
        dim %= nd
        offset = 0
        for x, idx in items:
            shp = rc.shape(x, idx)
            if len(shp) != nd:  # legacy cat of empty 1-D tensors
                continue
            for d in range(nd):
                if d == dim:
                    rc.tie_slice(rc.out(d), offset, rc.act(x, d, idx))
                else:
                    rc.tie(rc.act(x, d, idx), rc.out(d))
            offset += shp[dim]


class StackRule(Rule):
    name = "stack"

    def analyze(self, node, rc: RuleContext) -> None:
        items = _tensor_list(rc, rc.arg(0, "tensors"))
        nd = len(rc.out_shape())
        dim = rc.arg(1, "dim", 0) % nd
        for x, idx in items:
            for d in range(nd - 1):
                rc.tie(rc.act(x, d, idx), rc.out(d if d < dim else d + 1))


def _split_sizes(node: fx.Node, rc_shape: tuple[int, ...]) -> tuple[int, list[int]]:
    if node.target in ("chunk", torch.chunk):
        n = node.args[1] if len(node.args) > 1 else node.kwargs["chunks"]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    elif node.target in ("unbind", torch.unbind):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return dim % len(rc_shape), [1] * rc_shape[dim]
    else:
        n = node.args[1] if len(node.args) > 1 else node.kwargs["split_size_or_sections"] if (
            "split_size_or_sections" in node.kwargs) else node.kwargs["split_size"]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    sizes = [m.shape[dim] for m in node.meta["tensor_meta"]]
    return dim % len(rc_shape), sizes


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


class SplitRule(Rule):
    """split / chunk / unbind (tuple outputs); literal split sizes are patched on rewrite."""

    name = "split"
    example = staticmethod(ex_split)

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        dim, sizes = _split_sizes(node, rc.shape(x))
        tie_split(rc, x, dim, sizes, unbind=node.target in ("unbind", torch.unbind))

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        if old.target in ("unbind", torch.unbind):
            return
        x = old.args[0]
        dim, sizes = _split_sizes(old, rw.new_shape(x))
        if rw.keep_act(x, dim) is None:
            return
        new_sizes = [rw.new_shape(old, i)[dim] for i in range(len(sizes))]
        # Always express as explicit sections: equal chunks may no longer be equal after pruning.
        node.target = torch.split if old.op == "call_function" else "split"
        node.args = (node.args[0], new_sizes, dim)
        node.kwargs = {}


class NarrowRule(Rule):
    name = "narrow"

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        dim, start = rc.arg(1, "dim"), rc.arg(2, "start")
        shp = rc.shape(x)
        dim %= len(shp)
        for d in range(len(shp)):
            if d == dim:
                if isinstance(start, int):
                    rc.tie_slice(rc.act(x, d), start % shp[d], rc.out(d))
            else:
                rc.tie(rc.act(x, d), rc.out(d))

    def rewrite_node(self, node, old, rw) -> None:
        x = old.args[0]
        dim, start, length = old.args[1], old.args[2], old.args[3]
        k = rw.keep_act(x, dim)
        if k is None:
            return
        s = start % len(k)
        node.args = (node.args[0], dim, int(k[:s].sum()), int(k[s : s + length].sum()))


class ShapeQueryRule(Rule):
    """size() / dim() / numel() / .shape / len(): read the shape only."""

    name = "shape_query"

    def analyze(self, node, rc: RuleContext) -> None:
        if rc.out_shape() is not None or is_multi(node.meta.get("tensor_meta")):
            return  # x.T, x.mT, x.data...: a tensor view this rule does not map -> everything pinned
        for x in rc.tensor_args():
            for ax in rc.all_dims(x):
                rc.free(ax)


def _index_entries(idx: Any, nd: int) -> list[Any] | None:
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


class GetItemRule(Rule):
    """``operator.getitem``: item of a tuple output, or basic tensor indexing (ints, slices, None, ...)."""

    name = "getitem"
    example = staticmethod(ex_getitem)

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
        if any(isinstance(e, fx.Node) for e in entries) or any(
            isinstance(e, slice) and any(isinstance(v, fx.Node) for v in (e.start, e.stop, e.step))
            for e in entries
        ):
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
            start, stop, step = e.indices(shp[i])
            o = rc.out(j)
            if step == 1:
                rc.tie_slice(a, start, o)
            else:
                pos = np.arange(o.size)
                rc.tie_map(a, start + pos * step, o, pos)
                rc.pin(a, f"strided slice at {node.name}")
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
            if isinstance(e, fx.Node) or (isinstance(e, slice) and any(
                    isinstance(v, fx.Node) for v in (e.start, e.stop, e.step))):
                new.append(e_new)
                i += 1
                continue
            k = rw.keep_act(src, i)
            if k is not None and isinstance(e, int):
                new.append(int(k[: e % shp[i]].sum()))
                changed = True
            elif k is not None and isinstance(e, slice) and e != slice(None):
                start, stop, step = e.indices(shp[i])
                ns = int(k[:start].sum())
                new.append(slice(ns, ns + int(k[start:stop].sum()), None))
                changed = True
            else:
                new.append(e_new)
            i += 1
        if changed:
            node.args = (node.args[0], tuple(new))


view_rule = ViewRule()
RULES.register_method(("view", "reshape"), view_rule)
RULES.register_function((torch.reshape,), view_rule)
squeeze = ViewRule(patch=False, name="squeeze")
RULES.register_function((torch.squeeze, torch.unsqueeze), squeeze)
RULES.register_method(("squeeze", "unsqueeze", "squeeze_", "unsqueeze_", "view_as", "reshape_as"), squeeze)
flatten = FlattenRule()
RULES.register_function(torch.flatten, flatten)
RULES.register_method(("flatten", "ravel"), flatten)
RULES.register_module(nn.Flatten, flatten)
unflatten = UnflattenRule()
RULES.register_method("unflatten", unflatten)
RULES.register_module(nn.Unflatten, unflatten)
permute = PermuteRule()
RULES.register_function((torch.permute, torch.transpose, torch.swapaxes, torch.t, torch.movedim), permute)
RULES.register_method(("permute", "transpose", "swapaxes", "t", "movedim"), permute)
RULES.register_method(("expand", "expand_as"), ExpandRule())
RULES.register_method("repeat", RepeatRule())
RULES.register_function((torch.cat, torch.concat, torch.concatenate), CatRule())
RULES.register_function(torch.stack, StackRule())
split = SplitRule()
RULES.register_function((torch.split, torch.chunk, torch.unbind), split)
RULES.register_method(("split", "chunk", "unbind"), split)
RULES.register_function(torch.narrow, NarrowRule())
RULES.register_method("narrow", NarrowRule())
shape_query = ShapeQueryRule()
RULES.register_method(("size", "dim", "numel", "nelement", "ndimension", "element_size", "get_device"), shape_query)
RULES.register_function((builtins.getattr, builtins.len, torch.numel), shape_query)
RULES.register_function(operator.getitem, GetItemRule())
within = PermuteWithin()
RULES.register_function((torch.roll, torch.flip, torch.fliplr, torch.flipud, torch.channel_shuffle,
                         torch.nn.functional.channel_shuffle, torch.native_channel_shuffle), within)
RULES.register_method(("roll", "flip", "fliplr", "flipud"), within)
RULES.register_module(nn.ChannelShuffle, within)
