"""Matrix products between activations (attention scores, ``A @ V``), and einsum.

:class:`ProductCall` normalises ``torch.matmul``/``@``/``mm``/``bmm``, ``addmm``/``baddbmm`` (plus a
broadcast ``self``), the vector products ``mv``/``dot``/``addmv``/``addbmm`` (cost only), as functions,
Tensor methods and ATen overloads. A product whose second operand is a 2-D parameter *is* a linear layer
(``x @ W``, GPT-2's ``Conv1D`` = ``addmm(b, x, W)``): its binder returns a
:class:`~fxprune.rules.linear.LinearCall` and the linear family's meaning applies.

Between activations: batch dims pass through (broadcast dims pinned), the row dim of ``a`` and the column
dim of ``b`` pass to the output, and the contracted dim is pinned (removing part of it would change every
output). MACs: ``out_numel * K`` (``addbmm``: ``* batch`` as well). ``torch.einsum``: a letter kept in the
output ties its dims, a contracted letter is pinned; it costs 0 MACs (not analysed, documented).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..meta import shape_of
from .base import RULES, RuleContext
from .calls import Bound, Family, aten_overloads, aten_name, call_arg, param_origin, schema_args
from .linear import LINEAR, LinearCall

__all__ = ["ProductCall", "ProductFamily", "PRODUCT", "EinsumFamily", "tie_batch", "product_dim_origins"]


@dataclass(frozen=True)
class ProductCall:
    a: Any
    b: Any
    add: Any  # the broadcast addend of addmm/baddbmm (None: none)
    kind: str  # "matmul" | "vector" | "addbmm"


def product_dim_origins(node: fx.Node, a: Any, b: Any, dim: int) -> list[tuple[fx.Node, int]]:
    """Where output ``dim`` of a product ``a @ b`` (or attention ``softmax(q kᵀ) v``, ``b`` = v) comes from:
    the last dim from ``b``'s last dim, the others from ``a``'s (aligned from the right)."""
    os_, as_, bs = shape_of(node), shape_of(a), shape_of(b)
    if os_ is None or as_ is None or bs is None:
        return []
    dim %= len(os_)
    if dim == len(os_) - 1:
        return [(b, len(bs) - 1)]
    k = dim - (len(os_) - len(as_))
    return [(a, k)] if k >= 0 and as_[k] == os_[dim] else []


def tie_batch(rc: RuleContext, pairs: list[tuple[fx.Node, int]], out_batch: int) -> None:
    """Tie the leading (batch) dims of several operands to the output's, aligned from the right."""
    out_shape = rc.out_shape()
    for x, nb in pairs:
        shp = rc.shape(x)
        for k in range(1, nb + 1):
            if k > out_batch:
                break
            a, o = rc.act(x, nb - k), rc.out(out_batch - k)
            if shp[nb - k] == out_shape[out_batch - k]:
                rc.tie(a, o)
            elif shp[nb - k] == 1:
                rc.pin(a, "broadcast dim")


class ProductFamily(Family):
    name = "matmul"

    def analyze(self, call, node, rc: RuleContext) -> None:
        if isinstance(call, LinearCall):
            return LINEAR.analyze(call, node, rc)
        a, b = call.a, call.b
        if call.kind != "matmul" or not (rc.is_tensor(a) and rc.is_tensor(b)) or rc.out_shape() is None:
            return  # vector products: everything stays pinned
        na, nb = len(rc.shape(a)), len(rc.shape(b))
        if na < 2 or nb < 2:
            return
        tie_batch(rc, [(a, na - 2), (b, nb - 2)], len(rc.out_shape()) - 2)
        rc.tie(rc.act(a, -2), rc.out(-2))
        rc.tie(rc.act(b, -1), rc.out(-1))
        rc.tie(rc.act(a, -1), rc.act(b, -2))
        rc.pin(rc.act(a, -1), f"contracted by {node.name}")
        if rc.is_tensor(call.add):
            rc.tie_broadcast([call.add])

    def macs(self, call, node, gm) -> int | None:
        if isinstance(call, LinearCall):
            return LINEAR.macs(call, node, gm)
        a, out = shape_of(call.a), shape_of(node)
        if a is None or out is None:
            return None
        macs = math.prod(out) * (a[-1] if a else 1)
        return macs * a[0] if call.kind == "addbmm" else macs

    def consumer(self, call, node, gm):
        return LINEAR.consumer(call, node, gm) if isinstance(call, LinearCall) else None

    def layer_kind(self, call, node, gm) -> str | None:
        return LINEAR.layer_kind(call, node, gm) if isinstance(call, LinearCall) else None

    def produced_dim(self, call, node) -> int | None:
        return LINEAR.produced_dim(call, node) if isinstance(call, LinearCall) else None

    def dim_origins(self, call, node, dim):
        if isinstance(call, LinearCall):
            return LINEAR.dim_origins(call, node, dim)
        return product_dim_origins(node, call.a, call.b, dim) if call.kind == "matmul" else []


PRODUCT = ProductFamily()


def _product(a: Any, b: Any, add: Any, kind: str, scaled: bool, spelling: str, gm: fx.GraphModule) -> Any:
    """A linear layer when ``b`` is a 2-D parameter operand (and the product is not scaled), else a product."""
    if kind == "matmul" and not scaled and isinstance(a, fx.Node) and shape_of(b) is not None \
            and len(shape_of(b)) == 2 and param_origin(gm, b) is not None:
        return LinearCall(a, b, add, "io", spelling)
    return ProductCall(a, b, add, kind)


