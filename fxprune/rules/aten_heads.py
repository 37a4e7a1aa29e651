"""Reshapes that split attention heads out of merged dims, on the torch.export (ATen) path.

A reshape that splits one dim into several (``E -> (H, d)``) ties the channel identity of the merged dim to
ONE of the factors (:meth:`RuleContext.tie_product`); the others are pinned. On the fx path the default
choice (the outermost factor) is right because hand-written attention splits the projection's output
directly. ATen graphs of ``nn.MultiheadAttention`` (and of hand-written attention in the style of older
Hugging Face models: ``view(bsz * num_heads, -1, head_dim)``) take detours the default choice gets wrong:

* the packed in-projection ``(L, B, 3E)`` is unflattened to ``(L, B, 3, E)`` and q, k, v are taken with
  ``select`` on the ``3`` dim: identity must follow ``E`` (then row ``e`` of q, k and v is one unit; heads
  tie them further), since a dim read position by position (``select``/``unbind``/``split``) is pinned;
* ``(L, B, E)`` is viewed as ``(L, B*H, d)``, transposed, and viewed as ``(B, H, L, d)``: the merged
  ``B*H`` dim carries heads in its *inner* digit, so splitting it must follow ``H``, not ``B``.

This module answers "which factor carries the channels" from the graph itself: :func:`channel_digits`
walks back from a dim to the op that produced its channels (linear, conv, embedding) through element-wise
ops, transposes, selects and reshapes, and returns the span of mixed-radix digits the channel identity
depends on. A split then follows the outermost factor overlapping that span that is not read position by
position downstream. Where the walk finds nothing (unknown producers) the default choice stands, so this
only ever changes which factor is chosen, never what a tie means: every choice is exact, the right one
just prunes more.

Literal sizes inside symbolic size arithmetic (``view(x, [s0, s1 * 2, 4])`` with ``2`` = heads under
dynamic shapes) are patched on rewrite as well.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..trace import shape_of
from .base import RewriteContext, RuleContext
from .shape import ViewRule, UnflattenRule, match_dims, tie_reshape, _patch_sizes

__all__ = ["channel_digits", "AtenView", "AtenUnflattenHeads", "tie_reshape_heads"]

log = logging.getLogger(__name__)

_MAX_DEPTH = 96

#: ops whose output dim i is input 0's dim i (shape-preserving)
_SAME = {
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "mish", "hardswish", "hardsigmoid", "sigmoid",
    "tanh", "elu", "selu", "celu", "leaky_relu", "softplus", "hardtanh", "exp", "neg", "sqrt", "rsqrt", "erf",
    "dropout", "dropout_", "clone", "contiguous", "alias", "detach", "_to_copy", "to", "softmax", "_softmax",
    "log_softmax", "_log_softmax", "_safe_softmax", "layer_norm", "rms_norm", "native_layer_norm",
    "masked_fill", "masked_fill_", "where",
}
_BINARY = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub", "true_divide"}
_PERMUTE = {"permute", "permute_copy", "transpose", "transpose_", "transpose_copy", "t", "t_", "movedim",
            "swapaxes", "swapdims", "numpy_T"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "view_copy", "unflatten", "flatten"}
_POSITIONAL = {"select", "select_copy", "unbind", "split", "split_with_sizes", "chunk", "unsafe_split",
               "unsafe_chunk", "split_copy", "split_with_sizes_copy", "index_select"}


def _name(node: fx.Node) -> str | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    return node.target._schema.name.split("::")[-1]


def _arg0(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


def _dims_in(node: fx.Node, dim: int) -> int | None:
    """Input-0 dim that output dim ``dim`` of a dim-inserting/removing/permuting op comes from."""
    from .aten import _aten_perm, bind

    name = _name(node)
    x = _arg0(node)
    xs, os_ = shape_of(x), shape_of(node)
    if xs is None or os_ is None:
        return None
    if name in _PERMUTE:
        return _aten_perm(node, len(os_))[dim]
    if name in ("unsqueeze", "unsqueeze_", "unsqueeze_copy"):
        a = int(bind(node)["dim"]) % len(os_)
        return None if dim == a else dim - (dim > a)
    if name in ("squeeze", "squeeze_", "squeeze_copy"):
        dims = bind(node).get("dim")
        if dims is None:
            gone = {d for d, s in enumerate(xs) if s == 1}
        else:
            dims = [dims] if isinstance(dims, int) else list(dims)
            gone = {d % len(xs) for d in dims if xs[d % len(xs)] == 1}
        kept = [d for d in range(len(xs)) if d not in gone]
        return kept[dim] if len(kept) == len(os_) else None
    if name in ("select", "select_copy"):
        sd = int(bind(node)["dim"]) % len(xs)
        return dim if dim < sd else dim + 1
    if name in ("slice", "slice_copy"):
        sd = int(bind(node).get("dim") or 0) % len(xs)
        return dim if (dim != sd or xs[dim] == os_[dim]) else None  # a proper slice: not followed
    return None


def _reshape_groups(node: fx.Node) -> tuple[list[tuple[list[int], list[int]]], tuple[int, ...], tuple[int, ...]] | None:
    xs, os_ = shape_of(_arg0(node)), shape_of(node)
    if xs is None or os_ is None or 0 in xs:
        return None
    try:
        return match_dims(tuple(xs), tuple(os_)), tuple(xs), tuple(os_)
    except ValueError:
        return None


def _group_digits(node: fx.Node, ins: list[int], outs: list[int], xs, os_, memo, depth) -> dict[int, tuple[int, int] | None] | None:
    """Digits of each output dim of one reshape group; None when the input's channels are unknown."""
    carrying = []
    for d in ins:
        if xs[d] > 1:
            dg = channel_digits(_arg0(node), d, memo, depth + 1)
            if dg is not None:
                carrying.append((d, dg))
    if not carrying:
        return None
    # flat place values of each carrying dim's digits; several dims (B*H and d after a transpose) may
    # carry adjacent digits of one channel index: their spans must join into one interval
    spans = []
    for d, (lo, hi) in carrying:
        inner = int(np.prod([xs[i] for i in ins if i > d], dtype=np.int64))
        spans.append((inner * lo, inner * hi))
    spans.sort()
    for (_, h0), (l1, _) in zip(spans, spans[1:]):
        if h0 != l1:
            return None
    span_lo, span_hi = spans[0][0], spans[-1][1]
    res: dict[int, tuple[int, int] | None] = {}
    for j in outs:
        inner_o = int(np.prod([os_[i] for i in outs if i > j], dtype=np.int64))
        a, b = max(span_lo, inner_o), min(span_hi, inner_o * os_[j])
        if a >= b or os_[j] == 1:
            res[j] = None
        elif a % inner_o or b % inner_o:
            return None  # radices do not align: give up (the default choice stands)
        else:
            res[j] = (a // inner_o, b // inner_o)
    return res


def channel_digits(node: Any, dim: int, memo: dict | None = None, depth: int = 0) -> tuple[int, int] | None:
    """``(lo, hi)``: the channel identity of position ``p`` along ``dim`` of ``node`` is a function of
    ``(p // lo) % (hi // lo)`` (the mixed-radix digits between place values ``lo`` and ``hi``); None when
    the dim carries no channels or the walk cannot tell.

    A linear layer's output features are ``(1, n)``; after ``view(B*E) -> (B*H, d)`` the merged dim is
    ``(1, H)`` (its inner digit); after unflattening ``3E -> (3, E)`` the ``E`` dim is ``(1, E)``.
    """
    if memo is None:
        memo = {}
    if depth > _MAX_DEPTH or not isinstance(node, fx.Node):
        return None
    shp = shape_of(node)
    if shp is None or not shp:
        return None
    dim %= len(shp)
    key = (node.name, dim)
    if key in memo:
        return memo[key]
    memo[key] = None  # cycle guard
    res = _channel_digits(node, dim, shp, memo, depth)
    memo[key] = res
    return res


def _channel_digits(node: fx.Node, dim: int, shp: tuple[int, ...], memo: dict, depth: int) -> tuple[int, int] | None:
    name = _name(node)
    if name is None:
        return None
    nd = len(shp)
    if name == "linear":
        return (1, shp[dim]) if dim == nd - 1 else channel_digits(_arg0(node), dim, memo, depth + 1)
    if name == "embedding":
        return (1, shp[dim]) if dim == nd - 1 else None
    if name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                "conv_transpose2d", "conv_transpose3d"):
        return (1, shp[dim]) if dim == 1 else None
    if name in _SAME:
        return channel_digits(_arg0(node), dim, memo, depth + 1)
    if name in _BINARY:
        for x in node.args:
            xs = shape_of(x) if isinstance(x, fx.Node) else None
            if xs is None:
                continue
            k = dim - (nd - len(xs))
            if k >= 0 and xs[k] == shp[dim]:
                dg = channel_digits(x, k, memo, depth + 1)
                if dg is not None:
                    return dg
        return None
    if name in ("scaled_dot_product_attention", "matmul", "bmm", "mm"):
        a, b = node.args[0], node.args[2 if name == "scaled_dot_product_attention" else 1]
        if dim == nd - 1:
            return channel_digits(b, -1, memo, depth + 1)
        xs = shape_of(a)
        k = dim - (nd - len(xs)) if xs is not None else -1
        return channel_digits(a, k, memo, depth + 1) if k >= 0 else None
    if name in _RESHAPE:
        g = _reshape_groups(node)
        if g is None:
            return None
        groups, xs, os_ = g
        for ins, outs in groups:
            if dim in outs:
                res = _group_digits(node, ins, outs, xs, os_, memo, depth)
                return None if res is None else res[dim]
        return None
    src = _dims_in(node, dim)
    return None if src is None else channel_digits(_arg0(node), src, memo, depth + 1)


