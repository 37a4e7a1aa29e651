"""Rules for ATen operators, the op set of graphs captured with ``torch.export`` (see :mod:`fxprune.export`).

The ATen op set is closed: a custom layer built from standard ops exports to the overloads registered here,
so it needs no user rule. Rules are keyed by ``OpOverload`` (every overload of a packet is registered, ``out=``
variants excepted). Most ATen ops take their arguments in the same positions as the torch functions the
fx-level rules were written for, so the existing rule *objects* are registered again (element-wise,
broadcasting, view/reshape, cat, narrow, softmax, matmul, scaled-dot-product attention, pooling...). The ops
whose arguments or semantics differ get the small adapted rules below; they read arguments by their schema
name (:func:`bind`), so positional and keyword spellings both work.

Parameters of an exported graph are ``get_attr`` nodes (the front end unlifts them); the analysis ties a
``get_attr`` node's dims to the parameter generically. Rules that know a parameter's role (a convolution's
weight dim 0 produces channels, dim 1 consumes them) restate it with :meth:`RuleContext.param`, so the
importance criteria and the masked reference see the same roles as on the fx path.

Conservative corners (all exact, they only prune less): grouped convolutions that are neither plain nor
depthwise pin their channels; advanced indexing, ``index_select``/``gather``, sorting and ``.item()`` pin
every dim they touch; creation ops (``zeros``, ``arange``...) produce pinned tensors, so literal sizes in
them never need patching.
"""

from __future__ import annotations

import builtins
import logging
import math
import operator
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import RULES, Rule, RuleContext, RewriteContext
from .shape import PermuteRule, PermuteWithin, SplitRule, UnflattenRule, ExpandRule, _patch_sizes, tie_split
from .reduce import tie_reduction
from .norm import FunctionalGroupNorm, tie_group_norm
from .attention import tie_repeat_interleave

__all__ = ["bind", "aten_overloads", "AtenConv", "AtenLinear", "AtenEmbedding", "AtenBatchNorm", "AtenGroupNorm",
           "AtenReduce", "AtenPermute", "AtenSplit", "AtenSlice", "AtenSelect", "AtenExpand", "AtenUnflatten",
           "AtenIndexPut", "Creation", "Pinned", "AtenPad", "TieExcept", "AtenRepeatInterleave",
           "AtenPixelShuffle", "AtenBaddbmm"]

log = logging.getLogger(__name__)
A = torch.ops.aten


def aten_overloads(*names: str) -> list[Any]:
    """Every overload of the named ATen packets (``out=`` variants excepted); unknown names are skipped."""
    out: list[Any] = []
    for name in names:
        packet = getattr(A, name, None)
        if packet is None:
            continue
        for ov in packet.overloads():
            if "out" in ov.split("_"):
                continue
            out.append(getattr(packet, ov))
    return out


