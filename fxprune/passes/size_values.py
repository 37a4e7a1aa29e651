"""A channel count read as a *number*, not as a size, keeps its original value in the pruned graph.

``y * y.shape[1] ** -0.5`` reads the channel count of ``y`` and computes with it. On the fx path the read
happens at run time, so after pruning it would see the new count (``1/sqrt(4)`` instead of ``1/sqrt(8)``):
a different function. The same read feeding a ``view``/``reshape``/``split`` must follow the pruning (the
rules patch or tie those). The principle: follow each pruned size read through the integer arithmetic it
feeds to the first tensor op; where that op is element-wise (the number is an operand, a value), the path
is re-computed in the new graph from the *original* size, a literal. Paths into any other op are left to
that op's rule. (torch.export already specialises static channel sizes to literals, so this only changes
fx graphs.)
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from .. import meta
from ..rules import RuleTable
from ..rules.base import RewriteContext
from ..rules.creation import size_source

__all__ = ["keep_size_values"]


def _is_number(node: Any) -> bool:
    """A node computing a Python number or size (no tensor metadata) from other values."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and meta.tensor_meta(node) is None


def _pruned_reads(gm: fx.GraphModule, rw: RewriteContext) -> dict[fx.Node, int]:
    """Size-read nodes of ``gm`` whose dim the selection shrinks -> the original size."""
    out: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        src = size_source(node)
        if src is None:
            continue
        x, d = src
        shp = meta.tensor_meta(x)
        if shp is None or not hasattr(shp, "shape"):
            continue
        old = int(shp.shape[d])
        if rw.new_shape(x)[d] != old:
            out[node] = old
    return out


def keep_size_values(gm: fx.GraphModule, new_graph: fx.Graph, val_map: dict[fx.Node, fx.Node], rw: RewriteContext,
                     rules: RuleTable) -> int:
    """Rewire the element-wise uses of pruned size reads in ``new_graph`` (the copy of ``gm.graph`` under
    ``val_map``) to the original sizes. Returns the number of operands replaced."""
    reads = _pruned_reads(gm, rw)
    if not reads:
        return 0
    done = 0
    memo: dict[fx.Node, Any] = {}
    unused: list[fx.Node] = []

    def literal(old: fx.Node, before: fx.Node) -> Any:
        """``old``'s value computed from original sizes, as a node (or literal) of the new graph."""
        if old in memo:
            return memo[old]
        if old in reads:
            memo[old] = reads[old]
        elif _is_number(old) and any(n in reads or _is_number(n) for n in old.all_input_nodes):
            args = fx.map_arg(old.args, lambda n: literal(n, before))
            kwargs = fx.map_arg(old.kwargs, lambda n: literal(n, before))
            if args == fx.map_arg(old.args, lambda n: val_map[n]) and kwargs == fx.map_arg(old.kwargs, lambda n: val_map[n]):
                memo[old] = val_map[old]
            else:
                with new_graph.inserting_before(before):
                    memo[old] = new_graph.create_node(old.op, old.target, args, kwargs, name=old.name + "_orig")
        else:
            memo[old] = val_map[old]
        return memo[old]

    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or _is_number(node):
            continue
        operands = [a for a in node.all_input_nodes if a in reads or _is_number(a)]
        if not operands:
            continue
        rule = rules.lookup(gm, node)
        if rule is None or not rule.positionwise:
            continue
        new = val_map[node]
        swap = {val_map[a]: literal(a, new) for a in operands}
        swap = {k: v for k, v in swap.items() if v is not k}
        if swap:
            new.args = fx.map_arg(new.args, lambda n: swap.get(n, n))
            new.kwargs = fx.map_arg(new.kwargs, lambda n: swap.get(n, n))
            done += len(swap)
            unused.extend(swap)
    while unused:  # the run-time reads no longer used (never anything else: the rest of the graph is untouched)
        n = unused.pop()
        if not n.users and n.graph is new_graph and n.op in ("call_function", "call_method"):
            inputs = n.all_input_nodes
            new_graph.erase_node(n)
            unused.extend(i for i in inputs if i.op in ("call_function", "call_method") and meta.tensor_meta(i) is None)
    return done
