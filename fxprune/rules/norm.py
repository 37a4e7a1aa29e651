"""Normalisations: one call record (:class:`NormCall`) for batch, instance, group, layer and RMS norms as
modules, functions and ATen overloads.

* Per-channel (BatchNorm, InstanceNorm, ``F.batch_norm``/``F.instance_norm``, ATen ``batch_norm`` and its
  ``_native_*`` forms): exact; the affine parameters and running statistics follow the channels (role
  ``"norm"``). Statistics the call computes itself (``training=True``: timm's weight standardisation) span
  every other dim: pruning there is lossy.
* Group norm (``nn.GroupNorm``, ``F.group_norm``, ``aten.group_norm``): each group of ``C // G`` channels
  has its own statistics, so removing *whole* groups is exact (one unit per group, ``num_groups`` patched);
  with one group (timm's GroupNorm1) a channel can only go with its group's statistics changing: lossy,
  the same number removed in every group.
* Layer/RMS norm over the trailing dims (``nn.LayerNorm``, ``nn.RMSNorm``, ``F.layer_norm``, ``F.rms_norm``,
  ATen ``layer_norm``/``rms_norm``/``native_layer_norm``): the statistics span the normalised dims, so
  pruning them is lossy (``allow_lossy=True``; the report says so). The same norms written out as
  element-wise ops (Hugging Face's ``LlamaRMSNorm``: ``x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``)
  are lossy the same way: their reduction over the channel dim is (:mod:`fxprune.rules.reduce`).
* ``F.normalize`` (lossy over its dim) and ``nn.LocalResponseNorm`` (mixes neighbouring channels: pinned).

MACs: one per output element.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ir import Constraint
from ..meta import shape_of
from .base import RULES, RuleContext
from .calls import (Bound, Family, aten_name, aten_overloads, call_arg, module_of, schema_args, set_call_arg,
                    set_schema_arg, layer_name, weight_axis)

__all__ = ["NormCall", "NormFamily", "NORM", "tie_group_norm", "new_num_groups"]


@dataclass(frozen=True)
class NormCall:
    """``kind``: ``"channel"`` (batch/instance), ``"group"``, ``"last"`` (layer/RMS over ``normalized``
    trailing dims), ``"normalize"`` (``F.normalize`` over ``dim``), ``"lrn"``. ``params``: name → weight
    operand (parameter name or graph value) with its role dim; ``stats_dims``: dims the call's own statistics
    span besides the channel dim (lossy there)."""

    kind: str
    input: fx.Node
    params: tuple[tuple[str, Any], ...] = ()
    channel_dim: int = 1
    groups: Any = None
    normalized: int = 0
    dim: Any = None
    stats_dims: tuple[int, ...] = ()
    spelling: str = "module"


def tie_group_norm(rc: RuleContext, node: fx.Node, x: fx.Node, num_groups: Any, affine: list[Any], where: str,
                   whole_groups: bool = True) -> None:
    """Channel ties of a group norm over dim 1 of ``x`` with ``num_groups`` groups; ``affine``: the axes
    (C,) of its weight and bias (see the module docstring)."""
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


def new_num_groups(old_groups: int, channels: int, keep: Any) -> int:
    """num_groups after pruning: whole groups removed when a group is one unit, else unchanged."""
    if keep is None:
        return old_groups
    kept = int(keep.sum())
    size = channels // old_groups
    if size == 1:  # one channel per group
        return kept
    blocks = np.asarray(keep).reshape(-1, size)
    if kept % size == 0 and bool((blocks.all(1) | ~blocks.any(1)).all()):
        return kept // size
    return old_groups


class NormFamily(Family):
    name = "norm"

    def locality(self, call: NormCall, node: fx.Node) -> str | None:
        return "channel_local" if call.kind == "channel" and not call.stats_dims else None

    def analyze(self, call: NormCall, node: fx.Node, rc: RuleContext) -> None:
        x = call.input
        if not rc.is_tensor(x):
            return
        multi = rc.out_shape() is None
        index = 0 if multi else None
        if rc.out_shape(index) != rc.shape(x):
            return
        rc.tie_same_shape(x, index)
        nd = len(rc.shape(x))
        where = str(node.target) if node.op == "call_module" else node.name
        if call.kind == "channel":
            ch = rc.act(x, call.channel_dim)
            for _, p in call.params:
                rc.tie(ch, weight_axis(rc, p, 0, "norm"))
            for d in call.stats_dims:
                rc.lossy(rc.act(x, d), f"{where}: statistics computed by the call span dim {d}")
            if multi:  # saved statistics: (C,) tensors follow the channels; the others are free
                self._extra_outputs(rc, node, ch)
        elif call.kind == "group":
            affine = [weight_axis(rc, p, 0, "norm") for _, p in call.params]
            tie_group_norm(rc, node, x, call.groups, affine, where)
        elif call.kind == "last":
            k = call.normalized
            for i in range(k):
                ax = rc.act(x, -k + i)
                rc.lossy(ax, f"{where}: {self.layer_kind(call, node, rc.gm)} statistics span the normalised dims")
                for _, p in call.params:
                    rc.tie(ax, weight_axis(rc, p, i, "norm"))
            if multi:
                self._extra_outputs(rc, node, None)
        elif call.kind == "normalize":
            if not isinstance(call.dim, int):
                for ax in rc.all_dims(x):
                    rc.lossy(ax, f"{where}: normalize over dims computed at run time")
            else:
                rc.lossy(rc.act(x, call.dim % nd), f"{where}: the norm spans dim {call.dim % nd}")
        else:  # lrn
            rc.pin(rc.act(x, 1), f"{where}: LocalResponseNorm mixes neighbouring channels")

    @staticmethod
    def _extra_outputs(rc: RuleContext, node: fx.Node, ch: Any) -> None:
        for i in range(1, len(node.meta["tensor_meta"])):
            shp = rc.out_shape(i)
            if shp is None:
                continue
            for d, s in enumerate(shp):
                ax = rc.out(d, i)
                if ch is not None and len(shp) == 1 and s == ch.size:
                    rc.tie(ax, ch)
                else:
                    rc.free(ax)

    def fix_module(self, call, new, old, qualname, rw) -> None:
        if isinstance(old, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            for pname in ("weight", "running_mean"):
                t = getattr(new, pname, None)
                if t is not None:
                    new.num_features = t.shape[0]
                    break
        elif isinstance(old, nn.GroupNorm):
            k = rw.keep_act(call.input, 1) if call is not None else rw.keep_param(f"{qualname}.weight", 0)
            if k is not None:
                new.num_channels = int(k.sum())
                new.num_groups = new_num_groups(old.num_groups, old.num_channels, k)
        elif hasattr(old, "normalized_shape"):  # LayerNorm / RMSNorm
            k = len(old.normalized_shape)
            if call is not None:
                new.normalized_shape = tuple(rw.new_shape(call.input)[-k:])
            elif getattr(new, "weight", None) is not None:
                new.normalized_shape = tuple(new.weight.shape[-k:])

    def rewrite_node(self, call, node, old, rw) -> None:
        if call.kind == "group" and isinstance(call.groups, int):
            k = rw.keep_act(call.input, 1)
            new = new_num_groups(call.groups, len(k) if k is not None else 0, k)
            if new != call.groups:
                if call.spelling == "aten":
                    set_schema_arg(node, "num_groups", new)
                else:
                    set_call_arg(node, 1, "num_groups", new)
        elif call.kind == "last":
            shp = tuple(rw.new_shape(call.input)[-call.normalized:])
            if shp != tuple(shape_of(call.input)[-call.normalized:]):
                if call.spelling == "aten":
                    set_schema_arg(node, "normalized_shape", list(shp))
                else:
                    set_call_arg(node, 1, "normalized_shape", shp)

    def macs(self, call, node, gm) -> int | None:
        if call.kind in ("normalize", "lrn"):
            return 0
        out = shape_of(node, 0 if shape_of(node) is None else None)
        return None if out is None else math.prod(out)

    def dim_origins(self, call, node, dim):
        xs = shape_of(call.input)
        os_ = shape_of(node, None if shape_of(node) is not None else 0)
        return [(call.input, dim % len(xs))] if xs is not None and xs == os_ else []

    def layer_kind(self, call, node, gm) -> str | None:
        default = {"channel": "BatchNorm", "group": "GroupNorm", "last": "LayerNorm"}.get(call.kind, "norm")
        return layer_name(node, gm, default)


NORM = NormFamily()

_CHANNEL_PARAMS = ("weight", "bias", "running_mean", "running_var")


def bind_module(node: fx.Node, gm: fx.GraphModule) -> NormCall | None:
    m = module_of(node, gm)
    name = str(node.target)
    x = call_arg(node, 0, "input")
    if not isinstance(x, fx.Node) or shape_of(x) is None:
        return None
    nd = len(shape_of(x))
    params = tuple((p, f"{name}.{p}") for p in _CHANNEL_PARAMS if getattr(m, p, None) is not None)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        spatial = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}.get(type(m), nd - 2)
        return NormCall("channel", x, params, 0 if nd == spatial + 1 else 1)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return NormCall("channel", x, params, 1)
    if isinstance(m, nn.GroupNorm):
        affine = tuple((p, f"{name}.{p}") for p in ("weight", "bias")) if m.affine else ()
        return NormCall("group", x, affine, 1, m.num_groups)
    if isinstance(m, nn.LocalResponseNorm):
        return NormCall("lrn", x)
    # LayerNorm / RMSNorm
    affine = tuple((p, f"{name}.{p}") for p in ("weight", "bias") if getattr(m, p, None) is not None)
    return NormCall("last", x, affine, normalized=len(m.normalized_shape))


def _bound(fn: Any, node: fx.Node) -> dict[str, Any] | None:
    try:
        return inspect.signature(fn).bind(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):
        return None


def _tensors(a: dict[str, Any], names: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    return tuple((n, a[n]) for n in names if isinstance(a.get(n), fx.Node) and shape_of(a[n]) is not None)


def bind_function(node: fx.Node, gm: fx.GraphModule) -> NormCall | None:
    a = _bound(node.target, node)
    if a is None or not isinstance(a.get("input"), fx.Node) or shape_of(a["input"]) is None:
        return None
    x = a["input"]
    nd = len(shape_of(x))
    if node.target in (F.batch_norm, F.instance_norm):
        ch = 1 if nd > 1 else 0
        batch_stats = a.get("training", False) if node.target is F.batch_norm else a.get("use_input_stats", True)
        first = 0 if node.target is F.batch_norm else 2  # instance norm: per sample
        stats = tuple(d for d in range(first, nd) if d != ch) if batch_stats is not False else ()
        return NormCall("channel", x, _tensors(a, _CHANNEL_PARAMS), ch, stats_dims=stats, spelling="function")
    if node.target is F.group_norm:
        return NormCall("group", x, _tensors(a, ("weight", "bias")), 1, a.get("num_groups"), spelling="function")
    if node.target is F.normalize:
        return NormCall("normalize", x, dim=a.get("dim", 1), spelling="function")
    shape = a.get("normalized_shape")
    if not isinstance(shape, (list, tuple)):
        return None
    return NormCall("last", x, _tensors(a, ("weight", "bias")), normalized=len(shape), spelling="function")


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> NormCall | None:
    a = schema_args(node)
    name = aten_name(node)
    x = a.get("input")
    if not isinstance(x, fx.Node) or shape_of(x) is None:
        return None
    nd = len(shape_of(x))
    if name == "group_norm":
        return NormCall("group", x, _tensors(a, ("weight", "bias")), 1, a.get("num_groups"), spelling="aten")
    if name in ("layer_norm", "rms_norm", "native_layer_norm"):
        shape = a.get("normalized_shape")
        if not isinstance(shape, (list, tuple)):
            return None
        return NormCall("last", x, _tensors(a, ("weight", "bias")), normalized=len(shape), spelling="aten")
    ch = 1 if nd > 1 else 0
    stats: tuple[int, ...] = ()
    if name == "instance_norm" and a.get("use_input_stats", True) is not False:
        stats = tuple(range(2, nd))
    elif a.get("training") is True and name != "_native_batch_norm_legit_no_training":
        stats = tuple(d for d in range(nd) if d != ch)
    return NormCall("channel", x, _tensors(a, _CHANNEL_PARAMS), ch, stats_dims=stats, spelling="aten")


_channel_modules = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
                    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
RULES.register_module(_channel_modules, Bound(NORM, bind_module, "per_channel_norm"))
RULES.register_module(nn.GroupNorm, Bound(NORM, bind_module, "group_norm"))
_last = Bound(NORM, bind_module, "layer_norm")
_last.lossy = True
RULES.register_module((nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()), _last)
RULES.register_module(nn.LocalResponseNorm, Bound(NORM, bind_module, "local_response_norm"))
RULES.register_function((F.batch_norm, F.instance_norm), Bound(NORM, bind_function, "F.batch_norm"))
RULES.register_function(F.group_norm, Bound(NORM, bind_function, "F.group_norm"))
_flast = Bound(NORM, bind_function, "F.layer_norm")
_flast.lossy = True
RULES.register_function((F.layer_norm,) + ((F.rms_norm,) if hasattr(F, "rms_norm") else ()), _flast)
_fnorm = Bound(NORM, bind_function, "F.normalize")
_fnorm.lossy = True
RULES.register_function(F.normalize, _fnorm)
RULES.register_function(aten_overloads("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                                       "native_batch_norm", "_batch_norm_impl_index", "instance_norm",
                                       "_native_batch_norm_legit_functional"), Bound(NORM, bind_aten, "aten.batch_norm"))
RULES.register_function(aten_overloads("group_norm"), Bound(NORM, bind_aten, "aten.group_norm"))
_alast = Bound(NORM, bind_aten, "aten.layer_norm")
_alast.lossy = True
RULES.register_function(aten_overloads("layer_norm", "rms_norm", "native_layer_norm"), _alast)
