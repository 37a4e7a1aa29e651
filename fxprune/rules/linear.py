"""Linear layers: one call record for every way a model applies a weight matrix to features.

:class:`LinearCall` normalises ``nn.Linear``, ``F.linear``, ``aten.linear``, and (bound in
:mod:`fxprune.rules.matmul`) every matrix product whose second operand is a parameter: ``x @ W``,
``torch.mm``/``matmul``, ``torch.addmm(b, x, W)`` and their ATen overloads — the form GPT-2's ``Conv1D``
takes (``addmm(bias, x.view(-1, nx), weight)`` with the weight stored ``(in, out)``), through a
transpose too (``addmm(b, x, W.t())``). ``layout`` says how the weight *operand* is stored: ``"oi"``
(out, in) or ``"io"`` (in, out); the parameter behind it may be transposed once more
(:func:`~fxprune.rules.calls.param_origin` tells).

Meaning, written once: leading dims pass through; the last output dim is produced by the weight's output
dim (and the bias); the input's last dim follows the weight's input dim. MACs ``out_numel * in_features``.
Calibration sees a linear consumer of the input's last dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import shape_of
from .base import RULES, RuleContext
from .calls import (Bound, Consumer, Family, aten_overloads, call_arg, module_of, param_origin, schema_args,
                    tensor_shape, layer_name, weight_axis, weight_owner)

__all__ = ["LinearCall", "LinearFamily", "LINEAR"]


@dataclass(frozen=True)
class LinearCall:
    """``y = x @ W(ᵀ) + b``: ``weight``/``bias`` are parameter names (module spelling) or graph values."""

    input: fx.Node
    weight: Any
    bias: Any
    layout: str  # "oi": weight operand (out, in); "io": (in, out)
    spelling: str


class LinearFamily(Family):
    name = "linear"

    @staticmethod
    def _dims(call: LinearCall) -> tuple[int, int]:
        """(input dim, output dim) of the weight operand."""
        return (1, 0) if call.layout == "oi" else (0, 1)

    def analyze(self, call: LinearCall, node: fx.Node, rc: RuleContext) -> None:
        x = call.input
        if not rc.is_tensor(x) or rc.out_shape() is None:
            return
        nd = len(rc.shape(x))
        for d in range(nd - 1):
            rc.tie(rc.act(x, d), rc.out(d))
        out = rc.out(-1)
        rc.produce(out, root=weight_owner(rc.gm, call.weight))
        wi, wo = self._dims(call)
        rc.tie(out, weight_axis(rc, call.weight, wo, "out"))
        rc.tie(rc.act(x, -1), weight_axis(rc, call.weight, wi, "in"))
        b = call.bias
        if isinstance(b, str):
            rc.tie(out, rc.param(b, 0, "out"))
        elif rc.is_tensor(b):
            bs, os_ = rc.shape(b), rc.out_shape()
            for k in range(1, len(bs) + 1):
                ax = weight_axis(rc, b, -k, "out" if k == 1 else "other")
                if bs[-k] == os_[-k]:
                    rc.tie(ax, rc.out(-k))
                else:
                    rc.pin(ax, "broadcast dim")

    def fix_module(self, call, new, old, qualname, rw) -> None:
        new.out_features, new.in_features = new.weight.shape

    def macs(self, call, node, gm) -> int | None:
        out, w = shape_of(node), tensor_shape(gm, call.weight)
        if out is None or w is None:
            return None
        return math.prod(out) * w[self._dims(call)[0]]

    def consumer(self, call, node, gm) -> Consumer | None:
        w, b = call.weight, call.bias
        wi, wo = self._dims(call)
        if isinstance(w, str):
            qual, in_dim, out_dim = w, wi, wo
        else:
            o = param_origin(gm, w)
            if o is None or len(o.dims) != 2:
                return None
            qual, in_dim, out_dim = o.param, o.dims[wi], o.dims[wo]
        bname = b if isinstance(b, str) else None
        if isinstance(b, fx.Node):
            bo = param_origin(gm, b)
            if bo is None or len(bo.dims) != 1:
                return None  # a computed or 2-D bias: the refit could not write it back
            bname = bo.param
        if not isinstance(call.input, fx.Node) or shape_of(call.input) is None:
            return None
        return Consumer(node.name, call.input.name, -1, qual, in_dim, out_dim, bname, "linear")

    def produced_dim(self, call, node) -> int | None:
        os_ = shape_of(node)
        return None if os_ is None else len(os_) - 1

    def dim_origins(self, call, node, dim):
        os_ = shape_of(node)
        if os_ is None or dim % len(os_) == len(os_) - 1 or not isinstance(call.input, fx.Node):
            return []
        return [(call.input, dim % len(os_))]

    def layer_kind(self, call, node, gm) -> str | None:
        return layer_name(node, gm, "Linear")


LINEAR = LinearFamily()


def bind_module(node: fx.Node, gm: fx.GraphModule) -> LinearCall:
    m = module_of(node, gm)
    name = str(node.target)
    return LinearCall(call_arg(node, 0, "input"), f"{name}.weight", f"{name}.bias" if m.bias is not None else None,
                      "oi", "module")


def bind_function(node: fx.Node, gm: fx.GraphModule) -> LinearCall | None:
    x, w = call_arg(node, 0, "input"), call_arg(node, 1, "weight")
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)):
        return None
    return LinearCall(x, w, call_arg(node, 2, "bias"), "oi", "function")


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> LinearCall | None:
    a = schema_args(node)
    if not (isinstance(a["input"], fx.Node) and isinstance(a["weight"], fx.Node)):
        return None
    return LinearCall(a["input"], a["weight"], a.get("bias"), "oi", "aten")


RULES.register_module(nn.Linear, Bound(LINEAR, bind_module, "linear"))
RULES.register_function(F.linear, Bound(LINEAR, bind_function, "F.linear"))
RULES.register_function(aten_overloads("linear"), Bound(LINEAR, bind_aten, "aten.linear"))
