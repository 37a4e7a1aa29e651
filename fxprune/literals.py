"""Sizes a traced-through module keeps as plain ``int`` attributes and its forward reads as literals.

timm's RexNet block computes ``torch.cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]], 1)``:
symbolic tracing bakes ``self.in_channels`` into the graph's slices, which the rewrite patches to the pruned
width, but the class copy still holds the old attribute. For each module whose own nodes (recorded in it:
``nn_module_stack``) had a literal changed by the rewrite, an ``int`` attribute equal to the old literal takes
the new one — only when unambiguous: every occurrence of that value in the module's nodes became the same
new value. The class copy is then checked against the graph result as always (a wrong guess is caught there,
and the graph result is returned)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.fx as fx
from torch import nn

from .flops import module_owner

__all__ = ["literal_changes", "update_literal_attributes", "with_literal_retry"]


def _ints(a: Any, out: list[int]) -> list[int]:
    """The literal ints of a node argument, in order (slice bounds and nested sequences included)."""
    if isinstance(a, bool):
        return out
    if isinstance(a, int):
        out.append(a)
    elif isinstance(a, slice):
        for x in (a.start, a.stop, a.step):
            _ints(x, out)
    elif isinstance(a, (tuple, list)):
        for x in a:
            _ints(x, out)
    elif isinstance(a, dict):
        for x in a.values():
            _ints(x, out)
    return out


def literal_changes(traced: fx.GraphModule, pruned: fx.GraphModule) -> dict[str, dict[int, set[int]]]:
    """Module path -> {old literal: the values it has in the pruned graph} over the module's own function and
    method calls that have a changed literal (nodes are matched by name: the rewrite copies the graph)."""
    new_nodes = {n.name: n for n in pruned.graph.nodes}
    out: dict[str, dict[int, set[int]]] = {}
    for n in traced.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        m = new_nodes.get(n.name)
        if m is None or m.op != n.op or m.target != n.target:
            continue
        a, b = _ints((n.args, n.kwargs), []), _ints((m.args, m.kwargs), [])
        if len(a) != len(b) or a == b:
            continue
        seen = out.setdefault(module_owner(n), {})
        for x, y in zip(a, b):
            seen.setdefault(x, set()).add(y)
    return out


def update_literal_attributes(new: nn.Module, old: nn.Module, traced: fx.GraphModule, pruned: fx.GraphModule,
                              skip: Iterable[str] = ()) -> list[str]:
    """Set the ``int`` attributes of ``new``'s modules (a copy of ``old``) that were the source of a literal
    the rewrite changed (see the module docstring); returns ``"path.attr: old -> new"`` for each."""
    skip = set(skip)
    done: list[str] = []
    for path, changes in literal_changes(traced, pruned).items():
        try:
            src, dst = old.get_submodule(path), new.get_submodule(path)
        except AttributeError:
            continue
        for k, v in vars(src).items():
            if k.startswith("_") or k in skip or isinstance(v, bool) or not isinstance(v, int):
                continue
            to = changes.get(v, set())
            if len(to) == 1 and v not in to and vars(dst).get(k) == v:
                y = next(iter(to))
                setattr(dst, k, y)
                done.append(f"{path + '.' if path else ''}{k}: {v} -> {y}")
    return done


def with_literal_retry(build: Callable[[bool], Any], check: Callable[[Any], tuple],
                       failed: Callable[[Exception], tuple]) -> tuple[Any, tuple]:
    """The class copy's two tries: ``build(literals)`` makes a copy (``literals=True``: with
    :func:`update_literal_attributes`), ``check(copy)`` returns ``(why, *details)`` (``why`` '' accepts it) and
    ``failed(exc)`` that tuple for an exception of either. A copy that was built but fails is built once more
    with the literal sizes and checked again, unless that changed no attribute. Returns ``(copy or None,
    outcome)`` of the accepted try, else of the first."""
    first: tuple[Any, tuple] | None = None
    for literals in (False, True):
        try:
            copy = build(literals)
            if first is not None and copy.attributes == first[0].attributes:
                break  # no size read from a plain attribute: the same copy, already refused
            outcome = check(copy)
        except Exception as exc:  # noqa: BLE001 - a copy that cannot be made or checked is refused, with why
            copy, outcome = None, failed(exc)
        if copy is not None and not outcome[0]:
            return copy, outcome
        if first is None:
            first = (copy, outcome)
            if copy is None:
                break
    assert first is not None
    return first
