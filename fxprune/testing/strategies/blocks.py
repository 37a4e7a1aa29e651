"""Image building blocks for random networks: ``(N, C, H, W) -> (N, C', H', W')`` modules and the heads.

Owns :class:`ConvBNAct`, :class:`GroupedConv`, :class:`Residual`, :class:`ConcatBlock`, :class:`SplitBlock`,
:class:`DepthwiseSeparable`, :class:`SEGate`, :class:`Pool`, :class:`SharedConv`, :class:`GAPHead` and
:class:`FlattenHead`, plus the small construction helpers :func:`check_positive` (also used by the token
blocks) and :func:`conv_out_size`. Each block is built from explicit integers, accepts ``dtype=`` and is
symbolically traceable by ``torch.fx``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConcatBlock",
    "ConvBNAct",
    "DepthwiseSeparable",
    "FlattenHead",
    "GAPHead",
    "GroupedConv",
    "Pool",
    "Residual",
    "SEGate",
    "SharedConv",
    "SplitBlock",
    "check_positive",
    "conv_out_size",
]

_ACTS = ("relu", "silu", "gelu", "none")
_NORMS = ("bn", "gn", "in", "none")


def _act(name: str | None) -> nn.Module:
    if name is None or name == "none":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected one of {_ACTS}")


def _norm2d(name: str | None, channels: int, dtype: torch.dtype | None) -> nn.Module:
    if name is None or name == "none":
        return nn.Identity()
    if name == "bn":
        return nn.BatchNorm2d(channels, dtype=dtype)
    if name == "gn":
        return nn.GroupNorm(math.gcd(channels, 2), channels, dtype=dtype)
    if name == "in":
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=True, dtype=dtype)
    raise ValueError(f"unknown norm {name!r}; expected one of {_NORMS}")


def check_positive(**kwargs: int) -> None:
    """Raise ``ValueError`` unless every keyword argument is a positive ``int`` (``bool`` excluded)."""
    for k, v in kwargs.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")


def _same_padding(kernel_size: int, dilation: int) -> int:
    return dilation * (kernel_size - 1) // 2


def conv_out_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution / pooling window along one spatial axis (floor mode)."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


class ConvBNAct(nn.Module):
    """``act(norm(conv(x)))`` with "same" padding (odd ``kernel_size``).

    ``norm`` is ``"bn"`` (BatchNorm2d), ``"gn"`` (GroupNorm with gcd(C, 2) groups), ``"in"`` (affine
    InstanceNorm2d with running statistics) or ``"none"``; ``act`` is ``"relu"``, ``"silu"``, ``"gelu"`` or
    ``"none"``. Spatial size becomes ``ceil(H / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: str = "bn",
        act: str = "relu",
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                        stride=stride, dilation=dilation, groups=groups)
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=_same_padding(kernel_size, dilation), dilation=dilation, groups=groups,
                              bias=bias, dtype=dtype)
        self.norm = _norm2d(norm, out_channels, dtype)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class GroupedConv(ConvBNAct):
    """A grouped convolution block: ``act(bn(conv(x, groups=groups)))``; both channel counts must be
    divisible by ``groups``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        kernel_size: int = 3,
        stride: int = 1,
        act: str = "relu",
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=stride, groups=groups,
                         norm="bn", act=act, dtype=dtype)


class Residual(nn.Module):
    """A ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``conv1`` is 3x3 with ``stride`` and ``mid_channels`` outputs (default ``out_channels``); ``conv2`` is 3x3.
    The shortcut is the identity when ``in_channels == out_channels`` and ``stride == 1`` (unless
    ``projection=True``), otherwise a 1x1 strided conv + BN projection.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        mid_channels: int | None = None,
        projection: bool | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        mid = out_channels if mid_channels is None else mid_channels
        check_positive(in_channels=in_channels, out_channels=out_channels, stride=stride, mid_channels=mid)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=stride, padding=1, bias=False, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(mid, dtype=dtype)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, out_channels, 3, padding=1, bias=False, dtype=dtype)
        self.bn2 = nn.BatchNorm2d(out_channels, dtype=dtype)
        self.relu2 = nn.ReLU()
        needs_proj = in_channels != out_channels or stride != 1
        if projection is None:
            projection = needs_proj
        if needs_proj and not projection:
            raise ValueError("an identity shortcut needs in_channels == out_channels and stride == 1")
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, dtype=dtype),
                          nn.BatchNorm2d(out_channels, dtype=dtype))
            if projection
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + self.shortcut(x))