def _read_positionally(node: fx.Node, dim: int, depth: int = 0) -> bool:
    """Whether some user reads ``dim`` of ``node`` position by position (select/unbind/split), following
    the dim through transposes, (un)squeezes and copies."""
    if depth > _MAX_DEPTH:
        return False
    from .aten import bind

    for u in node.users:
        name = _name(u)
        if name is None or not u.args or u.args[0] is not node:
            continue
        if name in _POSITIONAL:
            a = bind(u)
            if int(a.get("dim") or 0) % len(shape_of(node)) == dim:
                return True
            continue
        os_ = shape_of(u)
        if os_ is None:
            continue
        if name in _SAME:
            if _read_positionally(u, dim, depth + 1):
                return True
            continue
        for j in range(len(os_)):
            if (name in _PERMUTE or name.startswith(("unsqueeze", "squeeze"))) and _dims_in(u, j) == dim:
                if _read_positionally(u, j, depth + 1):
                    return True
    return False


def _is_broadcast(node: fx.Node, dim: int) -> bool:
    """Whether ``dim`` of ``node`` is an ``expand`` of a size-1 (or missing) dim: every position is equal."""
    if _name(node) not in ("expand", "expand_copy"):
        return False
    xs, os_ = shape_of(_arg0(node)), shape_of(node)
    if xs is None or os_ is None:
        return False
    k = dim - (len(os_) - len(xs))
    return k < 0 or (xs[k] == 1 and os_[dim] > 1)


