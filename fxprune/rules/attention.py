"""Attention: scaled-dot-product attention, ``nn.MultiheadAttention``, and the key/value head repeats of
grouped-query attention.

* ``F.scaled_dot_product_attention`` / ``aten.scaled_dot_product_attention`` (:class:`AttentionCall`: q, k,
  v, mask, heads, kv-heads, GQA): heads and batch dims pass through; the query/key feature dim ``E`` is
  pinned, so whole heads are removed and the default softmax scale ``1/sqrt(E)`` never changes; value
  features pass to the output. With grouped-query attention (``enable_gqa``) a key/value head and the
  query heads that read it are one unit. MACs: ``batch·L·S·E + batch·L·S·Ev`` (causal masks do not reduce
  the count).
* ``nn.MultiheadAttention``: each head is a unit (in-projection rows of q/k/v, their biases, and the
  out-projection columns); query/key/value input channels follow the in-projection columns and the output
  channels are produced by the out-projection. Pruned layers become
  :class:`fxprune.modules.PrunedMultiheadAttention`, which allows an inner width different from the
  embedding width.
* ``repeat_interleave(x, r, dim)`` (function, method, ATen): output position ``p`` is input ``p // r`` (a
  key/value head and the query heads it serves move together).
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import shape_of
from ..modules import PrunedMultiheadAttention
from .base import RULES, RewriteContext, Rule, RuleContext, shrink_tensors
from .calls import Bound, Family, aten_overloads, call_arg, schema_args
from .matmul import product_dim_origins, tie_batch

__all__ = ["AttentionCall", "AttentionFamily", "MultiheadAttentionRule", "RepeatInterleaveRule",
           "tie_repeat_interleave", "mha_macs"]


@dataclass(frozen=True)
class AttentionCall:
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: Any
    gqa: bool

    @property
    def heads(self) -> int:
        q = shape_of(self.query)
        return q[-3] if len(q) >= 3 else 1

    @property
    def kv_heads(self) -> int:
        k = shape_of(self.key)
        return k[-3] if len(k) >= 3 else 1


class AttentionFamily(Family):
    name = "sdpa"

    def analyze(self, call: AttentionCall, node, rc: RuleContext) -> None:
        q, k, v, mask = call.query, call.key, call.value, call.mask
        if not all(rc.is_tensor(t) for t in (q, k, v)) or rc.out_shape() is None:
            return
        nq, nk = len(rc.shape(q)), len(rc.shape(k))
        out_nb = len(rc.out_shape()) - 2
        hq, hk = call.heads, call.kv_heads
        if call.gqa and hq != hk:
            # key/value head j serves query heads j*g .. j*g+g-1: one unit
            g = hq // hk
            pos = np.arange(hq)
            rc.tie_map(rc.act(k, -3), pos // g, rc.act(q, -3), pos)
            rc.tie(rc.act(k, -3), rc.act(v, -3))
            rc.tie(rc.act(q, -3), rc.out(-3))
            tie_batch(rc, [(q, nq - 3), (k, nk - 3), (v, len(rc.shape(v)) - 3)], out_nb - 1)
        else:
            tie_batch(rc, [(q, nq - 2), (k, nk - 2), (v, len(rc.shape(v)) - 2)], out_nb)
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

    def macs(self, call, node, gm) -> int | None:
        q, k, v, out = shape_of(call.query), shape_of(call.key), shape_of(call.value), shape_of(node)
        if None in (q, k, v, out):
            return None
        batch = math.prod(out[:-2])
        return batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]

    def dim_origins(self, call, node, dim):
        return product_dim_origins(node, call.query, call.value, dim)


def bind_sdpa(node: fx.Node, gm: fx.GraphModule) -> AttentionCall | None:
    if getattr(node.target, "_schema", None) is not None:
        a = schema_args(node)
        q, k, v, mask, gqa = a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("enable_gqa", False)
    else:
        q, k, v = call_arg(node, 0, "query"), call_arg(node, 1, "key"), call_arg(node, 2, "value")
        mask, gqa = call_arg(node, 3, "attn_mask"), call_arg(node, 7, "enable_gqa", False)
    if not all(isinstance(t, fx.Node) and shape_of(t) is not None for t in (q, k, v)):
        return None
    return AttentionCall(q, k, v, mask, bool(gqa))


_sdpa = Bound(AttentionFamily(), bind_sdpa, "sdpa")
RULES.register_function(F.scaled_dot_product_attention, _sdpa)
RULES.register_function(aten_overloads("scaled_dot_product_attention"), _sdpa)


# ---------------------------------------------------------------------------------------------------------
# grouped-query attention: repeated key/value heads


def tie_repeat_interleave(rc: RuleContext, x: fx.Node, r: int, dim: int) -> None:
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


class RepeatInterleaveRule(Rule):
    """``repeat_interleave(x, repeats: int, dim)``. Tensor ``repeats``, a flattened input (no ``dim``) or
    ``output_size=`` pin every dim (exact, conservative)."""

    name = "repeat_interleave"

    def analyze(self, node, rc: RuleContext) -> None:
        if getattr(node.target, "_schema", None) is not None:
            a = schema_args(node)
            x, r, dim = a.get("self"), a.get("repeats"), a.get("dim")
            extra = a.get("output_size") is not None
        else:
            x, r, dim = rc.arg(0, "input"), rc.arg(1, "repeats"), rc.arg(2, "dim")
            extra = node.kwargs.get("output_size") is not None or len(node.args) > 3
        if not rc.is_tensor(x) or not isinstance(r, int) or isinstance(r, bool) or not isinstance(dim, int) or extra:
            return
        tie_repeat_interleave(rc, x, r, dim)


_ri = RepeatInterleaveRule()
RULES.register_function(torch.repeat_interleave, _ri)
RULES.register_method("repeat_interleave", _ri)
RULES.register_function(aten_overloads("repeat_interleave"), _ri)


# ---------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention


def _weights_used(node: fx.Node) -> bool:
    """Whether the second output (attention weights) of an MHA call is read by anything."""
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == 0:
            continue
        if user.target is operator.getitem and user.args[1] == 1 and not user.users:
            continue
        return True
    return False


def _seq_dims(shape: tuple[int, ...], batch_first: bool) -> tuple[int, int]:
    """(batch, length) of a (N, L, C) / (L, N, C) / unbatched (L, C) sequence tensor."""
    if len(shape) == 2:
        return 1, shape[0]
    return (shape[0], shape[1]) if batch_first else (shape[1], shape[0])


def mha_macs(mha: nn.Module, q: tuple[int, ...], k: tuple[int, ...], batch_first: bool) -> int:
    """MACs of one attention call: q/k/v/out projections ``L·E·E + S·kdim·E + S·vdim·E + L·E·E`` plus
    ``L·S'·E`` for ``Q Kᵀ`` and ``L·S'·E`` for ``A V`` per batch element (``S' = S`` (+1 with
    ``add_bias_kv``, +1 with ``add_zero_attn``)). Widths are read from the projection weights, so the same
    formula covers ``PrunedMultiheadAttention``."""
    n, L = _seq_dims(q, batch_first)
    _, S = _seq_dims(k, batch_first)
    if getattr(mha, "in_proj_weight", None) is not None:
        rows, cols = tuple(mha.in_proj_weight.shape)
        wq = wk = wv = (rows // 3, cols)
    else:
        wq, wk, wv = (tuple(getattr(mha, f"{p}_proj_weight").shape) for p in "qkv")
    wo = tuple(mha.out_proj.weight.shape)
    s_att = S + (1 if getattr(mha, "bias_k", None) is not None else 0) + (1 if mha.add_zero_attn else 0)
    proj = L * math.prod(wq) + S * math.prod(wk) + S * math.prod(wv) + L * math.prod(wo)
    return n * (proj + L * s_att * wq[0] + L * s_att * wv[0])


def _kept(mask: np.ndarray | None) -> list[int] | None:
    return None if mask is None else [int(i) for i in np.flatnonzero(mask)]


def _io_keeps(mha: nn.MultiheadAttention, qualname: str, rw: RewriteContext) -> list[list[int] | None]:
    """Kept query, key, value input channels and output channels of an ``nn.MultiheadAttention``."""
    if mha._qkv_same_embed_dim:
        kq = kk = kv = rw.keep_param(f"{qualname}.in_proj_weight", 1)
    else:
        kq, kk, kv = (rw.keep_param(f"{qualname}.{p}_proj_weight", 1) for p in "qkv")
    return [_kept(m) for m in (kq, kk, kv, rw.keep_param(f"{qualname}.out_proj.weight", 0))]


class MultiheadAttentionRule(Rule):
    """nn.MultiheadAttention and its pruned replacement: whole heads, input and output channels."""

    name = "multihead_attention"

    def analyze(self, node, rc: RuleContext) -> None:
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
        packed = False if isinstance(m, PrunedMultiheadAttention) else m._qkv_same_embed_dim
        nh, d = m.num_heads, m.head_dim
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
            if len(rc.shape(kpm)) == 2 and b is not None:
                rc.tie(rc.act(kpm, 0), rc.act(q, b))
            rc.tie(rc.act(kpm, -1), rc.act(k, l))
        if rc.is_tensor(mask):
            rc.tie(rc.act(mask, -1), rc.act(k, l))
            rc.tie(rc.act(mask, -2), rc.act(q, l))
            if len(rc.shape(mask)) == 3:
                rc.pin(heads, f"{name}: a 3-D attn_mask has one slice per head")

    def rewrite_module(self, module, qualname, rw, nodes=()):
        if isinstance(module, PrunedMultiheadAttention):
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
        io = _io_keeps(module, qualname, rw)
        if hk is None and all(x is None for x in io):
            return copy.deepcopy(module)
        return PrunedMultiheadAttention.from_mha(module, _kept(hk), *io)

    def fix_module(self, new, old, qualname, rw, nodes=()):
        """(Rebuilding the user's class after an ATen capture, where the module was no graph node: the kept
        heads are read off the query rows of the input projection.)"""
        if nodes or isinstance(old, PrunedMultiheadAttention):
            return self.rewrite_module(old, qualname, rw, nodes)
        name = "in_proj_weight" if old._qkv_same_embed_dim else "q_proj_weight"
        rows = rw.keep_param(f"{qualname}.{name}", 0)
        heads = None
        if rows is not None:
            q = np.asarray(rows[: old.embed_dim]).reshape(old.num_heads, old.head_dim)
            if not (q.all(1) | ~q.any(1)).all():
                raise ValueError(f"{qualname}: the pruned query rows are not whole heads")
            heads = [int(i) for i in np.flatnonzero(q.all(1))]
        return PrunedMultiheadAttention.from_mha(old, heads, *_io_keeps(old, qualname, rw))

    def macs(self, node, gm) -> int | None:
        m = gm.get_submodule(str(node.target))
        q, k = shape_of(node.args[0]), shape_of(node.args[1] if len(node.args) > 1 else node.kwargs.get("key"))
        if q is None or k is None:
            return None
        return mha_macs(m, q, k, bool(m.batch_first))

    def layer_kind(self, node, gm) -> str | None:
        return type(gm.get_submodule(str(node.target))).__name__


RULES.register_module((nn.MultiheadAttention, PrunedMultiheadAttention), MultiheadAttentionRule())