class ConcatBlock(nn.Module):
    """Two branches (1x1 conv+BN+ReLU with ``branch_channels[0]`` outputs, 3x3 conv+BN+ReLU with
    ``branch_channels[1]``), concatenated on dim 1 (after ``x`` itself when ``include_input``), then a
    1x1 conv+BN+ReLU to ``out_channels``."""

    def __init__(
        self,
        in_channels: int,
        branch_channels: Sequence[int],
        out_channels: int,
        include_input: bool = False,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        a, b = (int(v) for v in branch_channels)
        check_positive(in_channels=in_channels, branch_a=a, branch_b=b, out_channels=out_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.include_input = bool(include_input)
        self.branch_a = ConvBNAct(in_channels, a, kernel_size=1, dtype=dtype)
        self.branch_b = ConvBNAct(in_channels, b, kernel_size=3, dtype=dtype)
        cat_channels = a + b + (in_channels if include_input else 0)
        self.fuse = ConvBNAct(cat_channels, out_channels, kernel_size=1, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch_a(x)
        b = self.branch_b(x)
        if self.include_input:
            y = torch.cat([x, a, b], dim=1)
        else:
            y = torch.cat([a, b], dim=1)
        return self.fuse(y)


class SplitBlock(nn.Module):
    """Split the channels, run each piece through its own conv+BN+ReLU, merge by ``"cat"`` or ``"add"``.

    Exactly one of ``split_sizes`` (``torch.split(x, [s0, s1, ...], dim=1)`` with the literal list, summing to
    ``in_channels``) or ``chunks`` (``x.chunk(chunks, dim=1)``, ``in_channels`` divisible by ``chunks``) must
    be given. ``branch_channels[i]`` is the output width of piece ``i``'s conv (all equal for ``"add"``);
    ``out_channels`` is their sum for ``"cat"`` and their common value for ``"add"``.
    """

    def __init__(
        self,
        in_channels: int,
        branch_channels: Sequence[int],
        split_sizes: Sequence[int] | None = None,
        chunks: int | None = None,
        merge: str = "cat",
        kernel_size: int = 3,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels)
        if (split_sizes is None) == (chunks is None):
            raise ValueError("give exactly one of split_sizes and chunks")
        if split_sizes is not None:
            sizes = [int(s) for s in split_sizes]
            if sum(sizes) != in_channels or min(sizes) < 1:
                raise ValueError(f"split_sizes {sizes} must be positive and sum to in_channels={in_channels}")
            self.split_sizes: list[int] | None = sizes
            self.chunks: int | None = None
        else:
            check_positive(chunks=chunks)
            if in_channels % chunks:
                raise ValueError(f"in_channels={in_channels} not divisible by chunks={chunks}")
            sizes = [in_channels // chunks] * chunks
            self.split_sizes, self.chunks = None, int(chunks)
        outs = [int(c) for c in branch_channels]
        if len(outs) != len(sizes):
            raise ValueError(f"need {len(sizes)} branch_channels, got {len(outs)}")
        if merge not in ("cat", "add"):
            raise ValueError("merge must be 'cat' or 'add'")
        if merge == "add" and len(set(outs)) != 1:
            raise ValueError("merge='add' needs equal branch_channels")
        self.merge = merge
        self.in_channels = in_channels
        self.out_channels = sum(outs) if merge == "cat" else outs[0]
        self.branches = nn.ModuleList(
            ConvBNAct(s, o, kernel_size=kernel_size, dtype=dtype) for s, o in zip(sizes, outs)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.split_sizes is not None:
            pieces = torch.split(x, self.split_sizes, dim=1)
        else:
            pieces = x.chunk(self.chunks, dim=1)
        outs = [branch(pieces[i]) for i, branch in enumerate(self.branches)]
        if self.merge == "cat":
            return torch.cat(outs, dim=1)
        y = outs[0]
        for o in outs[1:]:
            y = y + o
        return y


class DepthwiseSeparable(nn.Module):
    """Depthwise conv (``groups=in_channels``, ``in_channels * depth_multiplier`` outputs, ``stride``) +
    BN + ReLU, then pointwise 1x1 conv + BN + ReLU to ``out_channels``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        depth_multiplier: int = 1,
        kernel_size: int = 3,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, out_channels=out_channels, depth_multiplier=depth_multiplier)
        self.in_channels, self.out_channels = in_channels, out_channels
        mid = in_channels * depth_multiplier
        self.depthwise = ConvBNAct(in_channels, mid, kernel_size=kernel_size, stride=stride, groups=in_channels,
                                   dtype=dtype)
        self.pointwise = ConvBNAct(mid, out_channels, kernel_size=1, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class SEGate(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(fc2(relu(fc1(mean(x, (2, 3))))))``.

    ``style="conv"`` uses 1x1 convolutions on ``mean(..., keepdim=True)``; ``style="linear"`` uses
    ``nn.Linear`` and ``.view(-1, channels, 1, 1)`` with the literal channel count.
    """

    def __init__(
        self, channels: int, reduced_channels: int, style: str = "conv", *, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        check_positive(channels=channels, reduced_channels=reduced_channels)
        if style not in ("conv", "linear"):
            raise ValueError("style must be 'conv' or 'linear'")
        self.in_channels = self.out_channels = self.channels = channels
        self.style = style
        if style == "conv":
            self.fc1 = nn.Conv2d(channels, reduced_channels, 1, dtype=dtype)
            self.fc2 = nn.Conv2d(reduced_channels, channels, 1, dtype=dtype)
        else:
            self.fc1 = nn.Linear(channels, reduced_channels, dtype=dtype)
            self.fc2 = nn.Linear(reduced_channels, channels, dtype=dtype)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.style == "conv":
            s = x.mean((2, 3), keepdim=True)
            s = torch.sigmoid(self.fc2(self.relu(self.fc1(s))))
        else:
            s = x.mean((2, 3))
            s = torch.sigmoid(self.fc2(self.relu(self.fc1(s)))).view(-1, self.channels, 1, 1)
        return x * s


class Pool(nn.Module):
    """Channel-preserving pooling: ``kind`` is ``"max"``, ``"avg"`` (``kernel_size``, ``stride`` (default
    ``kernel_size``), ``padding``) or ``"adaptive_avg"`` (``output_size``). With ``functional=True`` the
    ``torch.nn.functional`` form is called instead of a pooling module."""

    def __init__(
        self,
        kind: str = "max",
        kernel_size: int = 2,
        stride: int | None = None,
        padding: int = 0,
        output_size: int | tuple[int, int] | None = None,
        functional: bool = False,
    ) -> None:
        super().__init__()
        self.kind, self.functional = kind, bool(functional)
        self.kernel_size = int(kernel_size)
        self.stride = int(kernel_size if stride is None else stride)
        self.padding = int(padding)
        self.output_size = tuple(output_size) if isinstance(output_size, (tuple, list)) else output_size
        if kind == "max":
            self.pool = nn.MaxPool2d(self.kernel_size, self.stride, self.padding)
        elif kind == "avg":
            self.pool = nn.AvgPool2d(self.kernel_size, self.stride, self.padding)
        elif kind == "adaptive_avg":
            if output_size is None:
                raise ValueError("adaptive_avg needs output_size")
            self.pool = nn.AdaptiveAvgPool2d(self.output_size)
        else:
            raise ValueError("kind must be 'max', 'avg' or 'adaptive_avg'")

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """The spatial size this block produces from ``(height, width)``."""
        if self.kind == "adaptive_avg":
            o = self.output_size
            return (o, o) if isinstance(o, int) else (int(o[0]), int(o[1]))
        return (conv_out_size(height, self.kernel_size, self.stride, self.padding),
                conv_out_size(width, self.kernel_size, self.stride, self.padding))

    def forward(self, x: Tensor) -> Tensor:
        if not self.functional:
            return self.pool(x)
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        if self.kind == "avg":
            return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)
        return F.adaptive_avg_pool2d(x, self.output_size)


class SharedConv(nn.Module):
    """Weight sharing: the same ``channels -> channels`` conv module applied ``repeats`` times in sequence,
    each application followed by its own norm (``"bn"`` or ``"none"``) and ReLU."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        repeats: int = 2,
        norm: str = "bn",
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels, kernel_size=kernel_size, repeats=repeats)
        self.in_channels = self.out_channels = channels
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False, dtype=dtype)
        self.norms = nn.ModuleList(_norm2d(norm, channels, dtype) for _ in range(repeats))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        for norm in self.norms:
            x = self.relu(norm(self.conv(x)))
        return x


class GAPHead(nn.Module):
    """``Linear(flatten(adaptive_avg_pool2d(x, 1), 1))``: ``(N, C, H, W) -> (N, num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class FlattenHead(nn.Module):
    """Hard-coded flatten head: ``x.view(-1, C*H*W)`` with the literal product computed here, then
    ``Linear(C*H*W, hidden_features) -> ReLU -> Linear(hidden_features, num_classes)``."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        hidden_features: int,
        num_classes: int,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, height=height, width=width, hidden_features=hidden_features,
                        num_classes=num_classes)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.flat_features = in_channels * height * width
        self.fc1 = nn.Linear(self.flat_features, hidden_features, dtype=dtype)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_features, num_classes, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x.view(-1, self.flat_features))))

