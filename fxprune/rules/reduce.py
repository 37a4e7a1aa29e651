"""Reductions (mean/sum/amax/...) and dim-wise normalisers (softmax, cumsum), every spelling.

:class:`ReduceCall` normalises ``torch.mean(x, dim, keepdim)``, ``x.sum(...)``, ATen ``mean.dim`` and their
siblings. Dims that are not reduced pass through (global average pooling ``x.mean((2, 3))`` keeps its
channels prunable). A reduced dim mixes every position into one value, so removing a position changes the
result:

* the *statistics* (mean, sum, var, std, norms, logsumexp) pin it, unless ``allow_lossy=True``: removing
  channels there is the same approximation as pruning through a LayerNorm, which is what they are when a
  model writes its norm out as element-wise ops (Hugging Face's ``LlamaRMSNorm``:
  ``x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``); with ``allow_lossy`` the group is reported lossy;
* order statistics and logic (max, min, argmax, median, all, any, prod...) **pin** it.

Dim-wise ops (softmax, log_softmax, cumsum, cumprod) keep the shape and pin their dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import is_multi, shape_of
from .base import RULES, Rule, RuleContext
from .calls import Bound, Family, aten_name, aten_overloads, call_arg, schema_args
from .elementwise import broadcast

__all__ = ["ReduceCall", "ReduceFamily", "tie_reduction", "DimwiseRule", "STATISTICS"]

#: reductions whose reduced dims are lossy (statistics); every other reduction pins them
STATISTICS = frozenset({"mean", "sum", "nansum", "nanmean", "var", "std", "var_mean", "std_mean", "norm",
                        "linalg_vector_norm", "logsumexp"})
_ORDER = ("amax", "amin", "max", "min", "aminmax", "prod", "argmax", "argmin", "all", "any", "count_nonzero",
          "median", "nanmedian")


@dataclass(frozen=True)
class ReduceCall:
    input: fx.Node
    dims: frozenset[int] | None  # None: the dims are computed at run time
    statistic: bool


def tie_reduction(rc: RuleContext, node: fx.Node, x: fx.Node, nd: int, red: Any, keep: bool,
                  index: int | None = None, statistic: bool = False) -> None:
    """Reduced dims are lossy (statistics) or pinned (a size-1 kept dim is free); the others pass through to
    output ``index``."""
    j = 0
    for d in range(nd):
        if d in red:
            if statistic:
                rc.lossy(rc.act(x, d), f"{node.name} computes a statistic over dim {d}", pin_unless_allowed=True)
            else:
                rc.pin(rc.act(x, d), f"reduced over by {node.name}")
            if keep:
                rc.free(rc.out(j, index))
                j += 1
            continue
        rc.tie(rc.act(x, d), rc.out(j, index))
        j += 1


class ReduceFamily(Family):
    name = "reduce"
    local = "channel_local"

    def analyze(self, call: ReduceCall, node: fx.Node, rc: RuleContext) -> None:
        if not rc.is_tensor(call.input) or call.dims is None:
            return  # everything pinned
        nd = len(rc.shape(call.input))
        tm = node.meta.get("tensor_meta")
        outs = list(range(len(tm))) if is_multi(tm) else [None]  # max(dim) -> (values, indices)
        for index in outs:
            oshape = rc.out_shape(index)
            if oshape is None:
                continue
            keep = len(oshape) == nd and nd > 0  # keepdim, read from the shapes (any spelling)
            tie_reduction(rc, node, call.input, nd, call.dims, keep, index, call.statistic)


REDUCE = ReduceFamily()


def _dims(dim: Any, nd: int) -> frozenset[int] | None:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return frozenset(range(nd))
    if isinstance(dim, int) and not isinstance(dim, bool):
        return frozenset({dim % max(nd, 1)})
    if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        return frozenset(d % nd for d in dim)
    return None


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def bind_torch(node: fx.Node, gm: fx.GraphModule) -> ReduceCall | None:
    x = call_arg(node, 0, "input")
    if not isinstance(x, fx.Node) or shape_of(x) is None:
        return None
    dim = call_arg(node, 1, "dim", None)
    if dim is None and "axis" in node.kwargs:
        dim = node.kwargs["axis"]
    if isinstance(dim, torch.dtype) or (dim is not None and not isinstance(dim, (int, list, tuple))):
        return None  # unusual signature: leave everything pinned
    name = _name(node)
    if name == "norm":  # torch.norm(x, p, dim, keepdim)
        dim = call_arg(node, 2, "dim", None)
    return ReduceCall(x, _dims(dim, len(shape_of(x))), name in STATISTICS)


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> ReduceCall | None:
    a = schema_args(node)
    x = a.get("self", a.get("input"))
    if not isinstance(x, fx.Node) or shape_of(x) is None:
        return None
    return ReduceCall(x, _dims(a.get("dim"), len(shape_of(x))), aten_name(node) in STATISTICS)


class _AtenReduce(Bound):
    """max.other / min.other are element-wise: the broadcast rule applies to them."""

    def analyze(self, node, rc: RuleContext) -> None:
        if "other" in schema_args(node):
            return broadcast.analyze(node, rc)
        return super().analyze(node, rc)


_NAMES = tuple(STATISTICS) + _ORDER
_torch_reduce = Bound(REDUCE, bind_torch, "reduce")
RULES.register_function([getattr(torch, n) for n in _NAMES if hasattr(torch, n)], _torch_reduce)
RULES.register_method([n for n in _NAMES if hasattr(torch.Tensor, n)], _torch_reduce)
RULES.register_function(aten_overloads(*_NAMES), _AtenReduce(REDUCE, bind_aten, "aten.reduce"))


class DimwiseRule(Rule):
    """softmax / log_softmax / cumsum along one dim: that dim is pinned, the others pass through."""

    name = "dimwise"
    local = "channel_local"

    def __init__(self, default_dim: int | None = None, name: str = "dimwise") -> None:
        self.default_dim = default_dim
        self.name = name

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        if not rc.is_tensor(x):
            return
        nd = len(rc.shape(x))
        if node.op == "call_module":
            dim = getattr(rc.module, "dim", self.default_dim)
        elif aten_name(node) is not None:
            dim = schema_args(node).get("dim")
        else:
            dim = rc.arg(1, "dim", self.default_dim)
        if not isinstance(dim, int):  # legacy implicit dim: be conservative
            return
        dim %= nd
        for d in range(nd):
            rc.tie(rc.act(x, d), rc.out(d))
            if d == dim:
                rc.pin(rc.act(x, d), f"{node.name} normalises along this dim")

    def dim_origins(self, node, dim):
        x = node.args[0] if node.args else None
        return [(x, dim % len(shape_of(x)))] if shape_of(x) is not None and shape_of(node) == shape_of(x) else []


dimwise = DimwiseRule()
RULES.register_function((F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, torch.cumsum,
                         torch.cumprod), dimwise)
RULES.register_method(("softmax", "log_softmax", "cumsum", "cumprod"), dimwise)
RULES.register_module((nn.Softmax, nn.LogSoftmax, nn.Softmin), dimwise)
RULES.register_module(nn.Softmax2d, DimwiseRule(default_dim=-3, name="softmax2d"))
RULES.register_function(aten_overloads("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod",
                                       "logcumsumexp", "softmin", "_safe_softmax"), DimwiseRule(name="aten.dimwise"))
