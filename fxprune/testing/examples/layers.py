"""Tiny example models for the layer families (conv, linear, products, embeddings, norms, element-wise ops):
each puts a producer before the op and a consumer after it, so pruning exercises the rule's ties and rewrite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


def img(c: int = 3, hw: int = 6) -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, c, hw, hw),)


class Sandwich(nn.Module):
    """conv(3→8) → op → conv(8→4): the op sees prunable channels on both sides."""

    def __init__(self, op: nn.Module, mid: int = 8, out: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, mid, 3, padding=1)
        self.op = op
        self.b = nn.Conv2d(mid, out, 1)

    def forward(self, x):
        return self.b(self.op(self.a(x)))


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def ex_unary_module() -> Example:
    return Sandwich(nn.Sequential(nn.ReLU(), nn.Dropout(0.1), nn.Hardswish())), img()


def ex_unary_fn() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.sigmoid(self.a(x)).relu()
            return self.b(F.gelu(y).contiguous())

    return M(), img()


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

    return M(), img()


def ex_prelu() -> Example:
    return Sandwich(nn.PReLU(8)), img()


def ex_conv() -> Example:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, dilation=2, padding=2),
                         nn.Conv2d(6, 4, 1)), img()


def ex_conv_transpose() -> Example:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 6, 3, stride=2), nn.Conv2d(6, 4, 1)), img()


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
    return Sandwich(nn.BatchNorm2d(8)), img()


def ex_instancenorm() -> Example:
    return Sandwich(nn.InstanceNorm2d(8, affine=True)), img()


def ex_groupnorm() -> Example:
    return Sandwich(nn.GroupNorm(4, 8)), img()


def ex_layernorm() -> Example:
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)), (torch.randn(2, 5),)


def ex_grouped_conv() -> Example:
    """A grouped (non-depthwise) conv: inputs and outputs pruned uniformly across its 2 groups."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.Conv2d(8, 4, 1)), img()


def ex_functional_conv() -> Example:
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

    return M(), img()


class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x.view(-1, nx), weight)`` with the weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def ex_gpt2_conv1d() -> Example:
    """Two GPT-2 Conv1D layers (an MLP). On the fx path the output view's size tuple is built at run time
    (nothing to patch: kept); torch.export turns it into sizes it can patch."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = Conv1D(8, 5)
            self.proj = Conv1D(3, 8)

        def forward(self, x):
            return self.proj(F.gelu(self.fc(x)))

    return M(), (torch.randn(2, 4, 5),)


def ex_addmm_param() -> Example:
    """``x @ W`` and ``addmm(b, x, W)`` with parameters: linear layers with the weight stored (in, out)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(5, 8) * 0.3)
            self.b1 = nn.Parameter(torch.randn(8) * 0.1)
            self.w2 = nn.Parameter(torch.randn(8, 6) * 0.3)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(torch.addmm(self.b1, x, self.w1))
            return self.out(torch.tanh(h @ self.w2))

    return M(), (torch.randn(4, 5),)


def ex_functional_embedding() -> Example:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 8))
            self.out = nn.Linear(8, 3)

        def forward(self, ids):
            return self.out(F.embedding(ids, self.table))

    return M(), (torch.randint(0, 10, (2, 4)),)


def ex_functional_batchnorm() -> Example:
    class BNAct(nn.BatchNorm2d):
        """timm's BatchNormAct2d pattern: a BatchNorm subclass calling F.batch_norm in its own forward."""

        def forward(self, x):
            return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, self.momentum, self.eps))

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BNAct(8), nn.Conv2d(8, 4, 1)), img()


def ex_functional_group_norm() -> Example:
    class M(nn.Module):
        """F.group_norm called as a function (timm's GroupNorm / GroupNorm1 forward): 4 groups of 2."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.w = nn.Parameter(torch.rand(8) + 0.5)
            self.bias = nn.Parameter(torch.randn(8))
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(F.group_norm(self.a(x), 4, self.w, self.bias, 1e-5))

    return M(), (torch.randn(2, 3, 5, 5),)


def ex_functional_layer_norm() -> Example:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 8)
            self.w = nn.Parameter(torch.rand(8) + 0.5)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(F.layer_norm(self.a(x), (8,), self.w))

    return M(), (torch.randn(2, 5),)


def ex_normalize() -> Example:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(F.normalize(self.a(x), dim=-1))

    return M(), (torch.randn(4, 5),)


def ex_lrn() -> Example:
    """LocalResponseNorm pins the channels it mixes; the layers after it stay prunable."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LocalResponseNorm(3), nn.Conv2d(8, 6, 1), nn.ReLU(),
                         nn.Conv2d(6, 4, 1)), img()


def ex_transposed_depthwise() -> Example:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1)), img()
