"""Convolutions (1/2/3-D, transposed), linear layers and embeddings: the ops that create channels.

Grouped convolutions: with ``groups == in_channels`` (depthwise, optionally with a channel multiplier)
input channel ``c`` and output channels ``c*m .. c*m+m-1`` are the same units. With ``1 < groups <
in_channels`` input and output channels are separate groups, each constrained to lose the same number
of channels in every conv group; the weight's input dim is then addressed in the full ``in_channels``
index space (``ParamSlice.groups``), and the rewrite gathers each conv group's kept inputs.

Functional convolutions (``F.conv2d(x, w, b, ...)``, :class:`FunctionalConvRule`) tie the weight *tensor*'s
dims like the module rule; plain and depthwise convolutions prune, other grouped ones pin their channels.
The weight may be computed from a parameter at run time (timm's ScaledStdConv2d standardises each filter:
``batch_norm(w.reshape(1, O, -1), training=True).reshape_as(w)``): the ops in between state the ties (the
standardisation is per output filter, so removing filters is exact; its statistics span each filter's
input channels, so removing input channels is lossy and needs ``allow_lossy=True``). The rule only walks
back through reshapes, casts, scalings and batch norm to find the parameter, to give its dims their
"out"/"in" roles for the criteria and the masked reference.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import meta
from ..ir import Constraint
from ..trace import shape_of
from .base import RULES, Rule, RuleContext, RewriteContext, shrink_tensors
from .examples import ex_conv, ex_conv_transpose, ex_embedding, ex_functional_linear, ex_linear

__all__ = ["ConvRule", "ConvTransposeRule", "LinearRule", "EmbeddingRule", "FunctionalLinearRule",
           "FunctionalConvRule", "weight_parameter"]


def _channel_dim(rc: RuleContext, x, spatial: int) -> int:
    return 1 if len(rc.shape(x)) == spatial + 2 else 0


class ConvRule(Rule):
    name = "conv"
    example = staticmethod(ex_conv)

    def analyze(self, node, rc: RuleContext) -> None:
        m = rc.module
        x = rc.arg(0, "input")
        k = len(m.kernel_size)
        c = _channel_dim(rc, x, k)
        if c == 1:
            rc.tie(rc.act(x, 0), rc.out(0))
        cin, cout, g = m.in_channels, m.out_channels, m.groups
        w = f"{rc.module_name}.weight"
        out = rc.out(c)
        rc.produce(out)
        rc.tie(out, rc.param(w, 0, "out"))
        if m.bias is not None:
            rc.tie(out, rc.param(f"{rc.module_name}.bias", 0, "out"))
        xin = rc.act(x, c)
        if g == 1:
            rc.tie(xin, rc.param(w, 1, "in"))
        elif g == cin:  # depthwise (with channel multiplier cout // cin)
            mult = cout // cin
            pos = np.arange(cout)
            rc.tie_map(xin, pos // mult, out, pos)
            rc.free(rc.param(w, 1, "in"))
        else:
            ax = rc.table.axis(("p", w, 1), cin)
            rc.table.params[ax.key] = _info("in", g)
            rc.tie(xin, rc._mark(ax))
            rc.constrain(xin, Constraint("uniform", g, f"{rc.module_name} groups"))
            rc.constrain(out, Constraint("uniform", g, f"{rc.module_name} groups"))

    def rewrite_module(self, module, qualname, rw: RewriteContext, nodes=()):
        w = f"{qualname}.weight"
        g, cin = module.groups, module.in_channels
        grouped = 1 < g < cin
        kin = rw.keep_param(w, 1) if grouped else None
        new = shrink_tensors(module, qualname, _skip(rw, {("p", w, 1)}) if grouped else rw)
        if grouped and kin is not None:
            cg = cin // g
            og = new.weight.shape[0] // g
            blocks = [np.flatnonzero(kin[q * cg : (q + 1) * cg]) for q in range(g)]
            if len({len(b) for b in blocks}) != 1:
                raise ValueError(f"{qualname}: grouped conv inputs not pruned uniformly")
            wt = new.weight.detach()
            parts = [wt[q * og : (q + 1) * og][:, torch.as_tensor(blocks[q])] for q in range(g)]
            new.weight = nn.Parameter(torch.cat(parts, 0).clone(), requires_grad=module.weight.requires_grad)
        o = new.weight.shape[0]
        if g == cin and g > 1:  # depthwise: groups follow the kept input channels
            mult = module.out_channels // module.in_channels
            new.groups = o // mult
            new.in_channels = new.groups
        else:
            new.in_channels = new.weight.shape[1] * g
        new.out_channels = o
        return new


def _info(role: str, groups: int):
    from .base import ParamInfo

    return ParamInfo(role, groups)


class _skip(RewriteContext):
    """A view of ``rw`` that hides the keep masks of ``keys`` (handled by the caller)."""

    def __init__(self, rw: RewriteContext, keys: set[tuple]) -> None:
        super().__init__(rw.gm, rw.new_gm, lambda key: None if key in keys else rw.keep(key))


class ConvTransposeRule(Rule):
    name = "conv_transpose"
    example = staticmethod(ex_conv_transpose)

    def analyze(self, node, rc: RuleContext) -> None:
        m = rc.module
        x = rc.arg(0, "input")
        k = len(m.kernel_size)
        c = _channel_dim(rc, x, k)
        if c == 1:
            rc.tie(rc.act(x, 0), rc.out(0))
        w = f"{rc.module_name}.weight"  # (in, out // groups, *k)
        out, xin = rc.out(c), rc.act(x, c)
        rc.produce(out)
        if m.bias is not None:
            rc.tie(out, rc.param(f"{rc.module_name}.bias", 0, "out"))
        if m.groups == 1:
            rc.tie(xin, rc.param(w, 0, "in"))
            rc.tie(out, rc.param(w, 1, "out"))
        elif m.groups == m.in_channels == m.out_channels:
            rc.tie(xin, rc.param(w, 0, "in"))
            rc.tie(xin, out)
            rc.free(rc.param(w, 1, "out"))
        else:
            for a in (xin, out):
                rc.pin(a, f"{rc.module_name}: grouped transposed conv is not pruned")

    def fix_attributes(self, module) -> None:
        module.in_channels = module.weight.shape[0]
        if module.groups > 1:
            module.groups = module.in_channels
        module.out_channels = module.weight.shape[1] * module.groups


class LinearRule(Rule):
    """``nn.Linear`` on any (..., in_features) input: leading dims pass through."""

    name = "linear"
    example = staticmethod(ex_linear)

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        nd = len(rc.shape(x))
        for d in range(nd - 1):
            rc.tie(rc.act(x, d), rc.out(d))
        out = rc.out(-1)
        rc.produce(out)
        name = rc.module_name
        rc.tie(out, rc.param(f"{name}.weight", 0, "out"))
        if rc.module.bias is not None:
            rc.tie(out, rc.param(f"{name}.bias", 0, "out"))
        rc.tie(rc.act(x, -1), rc.param(f"{name}.weight", 1, "in"))

    def fix_attributes(self, module) -> None:
        module.out_features, module.in_features = module.weight.shape


class FunctionalLinearRule(Rule):
    """``F.linear(x, w, b)`` with the weight from a ``get_attr`` node (parameters sliced generically)."""

    name = "F.linear"
    example = staticmethod(ex_functional_linear)

    def analyze(self, node, rc: RuleContext) -> None:
        x, w, b = rc.arg(0, "input"), rc.arg(1, "weight"), rc.arg(2, "bias")
        nd = len(rc.shape(x))
        for d in range(nd - 1):
            rc.tie(rc.act(x, d), rc.out(d))
        out = rc.out(-1)
        rc.produce(out)
        rc.tie(out, rc.act(w, 0))
        rc.tie(rc.act(x, -1), rc.act(w, 1))
        if isinstance(w, fx.Node) and w.op == "get_attr":  # roles, for the criteria and the masked reference
            rc.param(str(w.target), 0, "out")
            rc.param(str(w.target), 1, "in")
        if rc.is_tensor(b):
            rc.tie(out, rc.act(b, 0))


_CONV_FNS: dict[Any, bool] = {F.conv1d: False, F.conv2d: False, F.conv3d: False,
                              F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True}
#: ops a weight may go through between its parameter and a functional conv without changing which
#: (out, in) filter position an element is (reshapes, casts, scalings, per-filter normalisation)
_WEIGHT_PATH_METHODS = {"view", "reshape", "reshape_as", "view_as", "contiguous", "to", "float", "double", "half",
                        "mul", "div", "add", "sub", "clone", "detach"}
_WEIGHT_PATH_FUNCTIONS = {torch.reshape, F.batch_norm, torch.mul, torch.div, torch.add, torch.sub,
                          operator.mul, operator.truediv, operator.add, operator.sub}


def weight_parameter(w: Any, max_steps: int = 8) -> fx.Node | None:
    """The ``get_attr`` parameter a conv/linear weight tensor ``w`` is computed from, through reshapes,
    casts, scalings and batch norm only (first tensor argument at each step), with ``w``'s shape; or None."""
    shape = meta.tensor_meta(w).shape if meta.tensor_meta(w) is not None else None
    node = w
    for _ in range(max_steps):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            tm = meta.tensor_meta(node)
            return node if tm is not None and tuple(tm.shape) == tuple(shape) else None
        ok = (node.op == "call_method" and node.target in _WEIGHT_PATH_METHODS) or (
            node.op == "call_function" and node.target in _WEIGHT_PATH_FUNCTIONS)
        if not ok:
            return None
        node = next((a for a in node.all_input_nodes if meta.tensor_meta(a) is not None), None)
    return None


