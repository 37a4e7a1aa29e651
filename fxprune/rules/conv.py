"""Convolutions (1/2/3-D, transposed), linear layers and embeddings: the ops that create channels.

Grouped convolutions: with ``groups == in_channels`` (depthwise, optionally with a channel multiplier)
input channel ``c`` and output channels ``c*m .. c*m+m-1`` are the same units. With ``1 < groups <
in_channels`` input and output channels are separate groups, each constrained to lose the same number
of channels in every conv group; the weight's input dim is then addressed in the full ``in_channels``
index space (``ParamSlice.groups``), and the rewrite gathers each conv group's kept inputs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ir import Constraint
from .base import RULES, Rule, RuleContext, RewriteContext, shrink_tensors
from .examples import ex_conv, ex_conv_transpose, ex_embedding, ex_functional_linear, ex_linear

__all__ = ["ConvRule", "ConvTransposeRule", "LinearRule", "EmbeddingRule", "FunctionalLinearRule"]


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
RULES.register_module(nn.Embedding, EmbeddingRule())
