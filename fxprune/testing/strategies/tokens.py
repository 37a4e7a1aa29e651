"""Token building blocks (``(N, L, E) -> (N, L, E')``) and the two-input composition container.

Owns :class:`ConvToTokens` (the image-to-token adapter), :class:`SelfAttention`, :class:`AttentionBlock`,
:class:`TokenHead` and :class:`MultiInputNet`. Like the image blocks, each is built from explicit integers,
accepts ``dtype=`` (except the parameter-free adapter and the container) and is traceable by ``torch.fx``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import check_positive

__all__ = ["AttentionBlock", "ConvToTokens", "MultiInputNet", "SelfAttention", "TokenHead"]


class ConvToTokens(nn.Module):
    """Conv-to-tokens adapter: ``(N, C, H, W) -> x.flatten(2).transpose(1, 2) -> (N, H*W, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Hand-written multi-head self-attention on ``(N, L, embed_dim)`` tokens.

    ``q/k/v = Linear(embed_dim, num_heads*head_dim)``, reshaped with ``.view(B, L, num_heads, head_dim)
    .transpose(1, 2)`` (literal ``num_heads`` and ``head_dim``), ``F.scaled_dot_product_attention``,
    ``.transpose(1, 2).reshape(B, L, num_heads*head_dim)`` (literal product) and ``out = Linear(...,
    embed_dim)``. With ``seq_len=None`` ``B, L`` are ``x.size(0)`` and ``x.shape[1]``; otherwise ``B`` is
    ``-1`` and ``L`` the literal ``seq_len``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        seq_len: int | None = None,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(embed_dim=embed_dim, num_heads=num_heads, head_dim=head_dim)
        if seq_len is not None:
            check_positive(seq_len=seq_len)
        self.embed_dim, self.num_heads, self.head_dim, self.seq_len = embed_dim, num_heads, head_dim, seq_len
        self.inner_dim = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, self.inner_dim, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(embed_dim, self.inner_dim, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(embed_dim, self.inner_dim, bias=bias, dtype=dtype)
        self.out_proj = nn.Linear(self.inner_dim, embed_dim, bias=bias, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.seq_len is None:
            B = x.size(0)
            L = x.shape[1]
            q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v)
            o = o.transpose(1, 2).reshape(B, L, self.inner_dim)
        else:
            q = self.q_proj(x).view(-1, self.seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(-1, self.seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(-1, self.seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v)
            o = o.transpose(1, 2).reshape(-1, self.seq_len, self.inner_dim)
        return self.out_proj(o)


class AttentionBlock(nn.Module):
    """A transformer block on ``(N, L, embed_dim)`` tokens; LayerNorm appears only on the residual stream.

    ``attention="mha"`` uses ``nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`` (``embed_dim``
    divisible by ``num_heads``; ``head_dim`` must be ``None`` or ``embed_dim // num_heads``);
    ``attention="sdpa"`` uses :class:`SelfAttention` (``head_dim`` required, ``seq_len`` optional). The MLP is
    ``Linear(E, mlp_hidden) -> GELU -> Linear(mlp_hidden, E)`` (``mlp_hidden`` defaults to ``4*E``; ``0`` drops
    the MLP). Post-norm (default): ``x = ln1(x + attn(x)); x = ln2(x + mlp(x))``; ``norm_first=True``:
    ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int | None = None,
        attention: str = "mha",
        mlp_hidden: int | None = None,
        norm_first: bool = False,
        seq_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(embed_dim=embed_dim, num_heads=num_heads)
        self.embed_dim, self.norm_first = embed_dim, bool(norm_first)
        self.attention = attention
        if attention == "mha":
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim={embed_dim} not divisible by num_heads={num_heads}")
            if head_dim is not None and head_dim != embed_dim // num_heads:
                raise ValueError("nn.MultiheadAttention needs head_dim == embed_dim // num_heads")
            if seq_len is not None:
                raise ValueError("seq_len only applies to attention='sdpa'")
            self.attn: nn.Module = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, dtype=dtype)
        elif attention == "sdpa":
            if head_dim is None:
                raise ValueError("attention='sdpa' needs head_dim")
            self.attn = SelfAttention(embed_dim, num_heads, head_dim, seq_len=seq_len, dtype=dtype)
        else:
            raise ValueError("attention must be 'mha' or 'sdpa'")
        self.ln1 = nn.LayerNorm(embed_dim, dtype=dtype)
        hidden = 4 * embed_dim if mlp_hidden is None else int(mlp_hidden)
        self.has_mlp = hidden > 0
        if self.has_mlp:
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden, dtype=dtype), nn.GELU(),
                                     nn.Linear(hidden, embed_dim, dtype=dtype))
            self.ln2 = nn.LayerNorm(embed_dim, dtype=dtype)

    def _attend(self, x: Tensor) -> Tensor:
        if self.attention == "mha":
            return self.attn(x, x, x, need_weights=False)[0]
        return self.attn(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self._attend(self.ln1(x))
            if self.has_mlp:
                x = x + self.mlp(self.ln2(x))
        else:
            x = self.ln1(x + self._attend(x))
            if self.has_mlp:
                x = self.ln2(x + self.mlp(x))
        return x


class TokenHead(nn.Module):
    """``Linear(x.mean(dim=1))``: ``(N, L, E) -> (N, num_classes)``."""

    def __init__(self, embed_dim: int, num_classes: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_positive(embed_dim=embed_dim, num_classes=num_classes)
        self.fc = nn.Linear(embed_dim, num_classes, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=1))


class MultiInputNet(nn.Module):
    """Two image inputs, two outputs: ``f = trunk(merge(stem_a(a), stem_b(b)))``, returns ``(head(f), f)``.

    ``merge`` is ``"cat"`` (``torch.cat`` on dim 1) or ``"add"`` (stems of equal width). A composition
    container: it takes modules, not integers.
    """

    def __init__(self, stem_a: nn.Module, stem_b: nn.Module, trunk: nn.Module, head: nn.Module,
                 merge: str = "cat") -> None:
        super().__init__()
        if merge not in ("cat", "add"):
            raise ValueError("merge must be 'cat' or 'add'")
        self.stem_a, self.stem_b, self.trunk, self.head = stem_a, stem_b, trunk, head
        self.merge = merge

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        xa = self.stem_a(a)
        xb = self.stem_b(b)
        x = torch.cat([xa, xb], dim=1) if self.merge == "cat" else xa + xb
        features = self.trunk(x)
        return self.head(features), features


