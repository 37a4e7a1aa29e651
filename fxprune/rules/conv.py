"""Convolutions (1/2/3-D, transposed): one call record, one meaning, three spellings.

:class:`ConvCall` normalises ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` modules, the functional
``F.conv*`` / ``F.conv_transpose*`` and the ATen ``conv*`` / ``convolution`` / ``conv_transpose*`` overloads.
:class:`ConvFamily` states, once, the channel ties, the shrink, the MACs and what calibration sees.

Channel ties. The output channels are produced (weight dim 0, or dim 1 transposed, and the bias follow
them); the input channels follow the weight's input dim. Grouped convolutions:

* ``groups == in_channels`` (depthwise, optionally with a channel multiplier ``m``): input channel ``c`` and
  outputs ``c*m .. c*m+m-1`` are the same units; ``groups`` is patched to the kept count on rewrite;
* ``1 < groups < in_channels`` with the weight a parameter: input and output channels are separate groups,
  each constrained to lose the same number of channels in every conv group; the weight's input dim is a
  *grouped view* (addressed in the full ``in_channels`` index space), and the rewrite gathers each conv
  group's kept inputs (:func:`fxprune.rules.base.slice_param`);
* grouped transposed (weight ``(in, out/groups, k)``): the same, with the roles of the weight dims swapped;
* any other grouped case (a weight computed at run time) pins its channels: exact, never a
  guess.

A weight computed at run time (timm's ScaledStdConv2d standardises each filter:
``batch_norm(w.reshape(1, O, -1), training=True).reshape_as(w)``) is tied through the ops in between; its
parameter gets the ``"out"``/``"in"`` roles through :func:`~fxprune.rules.calls.param_origin`.

MACs (biases never counted): ``out_numel * (in/groups) * prod(kernel)``, transposed
``in_numel * (out/groups) * prod(kernel)``. Calibration models plain and grouped, zero-padded 1-D/2-D
convolutions whose weight is the parameter itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ir import Constraint
from ..meta import shape_of
from .base import RULES, RewriteContext, RuleContext
from .calls import (Bound, Consumer, Family, aten_overloads, call_arg, module_of, param_origin,
                    schema_args, set_call_arg, set_schema_arg, tensor_shape, layer_name, weight_axis, weight_owner)

__all__ = ["ConvCall", "ConvFamily", "CONV"]

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FNS = {F.conv1d: False, F.conv2d: False, F.conv3d: False,
             F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True}


@dataclass(frozen=True)
class ConvCall:
    """A convolution: ``weight``/``bias`` are parameter names (module spelling) or graph values."""

    input: fx.Node
    weight: Any
    bias: Any
    transposed: bool
    groups: Any
    stride: Any
    padding: Any
    dilation: Any
    padding_mode: str
    spelling: str  # "module" | "function" | "aten"


def _pair(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class ConvFamily(Family):
    name = "conv"

    # -- channel ties ---------------------------------------------------------------------------------
    def analyze(self, call: ConvCall, node: fx.Node, rc: RuleContext) -> None:
        x, w = call.input, call.weight
        wshape = tensor_shape(rc.gm, w)
        if not rc.is_tensor(x) or wshape is None or not isinstance(call.groups, int):
            return  # everything pinned by finish()
        spatial = len(wshape) - 2
        c = 1 if len(rc.shape(x)) == spatial + 2 else 0
        if c == 1:
            rc.tie(rc.act(x, 0), rc.out(0))
        xin, out = rc.act(x, c), rc.out(c)
        cin, cout, g = xin.size, out.size, call.groups
        rc.produce(out, root=weight_owner(rc.gm, w))
        w_in, w_out = (0, 1) if call.transposed else (1, 0)
        has_bias = call.bias is not None and (isinstance(call.bias, str) or rc.is_tensor(call.bias))
        if g == 1:
            rc.tie(out, weight_axis(rc, w, w_out, "out"))
            if has_bias:
                rc.tie(out, weight_axis(rc, call.bias, 0, "out"))
            rc.tie(xin, weight_axis(rc, w, w_in, "in"))
        elif g == cin and cin > 1 and (not call.transposed or cout == cin):
            mult = cout // cin  # depthwise with channel multiplier: input c feeds outputs c*m .. c*m+m-1
            pos = np.arange(cout)
            rc.tie_map(xin, pos // mult, out, pos)
            wo = weight_axis(rc, w, 0, "out")  # (cin*m, 1, k) or, transposed, (cin, 1, k)
            rc.tie(wo, out if wo.size == cout else xin)
            rc.free(weight_axis(rc, w, 1, "other"))
        elif self._grouped_param(rc, w) is not None:
            self._tie_grouped(rc, node, w, xin, out, g, call.transposed)
        else:
            kind = "grouped convolution of a computed weight"
            for ax in (xin, out):
                rc.pin(ax, f"{node.name}: {kind} ({g} groups) is not pruned")
        for d in range(2, 2 + spatial):
            rc.free(weight_axis(rc, w, d, "other"))
        if has_bias and g != 1:
            rc.tie(out, weight_axis(rc, call.bias, 0, "out"))

    def _tie_grouped(self, rc: RuleContext, node: fx.Node, w: Any, xin: Any, out: Any, g: int,
                     transposed: bool) -> None:
        """Weight ``(out, in/g, k)``, or transposed ``(in, out/g, k)`` (the same blocks, the dims' roles
        swapped): dim 0 is a plain axis, dim 1 the grouped view of the other side; both sides lose the same
        number of channels in every conv group."""
        plain, grouped = (xin, out) if transposed else (out, xin)
        rc.tie(plain, weight_axis(rc, w, 0, "in" if transposed else "out"))
        rc.tie(grouped, rc.param(self._grouped_param(rc, w), 1, "out" if transposed else "in", groups=g))
        if not isinstance(w, str):
            rc.free(rc.act(w, 1))
        where = str(node.target) if node.op == "call_module" else node.name
        for ax in (xin, out):
            rc.constrain(ax, Constraint("uniform", g, f"{where} groups"))

    @staticmethod
    def _grouped_param(rc: RuleContext, w: Any) -> str | None:
        """The parameter a grouped weight is, read directly (a grouped view needs the tensor itself)."""
        if isinstance(w, str):
            return w
        if isinstance(w, fx.Node) and w.op == "get_attr":
            o = param_origin(rc.gm, w)
            return o.param if o is not None else None
        return None

    # -- shrink -----------------------------------------------------------------------------------------
    @staticmethod
    def _depthwise(call: ConvCall, cin: int, cout: int) -> bool:
        g = call.groups
        return isinstance(g, int) and g == cin and g > 1 and (not call.transposed or cout == cin)

    def fix_module(self, call, new, old, qualname, rw) -> None:
        g = old.groups
        transposed = isinstance(old, _CONVT_MODULES)
        depthwise = g == old.in_channels and g > 1 and (not transposed or old.out_channels == old.in_channels)
        if transposed:
            new.in_channels = new.weight.shape[0]
            if depthwise:
                new.groups = new.in_channels
            new.out_channels = new.weight.shape[1] * new.groups
        else:
            new.out_channels = new.weight.shape[0]
            if depthwise:
                new.groups = new.out_channels // (old.out_channels // old.in_channels)
                new.in_channels = new.groups
            else:
                new.in_channels = new.weight.shape[1] * g

    def rewrite_node(self, call, node, old, rw: RewriteContext) -> None:
        w = tensor_shape(rw.gm, call.weight)
        x = shape_of(call.input)
        if w is None or x is None or not isinstance(call.groups, int) or call.groups == 1:
            return
        c = 1 if len(x) == len(w) else 0
        cin = x[c]
        cout = shape_of(old)[c]
        k = rw.keep_act(call.input, c)
        if k is None or not self._depthwise(call, cin, cout):
            return
        if call.spelling == "aten":
            set_schema_arg(node, "groups", int(k.sum()))
        else:
            set_call_arg(node, 6, "groups", int(k.sum()))

    # -- cost, calibration, report ------------------------------------------------------------------------
    def macs(self, call, node, gm) -> int | None:
        w = tensor_shape(gm, call.weight)
        if w is None:
            return None
        if call.transposed:
            xs = shape_of(call.input)
            return None if xs is None else math.prod(xs) * w[1] * math.prod(w[2:])
        out = shape_of(node)
        return None if out is None else math.prod(out) * w[1] * math.prod(w[2:])

    def consumer(self, call, node, gm) -> Consumer | None:
        w = call.weight
        if call.transposed or call.padding_mode != "zeros" or not isinstance(call.groups, int):
            return None
        if isinstance(w, str):
            qual = w
        elif isinstance(w, fx.Node) and w.op == "get_attr":
            o = param_origin(gm, w)
            qual = o.param if o is not None and o.dims == tuple(range(len(o.dims))) else None
        else:
            qual = None
        wshape = tensor_shape(gm, w)
        xs = shape_of(call.input)
        if qual is None or wshape is None or xs is None or len(wshape) not in (3, 4) or len(xs) != len(wshape):
            return None
        n = len(wshape) - 2
        kernel, dil, stride = tuple(wshape[2:]), _pair(call.dilation, n), _pair(call.stride, n)
        pad = call.padding
        if isinstance(pad, str):
            if pad == "valid":
                pad = (0,) * n
            else:  # 'same' (stride 1): symmetric when the receptive field is odd
                rf = [d * (k - 1) for d, k in zip(dil, kernel, strict=True)]
                if any(r % 2 for r in rf):
                    return None
                pad = tuple(r // 2 for r in rf)
        pad = _pair(pad, n)
        if n == 1:
            geom = ((1, kernel[0]), (1, dil[0]), (0, pad[0]), (1, stride[0]))
        else:
            geom = (kernel, tuple(dil), tuple(pad), tuple(stride))
        bias = call.bias
        bname = bias if isinstance(bias, str) else None
        if isinstance(bias, fx.Node):
            bo = param_origin(gm, bias)
            bname = bo.param if bo is not None else None
            if bname is None:
                return None  # a computed bias: the refit could not write it back
        return Consumer(node.name, call.input.name, 1, qual, 1, 0, bname, "conv", geom, call.groups)

    def produced_dim(self, call, node) -> int | None:
        xs, w = shape_of(call.input), tensor_shape(node.graph.owning_module, call.weight)
        if xs is None or w is None:
            return None
        return 1 if len(xs) == len(w) else 0

    def layer_kind(self, call, node, gm) -> str | None:
        w = tensor_shape(gm, call.weight)
        n = len(w) - 2 if w is not None else 2
        return layer_name(node, gm, f"ConvTranspose{n}d" if call.transposed else f"Conv{n}d")


CONV = ConvFamily()


def bind_module(node: fx.Node, gm: fx.GraphModule) -> ConvCall:
    m = module_of(node, gm)
    name = str(node.target)
    return ConvCall(node.args[0] if node.args else node.kwargs.get("input"), f"{name}.weight",
                    f"{name}.bias" if m.bias is not None else None, isinstance(m, _CONVT_MODULES), m.groups,
                    m.stride, m.padding, m.dilation, m.padding_mode, "module")


def bind_function(node: fx.Node, gm: fx.GraphModule) -> ConvCall | None:
    transposed = _CONV_FNS[node.target]
    x, w = call_arg(node, 0, "input"), call_arg(node, 1, "weight")
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)):
        return None
    if transposed:
        stride, pad, dil = call_arg(node, 3, "stride", 1), call_arg(node, 4, "padding", 0), call_arg(node, 7, "dilation", 1)
    else:
        stride, pad, dil = call_arg(node, 3, "stride", 1), call_arg(node, 4, "padding", 0), call_arg(node, 5, "dilation", 1)
    return ConvCall(x, w, call_arg(node, 2, "bias"), transposed, call_arg(node, 6, "groups", 1), stride, pad, dil,
                    "zeros", "function")


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> ConvCall | None:
    a = schema_args(node)
    transposed = bool(a.get("transposed", False)) or "conv_transpose" in node.target._schema.name
    x, w = a["input"], a["weight"]
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)):
        return None
    g = a.get("groups")
    return ConvCall(x, w, a.get("bias"), transposed, 1 if g is None else g, a.get("stride", 1),
                    a.get("padding", 0), a.get("dilation", 1), "zeros", "aten")


RULES.register_module(_CONV_MODULES + _CONVT_MODULES, Bound(CONV, bind_module, "conv"))
RULES.register_function(tuple(_CONV_FNS), Bound(CONV, bind_function, "F.conv"))
RULES.register_function(aten_overloads("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                                       "conv_transpose2d", "conv_transpose3d"), Bound(CONV, bind_aten, "aten.conv"))