def _ex_functional_conv():
    class StdConv(nn.Conv2d):
        """timm's ScaledStdConv2d pattern: each filter standardised at run time, then F.conv2d."""

        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0, eps=1e-6).reshape_as(self.weight)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = StdConv(3, 8, 3, padding=1)
            self.dw = nn.Parameter(torch.randn(8, 1, 3, 3))
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            return self.b(F.conv2d(y, self.dw, None, 1, 1, 1, 8))  # depthwise, groups patched

    return M(), (torch.randn(2, 3, 6, 6),)


class FunctionalConvRule(Rule):
    """``F.conv{1,2,3}d`` / ``F.conv_transpose{1,2,3}d`` with the weight as a graph value (see the module
    docstring); the depthwise ``groups`` literal is patched on rewrite."""

    name = "F.conv"
    example = staticmethod(_ex_functional_conv)

    @staticmethod
    def _parts(node: fx.Node) -> tuple[Any, Any, Any, bool, Any]:
        a = node.args
        get = lambda i, k, d=None: a[i] if len(a) > i else node.kwargs.get(k, d)  # noqa: E731
        return get(0, "input"), get(1, "weight"), get(2, "bias"), _CONV_FNS[node.target], get(6, "groups", 1)

    def analyze(self, node, rc: RuleContext) -> None:
        x, w, b, transposed, g = self._parts(node)
        if not (rc.is_tensor(x) and rc.is_tensor(w)) or not isinstance(g, int):
            return  # everything pinned by finish()
        spatial = len(rc.shape(w)) - 2
        c = 1 if len(rc.shape(x)) == spatial + 2 else 0
        if c == 1:
            rc.tie(rc.act(x, 0), rc.out(0))
        xin, out = rc.act(x, c), rc.out(c)
        cin, cout = xin.size, out.size
        rc.produce(out)
        param = weight_parameter(w)
        roles: dict[int, str] = {}
        if rc.is_tensor(b):
            rc.tie(out, rc.act(b, 0))
            _label(rc, weight_parameter(b), 0, "out")
        w_in, w_out = (0, 1) if transposed else (1, 0)
        if g == 1:
            rc.tie(xin, rc.act(w, w_in))
            rc.tie(out, rc.act(w, w_out))
            roles = {w_in: "in", w_out: "out"}
        elif g == cin and cin > 1 and (not transposed or cout == cin):
            mult = cout // cin  # depthwise with channel multiplier: input c feeds outputs c*m .. c*m+m-1
            pos = np.arange(cout)
            rc.tie_map(xin, pos // mult, out, pos)
            wo = rc.act(w, 0)  # (cin*m, 1, k) or, transposed, (cin, 1, k)
            if wo.size == cout:
                rc.tie(wo, out)
            else:
                rc.tie(wo, xin)
            rc.free(rc.act(w, 1))
            roles = {0: "out"}
        else:
            for ax in (xin, out):
                rc.pin(ax, f"{node.name}: grouped functional convolution ({g} groups) is not pruned")
        for d in range(2, 2 + spatial):
            rc.free(rc.act(w, d))
        for d, role in roles.items():
            _label(rc, param, d, role)

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        x, w, _, _, g = self._parts(old)
        if not isinstance(g, int) or g == 1:
            return
        c = 1 if len(shape_of(x)) == len(shape_of(w)) else 0
        k = rw.keep_act(x, c)
        if k is None or g != len(k):
            return
        if len(old.args) > 6:
            node.args = (*node.args[:6], int(k.sum()), *node.args[7:])
        else:
            node.kwargs = {**node.kwargs, "groups": int(k.sum())}


def _label(rc: RuleContext, p: fx.Node | None, dim: int, role: str) -> None:
    if p is None:
        return
    try:
        rc.param(str(p.target), dim, role)
    except (AttributeError, ValueError):  # a plain tensor attribute, not a parameter/buffer
        pass


class EmbeddingRule(Rule):
    """``nn.Embedding``: integer indices in, one vector per index out; the vector dim is produced."""

    name = "embedding"
    example = staticmethod(ex_embedding)

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        for d in range(len(rc.shape(x))):
            rc.tie(rc.act(x, d), rc.out(d))
        out = rc.out(-1)
        rc.produce(out)
        rc.tie(out, rc.param(f"{rc.module_name}.weight", 1, "out"))
        rc.free(rc.param(f"{rc.module_name}.weight", 0, "other"))

    def fix_attributes(self, module) -> None:
        module.embedding_dim = module.weight.shape[1]


RULES.register_module((nn.Conv1d, nn.Conv2d, nn.Conv3d), ConvRule())
RULES.register_module((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), ConvTransposeRule())
RULES.register_module(nn.Linear, LinearRule())
RULES.register_function(F.linear, FunctionalLinearRule())
RULES.register_function(tuple(_CONV_FNS), FunctionalConvRule())
RULES.register_module(nn.Embedding, EmbeddingRule())
