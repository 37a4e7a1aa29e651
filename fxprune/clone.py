"""A fast structural ``copy.deepcopy`` of module trees.

``copy.deepcopy`` of an ``nn.Module`` goes through ``__reduce_ex__`` and copies every entry of every
module's ``__dict__`` (a dozen hook tables each) generically: on a 200-module network that is a third of a
compile. :func:`copy_module` makes the same copy directly — a new instance per module with its ``__dict__``
copied entry by entry: immutable values shared, empty hook tables made anew, submodules copied recursively,
parameters and buffers mapped through ``memo`` (or deep-copied), everything else deep-copied with the same
memo (so aliasing inside the model, e.g. one config object shared by every layer, is kept). A module class
that customises its copying or pickling (``__deepcopy__``, ``__reduce_ex__``, ``__getstate__``,
``__setstate__``, ``__slots__``) is copied by ``copy.deepcopy`` itself.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
>>> twin = copy_module(net)
>>> twin[0] is not net[0], torch.equal(twin[0].weight, net[0].weight), twin[0].weight is not net[0].weight
(True, True, True)
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["copy_module", "shallow_copy", "set_training"]

_ATOMIC = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size, type)
#: the :data:`_ATOMIC` types themselves: the copiers share a value of exactly one of these types as it is
_SHARE = frozenset(_ATOMIC)


def _atomic(v: Any) -> bool:
    if isinstance(v, _ATOMIC):
        return True
    return type(v) is tuple and all(_atomic(x) for x in v)


#: torch.nn classes whose ``__setstate__`` only fills attributes missing from old pickles (a no-op on a full
#: ``__dict__``); RNNBase's rebuilds its weight lists and is not among them
_SHIMS = (nn.AvgPool3d, nn.modules.conv._ConvNd, nn.LogSoftmax, nn.MultiheadAttention, nn.Softmax, nn.Softmin,
          nn.TransformerDecoderLayer, nn.TransformerEncoderLayer, nn.Upsample, nn.Module)


@functools.lru_cache(maxsize=None)
def _plain(cls: type) -> bool:
    """Whether ``cls`` copies like ``nn.Module`` itself (its ``__dict__`` is its whole state)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and all(c in _SHIMS for c in cls.__mro__ if "__setstate__" in vars(c))
            and not any("__slots__" in vars(c) for c in cls.__mro__ if c is not object))


def copy_module(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)``, faster (see the module docstring). ``memo`` maps ``id(object)`` to
    the object its copy uses (e.g. a parameter to a replacement) and is filled like deepcopy's."""
    return _copy(model, {} if memo is None else memo)


_CONTAINERS = (dict, OrderedDict, list, set)
_CONTAINER_TYPES = frozenset(_CONTAINERS)


def shallow_copy(m: nn.Module) -> nn.Module:
    """``copy.copy(m)`` with its own containers (parameter, buffer and submodule tables, hook tables, other
    dicts, lists and sets: one level copied, so filling the copy's never changes ``m``); their values are
    shared. Classes that customise copying go through ``copy.copy``."""
    def own(v: Any) -> Any:
        t = type(v)
        if t in _SHARE:
            return v
        if t in _CONTAINER_TYPES:
            return v.copy()
        return copy.copy(v) if isinstance(v, (dict, list, set)) else v

    cls = type(m)
    if not _plain(cls):
        new = copy.copy(m)
        new.__dict__.update({k: own(v) for k, v in m.__dict__.items()})
        return new
    new = cls.__new__(cls)
    new.__dict__.update({k: own(v) for k, v in m.__dict__.items() if k != "_compiled_call_impl"})
    return new


def _tensors(store: dict[str, Any], memo: dict[int, Any]) -> dict[str, Any]:
    out = type(store)()
    for k, t in store.items():
        out[k] = None if t is None else memo[id(t)] if id(t) in memo else copy.deepcopy(t, memo)
    return out


#: how :func:`_copy` treats a ``__dict__`` value by its exact type, before the general checks: shared
#: (:data:`_SHARE`), or a new empty container when it is empty (hook tables)
_EMPTY_NEW = frozenset({dict, OrderedDict, set})


def _copy(m: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]
    cls = type(m)
    if not _plain(cls):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state: dict[str, Any] = {}
    for k, v in m.__dict__.items():
        t = type(v)
        if t in _SHARE:
            state[k] = v
        elif t in _EMPTY_NEW and not v:
            state[k] = t()
        elif k == "_compiled_call_impl":
            continue
        elif k == "_modules":
            state[k] = type(v)((n, None if s is None else _copy(s, memo)) for n, s in v.items())
        elif k in ("_parameters", "_buffers"):
            state[k] = _tensors(v, memo)
        elif _atomic(v):
            state[k] = v
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__dict__.update(state)
    return new


def set_training(module: nn.Module, mode: bool) -> nn.Module:
    """``module.train(mode)``, touching only the modules whose flag differs. When any class in the tree
    customises ``train()`` the real call runs (its override may do more than set the flag)."""
    mode = bool(mode)
    mods = list(module.modules())
    if any(type(m).train is not nn.Module.train for m in mods):
        return module.train(mode)
    for m in mods:
        if m.training is not mode:
            m.training = mode
    return module