def bind(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in (positional and keyword alike)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        raise TypeError(f"{node.target} is not an ATen overload")
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set argument ``name`` of an ATen call (node of the new graph), positionally if it was positional."""
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name != name:
            continue
        if i < len(node.args):
            args = list(node.args)
            args[i] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, name: value}
        return
    raise KeyError(name)


def _label(rc: RuleContext, x: Any, dim: int, role: str) -> None:
    """Restate the role of a parameter read directly by ``get_attr`` (no-op for computed tensors)."""
    if isinstance(x, fx.Node) and x.op == "get_attr":
        try:
            rc.param(str(x.target), dim, role)
        except (AttributeError, ValueError):  # a plain attribute, not a parameter/buffer
            pass


# ---------------------------------------------------------------------------------------------------------
# examples: tiny models that symbolic tracing cannot capture (``if x.dim()`` is Python control flow on a
# Proxy), so the registry test runs them through the torch.export front end and its ATen rules


class ExportOnly(nn.Module):
    """Wraps ``inner``; its forward branches on ``x.dim()``, which torch.fx cannot trace but export can."""

    def __init__(self, inner: nn.Module, static_shapes: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.fxprune_static_shapes = static_shapes

    def forward(self, x):
        if x.dim() < 1:
            raise ValueError("scalar input")
        return self.inner(x)


def _img(c: int = 3, hw: int = 6) -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, c, hw, hw),)


def _static(model: nn.Module) -> nn.Module:
    """Examples export with static shapes (several times faster; the rules see the same ops)."""
    model.fxprune_static_shapes = True
    return model


def _ex_conv():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.ConvTranspose2d(8, 6, 2, stride=2), nn.Conv2d(6, 4, 1))
    return ExportOnly(net, True), _img()


def _ex_linear():
    return ExportOnly(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 3)), True), (torch.randn(2, 4, 5),)


def _ex_embedding():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 8)
            self.o = nn.Linear(8, 3)

        def forward(self, ids):
            if ids.dim() != 2:
                raise ValueError("ids must be (batch, tokens)")
            return self.o(self.e(ids))

    return _static(M()), (torch.randint(0, 10, (2, 4)),)


def _ex_batchnorm():
    return ExportOnly(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)), True), _img()


def _ex_groupnorm():
    return ExportOnly(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 1)), True), _img()


class _ShapeOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 1)
        self.c = nn.Linear(8, 8)
        self.d = nn.Conv2d(8, 4, 1)
        self.e = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("NCHW input")
        y = self.a(x)
        u, v = torch.split(y, [4, 4], 1)
        z = self.c(y.permute(0, 2, 3, 1)).transpose(1, 3).transpose(2, 3)  # NHWC linear, back to NCHW
        s = y[:, :, 0].mean(2)[..., None, None]  # select a row, reduce it, unsqueeze
        g = y.mean((2, 3), keepdim=True).expand(-1, -1, x.shape[2], x.shape[3])
        h = torch.cat([u[:, 1:3], v], 1)  # a channel slice of a split piece
        return self.d(y + g + s) + self.b(h) + self.e(z) + y.amax(1, keepdim=True)


def _ex_shape():
    return _static(_ShapeOps()), _img()


def _ex_unflatten():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            if x.dim() != 2:
                raise ValueError("2-D input")
            y = self.a(x).unflatten(-1, (4, 2))  # (B, 4, 2): units of 2 features
            return self.b(y.relu().sum(-1))

    return _static(M()), (torch.randn(3, 6),)


def _ex_index_put():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            mask = torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3])
            mask[x[:, :1] > 0] = -1.0  # Hugging Face-style mask construction by item assignment
            return self.b(self.a(x) + mask)

    return _static(M()), _img()


def _ex_pinned():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)
            self.register_buffer("order", torch.tensor([2, 0, 1]))

        def forward(self, x):
            if x.dim() != 4:
                raise ValueError("NCHW input")
            y = self.a(x)
            side = max(x.shape[2] // 2, 1)  # arithmetic on (symbolic) sizes
            z = torch.index_select(x, 1, self.order).sum(1, keepdim=True)
            return self.b(y) + z[:, :, :side].mean() + torch.sort(x, dim=3).values[:, :1, :1, :1]

    return _static(M()), _img()


def _ex_pad():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.p = nn.Conv2d(8, 16, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            if x.dim() != 4:
                raise ValueError("NCHW input")
            y = F.pad(self.a(x), (1, 1, 0, 2))
            y = torch.roll(y, shifts=1, dims=3).flip(2)
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            return self.b(F.pixel_shuffle(self.p(y), 2))

    return _static(M()), _img()


def _ex_gqa():
    class M(nn.Module):
        """Grouped-query attention written by hand: 4 query heads share 2 key/value heads."""

        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 16)
            self.k = nn.Linear(6, 8)
            self.v = nn.Linear(6, 8)
            self.o = nn.Linear(16, 5)

        def forward(self, x):
            b, n, _ = x.shape
            if n > 16:
                raise ValueError("too long")
            q = self.q(x).view(b, n, 8, 2).transpose(1, 2)
            k = self.k(x).view(b, n, 4, 2).transpose(1, 2).repeat_interleave(2, dim=1)
            v = self.v(x).view(b, n, 4, 2).transpose(1, 2)
            v = v[:, :, None].expand(b, 4, 2, n, 2).reshape(b, 8, n, 2)  # Hugging Face's repeat_kv
            att = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1)
            return self.o((att @ v).transpose(1, 2).reshape(b, n, 16))

    return _static(M()), (torch.randn(2, 5, 6),)


# ---------------------------------------------------------------------------------------------------------
# adapted rules


class AtenConv(Rule):
    """aten.conv{1,2,3}d / convolution / conv_transpose*: weights in their ATen layout, roles restated.

    Plain and depthwise (``groups == in_channels``) convolutions prune; the depthwise ``groups`` literal is
    patched. Other grouped convolutions pin their channels (exact, conservative)."""

    name = "aten.conv"
    example = staticmethod(_ex_conv)

    @staticmethod
    def _parts(node: fx.Node) -> tuple[Any, Any, Any, bool, int]:
        a = bind(node)
        transposed = bool(a.get("transposed", False)) or "conv_transpose" in node.target._schema.name
        return a["input"], a["weight"], a.get("bias"), transposed, int(a.get("groups") or 1)

    def analyze(self, node, rc: RuleContext) -> None:
        x, w, b, transposed, g = self._parts(node)
        spatial = len(rc.shape(w)) - 2
        c = 1 if len(rc.shape(x)) == spatial + 2 else 0
        if c == 1:
            rc.tie(rc.act(x, 0), rc.out(0))
        xin, out = rc.act(x, c), rc.out(c)
        cin, cout = xin.size, out.size
        rc.produce(out)
        if rc.is_tensor(b):
            rc.tie(out, rc.act(b, 0))
            _label(rc, b, 0, "out")
        w_in, w_out = (0, 1) if transposed else (1, 0)
        if g == 1:
            rc.tie(xin, rc.act(w, w_in))
            rc.tie(out, rc.act(w, w_out))
            _label(rc, w, w_in, "in")
            _label(rc, w, w_out, "out")
        elif g == cin and cin > 1 and (not transposed or cout == cin):
            # depthwise (with channel multiplier cout // cin): input channel c feeds outputs c*m .. c*m+m-1
            mult = cout // cin
            pos = np.arange(cout)
            rc.tie_map(xin, pos // mult, out, pos)
            wo = rc.act(w, 0)  # (cin*m, 1, k) or, transposed, (cin, 1, k)
            if wo.size == cout:
                rc.tie(wo, out)
            else:
                rc.tie(wo, xin)
            _label(rc, w, 0, "out")
            rc.free(rc.act(w, 1))
        else:
            rc.pin(xin, f"{node.name}: grouped convolution ({g} groups) is not pruned on the export path")
            rc.pin(out, f"{node.name}: grouped convolution ({g} groups) is not pruned on the export path")
        for d in range(2, 2 + spatial):
            rc.free(rc.act(w, d))

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        x, _, _, transposed, g = self._parts(old)
        if g == 1:
            return
        c = 1 if len(old.args[0].meta["tensor_meta"].shape) == len(old.args[1].meta["tensor_meta"].shape) else 0
        k = rw.keep_act(x, c)
        if k is not None and g == len(k):
            _set_arg(node, "groups", int(k.sum()))


class AtenLinear(Rule):
    """aten.linear(input, weight, bias): weight (out, in)."""

    name = "aten.linear"
    example = staticmethod(_ex_linear)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x, w, b = a["input"], a["weight"], a["bias"]
        nd = len(rc.shape(x))
        for d in range(nd - 1):
            rc.tie(rc.act(x, d), rc.out(d))
        out = rc.out(-1)
        rc.produce(out)
        rc.tie(out, rc.act(w, 0))
        rc.tie(rc.act(x, -1), rc.act(w, 1))
        _label(rc, w, 0, "out")
        _label(rc, w, 1, "in")
        if rc.is_tensor(b):
            rc.tie(out, rc.act(b, 0))
            _label(rc, b, 0, "out")


class AtenEmbedding(Rule):
    """aten.embedding(weight, indices): the vector dim is produced by the weight's columns."""

    name = "aten.embedding"
    example = staticmethod(_ex_embedding)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        w, idx = a["weight"], a["indices"]
        for d in range(len(rc.shape(idx))):
            rc.tie(rc.act(idx, d), rc.out(d))
        out = rc.out(-1)
        rc.produce(out)
        rc.tie(out, rc.act(w, 1))
        _label(rc, w, 1, "out")
        rc.free(rc.act(w, 0))


class AtenBatchNorm(Rule):
    """batch_norm / _native_batch_norm_legit_no_training / native_batch_norm / instance_norm: per channel."""

    name = "aten.batch_norm"
    example = staticmethod(_ex_batchnorm)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x = a["input"]
        multi = rc.out_shape() is None
        index = 0 if multi else None
        nd = len(rc.shape(x))
        for d in range(nd):
            rc.tie(rc.act(x, d), rc.out(d, index))
        ch = rc.act(x, 1 if nd > 1 else 0)
        for pname in ("weight", "bias", "running_mean", "running_var"):
            p = a.get(pname)
            if rc.is_tensor(p):
                rc.tie(ch, rc.act(p, 0))
                _label(rc, p, 0, "norm")
        if multi:  # saved statistics: (C,) tensors follow the channels; empty ones are free
            for i in range(1, len(node.meta["tensor_meta"])):
                shp = rc.out_shape(i)
                if shp is None:
                    continue
                for d, s in enumerate(shp):
                    ax = rc.out(d, i)
                    rc.tie(ax, ch) if (len(shp) == 1 and s == ch.size) else rc.free(ax)


def _ex_functional_batchnorm():
    class BNAct(nn.BatchNorm2d):
        """timm's BatchNormAct2d pattern: a BatchNorm subclass calling F.batch_norm in its own forward."""

        def forward(self, x):
            return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, self.momentum, self.eps))

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BNAct(8), nn.Conv2d(8, 4, 1)), _img()