def _feeds_shuffle(node: fx.Node) -> bool:
    """view -> permute/transpose -> (contiguous) -> view: the channel-shuffle idiom, in ATen spelling."""
    def only(n: fx.Node) -> fx.Node | None:
        us = list(n.users)
        if len(us) != 1:
            return None
        return only(us[0]) if _name(us[0]) in ("contiguous", "clone") else us[0]

    u = only(node)
    if u is None or _name(u) not in _PERMUTE:
        return False
    v = only(u)
    return v is not None and _name(v) in _RESHAPE


def _choose(node: fx.Node, outs: list[int], digits: dict[int, tuple[int, int] | None] | None) -> int | None:
    """Position in ``outs`` (non-trivial output dims of a split) of the factor to carry the channels."""
    if digits is None:
        return None
    for pos, j in enumerate(outs):
        if digits.get(j) is not None and not _read_positionally(node, j):
            return pos
    return None


def tie_reshape_heads(rc: RuleContext, node: fx.Node, x: fx.Node) -> None:
    """:func:`fxprune.rules.shape.tie_reshape`, with splits following the factor that carries channels."""
    a, b = rc.shape(x), rc.out_shape()
    memo: dict = {}
    shuffle = _feeds_shuffle(node)

    def split_prefer(ins, outs, ins_nt, outs_nt, n_in) -> int | None:
        if shuffle and n_in == 1:
            return len(outs_nt) - 1
        prefer = _choose(node, outs_nt, _group_digits(node, ins, outs, a, b, memo, 0))
        return 0 if prefer is None and n_in == 1 else prefer

    def merge_prefer(ins_nt, xa) -> int | None:
        # merging dims none of which carries channels yet (a key padding mask (B, H, 1, L) expanded over
        # heads, flattened to B*H): follow a broadcast factor, which can take any identity, so the merged
        # dim can later tie to the heads of the scores it is added to
        if any(ax.key in rc.table.live for ax in xa):
            return None
        bc = [i for i, d in enumerate(ins_nt) if _is_broadcast(x, d)]
        return bc[-1] if bc else None

    tie_reshape(rc, x, None, split_prefer, merge_prefer)


