"""Reductions (mean/sum/amax/...) and dim-wise normalisers (softmax, cumsum).

A reduction over a channel dim mixes every channel into one value, so removing a channel would change
the result: the reduced dims are pinned. Dims that are not reduced pass through (global average pooling
as ``x.mean((2, 3))`` keeps its channels prunable).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..trace import is_multi

from .base import RULES, Rule, RuleContext
from .examples import ex_reduce, ex_softmax

__all__ = ["ReduceRule", "DimwiseRule"]


def _dims(dim, nd: int) -> list[int]:
    if dim is None:
        return list(range(nd))
    if isinstance(dim, int):
        return [dim % nd]
    return sorted(d % nd for d in dim)


def tie_reduction(rc: RuleContext, node: fx.Node, x: fx.Node, nd: int, red: Any, keep: bool,
                  index: int | None = None) -> None:
    """Reduced dims are pinned (a size-1 kept dim is free); the others pass through to output ``index``."""
    j = 0
    for d in range(nd):
        if d in red:
            rc.pin(rc.act(x, d), f"reduced over by {node.name}")
            if keep:
                rc.free(rc.out(j, index))
                j += 1
            continue
        rc.tie(rc.act(x, d), rc.out(j, index))
        j += 1


class ReduceRule(Rule):
    name = "reduce"
    example = staticmethod(ex_reduce)

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        if not rc.is_tensor(x):
            return
        nd = len(rc.shape(x))
        dim = rc.arg(1, "dim", None)
        if dim is None and "axis" in node.kwargs:
            dim = node.kwargs["axis"]
        if isinstance(dim, torch.dtype) or (dim is not None and not isinstance(dim, (int, list, tuple))):
            return  # unusual signature: leave everything pinned
        keep = bool(rc.arg(2, "keepdim", False))
        red = _dims(dim, nd)
        tm = node.meta.get("tensor_meta")
        outs = [None] if not is_multi(tm) else list(range(len(tm)))  # max(dim) -> (values, indices)
        for index in outs:
            tie_reduction(rc, node, x, nd, red, keep, index)


class DimwiseRule(Rule):
    """softmax / log_softmax / cumsum along one dim: that dim is pinned, the others pass through."""

    name = "dimwise"
    example = staticmethod(ex_softmax)

    def __init__(self, default_dim: int | None = None, name: str = "dimwise") -> None:
        self.default_dim = default_dim
        self.name = name

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        nd = len(rc.shape(x))
        if node.op == "call_module":
            dim = getattr(rc.module, "dim", self.default_dim)
        else:
            dim = rc.arg(1, "dim", self.default_dim)
        if dim is None:  # legacy implicit dim: be conservative
            return
        dim %= nd
        for d in range(nd):
            if d == dim:
                rc.tie(rc.act(x, d), rc.out(d))
                rc.pin(rc.act(x, d), f"{node.name} normalises along this dim")
            else:
                rc.tie(rc.act(x, d), rc.out(d))


_RED = ["mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "norm", "argmax",
        "argmin", "all", "any", "count_nonzero", "nansum", "nanmean", "median"]
reduce_rule = ReduceRule()
RULES.register_function([getattr(torch, n) for n in _RED if hasattr(torch, n)], reduce_rule)
RULES.register_method(_RED, reduce_rule)
dimwise = DimwiseRule()
RULES.register_function((F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, torch.cumsum,
                         torch.cumprod), dimwise)
RULES.register_method(("softmax", "log_softmax", "cumsum", "cumprod"), dimwise)
RULES.register_module((nn.Softmax, nn.LogSoftmax, nn.Softmin), dimwise)
RULES.register_module(nn.Softmax2d, DimwiseRule(default_dim=-3, name="softmax2d"))
