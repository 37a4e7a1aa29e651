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
==================  ============  ===========================================================
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["KEYS", "get", "put", "has", "tensor_meta", "concrete_value", "set_concrete_value"]

#: Graph-level keys a pass may declare in ``reads``/``writes``.
KEYS = ("shapes", "groups", "importance", "selection", "cost")

_PREFIX = "fxprune."


def _check(key: str) -> str:
    if key not in KEYS:
        raise KeyError(f"unknown fxprune meta key {key!r}; known keys: {', '.join(KEYS)}")
    return _PREFIX + key


def get(gm: fx.GraphModule, key: str, default: Any = None) -> Any:
    """Read graph-level fact ``key`` (one of :data:`KEYS`)."""
    return gm.meta.get(_check(key), default)


def put(gm: fx.GraphModule, key: str, value: Any) -> None:
    """Write graph-level fact ``key``."""
    gm.meta[_check(key)] = value


def has(gm: fx.GraphModule, key: str) -> bool:
    return _check(key) in gm.meta


def drop(gm: fx.GraphModule, key: str) -> None:
    gm.meta.pop(_check(key), None)


def tensor_meta(node: Any) -> Any:
    """torch's ShapeProp metadata of ``node`` (None for non-nodes and non-tensor results)."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("tensor_meta")


def concrete_value(node: fx.Node) -> Any:
    return node.meta.get(_PREFIX + "value")


def set_concrete_value(node: fx.Node, value: Any) -> None:
    node.meta[_PREFIX + "value"] = value
