"""Tiny example models that symbolic tracing cannot capture (``if x.dim()`` is Python control flow on a
Proxy), so the registry test runs them through the torch.export front end and the ATen spellings of the
op families.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Example, img
from . import attention, layers, shapes

class ExportOnly(nn.Module):
    """Wraps ``inner``; its forward branches on ``x.dim()``, which torch.fx cannot trace but export can."""

    def __init__(self, inner: nn.Module, static_shapes: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.fxprune_static_shapes = static_shapes

    def forward(self, x):
        if x.dim() < 1:
            raise ValueError("scalar input")
        return self.inner(x)


def static(model: nn.Module) -> nn.Module:
    """Examples export with static shapes (several times faster; the rules see the same ops)."""
    model.fxprune_static_shapes = True
    return model


def ex_conv():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.ConvTranspose2d(8, 6, 2, stride=2), nn.Conv2d(6, 4, 1))
    return ExportOnly(net, True), img()


def ex_linear():
    return ExportOnly(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 3)), True), (torch.randn(2, 4, 5),)


def ex_embedding():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 8)
            self.o = nn.Linear(8, 3)

        def forward(self, ids):
            if ids.dim() != 2:
                raise ValueError("ids must be (batch, tokens)")
            return self.o(self.e(ids))

    return static(M()), (torch.randint(0, 10, (2, 4)),)


def ex_batchnorm():
    return ExportOnly(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)), True), img()


def ex_groupnorm():
    return ExportOnly(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 1)), True), img()


class ShapeOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 1)
        self.c = nn.Linear(8, 8)
        self.d = nn.Conv2d(8, 4, 1)
        self.e = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("NCHW input")
        y = self.a(x)
        u, v = torch.split(y, [4, 4], 1)
        z = self.c(y.permute(0, 2, 3, 1)).transpose(1, 3).transpose(2, 3)  # NHWC linear, back to NCHW
        s = y[:, :, 0].mean(2)[..., None, None]  # select a row, reduce it, unsqueeze
        g = y.mean((2, 3), keepdim=True).expand(-1, -1, x.shape[2], x.shape[3])
        h = torch.cat([u[:, 1:3], v], 1)  # a channel slice of a split piece
        return self.d(y + g + s) + self.b(h) + self.e(z) + y.amax(1, keepdim=True)


def ex_shape():
    return static(ShapeOps()), img()


def ex_unflatten():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            if x.dim() != 2:
                raise ValueError("2-D input")
            y = self.a(x).unflatten(-1, (4, 2))  # (B, 4, 2): units of 2 features
            return self.b(y.relu().sum(-1))

    return static(M()), (torch.randn(3, 6),)


def ex_index_put():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            mask = torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3])
            mask[x[:, :1] > 0] = -1.0  # Hugging Face-style mask construction by item assignment
            return self.b(self.a(x) + mask)

    return static(M()), img()


def ex_channel_attention():
    """(exported with dynamic sizes: ``B * 4`` is a symbolic product with a literal factor)"""
    model, inputs = attention.ex_channel_attention()
    return ExportOnly(model), inputs


def ex_fill():
    class M(nn.Module):
        """T5-style: a zero position bias with a literal channel count (patched when the channels are pruned),
        a fill sized from the input's batch and spatial dims (symbolic sizes: it follows them)."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            if x.dim() != 4:
                raise ValueError("NCHW input")
            y = self.a(x)
            bias = torch.zeros(1, 8, 1, 1) + torch.full((1, 8, 1, 1), 0.5) + y.new_ones(x.shape[0], 8, *x.shape[2:])
            return self.b(y * bias)

    return M(), img()


