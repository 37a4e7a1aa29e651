"""Which factor of a reshape carries the channels (attention heads through merged dims), on any front end.

A reshape that splits one dim into several (``E -> (H, d)``) ties the channel identity of the merged dim to
ONE of the factors (:meth:`~fxprune.rules.base.RuleContext.tie_product`); the others are pinned. The default
(the outermost factor) is right when hand-written attention splits a projection's output directly; graphs
that take detours need more:

* the packed in-projection ``(L, B, 3E)`` of ``nn.MultiheadAttention`` is unflattened to ``(L, B, 3, E)`` and
  q, k, v are taken with ``select`` on the ``3`` dim: identity must follow ``E`` (a dim read position by
  position is pinned);
* ``(L, B, E)`` viewed as ``(L, B*H, d)``, transposed, and viewed as ``(B, H, L, d)``: the merged ``B*H``
  dim carries heads in its *inner* digit, so splitting it must follow ``H``, not ``B``;
* a channel shuffle (view → transpose → view) groups "channel j of every group".

:func:`channel_digits` answers from the graph itself, asking each node's rule what it knows (which dim it
produces, which operand dim an output dim is, whether it reshapes or permutes) instead of listing op names:
it walks back from a dim to the op that produced its channels and returns the span of mixed-radix digits the
channel identity depends on. A split then follows the outermost factor overlapping that span that is not
read position by position downstream. Where the walk finds nothing the default stands, so this only ever
changes which factor is chosen, never what a tie means: every choice is exact, the right one prunes more.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch.fx as fx

from ..meta import shape_of
from .base import RULES, Rule, RuleContext, RuleTable

__all__ = ["match_dims", "channel_digits", "group_digits", "split_preference", "merge_preference", "feeds_shuffle"]

_MAX_DEPTH = 96


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


def _rule(node: Any, rules: RuleTable) -> Rule | None:
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method", "call_module"):
        return None
    gm = node.graph.owning_module
    return rules.lookup(gm, node) if gm is not None else None


def _arg0(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


def _reshape_groups(node: fx.Node) -> tuple[list[tuple[list[int], list[int]]], tuple[int, ...], tuple[int, ...]] | None:
    xs, os_ = shape_of(_arg0(node)), shape_of(node)
    if xs is None or os_ is None or 0 in xs:
        return None
    try:
        return match_dims(tuple(xs), tuple(os_)), tuple(xs), tuple(os_)
    except ValueError:
        return None


def group_digits(node: fx.Node, ins: list[int], outs: list[int], xs: tuple[int, ...], os_: tuple[int, ...],
                 memo: dict, depth: int = 0, rules: RuleTable = RULES) -> dict[int, tuple[int, int] | None] | None:
    """Digits of each output dim of one reshape group; None when the input's channels are unknown."""
    carrying = []
    for d in ins:
        if xs[d] > 1:
            dg = channel_digits(_arg0(node), d, memo, depth + 1, rules)
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


def channel_digits(node: Any, dim: int, memo: dict | None = None, depth: int = 0,
                   rules: RuleTable = RULES) -> tuple[int, int] | None:
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
    res = _channel_digits(node, dim, shp, memo, depth, rules)
    memo[key] = res
    return res


def _channel_digits(node: fx.Node, dim: int, shp: tuple[int, ...], memo: dict, depth: int,
                    rules: RuleTable) -> tuple[int, int] | None:
    rule = _rule(node, rules)
    if rule is None:
        return None
    produced = rule.produced_dim(node, node.graph.owning_module)
    if produced is not None and produced % len(shp) == dim:
        return 1, shp[dim]
    if rule.reshapes:
        g = _reshape_groups(node)
        if g is None:
            return None
        groups, xs, os_ = g
        for ins, outs in groups:
            if dim in outs:
                res = group_digits(node, ins, outs, xs, os_, memo, depth, rules)
                return None if res is None else res[dim]
        return None
    for x, d in rule.dim_origins(node, dim):
        dg = channel_digits(x, d, memo, depth + 1, rules)
        if dg is not None:
            return dg
    return None


def _kept_dim(node: fx.Node, dim: int) -> int | None:
    """The output dim a reshape keeps input ``dim`` as, whole and alone (other dims of its group size 1)."""
    g = _reshape_groups(node)
    if g is None:
        return None
    groups, xs, os_ = g
    for ins, outs in groups:
        if dim in ins:
            ins_nt = [d for d in ins if xs[d] > 1]
            outs_nt = [j for j in outs if os_[j] > 1]
            if ins_nt == [dim] and len(outs_nt) == 1:
                return outs_nt[0]
            return None
    return None