class FunctionalBatchNorm(Rule):
    """``F.batch_norm`` / ``F.instance_norm`` called with the statistics and affine parameters as arguments
    (timm's BatchNormAct2d traces to this): per channel, exact; the parameters' role is "norm"."""

    name = "F.batch_norm"
    example = staticmethod(_ex_functional_batchnorm)

    def analyze(self, node, rc: RuleContext) -> None:
        import inspect

        a = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
        x = a["input"]
        nd = len(rc.shape(x))
        rc.tie_same_shape(x)
        ch = rc.act(x, 1 if nd > 1 else 0)
        # statistics of the call itself (training=True, e.g. timm's weight standardisation; instance norm)
        # span every other dim: removing positions there changes them
        batch_stats = a.get("training", False) if node.target is F.batch_norm else a.get("use_input_stats", True)
        if batch_stats is not False:
            first = 0 if node.target is F.batch_norm else 2  # instance norm: per sample
            for d in range(first, nd):
                if d != (1 if nd > 1 else 0):
                    rc.lossy(rc.act(x, d), f"{node.name}: statistics computed by the call span dim {d}")
        for pname in ("running_mean", "running_var", "weight", "bias"):
            p = a.get(pname)
            if rc.is_tensor(p):
                rc.tie(ch, rc.act(p, 0))
                _label(rc, p, 0, "norm")


