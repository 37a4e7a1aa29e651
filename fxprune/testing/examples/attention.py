"""Tiny example models for attention and matrix products."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Example

def ex_sdpa() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
            self.o = nn.Linear(8, 6)

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 2).transpose(1, 2)
            k = self.k(x).view(b, n, 4, 2).transpose(1, 2)
            v = self.v(x).view(b, n, 4, 2).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v)
            return self.o(y.transpose(1, 2).reshape(b, n, 8))

    return M(), (torch.randn(2, 5, 6),)


def ex_channel_attention() -> Example:
    class M(nn.Module):
        """edgenext's cross-covariance attention: a channel x channel attention map per head, and the merged
        heads reshaped back with a width read from the *input* at run time (``C = x.shape[2]``), which the
        rewrite writes as the new literal once heads are pruned; ``B * heads`` merged into the batch dim
        (a product with a literal factor: rescaled)."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.qkv = nn.Linear(8, 24)
            self.temperature = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
            self.proj = nn.Linear(8, 3)

        def forward(self, x):
            x = self.inp(x)
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 4, -1).permute(2, 0, 3, 4, 1).unbind(0)
            att = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
            y = att.softmax(-1) @ v
            y = y.reshape(b * 4, -1, n).reshape(b, -1, n)  # heads into the batch and back
            return self.proj(y.permute(0, 2, 1).reshape(b, n, c))

    return M(), (torch.randn(2, 5, 5),)


def ex_matmul() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(6, 8), nn.Linear(6, 8)
            self.w = nn.Parameter(torch.randn(8, 5))
            self.o = nn.Linear(5, 3)

        def forward(self, x):
            att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
            return self.o(torch.relu(att @ self.q(x) @ self.w))

    return M(), (torch.randn(2, 4, 6),)


def ex_mha() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.att = nn.MultiheadAttention(8, 4, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            y, _ = self.att(h, h, h)
            return self.out(y)

    return M(), (torch.randn(2, 5, 6),)


def ex_einsum() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
            self.o = nn.Linear(8, 3)

        def forward(self, x):
            att = torch.einsum("bid,bjd->bij", self.q(x), self.k(x)).softmax(-1)
            return self.o(torch.einsum("bij,bjd->bid", att, self.v(x).relu()))

    return M(), (torch.randn(2, 4, 6),)




def ex_repeat_interleave() -> Example:
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
