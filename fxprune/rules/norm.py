"""Normalisation and pooling.

Per-channel normalisations (BatchNorm, InstanceNorm) are exact under pruning. Normalisations whose
statistics span the pruned channels (GroupNorm over a group, LayerNorm/RMSNorm over the normalised
dims, ``F.normalize``) are marked *lossy*: the group is blocked unless the user opts in with
``allow_lossy=True`` (the report then lists it as not exactly lossless). LocalResponseNorm mixes
neighbouring channels and pins them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ir import Constraint
from .base import RULES, Rule, RuleContext, shrink_tensors
from .examples import ex_batchnorm, ex_groupnorm, ex_instancenorm, ex_layernorm, ex_pool

__all__ = ["PerChannelNorm", "GroupNormRule", "LastDimsNorm", "PoolRule"]


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


class GroupNormRule(Rule):
    name = "group_norm"
    example = staticmethod(ex_groupnorm)
    lossy = True

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0, "input")
        rc.tie_same_shape(x)
        ch = rc.act(x, 1)
        m = rc.module
        if m.affine:
            rc.tie(ch, rc.param(f"{rc.module_name}.weight", 0, "norm"))
            rc.tie(ch, rc.param(f"{rc.module_name}.bias", 0, "norm"))
        rc.lossy(ch, f"{rc.module_name}: GroupNorm statistics span each group's channels")
        rc.constrain(ch, Constraint("uniform", m.num_groups, f"{rc.module_name} num_groups"))

    def rewrite_module(self, module, qualname, rw, nodes=()):
        new = shrink_tensors(module, qualname, rw)
        k = rw.keep_act(nodes[0].args[0], 1) if nodes else None
        if k is not None:
            new.num_channels = int(k.sum())
        return new


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
RULES.register_module((nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()), LastDimsNorm())
RULES.register_function(F.layer_norm, FunctionalLayerNorm())
RULES.register_module(nn.LocalResponseNorm, LocalResponseNormRule())
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