class AtenGroupNorm(FunctionalGroupNorm):
    """aten.group_norm(input, num_groups, weight, bias, eps, cudnn_enabled): whole groups pruned exactly when
    ``num_groups > 1`` (``num_groups`` patched on rewrite), lossy with one group; see
    :func:`~fxprune.rules.norm.tie_group_norm`."""

    name = "aten.group_norm"
    example = staticmethod(_ex_groupnorm)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x = a["input"]
        affine = []
        for pname in ("weight", "bias"):
            p = a.get(pname)
            if rc.is_tensor(p):
                affine.append(rc.act(p, 0))
                _label(rc, p, 0, "norm")
        tie_group_norm(rc, node, x, int(a["num_groups"]), affine, node.name, whole_groups=True)


class AtenReduce(Rule):
    """mean/sum/amax/var/... over ``dim`` (``None`` or ``[]`` = every dim); keepdim read from the shapes."""

    name = "aten.reduce"
    example = staticmethod(_ex_shape)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x = a.get("self", a.get("input"))
        if not rc.is_tensor(x):
            return
        if "other" in a:  # max.other / min.other: element-wise
            rc.tie_broadcast(rc.tensor_args())
            return
        nd = len(rc.shape(x))
        dim = a.get("dim")
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            red = set(range(nd))
        elif isinstance(dim, int):
            red = {dim % max(nd, 1)}
        elif isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
            red = {d % nd for d in dim}
        else:
            return  # symbolic dims: everything stays pinned
        tm = node.meta.get("tensor_meta")
        outs = [None] if rc.out_shape() is not None else list(range(len(tm)))
        for index in outs:
            oshape = rc.out_shape(index)
            if oshape is None:
                continue
            tie_reduction(rc, node, x, nd, red, len(oshape) == nd and nd > 0, index)


def _aten_perm(node: fx.Node, nd: int) -> list[int]:
    a = bind(node)
    name = node.target._schema.name.split("::")[-1]
    if name in ("permute", "permute_copy"):
        return [d % nd for d in a["dims"]]
    if name in ("t", "numpy_T"):
        return list(range(nd))[::-1]
    if name == "movedim":
        src, dst = a["source"], a["destination"]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [None] * nd
        src = [s % nd for s in src]
        dst = [d % nd for d in dst]
        for s, d in zip(src, dst, strict=True):
            order[d] = s
        rest = iter(d for d in range(nd) if d not in src)
        return [o if o is not None else next(rest) for o in order]
    d0, d1 = a.get("dim0"), a.get("dim1")
    if d0 is None:
        d0, d1 = a.get("axis0"), a.get("axis1")
    p = list(range(nd))
    p[d0 % nd], p[d1 % nd] = p[d1 % nd], p[d0 % nd]
    return p


class AtenPermute(PermuteRule):
    """permute / transpose / t / movedim / swapaxes: output dim i is input dim perm[i]."""

    name = "aten.permute"
    example = staticmethod(_ex_shape)

    perm = staticmethod(_aten_perm)


class AtenSplit(SplitRule):
    """split.Tensor / split_with_sizes / chunk / unbind; sizes from the outputs, rewritten as sections."""

    name = "aten.split"
    example = staticmethod(_ex_shape)

    @staticmethod
    def _dim(node: fx.Node) -> int:
        return int(bind(node).get("dim") or 0)

    def analyze(self, node, rc: RuleContext) -> None:
        x = node.args[0]
        dim = self._dim(node) % len(rc.shape(x))
        unbind = "unbind" in node.target._schema.name
        sizes = [1 if unbind else m.shape[dim] for m in node.meta["tensor_meta"]]
        tie_split(rc, x, dim, sizes, unbind)

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        if "unbind" in old.target._schema.name:
            return
        x = old.args[0]
        dim = self._dim(old) % len(rw.new_shape(x))
        if rw.keep_act(x, dim) is None:
            return
        sizes = [rw.new_shape(old, i)[dim] for i in range(len(old.meta["tensor_meta"]))]
        node.target = A.split_with_sizes.default
        node.args = (node.args[0], sizes, dim)
        node.kwargs = {}


