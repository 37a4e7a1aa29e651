"""Replacement modules for layers whose torch class cannot express a pruned shape.

:class:`PrunedMultiheadAttention` stands in for :class:`torch.nn.MultiheadAttention` once whole heads
and/or embedding channels were removed. ``nn.MultiheadAttention`` ties everything to one
``embed_dim``: the query input width, the inner width ``num_heads * head_dim`` and both sides of
``out_proj`` must all be equal. A pruned layer keeps ``head_dim`` (so the softmax scale
``1/sqrt(head_dim)`` is unchanged) but has fewer heads, and its query/key/value input widths and output
width can each shrink independently.

The forward pass follows the slow path of ``nn.MultiheadAttention.forward`` /
``F.multi_head_attention_forward`` op for op: same mask canonicalisation, same ``is_causal``
handling, same dropout calls (so, seeded identically, training-mode dropout draws the same
random numbers), same shapes of returned weights. It never takes torch's fused fast path
(``torch._native_multi_head_attention``), which only supports equal q/k/v widths and a square
``out_proj``; that path gives the same values up to rounding.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .masks import IndexLike, canonical_mask, index_list, shape_check

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """Drop-in replacement for nn.MultiheadAttention after pruning: num_heads heads of head_dim each,
    query/key/value input widths and output width independent.

    Parameters (``I = num_heads * head_dim`` is the inner width)::

        q_proj_weight  (I, query_dim)      k_proj_weight (I, key_dim)      v_proj_weight (I, value_dim)
        in_proj_bias   (3*I,) [q | k | v]  or None when ``bias=False``
        bias_k, bias_v (1, 1, I)           only when ``add_bias_kv``
        out_proj       nn.Linear(I, out_dim, bias=bias)

    Inner channel ``h * head_dim + j`` is channel ``j`` of head ``h``, as in ``nn.MultiheadAttention``.

    ``forward`` has ``nn.MultiheadAttention.forward``'s signature and semantics (slow path), with these
    shapes (``L`` target length, ``S`` source length, ``N`` batch; unbatched inputs drop ``N``;
    ``batch_first`` swaps ``L``/``S`` with ``N`` for batched inputs only):

    * query ``(L, N, query_dim)``, key ``(S, N, key_dim)``, value ``(S, N, value_dim)``;
    * output ``(L, N, out_dim)``;
    * ``key_padding_mask`` ``(N, S)``, bool (True = ignore) or float (added);
    * ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)`` (``(num_heads, L, S)`` unbatched), bool or
      float. ``num_heads`` is the *pruned* head count: a 3-D mask is supplied at run time, so
      :meth:`from_mha` cannot drop the removed heads' slices from it; the caller must pass a mask that
      already has one slice per kept head, in ``keep_heads`` order (e.g.
      ``m.view(N, H, L, S)[:, keep_heads].reshape(N * len(keep_heads), L, S)``);
    * returned weights: ``(N, L, S)`` averaged over heads when ``average_attn_weights``, else
      ``(N, num_heads, L, S)``; ``None`` when ``need_weights=False``. The average is over the *kept*
      heads (divides by the pruned ``num_heads``), so a pruned layer's head-averaged weights differ from
      the original layer's even where the attention output is unchanged; the per-head weights of the
      kept heads are identical.

    ``is_causal`` is only a hint, as in torch: it requires ``attn_mask``; with ``need_weights=False`` and no
    ``key_padding_mask`` the given ``attn_mask`` is *ignored* and a top-left-aligned causal mask is
    applied by ``scaled_dot_product_attention`` instead; otherwise ``attn_mask`` is used as given.

    Dropout (probability ``dropout``) hits the attention weights, only in training mode.
    """

    # Marks this module as not eligible for torch's fused MHA fast paths (nn.TransformerEncoderLayer
    # reads this attribute and falls back to calling ``self_attn(...)``).
    _qkv_same_embed_dim = False

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        value_dim: int,
        num_heads: int,
        head_dim: int,
        out_dim: int,
        *,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        dropout: float = 0.0,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v, lo in (
            ("query_dim", query_dim, 0),
            ("key_dim", key_dim, 0),
            ("value_dim", value_dim, 0),
            ("num_heads", num_heads, 1),
            ("head_dim", head_dim, 1),
            ("out_dim", out_dim, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"PrunedMultiheadAttention: {name} must be an int >= {lo}, got {v!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ConfigError(f"PrunedMultiheadAttention: dropout must be in [0, 1], got {dropout!r}")
        fk = {"device": device, "dtype": dtype}
        self.query_dim = query_dim
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.out_dim = out_dim
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        inner = num_heads * head_dim

        self.q_proj_weight = nn.Parameter(torch.empty((inner, query_dim), **fk))
        self.k_proj_weight = nn.Parameter(torch.empty((inner, key_dim), **fk))
        self.v_proj_weight = nn.Parameter(torch.empty((inner, value_dim), **fk))
        # Same attribute set as nn.MultiheadAttention with separate projections (code that inspects
        # ``self_attn.in_proj_weight`` finds None, as for an MHA with kdim/vdim != embed_dim).
        self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        with warnings.catch_warnings():  # out_dim == 0 is allowed (every output channel pruned)
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.out_proj = nn.Linear(inner, out_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, inner), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, inner), **fk))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    @property
    def inner_dim(self) -> int:
        """Width of the projected q/k/v: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    def _reset_parameters(self) -> None:
        # Same initialisers as nn.MultiheadAttention's separate-projection case.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
            if self.in_proj_bias is not None:
                nn.init.constant_(self.in_proj_bias, 0.0)
            if self.out_proj.bias is not None:
                nn.init.constant_(self.out_proj.bias, 0.0)
            if self.bias_k is not None:
                nn.init.xavier_normal_(self.bias_k)
            if self.bias_v is not None:
                nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self) -> str:
        s = (
            f"query_dim={self.query_dim}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, out_dim={self.out_dim}"
        )
        if self.in_proj_bias is None:
            s += ", bias=False"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.batch_first:
            s += ", batch_first=True"
        return s

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("PrunedMultiheadAttention does not support NestedTensor inputs")
        is_batched = query.dim() == 3
        # nn.MultiheadAttention.forward canonicalises both masks before multi_head_attention_forward.
        key_padding_mask = canonical_mask(
            key_padding_mask,
            "key_padding_mask",
            None if attn_mask is None else attn_mask.dtype,
            "attn_mask",
            query.dtype,
        )
        attn_mask = canonical_mask(attn_mask, "attn_mask", None, "", query.dtype, check_other=False)
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attention(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        need_weights: bool,
        attn_mask: Optional[Tensor],
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``F.multi_head_attention_forward`` (sequence-first layout) for independent widths."""
        num_heads, head_dim, inner = self.num_heads, self.head_dim, self.inner_dim
        is_batched = shape_check(self.num_heads, query, key, value, key_padding_mask, attn_mask)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, qdim = query.shape
        src_len = key.shape[0]

        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. "
                "You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            # torch drops the mask and lets scaled_dot_product_attention build the causal mask.
            attn_mask = None
        elif key_padding_mask is not None:
            is_causal = False

        if qdim != self.query_dim:
            raise AssertionError(f"was expecting query dimension of {self.query_dim}, but got {qdim}")
        if key.shape[-1] != self.key_dim:
            raise AssertionError(f"was expecting key dimension of {self.key_dim}, but got {key.shape[-1]}")
        if value.shape[-1] != self.value_dim:
            raise AssertionError(f"was expecting value dimension of {self.value_dim}, but got {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")

        if self.in_proj_bias is None:
            b_q = b_k = b_v = None
        else:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, self.q_proj_weight, b_q)
        k = F.linear(key, self.k_proj_weight, b_k)
        v = F.linear(value, self.v_proj_weight, b_v)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                expected = (bsz * num_heads, tgt_len, src_len)
                if attn_mask.shape != expected:
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {expected} "
                        f"(num_heads={num_heads} is the pruned head count)."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

        if self.add_zero_attn:
            zero_shape = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zero_shape, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zero_shape, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        src_len = k.size(1)
        if key_padding_mask is not None:
            if not torch.jit.is_tracing():
                if key_padding_mask.shape[0] != bsz:
                    raise AssertionError(
                        f"Expected key_padded_mask.shape[0] to be {bsz}, but got {key_padding_mask.shape[0]}"
                    )
                if key_padding_mask.shape[1] != src_len:
                    raise AssertionError(
                        f"Expected key_padded_mask.shape[1] to be {src_len}, but got {key_padding_mask.shape[1]}"
                    )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, num_heads, -1, -1)
                .reshape(bsz * num_heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, inner)
            out = self.out_proj(out)
            out = out.view(tgt_len, bsz, out.size(1))
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out = out.squeeze(1)
                weights = weights.squeeze(0)
            return out, weights

        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, inner)
        out = self.out_proj(out)
        out = out.view(tgt_len, bsz, out.size(1))
        if not is_batched:
            out = out.squeeze(1)
        return out, None

    # ------------------------------------------------------------------ construction from MHA

    @classmethod
    def from_mha(
        cls,
        mha: nn.MultiheadAttention,
        keep_heads: IndexLike = None,
        keep_query: IndexLike = None,
        keep_key: IndexLike = None,
        keep_value: IndexLike = None,
        keep_out: IndexLike = None,
    ) -> "PrunedMultiheadAttention":
        """Copy weights from `mha` keeping the listed heads (indices into range(num_heads)), query/key/value input
        channels and output channels (None = keep all). New tensors (never shares storage with `mha`).

        Indices may be a sequence of ints, a 1-D integer tensor or a 1-D bool mask; duplicates are rejected.
        Kept items appear in the order given (pass sorted lists to keep the original order). The result has
        ``mha``'s dtype, device, flags (dropout, batch_first, add_zero_attn), training mode and per-parameter
        ``requires_grad``. ``mha`` may use the packed ``in_proj_weight`` or separate ``q/k/v_proj_weight``.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise ConfigError(f"from_mha expects an nn.MultiheadAttention, got {type(mha).__name__}")
        E, H, d = mha.embed_dim, mha.num_heads, mha.head_dim
        heads = index_list(keep_heads, H, "keep_heads")
        qi = index_list(keep_query, E, "keep_query")
        ki = index_list(keep_key, mha.kdim, "keep_key")
        vi = index_list(keep_value, mha.vdim, "keep_value")
        oi = index_list(keep_out, E, "keep_out")
        if heads is not None and not heads:
            raise ConfigError("from_mha: keep_heads is empty; a layer with no heads is not representable")

        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        ref = wq
        dev = ref.device

        def idx(lst: Optional[list[int]]) -> Optional[Tensor]:
            return None if lst is None else torch.tensor(lst, dtype=torch.long, device=dev)

        if heads is None:
            rows = None
        else:
            rows = (torch.tensor(heads, dtype=torch.long, device=dev)[:, None] * d
                    + torch.arange(d, device=dev)[None, :]).flatten()
        qt, kt, vt, ot = idx(qi), idx(ki), idx(vi), idx(oi)

        def take(t: Tensor, dim: int, sel: Optional[Tensor]) -> Tensor:
            return t if sel is None else t.index_select(dim, sel)

        n_heads = H if heads is None else len(heads)
        has_bias_kv = mha.bias_k is not None and mha.bias_v is not None
        new = cls(
            query_dim=E if qi is None else len(qi),
            key_dim=mha.kdim if ki is None else len(ki),
            value_dim=mha.vdim if vi is None else len(vi),
            num_heads=n_heads,
            head_dim=d,
            out_dim=E if oi is None else len(oi),
            bias=mha.in_proj_bias is not None,
            add_bias_kv=has_bias_kv,
            add_zero_attn=mha.add_zero_attn,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
            device="meta",  # shapes only: every parameter is set below from mha's (no initialisation to undo)
            dtype=ref.dtype,
        )
        if (mha.out_proj.bias is not None) != (new.out_proj.bias is not None):
            # in_proj and out_proj biases were toggled separately on the source module.
            new.out_proj = nn.Linear(new.inner_dim, new.out_dim, bias=mha.out_proj.bias is not None,
                                     device="meta", dtype=ref.dtype)

        def put(owner: nn.Module, name: str, src: Tensor, *srcs_for_grad: Tensor) -> None:
            dst = getattr(owner, name)
            if tuple(src.shape) != tuple(dst.shape):
                raise RuntimeError(f"from_mha: {name} of shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            fresh = src.clone() if src.untyped_storage().data_ptr() in sources else src  # never mha's storage
            setattr(owner, name, nn.Parameter(fresh, requires_grad=any(s.requires_grad for s in srcs_for_grad)))

        sources = {t.untyped_storage().data_ptr() for t in mha.parameters()}
        with torch.no_grad():
            put(new, "q_proj_weight", take(take(wq, 0, rows), 1, qt),
                mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight)
            put(new, "k_proj_weight", take(take(wk, 0, rows), 1, kt),
                mha.in_proj_weight if mha._qkv_same_embed_dim else mha.k_proj_weight)
            put(new, "v_proj_weight", take(take(wv, 0, rows), 1, vt),
                mha.in_proj_weight if mha._qkv_same_embed_dim else mha.v_proj_weight)
            if mha.in_proj_bias is not None:
                bq, bk, bv = mha.in_proj_bias.chunk(3)
                put(new, "in_proj_bias", torch.cat([take(b, 0, rows) for b in (bq, bk, bv)]), mha.in_proj_bias)
            if has_bias_kv:
                put(new, "bias_k", take(mha.bias_k, 2, rows), mha.bias_k)
                put(new, "bias_v", take(mha.bias_v, 2, rows), mha.bias_v)
            put(new.out_proj, "weight", take(take(mha.out_proj.weight, 0, ot), 1, rows), mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                put(new.out_proj, "bias", take(mha.out_proj.bias, 0, ot), mha.out_proj.bias)
        left = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"from_mha: {', '.join(left)} not set from the source module")
        new.train(mha.training)
        return new
