"""The only place that names meta keys.

Node-level facts live in ``node.meta``; graph-level facts (groups, importance, selection, cost) live in
``gm.meta`` (a plain dict torch.fx keeps on every GraphModule and copies with it). Passes use the typed
accessors below and declare which :data:`KEYS` they read and write, so a pipeline can be checked before
it runs.

Keys (documented contract for user passes):

==================  ============  ===========================================================
key                 where         value
==================  ============  ===========================================================
``tensor_meta``     node.meta     torch's ``TensorMetadata`` (shape, dtype…) or a tuple of them
``fxprune.value``   node.meta     concrete non-tensor result seen on the example inputs (ints…)
``shapes``          gm.meta       True once every node carries its metadata
``groups``          gm.meta       :class:`fxprune.passes.group.Analysis` (groups + axis table)
``importance``      gm.meta       ``dict[group_id, np.ndarray]`` one score per unit (higher = keep)
``selection``       gm.meta       :class:`fxprune.ir.Selection`
``cost``            gm.meta       :class:`fxprune.flops.Cost` of the graph
``pruned_from``     gm.meta       :class:`fxprune.passes.rewrite.Provenance`: the graph this one was
                                  rewritten from, its groups and the selection applied
``unit_mass``       gm.meta       ``{(param, dim, groups, p): (tensor version, np.ndarray)}`` Σ|x|^p per
                                  position of a dim, left by the magnitude criteria (absorb reads its zeros)
``absorbed``        gm.meta       tuple of :class:`fxprune.passes.absorb.Absorbed` (constants folded)
``reconstruction``  gm.meta       ``{site: (relative error before, after)}`` of a refit
``stack_trace``     node.meta     the user's source stack of the node (torch.fx's own key)
==================  ============  ===========================================================

Facts are the only channel between passes: a pass declares every key it reads (``reads``; optional ones
in ``optional_reads``) and writes, and :meth:`fxprune.pipeline.Pipeline.check` rejects a pipeline in which a
pass would find a fact missing. A library that adds passes declares its own keys with :func:`declare`.

Stack traces are not recorded while tracing (recording them costs as much as the whole analysis of a deep
network); :func:`stack_trace` computes them on demand, only when an error message needs a source line.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["KEYS", "declare", "check_key", "get", "put", "has", "drop", "tensor_meta", "shape_of", "is_multi", "concrete_value",
           "set_concrete_value", "stack_trace", "set_source_finder", "copy_source_finder"]

#: Graph-level keys a pass may declare in ``reads``/``writes`` (grown by :func:`declare`).
KEYS: list[str] = ["shapes", "groups", "importance", "selection", "cost", "pruned_from", "absorbed", "reconstruction",
                   "unit_mass"]

_PREFIX = "fxprune."


def declare(key: str) -> str:
    """Declare a new graph-level fact (for passes outside fxprune's core); returns ``key``."""
    if not isinstance(key, str) or not key.isidentifier():
        raise KeyError(f"a meta key must be an identifier, got {key!r}")
    if key not in KEYS:
        KEYS.append(key)
    return key


def check_key(key: str) -> str:
    """The stored name of declared key ``key`` (a ``KeyError`` for an undeclared one)."""
    if key not in KEYS:
        raise KeyError(f"unknown fxprune meta key {key!r}; known keys: {', '.join(KEYS)}")
    return _PREFIX + key


def get(gm: fx.GraphModule, key: str, default: Any = None) -> Any:
    """Read graph-level fact ``key`` (one of :data:`KEYS`)."""
    return gm.meta.get(check_key(key), default)


def put(gm: fx.GraphModule, key: str, value: Any) -> None:
    """Write graph-level fact ``key``."""
    gm.meta[check_key(key)] = value


def has(gm: fx.GraphModule, key: str) -> bool:
    return check_key(key) in gm.meta


def drop(gm: fx.GraphModule, key: str) -> None:
    gm.meta.pop(check_key(key), None)


def tensor_meta(node: Any) -> Any:
    """torch's ShapeProp metadata of ``node`` (None for non-nodes and non-tensor results)."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("tensor_meta")


def is_multi(tm: Any) -> bool:
    """True when ``tm`` is the metadata of a tuple output (TensorMetadata itself is a NamedTuple)."""
    return isinstance(tm, (tuple, list)) and not isinstance(tm, TensorMetadata)


def shape_of(node: Any, index: int | None = None) -> tuple[int, ...] | None:
    """Static shape of ``node``'s output (``index`` selects an item of a tuple output)."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")  # inline tensor_meta / is_multi: this runs thousands of times a compile
    if tm is None:
        return None
    if type(tm) is TensorMetadata or not is_multi(tm):
        return tuple(tm.shape) if index is None else None
    if index is None or index >= len(tm) or tm[index] is None:
        return None
    return tuple(tm[index].shape)


# GraphModule -> finder (or its cached result). Kept outside gm.meta so that modules stay picklable.
_SOURCES: "weakref.WeakKeyDictionary[fx.GraphModule, Any]" = weakref.WeakKeyDictionary()


def set_source_finder(gm: fx.GraphModule, finder: Any) -> None:
    """Attach ``finder() -> {node name: stack trace}`` (called at most once, when an error needs it)."""
    _SOURCES[gm] = finder


def copy_source_finder(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Let ``dst`` (a rewrite of ``src`` with the same node names) find its nodes' sources through ``src``."""
    if src in _SOURCES:
        _SOURCES[dst] = _SOURCES[src]


def stack_trace(node: Any) -> str | None:
    """The source stack of ``node`` (recorded or computed on demand), or None."""
    if not isinstance(node, fx.Node):
        return None
    found = node.meta.get("stack_trace")
    if found:
        return found
    gm = node.graph.owning_module
    finder = _SOURCES.get(gm) if gm is not None else None
    if finder is None:
        return None
    if not isinstance(finder, dict):
        try:
            finder = finder()
        except Exception:  # a source line is a courtesy in an error message, never a second error
            finder = {}
        _SOURCES[gm] = finder
    return finder.get(node.name)


def concrete_value(node: fx.Node) -> Any:
    return node.meta.get(_PREFIX + "value")


def set_concrete_value(node: fx.Node, value: Any) -> None:
    node.meta[_PREFIX + "value"] = value