class AtenSlice(Rule):
    """slice.Tensor(self, dim, start, end, step): a contiguous slice ties to a range; start/end patched."""

    name = "aten.slice"
    example = staticmethod(_ex_shape)

    @staticmethod
    def _range(node: fx.Node, size: int) -> tuple[int, int, int] | None:
        a = bind(node)
        start, end, step = a.get("start"), a.get("end"), a.get("step") or 1
        if any(isinstance(v, fx.Node) for v in (start, end, step)):
            return None
        return slice(start, end, step).indices(size)

    def analyze(self, node, rc: RuleContext) -> None:
        x = node.args[0]
        shp = rc.shape(x)
        dim = int(bind(node).get("dim") or 0) % len(shp)
        for d in range(len(shp)):
            if d != dim:
                rc.tie(rc.act(x, d), rc.out(d))
        r = self._range(node, shp[dim])
        if r is None:
            return  # symbolic bounds: the sliced dim stays pinned
        start, stop, step = r
        a, o = rc.act(x, dim), rc.out(dim)
        if step == 1:
            rc.tie_slice(a, start, o)
        else:
            pos = np.arange(o.size)
            rc.tie_map(a, start + pos * step, o, pos)
            rc.pin(a, f"strided slice at {node.name}")

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        x = old.args[0]
        shp = x.meta["tensor_meta"].shape
        dim = int(bind(old).get("dim") or 0) % len(shp)
        k = rw.keep_act(x, dim)
        r = self._range(old, shp[dim])
        if k is None or r is None:
            return
        start, stop, step = r
        if step != 1:
            return
        ns = int(k[:start].sum())
        _set_arg(node, "start", ns)
        _set_arg(node, "end", ns + int(k[start:stop].sum()))


class AtenSelect(Rule):
    """select.int(self, dim, index): the selected position is pinned; the index is renumbered on rewrite."""

    name = "aten.select"
    example = staticmethod(_ex_shape)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x, dim, index = a["self"], a["dim"], a["index"]
        shp = rc.shape(x)
        dim %= len(shp)
        j = 0
        for d in range(len(shp)):
            if d == dim:
                if isinstance(index, int):
                    rc.pin(rc.act(x, d), f"indexed by a constant at {node.name}", idx=np.array([index % shp[d]]))
                continue
            rc.tie(rc.act(x, d), rc.out(j))
            j += 1

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        a = bind(old)
        x, dim, index = a["self"], a["dim"], a["index"]
        shp = x.meta["tensor_meta"].shape
        k = rw.keep_act(x, dim % len(shp))
        if k is not None and isinstance(index, int):
            _set_arg(node, "index", int(k[: index % shp[dim % len(shp)]].sum()))


class AtenExpand(ExpandRule):
    """expand(self, size): broadcast; literal sizes patched."""

    name = "aten.expand"
    example = staticmethod(_ex_shape)

    def rewrite_node(self, node, old, rw: RewriteContext) -> None:
        new = rw.new_shape(old)
        sizes = bind(node)["size"]
        _set_arg(node, "size", list(_patch_sizes(tuple(sizes), new)))


class AtenUnflatten(UnflattenRule):
    """unflatten.int(self, dim, sizes): literal sizes patched."""

    name = "aten.unflatten"
    example = staticmethod(_ex_unflatten)

    def rewrite_node(self, node, old, rw) -> None:
        a = bind(old)
        shp = rw.new_shape(old)
        d = a["dim"] % len(old.args[0].meta["tensor_meta"].shape)
        sizes = bind(node)["sizes"]
        _set_arg(node, "sizes", list(_patch_sizes(tuple(sizes), tuple(shp[d : d + len(sizes)]))))


class AtenIndexPut(Rule):
    """index_put(_)(self, indices, values): the output is ``self`` with some entries overwritten.

    Output dims follow ``self``; the indices and values are pinned (they address positions)."""

    name = "aten.index_put"
    example = staticmethod(_ex_index_put)

    def analyze(self, node, rc: RuleContext) -> None:
        rc.tie_same_shape(node.args[0])


class Creation(Rule):
    """zeros / ones / full / arange / new_zeros ...: a new tensor; tensor arguments are read for dtype/device
    only, and the output (with its literal sizes) is pinned."""

    name = "aten.creation"
    example = staticmethod(_ex_index_put)

    def analyze(self, node, rc: RuleContext) -> None:
        for x in rc.tensor_args():
            for ax in rc.all_dims(x):
                rc.free(ax)


