"""Normalisation and pooling.

Per-channel normalisations (BatchNorm, InstanceNorm) are exact under pruning, and so is removing *whole*
groups of a group norm (``F.group_norm`` with ``num_groups > 1``: one unit per group). Normalisations whose
statistics span the pruned channels (a group norm with one group, ``nn.GroupNorm`` by default,
LayerNorm/RMSNorm over the normalised dims, ``F.normalize`` over its dim) are marked *lossy*: the group is blocked unless the user opts in with
``allow_lossy=True`` (the report then lists it as not exactly lossless). LocalResponseNorm mixes
neighbouring channels and pins them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ir import Constraint
from .base import RULES, Rule, RuleContext, shrink_tensors
from .examples import ex_batchnorm, ex_groupnorm, ex_instancenorm, ex_layernorm, ex_pool

__all__ = ["PerChannelNorm", "GroupNormRule", "FunctionalGroupNorm", "tie_group_norm", "LastDimsNorm",
           "NormalizeRule", "PoolRule"]


class PerChannelNorm(Rule):
    """BatchNorm*/InstanceNorm*: output == input shape; affine params and running stats follow dim C."""

    name = "per_channel_norm"
    example = staticmethod(ex_batchnorm)

    def __init__(self, spatial: int | None = None, name: str = "per_channel_norm", example=None) -> None:
        self.spatial = spatial
        self.name = name
        if example is not None:
            self.example = example

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        rc.tie_same_shape(x)
        nd = len(rc.shape(x))
        c = 0 if (self.spatial is not None and nd == self.spatial + 1) else 1
        ch = rc.act(x, c)
        for pname in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(rc.module, pname, None)
            if t is not None:
                rc.tie(ch, rc.param(f"{rc.module_name}.{pname}", 0, "norm"))

    def fix_attributes(self, module) -> None:
        for pname in ("weight", "running_mean"):
            t = getattr(module, pname, None)
            if t is not None:
                module.num_features = t.shape[0]
                return


def tie_group_norm(rc: RuleContext, node, x, num_groups: Any, affine: list[Any], where: str,
                   whole_groups: bool) -> None:
    """Channel ties of a group norm over dim 1 of ``x`` with ``num_groups`` groups; ``affine``: the axes
    (C,) of its weight and bias.

    Each group of ``C // G`` consecutive channels is normalised with its own statistics, so removing *whole*
    groups leaves every other channel's output unchanged: with ``whole_groups`` and ``1 < G`` the unit of
    pruning is one group (``G == C``: one channel, like instance norm), exactly. Otherwise (``G == 1``, as in
    timm's GroupNorm1 / poolformer, or ``whole_groups=False``) a channel can only go with its group's
    statistics changing: lossy (``allow_lossy=True``), the same number of channels removed in every group.
    """
    rc.tie_same_shape(x)
    ch = rc.act(x, 1)
    for ax in affine:
        rc.tie(ch, ax)
    g = num_groups if isinstance(num_groups, int) else None
    if g is not None and whole_groups and 1 < g <= ch.size and ch.size % g == 0:
        if g < ch.size:
            pos = np.arange(ch.size)
            rc.tie_map(ch, pos, rc.virtual("norm_groups", g), pos // (ch.size // g))
        return
    rc.lossy(ch, f"{where}: GroupNorm statistics span each group's channels")
    if g is not None:
        rc.constrain(ch, Constraint("uniform", g, f"{where} num_groups"))
    else:
        rc.pin(ch, f"{where}: num_groups is computed at run time")


def new_num_groups(old_groups: int, channels: int, keep) -> int:
    """num_groups after pruning: whole groups removed when a group is one unit, else unchanged."""
    if keep is None:
        return old_groups
    kept = int(keep.sum())
    size = channels // old_groups
    if size == 1:  # one channel per group
        return kept
    if kept % size == 0 and _whole(keep, size):
        return kept // size
    return old_groups


def _whole(keep, size: int) -> bool:
    blocks = np.asarray(keep).reshape(-1, size)
    return bool((blocks.all(1) | ~blocks.any(1)).all())


class GroupNormRule(Rule):
    """``nn.GroupNorm``; see :func:`tie_group_norm`. ``whole_groups=True`` (the registered default) prunes
    whole groups exactly when ``num_groups > 1``, as the functional and ATen rules do; ``False`` treats every
    ``num_groups`` as lossy (channels removed uniformly inside each group, needs ``allow_lossy``)."""

    name = "group_norm"
    example = staticmethod(ex_groupnorm)

    def __init__(self, whole_groups: bool = True) -> None:
        self.whole_groups = whole_groups

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        m = rc.module
        affine = [rc.param(f"{rc.module_name}.{p}", 0, "norm") for p in ("weight", "bias")] if m.affine else []
        tie_group_norm(rc, node, x, m.num_groups, affine, rc.module_name, self.whole_groups)

    def rewrite_module(self, module, qualname, rw, nodes=()):
        new = shrink_tensors(module, qualname, rw)
        k = rw.keep_act(nodes[0].args[0], 1) if nodes else None
        if k is not None:
            new.num_channels = int(k.sum())
            new.num_groups = new_num_groups(module.num_groups, module.num_channels, k)
        return new


def _ex_functional_group_norm():
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


class FunctionalGroupNorm(Rule):
    """``F.group_norm(x, num_groups, weight, bias, eps)``: exact whole-group pruning when ``num_groups > 1``,
    lossy with ``num_groups == 1`` (see :func:`tie_group_norm`); ``num_groups`` is patched on rewrite."""

    name = "F.group_norm"
    example = staticmethod(_ex_functional_group_norm)

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        affine = []
        for pos, pname in ((2, "weight"), (3, "bias")):
            p = rc.arg(pos, pname)
            if rc.is_tensor(p):
                affine.append(rc.act(p, 0))
                if p.op == "get_attr":
                    try:
                        rc.param(str(p.target), 0, "norm")
                    except (AttributeError, ValueError):  # a plain tensor attribute
                        pass
        tie_group_norm(rc, node, x, rc.arg(1, "num_groups"), affine, node.name, whole_groups=True)

    def rewrite_node(self, node, old, rw) -> None:
        g = old.args[1] if len(old.args) > 1 else old.kwargs.get("num_groups")
        if not isinstance(g, int):
            return
        k = rw.keep_act(old.args[0], 1)
        new = new_num_groups(g, len(k) if k is not None else 0, k)
        if new == g:
            return
        if len(node.args) > 1:
            node.args = (node.args[0], new, *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "num_groups": new}


class LastDimsNorm(Rule):
    """LayerNorm / RMSNorm over the last ``len(normalized_shape)`` dims (lossy on those dims)."""

    name = "layer_norm"
    example = staticmethod(ex_layernorm)
    lossy = True

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        rc.tie_same_shape(x)
        m = rc.module
        k = len(m.normalized_shape)
        for i in range(k):
            ax = rc.act(x, -k + i)
            rc.lossy(ax, f"{rc.module_name}: {type(m).__name__} statistics span the normalised dims")
            for pname in ("weight", "bias"):
                if getattr(m, pname, None) is not None:
                    rc.tie(ax, rc.param(f"{rc.module_name}.{pname}", i, "norm"))

    def rewrite_module(self, module, qualname, rw, nodes=()):
        new = shrink_tensors(module, qualname, rw)
        if nodes:
            x = nodes[0].args[0]
            k = len(module.normalized_shape)
            shp = rw.new_shape(x)
            new.normalized_shape = tuple(shp[-k:])
        return new


class FunctionalLayerNorm(Rule):
    """``F.layer_norm(x, normalized_shape, weight, bias)`` with get_attr parameters; lossy."""

    name = "F.layer_norm"
    lossy = True

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        rc.tie_same_shape(x)
        shape = rc.arg(1, "normalized_shape")
        k = len(shape)
        for i in range(k):
            ax = rc.act(x, -k + i)
            rc.lossy(ax, f"{node.name}: layer_norm statistics span the normalised dims")
            for pos, name in ((2, "weight"), (3, "bias")):
                p = rc.arg(pos, name)
                if rc.is_tensor(p):
                    rc.tie(ax, rc.act(p, i))

    def rewrite_node(self, node, old, rw) -> None:
        k = len(old.args[1] if len(old.args) > 1 else old.kwargs["normalized_shape"])
        shp = tuple(rw.new_shape(old.args[0])[-k:])
        if len(node.args) > 1:
            node.args = (node.args[0], shp, *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "normalized_shape": shp}


class NormalizeRule(Rule):
    """``F.normalize(x, p, dim)``: every other dim passes through; the norm spans ``dim`` (lossy there)."""

    name = "F.normalize"
    lossy = True
    example = staticmethod(lambda: _ex_normalize())

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        rc.tie_same_shape(x)
        dim = rc.arg(2, "dim", 1)
        if not isinstance(dim, int):
            for ax in rc.all_dims(x):
                rc.lossy(ax, f"{node.name}: normalize over dims computed at run time")
            return
        rc.lossy(rc.act(x, dim), f"{node.name}: the norm spans dim {dim % len(rc.shape(x))}")


def _ex_normalize():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(F.normalize(self.a(x), dim=-1))

    return M(), (torch.randn(4, 5),)


class LocalResponseNormRule(Rule):
    name = "local_response_norm"

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        rc.tie_same_shape(x)
        rc.pin(rc.act(x, 1), f"{rc.module_name}: LocalResponseNorm mixes neighbouring channels")


class PoolRule(Rule):
    """Pooling/resampling over the last ``spatial`` dims: every leading dim passes through."""

    name = "pool"
    example = staticmethod(ex_pool)

    def __init__(self, spatial: int, name: str = "pool") -> None:
        self.spatial = spatial
        self.name = name

    def spatial_dims(self, node, rc: RuleContext) -> int:
        return self.spatial

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        spatial = self.spatial_dims(node, rc)
        shp = rc.out_shape()
        if shp is None:  # return_indices=True gives a tuple
            for i in range(len(node.meta["tensor_meta"])):
                for d in range(len(rc.shape(x)) - spatial):
                    rc.tie(rc.act(x, d), rc.out(d, i))
            return
        for d in range(len(rc.shape(x)) - spatial):
            rc.tie(rc.act(x, d), rc.out(d))


class PixelShuffleRule(Rule):
    """(N, C·r², H, W) → (N, C, H·r, W·r): output channel c is input channels c·r² … c·r²+r²−1."""

    name = "pixel_shuffle"

    def analyze(self, node, rc: RuleContext) -> None:
        import numpy as np

        x = rc.arg(0, "input")
        r = rc.module.upscale_factor
        rc.tie(rc.act(x, 0), rc.out(0))
        cin = rc.act(x, 1)
        pos = np.arange(cin.size)
        rc.tie_map(cin, pos, rc.out(1), pos // (r * r))


RULES.register_module(
    (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d), PerChannelNorm()
)
for _k, _cls in ((1, nn.InstanceNorm1d), (2, nn.InstanceNorm2d), (3, nn.InstanceNorm3d)):
    RULES.register_module(_cls, PerChannelNorm(spatial=_k, name="instance_norm", example=ex_instancenorm))
RULES.register_module(nn.GroupNorm, GroupNormRule())
RULES.register_function(F.group_norm, FunctionalGroupNorm())
RULES.register_module((nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()), LastDimsNorm())
RULES.register_function(F.layer_norm, FunctionalLayerNorm())
RULES.register_module(nn.LocalResponseNorm, LocalResponseNormRule())
RULES.register_function(F.normalize, NormalizeRule())
RULES.register_module(nn.PixelShuffle, PixelShuffleRule())
for _k, _mods, _fns in (
    (1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
         nn.ReflectionPad1d, nn.ReplicationPad1d, nn.ConstantPad1d, nn.ZeroPad1d, nn.CircularPad1d),
     (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)),
    (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
         nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ConstantPad2d, nn.ZeroPad2d, nn.CircularPad2d,
         nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
     (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)),
    (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.ReflectionPad3d,
         nn.ReplicationPad3d, nn.ConstantPad3d, nn.ZeroPad3d, nn.CircularPad3d),
     (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)),
):
    _rule = PoolRule(_k, name=f"pool{_k}d")
    RULES.register_module(_mods, _rule)
    RULES.register_function(_fns, _rule)


class GridSampleRule(Rule):
    """``F.grid_sample(x, grid)``: x (N, C, *in) sampled at grid (N, *out, k) → (N, C, *out). Each channel is
    sampled alike, so the channel dim passes through; the output's spatial dims follow the grid's."""

    name = "grid_sample"
    example = staticmethod(lambda: ex_grid_sample())

    def analyze(self, node, rc: RuleContext) -> None:
        x, grid = rc.arg(0, "input"), rc.arg(1, "grid")
        if not (rc.is_tensor(x) and rc.is_tensor(grid)):
            return
        rc.tie(rc.act(x, 0), rc.out(0))
        rc.tie(rc.act(x, 1), rc.out(1))
        rc.tie(rc.act(grid, 0), rc.out(0))
        for d in range(1, len(rc.shape(grid)) - 1):
            rc.tie(rc.act(grid, d), rc.out(d + 1))


def ex_grid_sample():
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


RULES.register_function(F.grid_sample, GridSampleRule())


class _ResampleRule(PoolRule):
    """nn.Upsample / F.interpolate / F.pad: the resampled dims are the trailing ``ndim - 2`` ones."""

    def __init__(self, name: str) -> None:
        super().__init__(0, name)

    def spatial_dims(self, node, rc: RuleContext) -> int:
        nd = len(rc.shape(rc.arg(0, "input")))
        if node.target is F.pad:
            pad = rc.arg(1, "pad")
            return len(pad) // 2 if isinstance(pad, (list, tuple)) else nd
        return nd - 2


RULES.register_module(nn.Upsample, _ResampleRule("upsample"))
RULES.register_function((F.interpolate, F.upsample, F.pad), _ResampleRule("resample"))
