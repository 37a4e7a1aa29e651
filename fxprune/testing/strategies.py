"""Random, torch.fx-traceable networks for property tests of pruning compilers.

This module has three layers:

* :func:`randomize_` (alias :func:`randomize_bn`) and :func:`init_params_`: deterministic, seeded
  re-initialisation of a module's parameters and normalisation statistics, so that every channel of every
  layer is distinguishable (a pruning bug that keeps the wrong channel index changes the output).
* A library of small building blocks (:class:`ConvBNAct`, :class:`Residual`, :class:`ConcatBlock`,
  :class:`SplitBlock`, :class:`DepthwiseSeparable`, :class:`GroupedConv`, :class:`SEGate`, :class:`Pool`,
  :class:`SharedConv`, :class:`GAPHead`, :class:`FlattenHead`, :class:`ConvToTokens`,
  :class:`SelfAttention`, :class:`AttentionBlock`, :class:`TokenHead`, :class:`MultiInputNet`). Each is
  built from explicit integers, accepts ``dtype=``, and is symbolically traceable by ``torch.fx``.
  Image blocks map ``(N, C, H, W) -> (N, C', H', W')``; token blocks map ``(N, L, E) -> (N, L, E')``.
* Hypothesis strategies: :func:`networks` (random compositions of the blocks plus example inputs),
  :func:`network_specs` / :func:`build_network` (the same, split into a printable, hashable description and a
  deterministic builder), :func:`keep_fractions` and :func:`selection_seeds`.

Example (runs as a doctest)::

    >>> import torch
    >>> from hypothesis import given, settings
    >>> from fxprune.testing.strategies import networks
    >>> @settings(max_examples=5, deadline=None)
    ... @given(networks(max_blocks=2, families={"conv", "residual", "split"}))
    ... def check(net_and_inputs):
    ...     model, inputs = net_and_inputs
    ...     gm = torch.fx.symbolic_trace(model)
    ...     with torch.no_grad():
    ...         torch.testing.assert_close(gm(*inputs), model(*inputs))
    >>> check()

Determinism: the weights, normalisation statistics and example inputs of a drawn network depend only on the
drawn data (a seed drawn by hypothesis feeds private ``torch.Generator`` objects); the global torch RNG is
neither used nor advanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # hypothesis is only needed for the strategies, not for the blocks or randomize_.
    from hypothesis import strategies as st
    from hypothesis.strategies import SearchStrategy
except ImportError:  # pragma: no cover - exercised only without the test extra
    st = None  # type: ignore[assignment]
    SearchStrategy = Any  # type: ignore[assignment,misc]

__all__ = [
    # seeded initialisation
    "randomize_",
    "randomize_bn",
    "init_params_",
    # blocks
    "ConvBNAct",
    "Residual",
    "ConcatBlock",
    "SplitBlock",
    "DepthwiseSeparable",
    "GroupedConv",
    "SEGate",
    "Pool",
    "SharedConv",
    "GAPHead",
    "FlattenHead",
    "ConvToTokens",
    "SelfAttention",
    "AttentionBlock",
    "TokenHead",
    "MultiInputNet",
    "BLOCKS",
    "conv_out_size",
    # specs and strategies
    "ALL_FAMILIES",
    "IMAGE_BODY_FAMILIES",
    "BlockSpec",
    "NetworkSpec",
    "build_network",
    "network_specs",
    "networks",
    "keep_fractions",
    "selection_seeds",
]

# --------------------------------------------------------------------------------------------------------------
# Seeded initialisation
# --------------------------------------------------------------------------------------------------------------

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) % (2**63))
    return g


@torch.no_grad()
def _fill_(t: Tensor | None, values: Tensor) -> None:
    if t is not None:
        t.copy_(values.reshape(t.shape).to(device=t.device, dtype=t.dtype))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every normalisation layer of ``module`` distinct, seeded per-channel parameters and statistics.

    In place, for every BatchNorm / GroupNorm / LayerNorm / InstanceNorm / RMSNorm sub-module (in
    ``named_modules`` order): ``weight ~ U(0.5, 1.5)`` with the sign flipped on about 20% of the entries,
    ``bias ~ N(0, 0.5)``, ``running_mean ~ N(0, 0.5)``, ``running_var ~ U(0.5, 2.0)``. Tensors that are
    ``None`` (non-affine layers, no running statistics) are skipped. Only a private ``torch.Generator``
    seeded with ``seed`` is used. Returns ``module``.

    >>> bn = randomize_(torch.nn.BatchNorm2d(4), seed=0)
    >>> bool(torch.all(bn.running_var >= 0.5)) and len(set(bn.weight.tolist())) == 4
    True
    """
    g = _generator(seed)
    f64 = torch.float64
    for _, m in module.named_modules():
        if not isinstance(m, _NORM_TYPES):
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor):
            n = w.numel()
            mag = torch.rand(n, generator=g, dtype=f64) + 0.5
            sign = torch.where(torch.rand(n, generator=g, dtype=f64) < 0.2, -1.0, 1.0).to(f64)
            _fill_(w, mag * sign)
        b = getattr(m, "bias", None)
        if isinstance(b, Tensor):
            _fill_(b, torch.randn(b.numel(), generator=g, dtype=f64) * 0.5)
        rm = getattr(m, "running_mean", None)
        if isinstance(rm, Tensor):
            _fill_(rm, torch.randn(rm.numel(), generator=g, dtype=f64) * 0.5)
        rv = getattr(m, "running_var", None)
        if isinstance(rv, Tensor):
            _fill_(rv, torch.rand(rv.numel(), generator=g, dtype=f64) * 1.5 + 0.5)
    return module