class Pinned(Rule):
    """An op whose index arithmetic fxprune does not model (gather, advanced indexing, sort, item...):
    every dim it touches is pinned. Exact, never a guess."""

    example = staticmethod(_ex_pinned)

    def __init__(self, name: str) -> None:
        self.name = name

    def analyze(self, node, rc: RuleContext) -> None:
        return  # RuleContext.finish() pins every input and output dim


class TieExcept(PermuteWithin):
    """Output has the input's shape; some dims are permuted inside (roll, flip, channel_shuffle): those are
    pinned, the others pass through (the fx rule's analysis). ``dims``: op name -> the argument naming the
    dims, or fixed dims."""

    name = "aten.permute_within"
    example = staticmethod(_ex_pad)

    def __init__(self, dims: dict[str, str | tuple[int, ...]]) -> None:
        self.dims = dims

    def moved_dims(self, node: fx.Node, nd: int) -> list[int] | None:
        where = self.dims[node.target._schema.name.split("::")[-1]]
        dims = bind(node).get(where) if isinstance(where, str) else where
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return None  # roll without dims: over the flattened tensor
        return [dims % nd] if isinstance(dims, int) else [d % nd for d in dims]


class AtenPad(Rule):
    """constant_pad_nd / pad / reflection_pad* / replication_pad*: the padded trailing dims are pinned."""

    name = "aten.pad"
    example = staticmethod(_ex_pad)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x = node.args[0]
        pad = a.get("pad", a.get("padding"))
        nd = len(rc.shape(x))
        k = len(pad) // 2 if isinstance(pad, (list, tuple)) else nd
        for d in range(nd - k):
            rc.tie(rc.act(x, d), rc.out(d))


class AtenRepeatInterleave(Rule):
    """repeat_interleave.self_int(self, repeats, dim): output position p of ``dim`` is input p // repeats
    (grouped-query attention: one key/value head serves ``repeats`` query heads)."""

    name = "aten.repeat_interleave"
    example = staticmethod(_ex_gqa)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x, r, dim = a.get("self"), a.get("repeats"), a.get("dim")
        if x is None or dim is None or not isinstance(r, int):
            return  # flattened or tensor repeats: pinned
        tie_repeat_interleave(rc, x, r, dim)


class AtenPixelShuffle(Rule):
    """pixel_shuffle(self, r): output channel c is input channels c·r² … c·r²+r²−1."""

    name = "aten.pixel_shuffle"
    example = staticmethod(_ex_pad)

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x, r = a["self"], a["upscale_factor"]
        nd = len(rc.shape(x))
        for d in range(nd - 3):
            rc.tie(rc.act(x, d), rc.out(d))
        cin = rc.act(x, -3)
        pos = np.arange(cin.size)
        rc.tie_map(cin, pos, rc.out(-3), pos // (r * r))


class AtenBaddbmm(Rule):
    """baddbmm(self, batch1, batch2, beta, alpha) = beta·self + alpha·(batch1 @ batch2): the product's dims
    as in :class:`~fxprune.rules.attention.MatmulRule` (contraction pinned), ``self`` broadcast to the
    output (nn.MultiheadAttention's attention scores plus an additive mask)."""

    name = "aten.baddbmm"
    example = staticmethod(lambda: _ex_mha_masked())

    def analyze(self, node, rc: RuleContext) -> None:
        a = bind(node)
        x, b1, b2 = a["self"], a["batch1"], a["batch2"]
        rc.tie(rc.act(b1, 0), rc.out(0))
        rc.tie(rc.act(b2, 0), rc.out(0))
        rc.tie(rc.act(b1, 1), rc.out(1))
        rc.tie(rc.act(b2, 2), rc.out(2))
        rc.tie(rc.act(b1, 2), rc.act(b2, 1))
        rc.pin(rc.act(b1, 2), f"contracted by {node.name}")
        if rc.is_tensor(x):
            rc.tie_broadcast([x])


def _ex_mha_masked():
    class M(nn.Module):
        """nn.MultiheadAttention returning its weights under an additive mask: the ATen graph has
        in-projection, unflatten/select of q/k/v, views merging batch and heads, baddbmm, softmax, bmm."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.mha = nn.MultiheadAttention(8, 4)
            self.register_buffer("mask", torch.triu(torch.full((4, 4), -1e4), 1))
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            if x.dim() != 3:
                raise ValueError("(L, B, E) input")
            h = self.inp(x)
            return self.out(self.mha(h, h, h, attn_mask=self.mask)[0])

    return _static(M()), (torch.randn(4, 2, 5),)


def _ex_mha_packed():
    class M(nn.Module):
        """Two batch-first nn.MultiheadAttention layers without weights (sdpa path): packed in-projection
        unflattened to (3, E) and selected, views merging batch and heads, a key padding mask."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.a = nn.MultiheadAttention(8, 4, batch_first=True)
            self.b = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
            self.register_buffer("pad", torch.tensor([[False] * 4, [False, False, False, True]]))
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            if x.dim() != 3:
                raise ValueError("(B, L, E) input")
            h = self.inp(x)
            h = self.a(h, h, h, need_weights=False)[0]
            return self.out(self.b(h, h, h, key_padding_mask=self.pad, need_weights=False)[0])

    return _static(M()), (torch.randn(2, 4, 5),)


# ---------------------------------------------------------------------------------------------------------
# registration


def _fn_rule(fn: Any) -> Rule:
    rule = RULES.functions.get(fn)
    if rule is None:  # pragma: no cover - the fx-level rules are imported first
        raise RuntimeError(f"fx-level rule for {fn} is not registered")
    return rule


def _reg(names: Iterable[str], rule: Rule) -> None:
    RULES.register_function(aten_overloads(*names), rule)


_UNARY = ["relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "mish", "mish_", "hardswish", "hardswish_",
          "hardsigmoid", "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_", "selu", "celu",
          "leaky_relu", "leaky_relu_", "softplus", "softshrink", "hardshrink", "hardtanh", "hardtanh_", "exp",
          "log", "log1p", "expm1", "abs", "neg", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "reciprocal",
          "sign", "floor", "ceil", "round", "trunc", "clamp_min", "clamp_max", "nan_to_num", "logit", "dropout",
          "dropout_", "alpha_dropout", "feature_dropout", "feature_alpha_dropout", "clone", "contiguous", "alias",
          "detach", "detach_", "_to_copy", "to", "lift_fresh_copy", "lift_fresh", "zeros_like", "ones_like",
          "empty_like", "full_like", "rand_like", "randn_like", "fill_", "zero_", "bitwise_not", "logical_not",
          "isnan", "isinf", "sigmoid_backward", "log_sigmoid", "tan", "atan",
          "exp2", "log2", "log10", "frac", "positive", "erfinv", "sinh", "cosh", "asinh", "acosh", "atanh"]
_BINARY = ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub", "true_divide", "floor_divide",
           "remainder", "fmod", "pow", "pow_", "maximum", "minimum", "fmax", "fmin", "atan2", "hypot", "copysign",
           "where", "masked_fill", "masked_fill_", "lerp", "addcmul", "addcdiv", "eq", "ne", "lt", "le", "gt",
           "ge", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "copy_",
           "copy", "xlogy", "clamp", "clip", "threshold"]


