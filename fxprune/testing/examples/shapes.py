"""Tiny example models for shape ops, pooling and reductions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Example, Sandwich, img

def ex_pool() -> Example:
    return Sandwich(nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2))), img()


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

    return M(), img()


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

    return M(), img()


def ex_permute() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.a(x).permute(0, 2, 3, 1)).transpose(1, 3)

    return M(), img()


def ex_cat() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 5, 3, padding=1)
            self.b = nn.Conv2d(3, 7, 1)
            self.c = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    return M(), img()


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

    return M(), img()


def ex_getitem() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(5, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y[:, 1:6]) + y[:, 0:1, ...] + y[:, None, 7, :, :]

    return M(), img()


def ex_reduce() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = self.a(x)
            return self.fc(y.mean((2, 3)) + y.amax(dim=(2, 3)) + torch.sum(y, dim=[2, 3]))

    return M(), img()


def ex_softmax() -> Example:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(F.softmax(self.a(x), dim=-1))

    return M(), img()




def ex_roll() -> Example:
    class M(nn.Module):
        """Swin-style shifted windows: roll/flip the spatial dims of an NHWC tensor (channels last)."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Linear(8, 6)
            self.c = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = self.a(x).permute(0, 2, 3, 1)  # NHWC
            y = torch.roll(y, shifts=(-1, 2), dims=(1, 2)).flip(1)
            z = torch.flip(self.b(y), [2]).roll(1, 1).permute(0, 3, 1, 2)
            return self.c(torch.flipud(z))  # batch dim: channels stay prunable

    return M(), (torch.randn(2, 3, 5, 6),)


def ex_stack_narrow_repeat() -> Example:
    class M(nn.Module):
        """stack along a new dim, narrow a channel range, repeat a broadcast map, unflatten features."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)
            self.d = nn.Conv2d(5, 4, 1)
            self.e = nn.Linear(6, 12)
            self.f = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.stack([self.a(x), self.b(x)], 0).sum(0)
            m = y.mean((2, 3), keepdim=True).repeat(1, 1, 6, 6)
            z = self.e(x[:, 0]).unflatten(-1, (4, 3)).relu().sum(-1)
            return self.c(y + m) + self.d(y.narrow(1, 2, 5)) + self.f(z).sum(-1)[:, None, :, None]

    return M(), img()


def ex_pixel_shuffle() -> Example:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(4, 4, 1)), img()


def ex_resample() -> Example:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.up = nn.Upsample(scale_factor=2.0)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = F.pad(F.interpolate(self.a(x), scale_factor=0.5), (1, 1, 1, 1))
            return self.b(self.up(y))

    return M(), img()


def ex_grid_sample() -> Example:
    class M(nn.Module):
        """RAFT-style: a coordinate grid built at run time (meshgrid of aranges), features sampled on it."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(10, 4, 1)

        def forward(self, x):
            n, _, h, w = x.shape
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            xy = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")[0]  # == ys
            grid = torch.stack([xs, xy], 0).to(x.dtype)[None].expand(n, -1, -1, -1)
            y = F.grid_sample(self.a(x), grid.permute(0, 2, 3, 1) / 3.0 - 0.7, align_corners=False)
            return self.b(torch.cat([y, grid], 1))

    return M(), (torch.randn(2, 3, 5, 6),)


def ex_creation() -> Example:
    class M(nn.Module):
        """Positional-encoding style: created tensors sized from the input (edgenext), from a prunable
        activation (follow it: zeros/ones/full), and a literal-sized constant; arange over a spatial size."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            b, c, h, w = y.shape
            mask = ~torch.zeros((b, h, w)).to(dtype=torch.bool)
            pos = mask.cumsum(2, dtype=torch.float32)[:, None] / w
            bias = torch.ones(1, c, 1, 1) * 0.5 + y.new_zeros(y.shape[:2] + (1, 1)) + torch.full((c, 1, 1), 2.0)
            ramp = torch.arange(w, dtype=torch.float32) + torch.zeros_like(y)
            return self.b(y * bias + pos + ramp + torch.zeros(1, 1, h, 1))

    return M(), (torch.randn(2, 3, 5, 6),)


def ex_rms_norm_decomposed() -> Example:
    class RMSNorm(nn.Module):
        """Hugging Face's LlamaRMSNorm, written out as element-wise ops and a mean over the channels."""

        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(d) + 0.5)

        def forward(self, x):
            v = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(v + 1e-6))

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 8)
            self.norm = RMSNorm(8)
            self.up = nn.Linear(8, 12)
            self.down = nn.Linear(12, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            h = h + self.down(F.silu(self.up(self.norm(h))))
            return self.out(h)

    return M(), (torch.randn(2, 4, 5),)