randomize_bn = randomize_


@torch.no_grad()
def init_params_(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter of ``module`` from a private generator seeded with ``seed``.

    Parameters with two or more dimensions get ``U(-b, b)``, ``b = sqrt(3 / fan_in)`` (variance preserving,
    ``fan_in = weight[0].numel()``, correct for grouped convolutions and ``in_proj_weight``); one-dimensional
    parameters get ``U(-0.5, 0.5)``. Shared parameters are initialised once. Call :func:`randomize_` afterwards
    to give normalisation layers their distinguishable values. Returns ``module``.
    """
    g = _generator(seed)
    for _, p in module.named_parameters():  # deduplicated, deterministic order
        if p.dim() >= 2:
            fan_in = max(1, p[0].numel())
            bound = math.sqrt(3.0 / fan_in)
            _fill_(p, (torch.rand(p.numel(), generator=g, dtype=torch.float64) * 2 - 1) * bound)
        else:
            _fill_(p, torch.rand(p.numel(), generator=g, dtype=torch.float64) - 0.5)
    return module


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------

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


def _check_positive(**kwargs: int) -> None:
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
        _check_positive(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
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
        _check_positive(in_channels=in_channels, out_channels=out_channels, stride=stride, mid_channels=mid)
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
        _check_positive(in_channels=in_channels, branch_a=a, branch_b=b, out_channels=out_channels)
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
        _check_positive(in_channels=in_channels)
        if (split_sizes is None) == (chunks is None):
            raise ValueError("give exactly one of split_sizes and chunks")
        if split_sizes is not None:
            sizes = [int(s) for s in split_sizes]
            if sum(sizes) != in_channels or min(sizes) < 1:
                raise ValueError(f"split_sizes {sizes} must be positive and sum to in_channels={in_channels}")
            self.split_sizes: list[int] | None = sizes
            self.chunks: int | None = None
        else:
            _check_positive(chunks=chunks)
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
        _check_positive(in_channels=in_channels, out_channels=out_channels, depth_multiplier=depth_multiplier)
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
        _check_positive(channels=channels, reduced_channels=reduced_channels)
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
        _check_positive(channels=channels, kernel_size=kernel_size, repeats=repeats)
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
        _check_positive(in_channels=in_channels, num_classes=num_classes)
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
        _check_positive(in_channels=in_channels, height=height, width=width, hidden_features=hidden_features,
                        num_classes=num_classes)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.flat_features = in_channels * height * width
        self.fc1 = nn.Linear(self.flat_features, hidden_features, dtype=dtype)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_features, num_classes, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x.view(-1, self.flat_features))))


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
        _check_positive(embed_dim=embed_dim, num_heads=num_heads, head_dim=head_dim)
        if seq_len is not None:
            _check_positive(seq_len=seq_len)
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
        _check_positive(embed_dim=embed_dim, num_heads=num_heads)
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
        _check_positive(embed_dim=embed_dim, num_classes=num_classes)
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


#: Name -> constructor, used by :class:`BlockSpec`.
BLOCKS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (ConvBNAct, GroupedConv, Residual, ConcatBlock, SplitBlock, DepthwiseSeparable, SEGate, Pool,
                SharedConv, GAPHead, FlattenHead, ConvToTokens, SelfAttention, AttentionBlock, TokenHead)
}
BLOCKS["Linear"] = nn.Linear

_NO_DTYPE = {"Pool", "ConvToTokens"}

# --------------------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------------------

#: Every family :func:`networks` understands.
ALL_FAMILIES: frozenset[str] = frozenset({
    "conv", "residual", "concat", "split", "depthwise", "grouped", "se", "pool", "shared", "flatten_linear",
    "attention", "multi_io",
})
#: The families that are drawn as body blocks of image networks.
IMAGE_BODY_FAMILIES: frozenset[str] = frozenset({
    "conv", "residual", "concat", "split", "depthwise", "grouped", "se", "pool", "shared",
})


@dataclass(frozen=True)
class BlockSpec:
    """A block's class name (a key of :data:`BLOCKS`) and constructor keyword arguments; hashable, and its
    repr is the constructor call."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, **kwargs: Any) -> "BlockSpec":
        return cls(name, tuple(kwargs.items()))

    def build(self, dtype: torch.dtype | None = None) -> nn.Module:
        kwargs = dict(self.kwargs)
        if self.name not in _NO_DTYPE:
            kwargs["dtype"] = dtype
        return BLOCKS[self.name](**kwargs)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


@dataclass(frozen=True)
class NetworkSpec:
    """A complete description of a drawn network; :func:`build_network` turns it into ``(model, inputs)``.

    ``kind`` is ``"image"`` (``nn.Sequential(*layers, head)`` on one ``(N, C, H, W)`` input), ``"tokens"``
    (``nn.Sequential(*layers, head)`` ending in attention blocks and a :class:`TokenHead`; its one input is
    either ``(N, L, E)`` tokens or an image that a conv stem and :class:`ConvToTokens` turn into tokens) or ``"multi_io"`` (:class:`MultiInputNet` with ``stems``, trunk
    ``layers``, ``head`` and ``merge``; returns ``(logits, features)``). ``families`` lists the families that
    actually occur. ``seed`` drives weights, norm statistics and inputs.
    """

    kind: str
    input_shapes: tuple[tuple[int, ...], ...]
    layers: tuple[BlockSpec, ...]
    head: BlockSpec
    num_classes: int
    seed: int
    dtype: torch.dtype = torch.float64
    stems: tuple[BlockSpec, ...] = ()
    merge: str | None = None
    families: frozenset[str] = field(default_factory=frozenset)


def build_network(spec: NetworkSpec) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Build ``spec`` deterministically: ``(model in eval mode, example inputs)``.

    Weights come from :func:`init_params_` and norm statistics from :func:`randomize_`, both seeded from
    ``spec.seed``; inputs are standard normal from another generator seeded from ``spec.seed``. The global torch
    RNG state is left untouched. The spec is attached to the model as ``model.fxprune_spec``.
    """
    dtype = spec.dtype
    with torch.random.fork_rng(devices=[]):  # default module init consumes the global RNG; restore it.
        layers = [b.build(dtype) for b in spec.layers]
        head = spec.head.build(dtype)
        if spec.kind == "multi_io":
            stem_a, stem_b = (s.build(dtype) for s in spec.stems)
            model: nn.Module = MultiInputNet(stem_a, stem_b, nn.Sequential(*layers), head, merge=spec.merge or "cat")
        elif spec.kind in ("image", "tokens"):
            model = nn.Sequential(*layers, head)
        else:
            raise ValueError(f"unknown network kind {spec.kind!r}")
    init_params_(model, spec.seed)
    randomize_(model, spec.seed + 1)
    model.eval()
    g = _generator(spec.seed + 2)
    inputs = tuple(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in spec.input_shapes)
    model.fxprune_spec = spec  # type: ignore[assignment]
    return model, inputs


# --------------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------------

_MIN_W, _MAX_W = 2, 12


def _require_hypothesis() -> None:
    if st is None:  # pragma: no cover
        raise ImportError("fxprune.testing.strategies needs hypothesis (pip install 'fxprune[test]')")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _widths() -> "SearchStrategy[int]":
    return st.integers(_MIN_W, _MAX_W)


def _draw_stride(draw: Any, h: int, w: int) -> int:
    return draw(st.sampled_from([1, 2])) if min(h, w) >= 4 else 1


def _draw_composition(draw: Any, total: int, parts: int) -> list[int]:
    """``parts`` positive ints summing to ``total``."""
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


def _draw_image_block(draw: Any, fam: str, c: int, h: int, w: int) -> tuple[BlockSpec, int, int, int]:
    """Draw one body block of family ``fam`` for input ``(c, h, w)``; return it and the output ``(c, h, w)``."""
    if fam == "conv":
        out = draw(_widths())
        k = draw(st.sampled_from([3, 1]))
        stride = _draw_stride(draw, h, w)
        dilation = draw(st.sampled_from([1, 2])) if k == 3 else 1
        spec = BlockSpec.of("ConvBNAct", in_channels=c, out_channels=out, kernel_size=k, stride=stride,
                            dilation=dilation, bias=draw(st.booleans()),
                            norm=draw(st.sampled_from(["bn", "none"])),
                            act=draw(st.sampled_from(["relu", "silu", "none"])))
        return spec, out, -(-h // stride), -(-w // stride)
    if fam == "residual":
        stride = _draw_stride(draw, h, w)
        out = c if draw(st.booleans()) else draw(_widths())
        mid = draw(st.one_of(st.none(), _widths()))
        spec = BlockSpec.of("Residual", in_channels=c, out_channels=out, stride=stride, mid_channels=mid)
        return spec, out, -(-h // stride), -(-w // stride)
    if fam == "concat":
        a = draw(_widths())
        b = draw(st.integers(_MIN_W, _MAX_W - 1))
        b = b + 1 if b >= a else b  # two branches of different widths
        out = draw(_widths())
        spec = BlockSpec.of("ConcatBlock", in_channels=c, branch_channels=(a, b), out_channels=out,
                            include_input=draw(st.booleans()))
        return spec, out, h, w
    if fam == "split":
        chunk_options = [k for k in (2, 3, 4) if c % k == 0]
        use_chunk = bool(chunk_options) and draw(st.booleans())
        merge = draw(st.sampled_from(["cat", "add"]))
        if use_chunk:
            chunks = draw(st.sampled_from(chunk_options))
            n, kw = chunks, {"chunks": chunks}
        else:
            n = draw(st.integers(2, min(3, c)))
            kw = {"split_sizes": tuple(_draw_composition(draw, c, n))}
        if merge == "add":
            branch = (draw(_widths()),) * n
        else:
            branch = tuple(draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)))
        spec = BlockSpec.of("SplitBlock", in_channels=c, branch_channels=branch, **kw, merge=merge,
                            kernel_size=draw(st.sampled_from([3, 1])))
        out = sum(branch) if merge == "cat" else branch[0]
        return spec, out, h, w
    if fam == "depthwise":
        stride = _draw_stride(draw, h, w)
        out = draw(_widths())
        spec = BlockSpec.of("DepthwiseSeparable", in_channels=c, out_channels=out, stride=stride,
                            depth_multiplier=draw(st.sampled_from([1, 2])), kernel_size=draw(st.sampled_from([3, 5])))
        return spec, out, -(-h // stride), -(-w // stride)
    if fam == "grouped":
        g = draw(st.sampled_from([d for d in _divisors(c) if d > 1]))
        out = g * draw(st.integers(1, max(1, _MAX_W // g)))
        stride = _draw_stride(draw, h, w)
        spec = BlockSpec.of("GroupedConv", in_channels=c, out_channels=out, groups=g,
                            kernel_size=draw(st.sampled_from([3, 1])), stride=stride)
        return spec, out, -(-h // stride), -(-w // stride)
    if fam == "se":
        spec = BlockSpec.of("SEGate", channels=c, reduced_channels=draw(st.integers(1, max(1, c))),
                            style=draw(st.sampled_from(["conv", "linear"])))
        return spec, c, h, w
    if fam == "pool":
        options = ["adaptive_avg"] + (["max", "avg"] if min(h, w) >= 2 else [])
        kind = draw(st.sampled_from(options))
        functional = draw(st.booleans())
        if kind == "adaptive_avg":
            oh = draw(st.integers(max(1, h // 2), h))
            ow = draw(st.integers(max(1, w // 2), w))
            spec = BlockSpec.of("Pool", kind=kind, output_size=(oh, ow), functional=functional)
            return spec, c, oh, ow
        k, s, p = draw(st.sampled_from([(2, 2, 0), (3, 2, 1), (3, 1, 1)]))
        spec = BlockSpec.of("Pool", kind=kind, kernel_size=k, stride=s, padding=p, functional=functional)
        return spec, c, conv_out_size(h, k, s, p), conv_out_size(w, k, s, p)
    if fam == "shared":
        spec = BlockSpec.of("SharedConv", channels=c, kernel_size=draw(st.sampled_from([3, 1])),
                            repeats=draw(st.integers(2, 3)), norm=draw(st.sampled_from(["bn", "none"])))
        return spec, c, h, w
    raise ValueError(f"not an image body family: {fam!r}")


def _draw_attention_block(draw: Any, e: int, seq_len: int) -> BlockSpec:
    kind = draw(st.sampled_from(["mha", "sdpa"]))
    mlp_hidden = draw(st.one_of(st.none(), st.integers(2, 16)))
    norm_first = draw(st.booleans())
    if kind == "mha":
        heads = draw(st.sampled_from(_divisors(e)))
        return BlockSpec.of("AttentionBlock", embed_dim=e, num_heads=heads, attention="mha",
                            mlp_hidden=mlp_hidden, norm_first=norm_first)
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 4))
    literal_len = draw(st.booleans())
    return BlockSpec.of("AttentionBlock", embed_dim=e, num_heads=heads, head_dim=head_dim, attention="sdpa",
                        mlp_hidden=mlp_hidden, norm_first=norm_first, seq_len=seq_len if literal_len else None)


def _draw_image_head(draw: Any, families: frozenset[str], c: int, h: int, w: int, num_classes: int,
                     used: set[str]) -> BlockSpec:
    flatten_only = not (families & IMAGE_BODY_FAMILIES) and "multi_io" not in families
    if "flatten_linear" in families and (flatten_only or draw(st.booleans())):
        used.add("flatten_linear")
        return BlockSpec.of("FlattenHead", in_channels=c, height=h, width=w,
                            hidden_features=draw(st.integers(2, 12)), num_classes=num_classes)
    return BlockSpec.of("GAPHead", in_channels=c, num_classes=num_classes)


if st is not None:

    @st.composite
    def _network_specs(draw: Any, max_blocks: int, families: frozenset[str], dtype: torch.dtype,
                       batch_size: int) -> NetworkSpec:
        body_fams = sorted(families & IMAGE_BODY_FAMILIES)
        kinds = []
        if body_fams or "flatten_linear" in families:
            kinds.append("image")
        if "multi_io" in families:
            kinds.append("multi_io")
        if "attention" in families:
            kinds += ["tokens", "image_tokens"]
        kind = draw(st.sampled_from(kinds))
        seed = draw(st.integers(0, 2**32 - 1))
        num_classes = draw(st.integers(2, 6))
        used: set[str] = set()
        layers: list[BlockSpec] = []

        if kind == "tokens":
            seq_len = draw(st.integers(4, 8))
            e_in = draw(_widths())
            shapes: tuple[tuple[int, ...], ...] = ((batch_size, seq_len, e_in),)
            e = e_in
            if draw(st.booleans()):
                e = draw(_widths())
                layers.append(BlockSpec.of("Linear", in_features=e_in, out_features=e))
            for _ in range(draw(st.integers(1, max_blocks))):
                layers.append(_draw_attention_block(draw, e, seq_len))
            used.add("attention")
            head = BlockSpec.of("TokenHead", embed_dim=e, num_classes=num_classes)
            return NetworkSpec("tokens", shapes, tuple(layers), head, num_classes, seed, dtype,
                               families=frozenset(used))

        h = draw(st.integers(8, 16))
        w = draw(st.integers(8, 16))
        stems: tuple[BlockSpec, ...] = ()
        merge = None
        if kind == "multi_io":
            ca, cb = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            merge = draw(st.sampled_from(["cat", "add"]))
            wa = draw(_widths())
            wb = wa if merge == "add" else draw(_widths())
            stems = (BlockSpec.of("ConvBNAct", in_channels=ca, out_channels=wa),
                     BlockSpec.of("ConvBNAct", in_channels=cb, out_channels=wb))
            shapes = ((batch_size, ca, h, w), (batch_size, cb, h, w))
            c = wa + wb if merge == "cat" else wa
            used.add("multi_io")
        else:
            c_in = draw(st.integers(1, 4))
            c = draw(_widths())
            shapes = ((batch_size, c_in, h, w),)
            layers.append(BlockSpec.of("ConvBNAct", in_channels=c_in, out_channels=c))

        n_body = 0
        if body_fams:
            if kind == "image_tokens":
                n_body = draw(st.integers(0, max_blocks - 1))
            else:
                n_body = draw(st.integers(1, max_blocks))
            for _ in range(n_body):
                fam = draw(st.sampled_from(body_fams))
                spec, c, h, w = _draw_image_block(draw, fam, c, h, w)
                layers.append(spec)
                used.add(fam)

        if kind == "image_tokens":
            layers.append(BlockSpec.of("ConvToTokens"))
            seq_len, e = h * w, c
            if draw(st.booleans()):
                e = draw(_widths())
                layers.append(BlockSpec.of("Linear", in_features=c, out_features=e))
            n_att = draw(st.integers(1, max(1, max_blocks - n_body)))
            for _ in range(n_att):
                layers.append(_draw_attention_block(draw, e, seq_len))
            used.add("attention")
            head = BlockSpec.of("TokenHead", embed_dim=e, num_classes=num_classes)
            return NetworkSpec("tokens", shapes, tuple(layers), head, num_classes, seed, dtype,
                               families=frozenset(used))

        head = _draw_image_head(draw, families, c, h, w, num_classes, used)
        return NetworkSpec("multi_io" if kind == "multi_io" else "image", shapes, tuple(layers), head,
                           num_classes, seed, dtype, stems=stems, merge=merge, families=frozenset(used))


def _check_args(max_blocks: int, families: Iterable[str], batch_size: int) -> frozenset[str]:
    if isinstance(families, str):
        families = {families}
    fams = frozenset(families)
    unknown = fams - ALL_FAMILIES
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {sorted(ALL_FAMILIES)}")
    if not fams:
        raise ValueError("families must not be empty")
    if not isinstance(max_blocks, int) or max_blocks < 1:
        raise ValueError(f"max_blocks must be a positive int, got {max_blocks!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return fams


def network_specs(
    max_blocks: int = 4,
    families: Iterable[str] = ALL_FAMILIES,
    dtype: torch.dtype = torch.float64,
    *,
    batch_size: int = 2,
) -> "SearchStrategy[NetworkSpec]":
    """Strategy for :class:`NetworkSpec` descriptions (see :func:`networks`, which builds them).

    Specs are hashable and print as constructor calls, which makes failing examples easy to read and to
    rebuild with :func:`build_network`.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, deadline=None)
    ... @given(network_specs(max_blocks=2, families={"attention"}))
    ... def check(spec):
    ...     model, inputs = build_network(spec)
    ...     assert model(*inputs).shape == (2, spec.num_classes)
    >>> check()
    """
    _require_hypothesis()
    fams = _check_args(max_blocks, families, batch_size)
    return _network_specs(max_blocks, fams, dtype, batch_size)


def networks(
    max_blocks: int = 4,
    families: Iterable[str] = ALL_FAMILIES,
    dtype: torch.dtype = torch.float64,
    *,
    batch_size: int = 2,
) -> "SearchStrategy[tuple[nn.Module, tuple[Tensor, ...]]]":
    """Strategy for ``(model, example_inputs)``: a random, ``torch.fx.symbolic_trace``-able network.

    The network is a sequential composition of up to ``max_blocks`` body blocks whose families are drawn from
    ``families`` (a subset of :data:`ALL_FAMILIES`):

    * image body blocks: ``"conv"`` (:class:`ConvBNAct`: 1x1/3x3, stride 1/2, dilation, bias, BN or none),
      ``"residual"`` (:class:`Residual`, identity or projection shortcut), ``"concat"`` (:class:`ConcatBlock`),
      ``"split"`` (:class:`SplitBlock`: ``torch.split`` with literal sizes or ``chunk``; cat or add),
      ``"depthwise"`` (:class:`DepthwiseSeparable`), ``"grouped"`` (:class:`GroupedConv`), ``"se"``
      (:class:`SEGate`), ``"pool"`` (:class:`Pool`), ``"shared"`` (:class:`SharedConv`);
    * heads and topologies: ``"flatten_linear"`` (:class:`FlattenHead`, literal ``C*H*W``; otherwise
      :class:`GAPHead`), ``"attention"`` (token networks with :class:`AttentionBlock` s on an ``(N, L, E)``
      input with ``L`` in 4..8, or after a conv stem + :class:`ConvToTokens`), ``"multi_io"``
      (:class:`MultiInputNet`: two image inputs, returns ``(logits, features)``).

    Image networks always start with a :class:`ConvBNAct` stem (1..4 input channels) and end with a head;
    widths are drawn from 2..12 (respecting divisibility for grouped / depthwise / chunk); inputs are
    ``(batch_size, C, H, W)`` with ``H, W`` in 8..16. The model is in eval mode, in ``dtype``, with seeded
    weights (:func:`init_params_`) and norm statistics (:func:`randomize_`); its weights and the inputs depend
    only on the drawn data. ``model.fxprune_spec`` holds the :class:`NetworkSpec` it was built from.

    >>> import torch
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None)
    ... @given(networks(max_blocks=3, families={"grouped", "depthwise", "se", "flatten_linear"}))
    ... def check(net_and_inputs):
    ...     model, inputs = net_and_inputs
    ...     gm = torch.fx.symbolic_trace(model)
    ...     with torch.no_grad():
    ...         out = gm(*inputs)
    ...     assert torch.isfinite(out).all()
    >>> check()
    """
    return network_specs(max_blocks, families, dtype, batch_size=batch_size).map(build_network)


def keep_fractions(min_value: float = 0.0, max_value: float = 1.0) -> "SearchStrategy[float]":
    """Strategy for a pruning ratio: a finite float in ``[min_value, max_value)`` (default ``[0, 1)``).

    >>> from hypothesis import given
    >>> @given(keep_fractions())
    ... def check(r):
    ...     assert 0.0 <= r < 1.0
    >>> check()
    """
    _require_hypothesis()
    if not 0.0 <= min_value < max_value <= 1.0:
        raise ValueError("need 0 <= min_value < max_value <= 1")
    return st.floats(min_value, max_value, exclude_max=True, allow_nan=False, allow_infinity=False)


def selection_seeds() -> "SearchStrategy[int]":
    """Strategy for integer seeds (``0 .. 2**32 - 1``) for random channel selections.

    >>> from hypothesis import given
    >>> @given(selection_seeds())
    ... def check(s):
    ...     assert 0 <= s < 2**32
    >>> check()
    """
    _require_hypothesis()
    return st.integers(0, 2**32 - 1)
