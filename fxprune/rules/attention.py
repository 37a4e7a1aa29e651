"""Attention and matrix products.

``F.scaled_dot_product_attention``: heads (and any batch dims) pass through; the query/key feature dim
``E`` is pinned, so whole heads are removed and the default softmax scale ``1/sqrt(E)`` never changes;
value features pass to the output. With grouped-query attention (``enable_gqa``) a key/value head and the
query heads that read it are one unit.

``matmul``/``bmm``/``mm``: the contracted dim is pinned (removing part of it would change every
output), the other dims pass through. When the right operand is a parameter (``x @ self.w``) the
product is a linear layer: the contracted dim follows the parameter's rows (a consumer slice) and the
output dim is produced by its columns.

``nn.MultiheadAttention``: each head is a unit (in-projection rows of q/k/v, their biases, and the
out-projection columns); query/key/value input channels follow the in-projection columns and the output
channels are produced by the out-projection. Pruned layers become
:class:`fxprune.modules.PrunedMultiheadAttention`, which allows an inner width different from the
embedding width. ``nn.TransformerEncoder(Layer)``/``nn.TransformerDecoder``/``nn.Transformer`` are traced
through (``fxprune.trace.TRACE_THROUGH``; traceable stand-in forwards in :mod:`fxprune.modules`), so their
attention reaches this rule and their FFN layers the Linear rule.

``repeat_interleave(x, r, dim)``: output position ``p`` is input ``p // r`` (grouped-query attention's
repeated key/value heads). The torch.export path has its own rules for the same ops
(:mod:`fxprune.rules.aten`, :mod:`fxprune.rules.aten_heads`).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import RULES, Rule, RuleContext
from .examples import ex_einsum, ex_matmul, ex_mha, ex_sdpa

__all__ = ["SdpaRule", "MatmulRule", "MultiheadAttentionRule", "RepeatInterleaveRule"]


def _tie_batch(rc: RuleContext, pairs: list[tuple[fx.Node, int]], out_batch: int) -> None:
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


class SdpaRule(Rule):
    name = "sdpa"
    example = staticmethod(ex_sdpa)

    def analyze(self, node, rc: RuleContext) -> None:
        q, k, v = rc.arg(0, "query"), rc.arg(1, "key"), rc.arg(2, "value")
        mask = rc.arg(3, "attn_mask")
        gqa = bool(rc.arg(7, "enable_gqa", False))
        nq, nk = len(rc.shape(q)), len(rc.shape(k))
        out_nb = len(rc.out_shape()) - 2
        hq, hk = rc.shape(q)[-3] if nq >= 3 else 1, rc.shape(k)[-3] if nk >= 3 else 1
        if gqa and hq != hk:
            # key/value head j serves query heads j*g .. j*g+g-1: one unit
            g = hq // hk
            pos = np.arange(hq)
            rc.tie_map(rc.act(k, -3), pos // g, rc.act(q, -3), pos)
            rc.tie(rc.act(k, -3), rc.act(v, -3))
            rc.tie(rc.act(q, -3), rc.out(-3))
            _tie_batch(rc, [(q, nq - 3), (k, nk - 3), (v, len(rc.shape(v)) - 3)], out_nb - 1)
        else:
            _tie_batch(rc, [(q, nq - 2), (k, nk - 2), (v, len(rc.shape(v)) - 2)], out_nb)
        rc.tie(rc.act(q, -2), rc.out(-2))  # query positions
        rc.tie(rc.act(k, -2), rc.act(v, -2))  # key positions
        rc.pin(rc.act(q, -1), "attention feature dim (softmax scale and head contraction)")
        rc.tie(rc.act(q, -1), rc.act(k, -1))
        rc.tie(rc.act(v, -1), rc.out(-1))
        if rc.is_tensor(mask):
            ms = rc.shape(mask)
            for i in range(1, len(ms) + 1):
                a = rc.act(mask, -i)
                if i == 1:
                    target = rc.act(k, -2)
                elif i == 2:
                    target = rc.out(-2)
                else:
                    target = rc.out(-i) if i <= len(rc.out_shape()) else None
                if target is not None and ms[-i] == target.size:
                    rc.tie(a, target)
                elif ms[-i] == 1:
                    rc.pin(a, "broadcast dim")


def _param_of(rc: RuleContext, x) -> str | None:
    """Qualified name if ``x`` is a get_attr node reading a parameter."""
    if isinstance(x, fx.Node) and x.op == "get_attr":
        return str(x.target)
    return None


class MatmulRule(Rule):
    name = "matmul"
    example = staticmethod(ex_matmul)

    def analyze(self, node, rc: RuleContext) -> None:
        a, b = rc.arg(0, "input"), rc.arg(1, "other")
        if not (rc.is_tensor(a) and rc.is_tensor(b)):
            return
        na, nb = len(rc.shape(a)), len(rc.shape(b))
        if na < 2 or nb < 2:
            return  # vector products: keep everything
        out_nd = len(rc.out_shape())
        _tie_batch(rc, [(a, na - 2), (b, nb - 2)], out_nd - 2)
        rc.tie(rc.act(a, -2), rc.out(-2))
        wb = _param_of(rc, b)
        if wb is not None and nb == 2:
            # x @ W: a linear layer with W (in, out)
            rc.tie(rc.act(a, -1), rc.param(wb, 0, "in"))
            rc.tie(rc.act(a, -1), rc.act(b, 0))
            out = rc.out(-1)
            rc.produce(out, root=wb)
            rc.tie(out, rc.param(wb, 1, "out"))
            rc.tie(out, rc.act(b, 1))
            return
        rc.tie(rc.act(b, -1), rc.out(-1))
        rc.tie(rc.act(a, -1), rc.act(b, -2))
        rc.pin(rc.act(a, -1), f"contracted by {node.name}")


def ex_repeat_interleave():
    class M(nn.Module):
        """Grouped-query attention with k/v heads repeated by ``repeat_interleave`` (8 query heads, 4 k/v)."""

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 16), nn.Linear(6, 8), nn.Linear(6, 8)
            self.o = nn.Linear(16, 3)

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 8, 2).transpose(1, 2)
            k = self.k(x).view(b, n, 4, 2).transpose(1, 2).repeat_interleave(2, dim=1)
            v = torch.repeat_interleave(self.v(x).view(b, n, 4, 2).transpose(1, 2), 2, 1)
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))

    return M(), (torch.randn(2, 5, 6),)


class RepeatInterleaveRule(Rule):
    """``repeat_interleave(x, repeats: int, dim)``: output position ``p`` of ``dim`` is input ``p // repeats``
    (grouped-query attention: a key/value head and the query heads it serves are one unit). Tensor
    ``repeats``, a flattened input (no ``dim``) or ``output_size=`` pin every dim (exact, conservative)."""

    name = "repeat_interleave"
    example = staticmethod(ex_repeat_interleave)

    def analyze(self, node, rc: RuleContext) -> None:
        x, r, dim = rc.arg(0, "input"), rc.arg(1, "repeats"), rc.arg(2, "dim")
        if not rc.is_tensor(x) or not isinstance(r, int) or isinstance(r, bool) or not isinstance(dim, int):
            return
        if node.kwargs.get("output_size") is not None or len(node.args) > 3:
            return
        tie_repeat_interleave(rc, x, r, dim)


def tie_repeat_interleave(rc: RuleContext, x, r: int, dim: int) -> None:
    """``repeat_interleave(x, r, dim)``: output position p along ``dim`` is input position p // r (a k/v
    head and the query heads that share it move together); the other dims pass through."""
    nd = len(rc.shape(x))
    dim %= nd
    for d in range(nd):
        if d == dim:
            o = rc.out(d)
            pos = np.arange(o.size)
            rc.tie_map(rc.act(x, d), pos // r, o, pos)
        else:
            rc.tie(rc.act(x, d), rc.out(d))


RULES.register_function(F.scaled_dot_product_attention, SdpaRule())
_ri = RepeatInterleaveRule()
RULES.register_function(torch.repeat_interleave, _ri)
RULES.register_method("repeat_interleave", _ri)
_mm = MatmulRule()
RULES.register_function((torch.matmul, operator.matmul, torch.bmm, torch.mm), _mm)
RULES.register_method(("matmul", "bmm", "mm", "__matmul__"), _mm)


def _weights_used(node: fx.Node) -> bool:
    """Whether the second output (attention weights) of an MHA call is read by anything."""
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == 0:
            continue
        if user.target is operator.getitem and user.args[1] == 1 and not user.users:
            continue
        return True
    return False


class MultiheadAttentionRule(Rule):
    """nn.MultiheadAttention and its pruned replacement: whole heads, input and output channels."""

    name = "multihead_attention"
    example = staticmethod(ex_mha)

    def analyze(self, node, rc: RuleContext) -> None:
        from ..modules import PrunedMultiheadAttention

        m = rc.module
        name = rc.module_name
        q, k, v = rc.arg(0, "query"), rc.arg(1, "key"), rc.arg(2, "value")
        batched = len(rc.shape(q)) == 3
        b, l = (0, 1) if m.batch_first else (1, 0)
        if not batched:
            b, l = None, 0
        if b is not None:
            for x in (q, k, v):
                rc.tie(rc.act(x, b), rc.out(b, 0))
        rc.tie(rc.act(q, l), rc.out(l, 0))
        rc.tie(rc.act(k, l), rc.act(v, l))
        if isinstance(m, PrunedMultiheadAttention):
            nh, d, packed = m.num_heads, m.head_dim, False
        else:
            nh, d, packed = m.num_heads, m.head_dim, m._qkv_same_embed_dim
        heads = rc.virtual("heads", nh)
        rc.produce(heads, root=f"{name} (heads)")
        inner = nh * d

        def head_rows(param: str, dim: int, n: int, role: str) -> None:
            ax = rc.param(param, dim, role)
            pos = np.arange(n)
            rc.tie_map(ax, pos, heads, (pos % inner) // d)

        if packed:
            head_rows(f"{name}.in_proj_weight", 0, 3 * inner, "out")
            w_in = rc.param(f"{name}.in_proj_weight", 1, "in")
            for x in (q, k, v):
                rc.tie(rc.act(x, -1), w_in)
        else:
            for x, p in ((q, "q_proj_weight"), (k, "k_proj_weight"), (v, "v_proj_weight")):
                head_rows(f"{name}.{p}", 0, inner, "out")
                rc.tie(rc.act(x, -1), rc.param(f"{name}.{p}", 1, "in"))
        if m.in_proj_bias is not None:
            head_rows(f"{name}.in_proj_bias", 0, 3 * inner, "out")
        for p in ("bias_k", "bias_v"):
            if getattr(m, p, None) is not None:
                head_rows(f"{name}.{p}", 2, inner, "out")
                rc.free(rc.param(f"{name}.{p}", 0, "other"))
                rc.free(rc.param(f"{name}.{p}", 1, "other"))
        head_rows(f"{name}.out_proj.weight", 1, inner, "in")
        out = rc.out(-1, 0)
        rc.produce(out)
        rc.tie(out, rc.param(f"{name}.out_proj.weight", 0, "out"))
        if m.out_proj.bias is not None:
            rc.tie(out, rc.param(f"{name}.out_proj.bias", 0, "out"))
        # attention weights: averaged over heads (or per head); if used, heads must stay
        if rc.out_shape(1) is not None:
            if _weights_used(node):
                rc.pin(heads, f"{name}: attention weights are used")
            else:
                for ax in rc.all_dims(node, 1):
                    rc.free(ax)
        kpm, mask = rc.arg(3, "key_padding_mask"), rc.arg(5, "attn_mask")
        if rc.is_tensor(kpm):
            ks = rc.shape(kpm)
            if len(ks) == 2 and b is not None:
                rc.tie(rc.act(kpm, 0), rc.act(q, b))
            rc.tie(rc.act(kpm, -1), rc.act(k, l))
        if rc.is_tensor(mask):
            ms = rc.shape(mask)
            rc.tie(rc.act(mask, -1), rc.act(k, l))
            rc.tie(rc.act(mask, -2), rc.act(q, l))
            if len(ms) == 3:
                rc.pin(heads, f"{name}: a 3-D attn_mask has one slice per head")

    def rewrite_module(self, module, qualname, rw, nodes=()):
        from ..modules import PrunedMultiheadAttention
        import copy as _copy

        if isinstance(module, PrunedMultiheadAttention):
            from .base import shrink_tensors

            new = shrink_tensors(module, qualname, rw)
            new.out_proj = shrink_tensors(module.out_proj, f"{qualname}.out_proj", rw)
            new.num_heads = new.q_proj_weight.shape[0] // module.head_dim
            new.query_dim = new.q_proj_weight.shape[1]
            new.key_dim = new.k_proj_weight.shape[1]
            new.value_dim = new.v_proj_weight.shape[1]
            new.out_dim = new.out_proj.weight.shape[0]
            new.out_proj.in_features = new.out_proj.weight.shape[1]
            new.out_proj.out_features = new.out_dim
            return new
        hk = rw.keep(("v", nodes[0].name, "heads")) if nodes else None

        def lst(mask):
            return None if mask is None else [int(i) for i in np.flatnonzero(mask)]

        if module._qkv_same_embed_dim:
            kq = kk = kv = rw.keep_param(f"{qualname}.in_proj_weight", 1)
        else:
            kq = rw.keep_param(f"{qualname}.q_proj_weight", 1)
            kk = rw.keep_param(f"{qualname}.k_proj_weight", 1)
            kv = rw.keep_param(f"{qualname}.v_proj_weight", 1)
        ko = rw.keep_param(f"{qualname}.out_proj.weight", 0)
        if all(x is None for x in (hk, kq, kk, kv, ko)):
            return _copy.deepcopy(module)
        return PrunedMultiheadAttention.from_mha(module, lst(hk), lst(kq), lst(kk), lst(kv), lst(ko))


def _register_mha() -> None:
    from ..modules import PrunedMultiheadAttention

    RULES.register_module((nn.MultiheadAttention, PrunedMultiheadAttention), MultiheadAttentionRule())


_register_mha()


def _einsum_terms(eq: str, ndims: list[int], out_nd: int) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None  # implicit output: be conservative
    lhs, rhs = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        return None
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    n_ell = max([nd - len(t.replace("...", "")) for t, nd in zip(ins, ndims) if "..." in t] + [0])
    ell = "".join(free[:n_ell])
    terms = []
    for t, nd in zip(ins, ndims):
        if "..." in t:
            k = nd - len(t.replace("...", ""))
            t = t.replace("...", ell[n_ell - k :])
        terms.append(t)
    if "..." in rhs:
        rhs = rhs.replace("...", ell)
    return terms, rhs


class EinsumRule(Rule):
    """``torch.einsum``: a letter kept in the output ties its dims; a contracted letter is pinned."""

    name = "einsum"
    example = staticmethod(ex_einsum)

    def analyze(self, node, rc: RuleContext) -> None:
        eq = node.args[0]
        ops = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
        if not isinstance(eq, str) or not all(rc.is_tensor(x) for x in ops):
            return
        parsed = _einsum_terms(eq, [len(rc.shape(x)) for x in ops], len(rc.out_shape()))
        if parsed is None:
            return
        terms, rhs = parsed
        out_shape = rc.out_shape()
        for x, t in zip(ops, terms):
            shp = rc.shape(x)
            if len(t) != len(shp):
                return
            for d, c in enumerate(t):
                a = rc.act(x, d)
                if c in rhs:
                    j = rhs.index(c)
                    if shp[d] == out_shape[j]:
                        rc.tie(a, rc.out(j))
                    else:
                        rc.pin(a, "broadcast dim")
                else:
                    rc.pin(a, f"contracted by {node.name}")
        # contracted letters shared by several operands must still agree in size: tie them
        first: dict[str, Any] = {}
        for x, t in zip(ops, terms):
            for d, c in enumerate(t):
                if c not in rhs:
                    a = rc.act(x, d)
                    if c in first and first[c].size == a.size:
                        rc.tie(first[c], a)
                    first.setdefault(c, a)


RULES.register_function(torch.einsum, EinsumRule())