def _patch_symbolic_sizes(node: fx.Node, old: fx.Node, sizes: Any, rw: RewriteContext, arg: str) -> None:
    """Sizes computed at run time from a literal (``s1 * 2``: 2 heads per batch item) on a pruned dim: the
    literal is rescaled (``s1 * 1``). Anything else on a pruned dim is an error (never a silent mismatch)."""
    from .aten import _set_arg

    old_shape = shape_of(old)
    new_shape = rw.new_shape(old)
    if not isinstance(sizes, (list, tuple)) or len(sizes) != len(new_shape):
        return
    out = list(sizes)
    changed = False
    for i, s in enumerate(sizes):
        if not isinstance(s, fx.Node) or old_shape[i] == new_shape[i]:
            continue
        lits = [v for v in s.args if isinstance(v, int) and not isinstance(v, bool)]
        if s.target is operator.mul and len(s.args) == 2 and len(lits) == 1:
            c = lits[0]
            if (c * new_shape[i]) % old_shape[i] == 0:
                other = s.args[0] if isinstance(s.args[1], int) else s.args[1]
                with node.graph.inserting_before(node):
                    out[i] = node.graph.call_function(operator.mul, (other, c * new_shape[i] // old_shape[i]))
                changed = True
                continue
        raise NotImplementedError(
            f"{old.name}: size {i} is computed at run time ({s.format_node()}) and its dim was pruned "
            f"({old_shape[i]} -> {new_shape[i]}); fxprune cannot rewrite that expression")
    if changed:
        _set_arg(node, arg, out)


class AtenView(ViewRule):
    """aten.view / reshape / _unsafe_view: :func:`tie_reshape_heads`; literal sizes patched, including a
    literal factor inside symbolic size arithmetic."""

    def __init__(self) -> None:
        super().__init__(patch=True, name="aten.view")

    @staticmethod
    def example():
        from .aten import _ex_mha_packed

        return _ex_mha_packed()

    def analyze(self, node, rc: RuleContext) -> None:
        tie_reshape_heads(rc, node, node.args[0])

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        from .aten import bind

        a = bind(node)
        key = "size" if "size" in a else "shape"
        sizes = a.get(key)
        if not isinstance(sizes, (list, tuple)):
            return
        new = rw.new_shape(old)
        from .aten import _set_arg

        _set_arg(node, key, list(_patch_sizes(tuple(sizes), new)))
        _patch_symbolic_sizes(node, old, bind(node)[key], rw, key)


class AtenUnflattenHeads(UnflattenRule):
    """aten.unflatten.int(self, dim, sizes): like a view (packed q/k/v follow ``E``, not the ``3``)."""

    name = "aten.unflatten"

    @staticmethod
    def example():
        from .aten import _ex_mha_masked

        return _ex_mha_masked()

    def analyze(self, node, rc: RuleContext) -> None:
        tie_reshape_heads(rc, node, node.args[0])

    def rewrite_node(self, node, old, rw) -> None:
        from .aten import AtenUnflatten

        AtenUnflatten.rewrite_node(self, node, old, rw)  # literal sizes patched the same way