_VECTOR = {"mv", "dot", "addmv", "vdot", "inner"}


def bind_torch(node: fx.Node, gm: fx.GraphModule) -> Any:
    """matmul / @ / mm / bmm / addmm / baddbmm / mv / dot / addbmm as functions or Tensor methods."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    name = {"__matmul__": "matmul", "matmul": "matmul"}.get(name, name)
    spelling = "method" if node.op == "call_method" else "function"
    scaled = any(k in node.kwargs and node.kwargs[k] != 1 for k in ("alpha", "beta"))
    if name in ("addmm", "baddbmm", "addmv", "addbmm"):
        add, a, b = call_arg(node, 0, "input"), call_arg(node, 1, "mat1"), call_arg(node, 2, "mat2")
        if name == "addmm":
            return _product(a, b, add, "matmul", scaled, spelling, gm)
        return ProductCall(a, b, add, {"baddbmm": "matmul", "addbmm": "addbmm"}.get(name, "vector"))
    a, b = call_arg(node, 0, "input"), call_arg(node, 1, "other")
    if name in _VECTOR:
        return ProductCall(a, b, None, "vector")
    return _product(a, b, None, "matmul", False, spelling, gm)


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> Any:
    name = aten_name(node)
    args = schema_args(node)
    scaled = any(args.get(k, 1) != 1 for k in ("alpha", "beta"))
    if name == "addmm":
        return _product(args["mat1"], args["mat2"], args["self"], "matmul", scaled, "aten", gm)
    if name == "baddbmm":
        return ProductCall(args["batch1"], args["batch2"], args["self"], "matmul")
    if name in ("addmv", "addbmm"):
        return ProductCall(args.get("mat", args.get("batch1")), args.get("vec", args.get("batch2")), args["self"],
                           "addbmm" if name == "addbmm" else "vector")
    a = args.get("self")
    b = args.get("other", args.get("mat2", args.get("vec", args.get("tensor"))))
    if name in _VECTOR:
        return ProductCall(a, b, None, "vector")
    return _product(a, b, None, "matmul", False, "aten", gm)


_T = torch.Tensor
_mm = Bound(PRODUCT, bind_torch, "matmul")
RULES.register_function((torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.addmm, torch.baddbmm, torch.mv,
                         torch.dot, torch.addmv, torch.addbmm), _mm)
RULES.register_method(("matmul", "bmm", "mm", "__matmul__", "addmm", "baddbmm", "mv", "dot", "addmv", "addbmm"), _mm)
RULES.register_function(aten_overloads("matmul", "mm", "bmm", "addmm", "baddbmm", "mv", "dot", "addmv", "addbmm"),
                        Bound(PRODUCT, bind_aten, "aten.matmul"))


# ---------------------------------------------------------------------------------------------------------
# einsum


@dataclass(frozen=True)
class EinsumCall:
    equation: str
    operands: tuple


def _einsum_terms(eq: str, ndims: list[int]) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None  # implicit output: be conservative
    lhs, rhs = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        return None
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    n_ell = max([nd - len(t.replace("...", "")) for t, nd in zip(ins, ndims, strict=True) if "..." in t] + [0])
    ell = "".join(free[:n_ell])
    terms = []
    for t, nd in zip(ins, ndims, strict=True):
        if "..." in t:
            k = nd - len(t.replace("...", ""))
            t = t.replace("...", ell[n_ell - k :])
        terms.append(t)
    return terms, rhs.replace("...", ell)


class EinsumFamily(Family):
    name = "einsum"

    def analyze(self, call: EinsumCall, node, rc: RuleContext) -> None:
        ops = list(call.operands)
        if not all(rc.is_tensor(x) for x in ops) or rc.out_shape() is None:
            return
        parsed = _einsum_terms(call.equation, [len(rc.shape(x)) for x in ops])
        if parsed is None:
            return
        terms, rhs = parsed
        out_shape = rc.out_shape()
        if any(len(t) != len(rc.shape(x)) for x, t in zip(ops, terms, strict=True)):
            return
        first: dict[str, Any] = {}
        for x, t in zip(ops, terms, strict=True):
            shp = rc.shape(x)
            for d, c in enumerate(t):
                a = rc.act(x, d)
                if c in rhs:
                    j = rhs.index(c)
                    if shp[d] == out_shape[j]:
                        rc.tie(a, rc.out(j))
                    else:
                        rc.pin(a, "broadcast dim")
                    continue
                rc.pin(a, f"contracted by {node.name}")
                # contracted letters shared by several operands must still agree in size: tie them
                if c in first and first[c].size == a.size:
                    rc.tie(first[c], a)
                first.setdefault(c, a)

    def macs(self, call, node, gm) -> int | None:
        return 0  # documented: einsum is not analysed


def bind_einsum(node: fx.Node, gm: fx.GraphModule) -> EinsumCall | None:
    eq = node.args[0] if node.args else None
    if not isinstance(eq, str):
        return None
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return EinsumCall(eq, tuple(node.args[1]))
    return EinsumCall(eq, tuple(node.args[1:]))


_einsum = Bound(EinsumFamily(), bind_einsum, "einsum")
RULES.register_function(torch.einsum, _einsum)
RULES.register_function(aten_overloads("einsum"), _einsum)