def _read_positionally(node: fx.Node, dim: int, depth: int = 0, rules: RuleTable = RULES) -> bool:
    """Whether some user reads ``dim`` of ``node`` position by position (select/unbind/split), following
    the dim through ops that keep positions (element-wise ops, transposes, (un)squeezes, copies)."""
    if depth > _MAX_DEPTH:
        return False
    nd = len(shape_of(node))
    for u in node.users:
        rule = _rule(u, rules)
        if rule is None or not u.args or u.args[0] is not node:
            continue
        pd = rule.positional_dim(u)
        if pd is not None:
            if pd % nd == dim:
                return True
            continue
        os_ = shape_of(u)
        if os_ is None:
            continue
        if rule.reshapes:  # (un)squeeze, or a reshape that keeps this dim whole
            j = _kept_dim(u, dim)
            if j is not None and _read_positionally(u, j, depth + 1, rules):
                return True
            continue
        for j in range(len(os_)):
            if any(x is node and d == dim for x, d in rule.dim_origins(u, j)) and _read_positionally(u, j, depth + 1, rules):
                return True
    return False


def _is_broadcast(node: fx.Node, dim: int, rules: RuleTable = RULES) -> bool:
    """Whether ``dim`` of ``node`` is an expand of a size-1 (or missing) dim: every position is equal."""
    rule = _rule(node, rules)
    if rule is None or not rule.expands:
        return False
    xs, os_ = shape_of(_arg0(node)), shape_of(node)
    if xs is None or os_ is None:
        return False
    k = dim - (len(os_) - len(xs))
    return k < 0 or (xs[k] == 1 and os_[dim] > 1)


def feeds_shuffle(node: fx.Node, rules: RuleTable = RULES) -> bool:
    """reshape -> permute/transpose -> (contiguous/clone) -> reshape: the channel-shuffle idiom."""
    def only(n: fx.Node) -> fx.Node | None:
        us = list(n.users)
        if len(us) != 1:
            return None
        r = _rule(us[0], rules)
        if r is not None and r.positionwise and shape_of(us[0]) == shape_of(n) and len(us[0].all_input_nodes) == 1:
            return only(us[0])  # contiguous / clone
        return us[0]

    u = only(node)
    ru = _rule(u, rules) if u is not None else None
    if ru is None or not ru.permutes:
        return False
    v = only(u)
    rv = _rule(v, rules) if v is not None else None
    if rv is None or not rv.reshapes:
        return False
    # a reshape that merges dims ((un)squeezing size-1 dims does not)
    return [s for s in shape_of(_arg0(v)) or () if s > 1] != [s for s in shape_of(v) or () if s > 1]


def _choose(node: fx.Node, outs: list[int], digits: dict[int, tuple[int, int] | None] | None,
            rules: RuleTable) -> int | None:
    """Position in ``outs`` (non-trivial output dims of a split) of the factor to carry the channels."""
    if digits is None:
        return None
    for pos, j in enumerate(outs):
        if digits.get(j) is not None and not _read_positionally(node, j, 0, rules):
            return pos
    return None


def split_preference(node: fx.Node, x: fx.Node, rules: RuleTable = RULES) -> Callable[..., int | None]:
    """The ``split_prefer`` hook of :func:`~fxprune.rules.reshape.tie_reshape` for reshape ``node`` of ``x``."""
    a, b = shape_of(x), shape_of(node)
    memo: dict = {}
    shuffle = feeds_shuffle(node, rules)

    def prefer(ins, outs, ins_nt, outs_nt, n_in) -> int | None:
        if shuffle and n_in == 1:
            return len(outs_nt) - 1
        chosen = _choose(node, outs_nt, group_digits(node, ins, outs, a, b, memo, 0, rules), rules)
        return 0 if chosen is None and n_in == 1 else chosen

    return prefer


def merge_preference(rc: RuleContext, x: fx.Node, rules: RuleTable = RULES) -> Callable[..., int | None]:
    """The ``merge_prefer`` hook: merging dims none of which carries channels yet (a key padding mask
    (B, H, 1, L) expanded over heads, flattened to B*H) follows a broadcast factor, which can take any
    identity, so the merged dim can later tie to the heads of the scores it is added to."""

    def prefer(ins_nt, xa) -> int | None:
        if any(rc.is_live(ax) for ax in xa):
            return None
        bc = [i for i, d in enumerate(ins_nt) if _is_broadcast(x, d, rules)]
        return bc[-1] if bc else None

    return prefer