def ex_pinned():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)
            self.register_buffer("order", torch.tensor([2, 0, 1]))

        def forward(self, x):
            if x.dim() != 4:
                raise ValueError("NCHW input")
            y = self.a(x)
            side = max(x.shape[2] // 2, 1)  # arithmetic on (symbolic) sizes
            z = torch.index_select(x, 1, self.order).sum(1, keepdim=True)
            return self.b(y) + z[:, :, :side].mean() + torch.sort(x, dim=3).values[:, :1, :1, :1]

    return static(M()), img()


def ex_pad():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.p = nn.Conv2d(8, 16, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            if x.dim() != 4:
                raise ValueError("NCHW input")
            y = F.pad(self.a(x), (1, 1, 0, 2))
            y = torch.roll(y, shifts=1, dims=3).flip(2)
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            return self.b(F.pixel_shuffle(self.p(y), 2))

    return static(M()), img()


def ex_gqa():
    class M(nn.Module):
        """Grouped-query attention written by hand: 4 query heads share 2 key/value heads."""

        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 16)
            self.k = nn.Linear(6, 8)
            self.v = nn.Linear(6, 8)
            self.o = nn.Linear(16, 5)

        def forward(self, x):
            b, n, _ = x.shape
            if n > 16:
                raise ValueError("too long")
            q = self.q(x).view(b, n, 8, 2).transpose(1, 2)
            k = self.k(x).view(b, n, 4, 2).transpose(1, 2).repeat_interleave(2, dim=1)
            v = self.v(x).view(b, n, 4, 2).transpose(1, 2)
            v = v[:, :, None].expand(b, 4, 2, n, 2).reshape(b, 8, n, 2)  # Hugging Face's repeat_kv
            att = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1)
            return self.o((att @ v).transpose(1, 2).reshape(b, n, 16))

    return static(M()), (torch.randn(2, 5, 6),)


def ex_mha_masked():
    class M(nn.Module):
        """nn.MultiheadAttention returning its weights under an additive mask: the ATen graph has
        in-projection, unflatten/select of q/k/v, views merging batch and heads, baddbmm, softmax, bmm."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.mha = nn.MultiheadAttention(8, 4)
            self.register_buffer("mask", torch.triu(torch.full((4, 4), -1e4), 1))
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            if x.dim() != 3:
                raise ValueError("(L, B, E) input")
            h = self.inp(x)
            return self.out(self.mha(h, h, h, attn_mask=self.mask)[0])

    return static(M()), (torch.randn(4, 2, 5),)


def ex_mha_packed():
    class M(nn.Module):
        """Two batch-first nn.MultiheadAttention layers without weights (sdpa path): packed in-projection
        unflattened to (3, E) and selected, views merging batch and heads, a key padding mask."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.a = nn.MultiheadAttention(8, 4, batch_first=True)
            self.b = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
            self.register_buffer("pad", torch.tensor([[False] * 4, [False, False, False, True]]))
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            if x.dim() != 3:
                raise ValueError("(B, L, E) input")
            h = self.inp(x)
            h = self.a(h, h, h, need_weights=False)[0]
            return self.out(self.b(h, h, h, key_padding_mask=self.pad, need_weights=False)[0])

    return static(M()), (torch.randn(2, 4, 5),)


def exported(factory):
    """An fx example made export-only (wrapped in :class:`ExportOnly`, static shapes)."""

    def make() -> Example:
        model, inputs = factory()
        return ExportOnly(model, True), inputs

    make.__name__ = f"exported_{factory.__name__}"
    make.__doc__ = f"{factory.__name__}, captured by torch.export."
    return make


ex_grouped_conv = exported(layers.ex_grouped_conv)
ex_gpt2_conv1d = exported(layers.ex_gpt2_conv1d)
ex_addmm_param = exported(layers.ex_addmm_param)
ex_rms_norm_decomposed = exported(shapes.ex_rms_norm_decomposed)
ex_sdpa = exported(attention.ex_sdpa)
ex_layernorm = exported(layers.ex_layernorm)
ex_functional_conv = exported(layers.ex_functional_conv)
ex_matmul = exported(attention.ex_matmul)
ex_einsum = exported(attention.ex_einsum)
ex_roll = exported(shapes.ex_roll)
ex_grid_sample = exported(shapes.ex_grid_sample)
ex_stack_narrow_repeat = exported(shapes.ex_stack_narrow_repeat)
ex_pool = exported(shapes.ex_pool)
ex_reduce = exported(shapes.ex_reduce)
ex_softmax = exported(shapes.ex_softmax)
ex_cat = exported(shapes.ex_cat)
ex_split = exported(shapes.ex_split)
ex_repeat_interleave = exported(attention.ex_repeat_interleave)
ex_unary = exported(layers.ex_unary_fn)
ex_binary = exported(layers.ex_binary)
ex_instancenorm = exported(layers.ex_instancenorm)
ex_pixel_shuffle = exported(shapes.ex_pixel_shuffle)
ex_normalize = exported(layers.ex_normalize)
