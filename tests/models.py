"""Small hand-written models for the compiler tests (each fx-traceable, float64-ready)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.b2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(y)))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(11)
        self.c = nn.Conv2d(11, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 10, 3, padding=1)
        self.p = nn.Conv2d(4, 5, 1)
        self.q = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        u, v = torch.split(self.a(x), [4, 6], dim=1)
        return self.p(F.relu(u)) + self.q(v)


class SEGate(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.out(x * s)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        return self.b(F.relu(self.bn(self.g(F.relu(self.a(x))))))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
        self.b = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        return self.b(self.dw2(F.relu(self.bn(self.dw(self.a(x))))))


class FlattenLinear(nn.Module):
    """LeNet-style head with a hard-coded view(-1, N)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 400)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Shared(nn.Module):
    """One conv module called twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.relu(self.shared(y))
        y = F.relu(self.shared(y))
        return self.b(y)


class MHABlock(nn.Module):
    def __init__(self, e: int = 8, heads: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(6, e)
        self.att = nn.MultiheadAttention(e, heads, batch_first=True)
        self.fc1 = nn.Linear(e, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.att(h, h, h)
        return self.fc2(F.gelu(self.fc1(a)))


class HandAttention(nn.Module):
    """q/k/v Linear + view/transpose into heads + scaled_dot_product_attention + out projection."""

    def __init__(self, e: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.h, self.d = heads, e // heads
        self.inp = nn.Linear(5, e)
        self.q, self.k, self.v = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)
        self.o = nn.Linear(e, 4)

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        t = self.inp(x)
        q = self.q(t).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(t).view(b, n, self.h, self.d).transpose(1, 2)
        v = self.v(t).view(b, n, self.h, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, self.h * self.d))


class MultiIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(2, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x, y):
        f = self.c(F.relu(self.a(x) + self.b(y)))
        return self.head(f.mean((2, 3))), f


def img(c: int = 3, hw: int = 8, n: int = 2) -> torch.Tensor:
    return torch.randn(n, c, hw, hw)


#: name -> (factory, example inputs factory)
ZOO = {
    "residual": (Residual, lambda: (img(),)),
    "concat": (Concat, lambda: (img(),)),
    "split": (Split, lambda: (img(),)),
    "se_gate": (SEGate, lambda: (img(),)),
    "grouped": (Grouped, lambda: (img(),)),
    "depthwise": (Depthwise, lambda: (img(),)),
    "flatten_linear": (FlattenLinear, lambda: (img(1, 32),)),
    "shared": (Shared, lambda: (img(),)),
    "mha": (MHABlock, lambda: (torch.randn(2, 5, 6),)),
    "sdpa": (HandAttention, lambda: (torch.randn(2, 5, 5),)),
    "multi_io": (MultiIO, lambda: (img(), img(2))),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct per-channel BN statistics and affine parameters (a wrong-index shrink then shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def build(name: str, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    factory, inputs = ZOO[name]
    model = randomize(factory(), seed).to(dtype).eval()
    xs = tuple(x.to(dtype) for x in inputs())
    return model, xs
