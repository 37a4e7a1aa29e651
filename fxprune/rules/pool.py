"""Spatial ops: pooling, resampling, padding, pixel shuffle and grid sampling, every spelling.

Pooling, interpolation and padding act on the trailing spatial dims (``spatial`` of them; padding: as many
as the pad list covers), each channel alike: every leading dim (batch, channels) passes through and the
spatial dims are left to the shape pins. ``pixel_shuffle(r)``: output channel ``c`` is input channels
``c·r² … c·r²+r²−1``. ``F.grid_sample(x, grid)``: the channel dim passes through, the output's spatial dims
follow the grid's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import is_multi, shape_of
from .base import RULES, Rule, RuleContext
from .calls import Bound, Family, aten_name, aten_overloads, schema_args

__all__ = ["SpatialCall", "SpatialFamily", "PixelShuffleRule", "GridSampleRule"]


@dataclass(frozen=True)
class SpatialCall:
    input: fx.Node
    spatial: int  # trailing dims the op resamples


class SpatialFamily(Family):
    name = "pool"
    local = "channel_local"

    def analyze(self, call: SpatialCall, node, rc: RuleContext) -> None:
        x = call.input
        lead = len(rc.shape(x)) - call.spatial
        outs = range(len(node.meta["tensor_meta"])) if is_multi(node.meta.get("tensor_meta")) else [None]
        for i in outs:  # return_indices=True gives (values, indices)
            if rc.out_shape(i) is None:
                continue
            for d in range(lead):
                rc.tie(rc.act(x, d), rc.out(d, i))

    def dim_origins(self, call, node, dim):
        xs = shape_of(call.input)
        return [(call.input, dim)] if xs is not None and dim < len(xs) - call.spatial else []


SPATIAL = SpatialFamily()


def _input(node: fx.Node) -> Any:
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return x if isinstance(x, fx.Node) and shape_of(x) is not None else None


def _pool_binder(spatial: int):
    def bind(node: fx.Node, gm: fx.GraphModule) -> SpatialCall | None:
        x = _input(node)
        return None if x is None else SpatialCall(x, spatial)

    return bind


def bind_resample(node: fx.Node, gm: fx.GraphModule) -> SpatialCall | None:
    """nn.Upsample / F.interpolate / F.pad (the trailing ``ndim - 2`` dims; pad: those its list covers)."""
    x = _input(node)
    if x is None:
        return None
    nd = len(shape_of(x))
    if node.target is F.pad:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        return SpatialCall(x, len(pad) // 2 if isinstance(pad, (list, tuple)) else nd)
    return SpatialCall(x, nd - 2)


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> SpatialCall | None:
    x = _input(node)
    if x is None:
        return None
    nd = len(shape_of(x))
    name = aten_name(node)
    if "pad" in name:
        a = schema_args(node)
        pad = a.get("pad", a.get("padding"))
        return SpatialCall(x, len(pad) // 2 if isinstance(pad, (list, tuple)) else nd)
    if "upsample" in name:
        return SpatialCall(x, nd - 2)
    k = next((int(c) for c in name if c.isdigit()), 2)
    return SpatialCall(x, k)


_PAD_MODULES = {1: (nn.ReflectionPad1d, nn.ReplicationPad1d, nn.ConstantPad1d, nn.ZeroPad1d, nn.CircularPad1d),
                2: (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ConstantPad2d, nn.ZeroPad2d, nn.CircularPad2d),
                3: (nn.ReflectionPad3d, nn.ReplicationPad3d, nn.ConstantPad3d, nn.ZeroPad3d, nn.CircularPad3d)}
for _k, _mods, _fns in (
    (1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
     (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)),
    (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
         nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
     (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)),
    (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
     (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)),
):
    _rule = Bound(SPATIAL, _pool_binder(_k), f"pool{_k}d")
    RULES.register_module(_mods + _PAD_MODULES[_k], _rule)
    RULES.register_function(_fns, _rule)
_resample = Bound(SPATIAL, bind_resample, "resample")
RULES.register_module(nn.Upsample, _resample)
RULES.register_function((F.interpolate, F.upsample, F.pad), _resample)
RULES.register_function(aten_overloads(
    "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d", "max_pool1d_with_indices", "lp_pool1d",
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d",
    "max_pool2d_with_indices", "lp_pool2d", "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d",
    "adaptive_max_pool3d", "max_pool3d_with_indices", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d", "_upsample_bilinear2d_aa",
    "_upsample_bicubic2d_aa", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    "constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "_pad_circular"), Bound(SPATIAL, bind_aten, "aten.pool"))


class PixelShuffleRule(Rule):
    """(N, C·r², H, W) → (N, C, H·r, W·r): output channel c is input channels c·r² … c·r²+r²−1."""

    name = "pixel_shuffle"

    def analyze(self, node, rc: RuleContext) -> None:
        x = node.args[0]
        if node.op == "call_module":
            r = rc.module.upscale_factor
        elif aten_name(node):
            r = schema_args(node)["upscale_factor"]
        else:
            r = rc.arg(1, "upscale_factor")
        if not rc.is_tensor(x) or not isinstance(r, int):
            return
        for d in range(len(rc.shape(x)) - 3):
            rc.tie(rc.act(x, d), rc.out(d))
        cin = rc.act(x, -3)
        pos = np.arange(cin.size)
        rc.tie_map(cin, pos, rc.out(-3), pos // (r * r))


_shuffle = PixelShuffleRule()
RULES.register_module(nn.PixelShuffle, _shuffle)
RULES.register_function(F.pixel_shuffle, _shuffle)
RULES.register_function(aten_overloads("pixel_shuffle"), _shuffle)


class GridSampleRule(Rule):
    """``F.grid_sample(x, grid)``: x (N, C, *in) sampled at grid (N, *out, k) → (N, C, *out). Each channel is
    sampled alike, so the channel dim passes through; the output's spatial dims follow the grid's."""

    name = "grid_sample"

    def analyze(self, node, rc: RuleContext) -> None:
        x, grid = rc.arg(0, "input"), rc.arg(1, "grid")
        if not (rc.is_tensor(x) and rc.is_tensor(grid)):
            return
        rc.tie(rc.act(x, 0), rc.out(0))
        rc.tie(rc.act(x, 1), rc.out(1))
        rc.tie(rc.act(grid, 0), rc.out(0))
        for d in range(1, len(rc.shape(grid)) - 1):
            rc.tie(rc.act(grid, d), rc.out(d + 1))


_grid = GridSampleRule()
RULES.register_function(F.grid_sample, _grid)
RULES.register_function(aten_overloads("grid_sampler", "grid_sampler_2d"), _grid)
