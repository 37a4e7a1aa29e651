"""Tiny example models, one per rule, used by the registry-driven test (every rule is oracle-checked).

Each example puts a producer (conv/linear) before the op and a consumer after it, so pruning the
producer's channels exercises the rule's ties and its rewrite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _img(c: int = 3, hw: int = 6) -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, c, hw, hw),)


class _Sandwich(nn.Module):
    """conv(3→8) → op → conv(8→4): the op sees prunable channels on both sides."""

    def __init__(self, op: nn.Module, mid: int = 8, out: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, mid, 3, padding=1)
        self.op = op
        self.b = nn.Conv2d(mid, out, 1)

    def forward(self, x):
        return self.b(self.op(self.a(x)))


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def ex_unary_module() -> Example:
    return _Sandwich(nn.Sequential(nn.ReLU(), nn.Dropout(0.1), nn.Hardswish())), _img()


def ex_unary_fn() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.sigmoid(self.a(x)).relu()
            return self.b(F.gelu(y).contiguous())

    return M(), _img()


def ex_binary() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.g = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y * torch.sigmoid(self.g(x)) + y - 0.5)

    return M(), _img()


def ex_prelu() -> Example:
    return _Sandwich(nn.PReLU(8)), _img()


def ex_conv() -> Example:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, dilation=2, padding=2),
                         nn.Conv2d(6, 4, 1)), _img()


def ex_conv_transpose() -> Example:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 6, 3, stride=2), nn.Conv2d(6, 4, 1)), _img()


def ex_linear() -> Example:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 3)), (torch.randn(2, 4, 5),)


def ex_functional_linear() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 5))
            self.bias = nn.Parameter(torch.randn(8))
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(F.linear(x, self.w, self.bias))

    return M(), (torch.randn(2, 5),)


def ex_embedding() -> Example:
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 3)), (torch.randint(0, 10, (2, 4)),)


def ex_batchnorm() -> Example:
    return _Sandwich(nn.BatchNorm2d(8)), _img()


def ex_instancenorm() -> Example:
    return _Sandwich(nn.InstanceNorm2d(8, affine=True)), _img()


def ex_groupnorm() -> Example:
    return _Sandwich(nn.GroupNorm(4, 8)), _img()


def ex_layernorm() -> Example:
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)), (torch.randn(2, 5),)


def ex_pool() -> Example:
    return _Sandwich(nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2))), _img()


def ex_flatten_view() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8 * 4 * 4, 10)
            self.fc2 = nn.Linear(10, 3)

        def forward(self, x):
            y = self.a(x).view(-1, 128)
            y = self.fc(y).reshape(x.size(0), 2, 5).flatten(1)
            return self.fc2(y)

    return M(), _img()


def ex_expand() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.s = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            g = self.s(x).mean((2, 3), keepdim=True).expand(2, 8, 6, 6)
            return self.b(y + g + y.mean((2, 3), keepdim=True).expand_as(y))

    return M(), _img()


def ex_permute() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.a(x).permute(0, 2, 3, 1)).transpose(1, 3)

    return M(), _img()


def ex_cat() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 5, 3, padding=1)
            self.b = nn.Conv2d(3, 7, 1)
            self.c = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    return M(), _img()


def ex_split() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(5, 4, 1)
            self.d = nn.Conv2d(4, 4, 1)
            self.e = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            p, q = torch.split(self.a(x), [3, 5], dim=1)
            r, s = self.e(x).chunk(2, dim=1)
            return self.c(q) + self.b(x) * p.sum(1, keepdim=True) + self.d(r * s)

    return M(), _img()


def ex_getitem() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(5, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y[:, 1:6]) + y[:, 0:1, ...] + y[:, None, 7, :, :]

    return M(), _img()


def ex_reduce() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = self.a(x)
            return self.fc(y.mean((2, 3)) + y.amax(dim=(2, 3)) + torch.sum(y, dim=[2, 3]))

    return M(), _img()


def ex_softmax() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(F.softmax(self.a(x), dim=-1))

    return M(), _img()


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
