"""Ops that move dims or positions without changing values: permutes, in-dim moves, concatenation.

* Permutes (:class:`PermuteCall`): ``permute``/``transpose``/``swapaxes``/``t``/``movedim`` as functions,
  methods and ATen overloads: output dim ``i`` is input dim ``perm[i]``.
* Moves within dims (``roll``, ``flip``, ``fliplr``/``flipud``, ``channel_shuffle``, ``nn.ChannelShuffle``):
  the output has the input's shape; the dims whose positions move are pinned whole (their channel order is
  not preserved), every other dim passes through. ``roll`` without dims rolls the flattened tensor: every
  dim is pinned.
* ``cat``/``stack``: each input is a slice of the output's concatenated dim (stack: a new dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..meta import is_multi, shape_of
from .base import RULES, Rule, RuleContext
from .calls import Bound, Family, aten_name, aten_overloads, aten_self

__all__ = ["PermuteCall", "PermuteFamily", "WithinCall", "WithinFamily", "CatRule", "StackRule"]


@dataclass(frozen=True)
class PermuteCall:
    input: fx.Node
    perm: tuple[int, ...]  # output dim i is input dim perm[i]


class PermuteFamily(Family):
    name = "permute"
    permutes = True
    local = "positional"

    def analyze(self, call: PermuteCall, node, rc: RuleContext) -> None:
        for i, d in enumerate(call.perm):
            rc.tie(rc.act(call.input, d), rc.out(i))

    def dim_origins(self, call, node, dim):
        return [(call.input, call.perm[dim % len(call.perm)])]


def _movedim(nd: int, src: Any, dst: Any) -> tuple[int, ...]:
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [s % nd for s in src]
    dst = [d % nd for d in dst]
    order: list[int | None] = [None] * nd
    for s, d in zip(src, dst, strict=True):
        order[d] = s
    rest = iter(d for d in range(nd) if d not in src)
    return tuple(o if o is not None else next(rest) for o in order)


def _swap(nd: int, a: int, b: int) -> tuple[int, ...]:
    p = list(range(nd))
    p[a % nd], p[b % nd] = p[b % nd], p[a % nd]
    return tuple(p)


def bind_torch(node: fx.Node, gm: fx.GraphModule) -> PermuteCall | None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    xs = shape_of(x)
    if xs is None:
        return None
    nd, t, args, kw = len(xs), node.target, node.args[1:], node.kwargs
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = dims or kw.get("dims")
        return PermuteCall(x, tuple(d % nd for d in dims))
    if name == "t":
        return PermuteCall(x, tuple(range(nd))[::-1])
    if name == "movedim":
        return PermuteCall(x, _movedim(nd, args[0] if args else kw["source"],
                                       args[1] if len(args) > 1 else kw["destination"]))
    a = args[0] if args else kw.get("dim0", kw.get("axis0"))
    b = args[1] if len(args) > 1 else kw.get("dim1", kw.get("axis1"))
    return PermuteCall(x, _swap(nd, a, b))


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> PermuteCall | None:
    bound = aten_self(node)
    if bound is None:
        return None
    a, x, xs = bound
    nd, name = len(xs), aten_name(node)
    if name in ("permute", "permute_copy"):
        return PermuteCall(x, tuple(d % nd for d in a["dims"]))
    if name in ("t", "t_", "t_copy", "numpy_T"):
        return PermuteCall(x, tuple(range(nd))[::-1])
    if name == "movedim":
        return PermuteCall(x, _movedim(nd, a["source"], a["destination"]))
    d0, d1 = (a["dim0"], a["dim1"]) if "dim0" in a else (a["axis0"], a["axis1"])
    return PermuteCall(x, _swap(nd, d0, d1))


PERMUTE = PermuteFamily()
_permute = Bound(PERMUTE, bind_torch, "permute")
RULES.register_function((torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.t, torch.movedim,
                         torch.moveaxis), _permute)
RULES.register_method(("permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"), _permute)
RULES.register_function(aten_overloads("permute", "permute_copy", "transpose", "transpose_", "transpose_copy", "t",
                                       "t_", "t_copy", "movedim", "swapaxes", "swapdims", "numpy_T"),
                        Bound(PERMUTE, bind_aten, "aten.permute"))


@dataclass(frozen=True)
class WithinCall:
    input: fx.Node
    moved: tuple[int, ...] | None  # dims whose positions move; None: every dim


class WithinFamily(Family):
    name = "permute_within"

    def analyze(self, call: WithinCall, node, rc: RuleContext) -> None:
        x = call.input
        nd = len(rc.shape(x))
        moved = set(range(nd)) if call.moved is None else {d % nd for d in call.moved}
        for d in range(nd):
            rc.tie(rc.act(x, d), rc.out(d))
            if d in moved:
                rc.pin(rc.act(x, d), f"{node.name} moves positions along dim {d}")


def _dims(dims: Any, nd: int) -> tuple[int, ...] | None:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None
    if isinstance(dims, int):
        return (dims % nd,)
    if all(isinstance(d, int) for d in dims):
        return tuple(d % nd for d in dims)
    return None  # dims computed at run time: treat every dim as moved


def bind_within_torch(node: fx.Node, gm: fx.GraphModule) -> WithinCall | None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    xs = shape_of(x)
    if xs is None:
        return None
    nd = len(xs)
    if node.op == "call_module":
        return WithinCall(x, (1,))
    t, args, kw = node.target, node.args[1:], node.kwargs
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if name == "roll":
        return WithinCall(x, _dims(args[1] if len(args) > 1 else kw.get("dims"), nd))
    if name == "flip":
        if len(args) > 1 or (len(args) == 1 and isinstance(args[0], int)):
            return WithinCall(x, _dims(list(args), nd))  # x.flip(1, 2)
        return WithinCall(x, _dims(args[0] if args else kw.get("dims"), nd))
    if name == "fliplr":
        return WithinCall(x, (1,))
    if name == "flipud":
        return WithinCall(x, (0,))
    return WithinCall(x, (1,))  # channel_shuffle: channels of (N, C, ...)


def bind_within_aten(node: fx.Node, gm: fx.GraphModule) -> WithinCall | None:
    bound = aten_self(node)
    if bound is None:
        return None
    a, x, xs = bound
    name = aten_name(node)
    if name in ("channel_shuffle", "native_channel_shuffle", "fliplr"):
        return WithinCall(x, (1,))
    if name == "flipud":
        return WithinCall(x, (0,))
    return WithinCall(x, _dims(a.get("dims"), len(xs)))


WITHIN = WithinFamily()
_within = Bound(WITHIN, bind_within_torch, "permute_within")
RULES.register_function((torch.roll, torch.flip, torch.fliplr, torch.flipud, torch.channel_shuffle,
                         torch.nn.functional.channel_shuffle, torch.native_channel_shuffle), _within)
RULES.register_method(("roll", "flip", "fliplr", "flipud"), _within)
RULES.register_module(nn.ChannelShuffle, _within)
RULES.register_function(aten_overloads("roll", "flip", "fliplr", "flipud", "channel_shuffle", "native_channel_shuffle"),
                        Bound(WITHIN, bind_within_aten, "aten.permute_within"))


def _tensor_list(rc: RuleContext, arg: Any) -> list[tuple[fx.Node, int | None]]:
    if isinstance(arg, (list, tuple)):
        return [(x, None) for x in arg if rc.is_tensor(x)]
    if isinstance(arg, fx.Node) and is_multi(arg.meta.get("tensor_meta")):
        return [(arg, i) for i in range(len(arg.meta["tensor_meta"]))]
    return []


class CatRule(Rule):
    """cat(tensors, dim): input ``i`` is the slice of the output's ``dim`` after the earlier inputs."""

    name = "cat"
    local = "positional"

    def analyze(self, node, rc: RuleContext) -> None:
        items = _tensor_list(rc, rc.arg(0, "tensors"))
        out = rc.out_shape()
        if out is None:
            return
        nd = len(out)
        dim = rc.arg(1, "dim", 0) % nd
        offset = 0
        for x, idx in items:
            shp = rc.shape(x, idx)
            if len(shp) != nd:  # legacy cat of empty 1-D tensors
                continue
            for d in range(nd):
                if d == dim:
                    rc.tie_slice(rc.out(d), offset, rc.act(x, d, idx))
                else:
                    rc.tie(rc.act(x, d, idx), rc.out(d))
            offset += shp[dim]


class StackRule(Rule):
    """stack(tensors, dim): every input's dims pass to the output around the new dim."""

    name = "stack"
    local = "positional"

    def analyze(self, node, rc: RuleContext) -> None:
        items = _tensor_list(rc, rc.arg(0, "tensors"))
        if rc.out_shape() is None:
            return
        nd = len(rc.out_shape())
        dim = rc.arg(1, "dim", 0) % nd
        for x, idx in items:
            for d in range(nd - 1):
                rc.tie(rc.act(x, d, idx), rc.out(d if d < dim else d + 1))


_cat, _stack = CatRule(), StackRule()
RULES.register_function((torch.cat, torch.concat, torch.concatenate), _cat)
RULES.register_function(aten_overloads("cat", "concat", "concatenate"), _cat)
RULES.register_function(torch.stack, _stack)
RULES.register_function(aten_overloads("stack"), _stack)