def _register() -> None:
    from . import elementwise, shape, reduce as _red, attention, misc, norm  # noqa: F401 (register the fx rules first)

    unary = RULES.functions[torch.relu]
    broadcast = RULES.functions[torch.add]
    _reg(_UNARY, unary)
    _reg(_BINARY, broadcast)
    # clamp.Tensor/where/... with tensor bounds are broadcasts (registered above); plain clamp is unary too
    from .aten_heads import AtenView, AtenUnflattenHeads

    _reg(["view", "reshape", "_unsafe_view", "view_copy"], AtenView())
    _reg(["unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "unsqueeze_copy", "squeeze_copy"],
         _fn_rule(torch.squeeze))
    _reg(["flatten"], _fn_rule(torch.flatten))
    _reg(["unflatten"], AtenUnflattenHeads())
    _reg(["permute", "permute_copy", "transpose", "transpose_", "transpose_copy", "t", "t_", "t_copy", "movedim",
          "swapaxes", "swapdims", "numpy_T"], AtenPermute())
    _reg(["expand", "expand_copy"], AtenExpand())
    _reg(["repeat"], RULES.methods["repeat"])
    _reg(["cat", "concat", "concatenate"], _fn_rule(torch.cat))
    _reg(["stack"], _fn_rule(torch.stack))
    _reg(["split", "split_with_sizes", "tensor_split", "chunk", "unbind", "split_copy", "split_with_sizes_copy", "unsafe_split",
          "unsafe_chunk"], AtenSplit())
    _reg(["narrow", "narrow_copy"], _fn_rule(torch.narrow))
    _reg(["slice", "slice_copy"], AtenSlice())
    _reg(["select", "select_copy"], AtenSelect())
    _reg(["sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "dim", "numel"],
         RULES.methods["size"])
    no_op = _fn_rule(torch._assert)
    _reg(["_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
          "_assert_async", "_functional_assert_async", "_functional_sym_constrain_range",
          "_functional_sym_constrain_range_for_size", "_print"], no_op)
    sym_fns = [getattr(torch, n) for n in ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite",
                                           "sym_sqrt", "sym_sum") if hasattr(torch, n)]
    sym_fns += [math.ceil, math.floor, math.trunc, math.sqrt, builtins.max, builtins.min, builtins.round,
                builtins.int, builtins.float, operator.neg, operator.floordiv, operator.truediv, operator.mod]
    pinned = Pinned("aten.pinned")
    for fn in sym_fns:  # arithmetic on sizes: no tensors, nothing to tie
        RULES.functions.setdefault(fn, pinned)
    _reg(["index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"], AtenIndexPut())
    _reg(["zeros", "ones", "full", "empty", "empty_strided", "arange", "scalar_tensor", "eye", "linspace",
          "new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided", "rand", "randn", "randint",
          "tensor", "tril_indices", "triu_indices"], Creation())
    _reg(["index", "_unsafe_index", "index_select", "gather", "scatter", "scatter_", "scatter_add",
          "scatter_add_", "masked_select", "nonzero", "sort", "argsort", "topk", "_local_scalar_dense", "item",
          "unfold", "triu", "tril", "diag", "diagonal", "bucketize", "searchsorted", "one_hot",
          "multinomial", "as_strided", "im2col", "col2im", "grid_sampler", "grid_sampler_2d",
          "upsample_nearest2d_backward", "nll_loss_forward", "addmm", "addbmm", "index_add",
          "index_copy", "index_fill", "masked_scatter", "embedding_bag", "_embedding_bag", "histc", "bincount",
          "unique_consecutive", "_unique2", "native_dropout", "stft", "fft_rfft", "fft_irfft", "fft_fft",
          "view_as_real", "view_as_complex", "_cdist_forward", "cdist", "_weight_norm_interface",
          "_weight_int4pack_mm", "meshgrid", "cartesian_prod"], pinned)
    _reg(["mean", "sum", "nansum", "amax", "amin", "max", "min", "aminmax", "var", "std", "var_mean", "std_mean",
          "prod", "logsumexp", "argmax", "argmin", "any", "all", "count_nonzero", "median", "nanmean",
          "linalg_vector_norm", "norm"], AtenReduce())
    dimwise = _fn_rule(F.softmax)
    _reg(["softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "logcumsumexp", "softmin",
          "_safe_softmax"], dimwise)
    _reg(["matmul", "mm", "bmm"], _fn_rule(torch.matmul))
    _reg(["baddbmm"], AtenBaddbmm())
    _reg(["einsum"], _fn_rule(torch.einsum))
    _reg(["scaled_dot_product_attention"], _fn_rule(F.scaled_dot_product_attention))
    _reg(["conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d"], AtenConv())
    _reg(["linear"], AtenLinear())
    _reg(["embedding"], AtenEmbedding())
    _reg(["batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
          "_batch_norm_impl_index", "instance_norm", "_native_batch_norm_legit_functional"], AtenBatchNorm())
    _reg(["group_norm"], AtenGroupNorm())
    RULES.register_function((F.batch_norm, F.instance_norm), FunctionalBatchNorm())
    _reg(["layer_norm", "rms_norm"], _fn_rule(F.layer_norm))
    for k, fns in ((1, ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
                        "max_pool1d_with_indices", "lp_pool1d")),
                   (2, ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
                        "adaptive_max_pool2d", "max_pool2d_with_indices", "lp_pool2d")),
                   (3, ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d",
                        "adaptive_max_pool3d", "max_pool3d_with_indices"))):
        _reg(fns, _fn_rule(getattr(F, f"max_pool{k}d")))
    _reg(["upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
          "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d", "_upsample_bilinear2d_aa",
          "_upsample_bicubic2d_aa", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
          "_upsample_nearest_exact3d"], _fn_rule(F.interpolate))
    _reg(["constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
          "replication_pad1d", "replication_pad2d", "replication_pad3d", "_pad_circular"], AtenPad())
    within = TieExcept({"roll": "dims", "flip": "dims", "channel_shuffle": (1,), "native_channel_shuffle": (1,)})
    _reg(list(within.dims), within)
    _reg(["repeat_interleave"], AtenRepeatInterleave())
    _reg(["pixel_shuffle"], AtenPixelShuffle())
    _register_costs()


def _register_costs() -> None:
    """MACs formulas of the ATen ops, reusing the functional ones (same argument positions)."""
    from .. import flops

    reg = getattr(flops, "_register", None)
    if reg is None:  # pragma: no cover - the counter changed; MACs of export graphs are then lower bounds
        return

    def conv(gm, node):
        _, _, _, transposed, _ = AtenConv._parts(node)
        return (flops._conv_t_fn if transposed else flops._conv_fn)(gm, node)

    reg(aten_overloads("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                       "conv_transpose2d", "conv_transpose3d"), conv)
    reg(aten_overloads("linear"), flops._linear_fn)
    reg(aten_overloads("matmul", "mm", "bmm"), flops._matmul_rule(0, "self"))
    reg(aten_overloads("baddbmm"), flops._matmul_rule(1, "batch1"))
    reg(aten_overloads("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"), flops._norm_fn)
    reg(aten_overloads("scaled_dot_product_attention"), flops._sdpa_fn)


_register()
