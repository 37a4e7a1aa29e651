"""Axes and the facts rules state about them: :class:`Axis`, :class:`AxisTable` (every axis of a graph and
every tie, pin, producer, constraint and lossy mark) and :class:`RuleContext` (what a rule sees while it
analyses one node). See :mod:`fxprune.rules.base` for the rule protocol these serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..ir import Constraint
from ..meta import is_multi, shape_of

__all__ = ["Axis", "AxisTable", "components", "ParamInfo", "RuleContext", "op_key", "lookup_tensor", "is_state", "tied_names", "submodule"]


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected-component label (smallest member id) of each of ``n`` elements, edges ``u[i]–v[i]``."""
    parent = np.arange(n, dtype=np.int64)
    if len(u) == 0:
        return parent
    while True:
        pu, pv = parent[u], parent[v]
        diff = pu != pv
        if not diff.any():
            return parent
        lo = np.minimum(pu[diff], pv[diff])
        hi = np.maximum(pu[diff], pv[diff])
        np.minimum.at(parent, hi, lo)
        while True:  # pointer jumping until every element points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


@dataclass(frozen=True)
class Axis:
    """One dim of a tensor/parameter: ``key`` identifies it, elements ``base .. base+size-1``."""

    key: tuple
    base: int
    size: int

    def ids(self, idx: np.ndarray | None = None) -> np.ndarray:
        if idx is None:
            return np.arange(self.base, self.base + self.size, dtype=np.int64)
        return self.base + np.asarray(idx, dtype=np.int64)


@dataclass
class ParamInfo:
    """Role of a parameter dim (``"out"``, ``"in"``, ``"norm"``, ``"other"``); ``groups > 1`` marks a grouped
    view (the dim addressed ``groups`` times over, see the module docstring)."""

    role: str
    groups: int = 1
    is_buffer: bool = False


def tied_names(module: nn.Module) -> list[tuple[str, ...]]:
    """The names of every parameter or buffer of ``module`` that is one tensor under several names (tied
    weights: an embedding that is also the output head), one tuple per tensor, in registration order."""
    by_id: dict[int, list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(t), []).append(name)
    return [tuple(names) for names in by_id.values() if len(names) > 1]


class AxisTable:
    """Every axis of a graph and every fact rules stated about their elements."""

    def __init__(self) -> None:
        self.axes: dict[tuple, Axis] = {}
        self.order: list[tuple] = []
        self.n = 0
        self.eye: list[tuple[int, int, int]] = []  # identity ties: (base_a, base_b, size)
        self.maps: list[tuple[np.ndarray, np.ndarray]] = []  # general ties
        self.pins: list[tuple[np.ndarray, str, bool]] = []  # (element ids, reason, blocks whole group)
        self.producers: list[tuple[tuple, str]] = []  # (axis key, root name)
        self.constraints: list[tuple[tuple, Constraint]] = []
        self.lossy: list[tuple[np.ndarray, str, bool]] = []  # (element ids, reason, pinned unless allowed)
        self.params: dict[tuple, ParamInfo] = {}
        self.live: set[tuple] = set()
        self._aliases: dict[str, tuple[str, ...]] | None = None
        self._tied: list[tuple[str, ...]] | None = None
        self._layout: tuple[np.ndarray, list[tuple[int, str]]] | None = None

    def aliases(self, gm: fx.GraphModule, qualname: str) -> tuple[str, ...]:
        """The other names of the tensor ``qualname`` in ``gm`` (tied weights: an embedding that is also
        the output head), computed once per table."""
        if self._aliases is None:
            self._aliases = {n: tuple(x for x in names if x != n) for names in self.tied(gm) for n in names}
        return self._aliases.get(qualname, ())

    def tied(self, gm: fx.GraphModule) -> list[tuple[str, ...]]:
        """:func:`tied_names` of ``gm`` (the graph this table describes), computed once."""
        if self._tied is None:
            self._tied = tied_names(gm)
        return self._tied

    def axis(self, key: tuple, size: int) -> Axis:
        ax = self.axes.get(key)
        if ax is None:
            ax = Axis(key, self.n, int(size))
            self.axes[key] = ax
            self.order.append(key)
            self.n += int(size)
            self._layout = None
        elif ax.size != size:
            raise ValueError(f"axis {key} registered with size {ax.size}, now {size}")
        return ax

    def layout(self) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """The first element of every non-empty axis, ascending (axes are laid out one after another, so
        consecutive bases delimit them), and ``(position in it, tensor name)`` of the parameter axes."""
        if self._layout is None:
            keys = [key for key, ax in self.axes.items() if ax.size]  # registration order: ascending bases
            bases = np.array([self.axes[k].base for k in keys], dtype=np.int64)
            self._layout = (bases, [(i, k[1]) for i, k in enumerate(keys) if k[0] == "p"])
        return self._layout

    def labels(self) -> np.ndarray:
        """The connected-component label (smallest member id) of every element under the table's ties.

        Most ties are identities between two whole axes of one size (an element-wise op, a norm): those are
        joined per axis first (a union-find over axes), each element renamed to the same position of its
        set's first axis; only the remaining ties (slices, index maps) go to the element-level
        :func:`components`, over just the elements they touch. The labels equal ``components`` over every
        tie (the smallest member of a component is always its first axis' element)."""
        size_at = {ax.base: ax.size for ax in self.axes.values() if ax.size}
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while x in parent:
                nxt = parent[x]
                if nxt in parent:
                    parent[x] = parent[nxt]  # path halving
                x = nxt
            return x

        rest_u: list[np.ndarray] = []
        rest_v: list[np.ndarray] = []
        for a, b, s in self.eye:
            if not s:
                continue
            if size_at.get(a) == s and size_at.get(b) == s:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            else:
                rest_u.append(np.arange(a, a + s, dtype=np.int64))
                rest_v.append(np.arange(b, b + s, dtype=np.int64))
        for u, v in self.maps:
            rest_u.append(u)
            rest_v.append(v)
        axes = [self.axes[k] for k in self.order]
        shift = np.repeat(np.array([find(ax.base) - ax.base if ax.size else 0 for ax in axes], dtype=np.int64),
                          np.array([ax.size for ax in axes], dtype=np.int64))
        rename = np.arange(self.n, dtype=np.int64) + shift
        if not rest_u:
            return rename
        u, v = rename[np.concatenate(rest_u)], rename[np.concatenate(rest_v)]
        touched, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
        lab = components(len(touched), inv[: len(u)], inv[len(u):])
        label_of = np.arange(self.n, dtype=np.int64)
        label_of[touched] = touched[lab]
        return label_of[rename]

    def groups_of(self, qualname: str, dim: int) -> int:
        info = self.params.get(("p", qualname, dim))
        return info.groups if info is not None else 1


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` through the ``_modules`` tables directly (several times cheaper: analysis
    and rewrite look a module up for every node); ``get_submodule`` itself raises the error for a bad path."""
    if not path:
        return root
    m = root
    try:
        for part in path.split("."):
            m = m._modules[part]
    except (KeyError, AttributeError):
        return root.get_submodule(path)
    if m is None:
        return root.get_submodule(path)
    return m


def op_key(gm: fx.GraphModule, node: fx.Node) -> str:
    """Human-readable op identity: module type, function qualname or method name."""
    if node.op == "call_module":
        return f"module {type(submodule(gm, node.target)).__qualname__}"
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        return f"function {mod + '.' if mod else ''}{getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return node.op


def lookup_tensor(gm: nn.Module, qualname: str) -> tuple[torch.Tensor, bool]:
    """``(tensor, is_buffer)`` of the parameter, buffer or tensor attribute ``qualname`` of ``gm``."""
    mod_name, _, attr = qualname.rpartition(".")
    mod = submodule(gm, mod_name)
    if attr in mod._parameters:
        return mod._parameters[attr], False
    if attr in mod._buffers:
        return mod._buffers[attr], True
    t = getattr(mod, attr)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{qualname} is not a tensor")
    return t, False


def is_state(gm: nn.Module, qualname: str) -> bool:
    """Whether ``qualname`` names a registered parameter or buffer (not a plain tensor attribute)."""
    owner, _, attr = qualname.rpartition(".")
    try:
        mod = submodule(gm, owner)
    except AttributeError:
        return False
    return attr in mod._parameters or attr in mod._buffers


class RuleContext:
    """What a rule sees while analysing one node."""

    def __init__(self, table: AxisTable, gm: fx.GraphModule, node: fx.Node, rule_name: str) -> None:
        self.table = table
        self.gm = gm
        self.node = node
        self.rule_name = rule_name
        self.touched: set[tuple] = set()

    # -- looking at the node --------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return submodule(self.gm, self.node.target)

    @property
    def module_name(self) -> str:
        return str(self.node.target)

    def arg(self, pos: int, name: str | None = None, default: Any = None) -> Any:
        """Positional-or-keyword argument of the node (fx keeps call arguments as written)."""
        if pos is not None and pos < len(self.node.args):
            return self.node.args[pos]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def shape(self, x: Any, index: int | None = None) -> tuple[int, ...] | None:
        return shape_of(x, index) if isinstance(x, fx.Node) else None

    def out_shape(self, index: int | None = None) -> tuple[int, ...] | None:
        return shape_of(self.node, index)

    def is_tensor(self, x: Any) -> bool:
        return isinstance(x, fx.Node) and shape_of(x) is not None

    def tensor_args(self) -> list[fx.Node]:
        seen: list[fx.Node] = []
        for x in self.node.all_input_nodes:
            if shape_of(x) is not None and x not in seen:
                seen.append(x)
        return seen

    # -- axes -----------------------------------------------------------------------------------
    def act(self, x: fx.Node, dim: int, index: int | None = None) -> Axis:
        if dim >= 0:  # most activation axes were registered by an earlier node: no shape needed
            ax = self.table.axes.get(("a", x.name, index, dim))
            if ax is not None:
                self.touched.add(ax.key)
                return ax
        shp = shape_of(x, index)
        if shp is None:
            raise ValueError(f"{x} has no tensor shape")
        d = dim % len(shp)
        return self._mark(self.table.axis(("a", x.name, index, d), shp[d]))

    def out(self, dim: int, index: int | None = None) -> Axis:
        return self.act(self.node, dim, index)

    def param(self, qualname: str, dim: int, role: str, groups: int = 1) -> Axis:
        """Axis of a parameter or buffer dim (by qualified name in the traced module) in a given role;
        ``groups > 1``: the grouped view of the dim (``groups`` times its length)."""
        t, is_buffer = lookup_tensor(self.gm, qualname)
        d = dim % t.dim()
        key = ("p", qualname, d)
        ax = self.table.axis(key, t.shape[d] * groups)
        new = key not in self.table.params
        self.table.params[key] = ParamInfo(role, groups, is_buffer)
        if new and groups == 1:  # a tied tensor keeps the same positions under each of its names
            for alias in self.table.aliases(self.gm, qualname):
                other = self.table.axes.get(("p", alias, d)) if ("p", alias, d) in self.table.params else \
                    self.param(alias, d, role)
                if other is not None and other.size == ax.size:
                    self.tie(ax, other)
        return self._mark(ax)

    def virtual(self, tag: str, size: int) -> Axis:
        return self._mark(self.table.axis(("v", self.node.name, tag), size))

    def _mark(self, ax: Axis) -> Axis:
        self.touched.add(ax.key)
        return ax

    # -- facts ----------------------------------------------------------------------------------
    def tie(self, a: Axis, b: Axis) -> None:
        if a.size != b.size:
            raise ValueError(f"{self.rule_name}: cannot tie {a.key} (size {a.size}) to {b.key} (size {b.size})")
        self._mark(a), self._mark(b)
        if a.key != b.key:
            self.table.eye.append((a.base, b.base, a.size))
            self._share_live(a, b)

    def tie_map(self, a: Axis, a_idx: np.ndarray, b: Axis, b_idx: np.ndarray) -> None:
        """Tie ``a[a_idx[k]]`` with ``b[b_idx[k]]`` for every k."""
        self._mark(a), self._mark(b)
        self.table.maps.append((a.ids(a_idx), b.ids(b_idx)))
        self._share_live(a, b)

    def tie_slice(self, big: Axis, offset: int, small: Axis) -> None:
        self._mark(big), self._mark(small)
        if offset + small.size > big.size:
            raise ValueError(f"{self.rule_name}: slice {offset}+{small.size} exceeds {big.key}")
        self.table.eye.append((big.base + offset, small.base, small.size))
        self._share_live(big, small)

    def tie_product(self, merged: Axis, factors: Sequence[Axis], prefer: int | None = None) -> None:
        """``merged`` is the row-major product of ``factors`` (a flatten, or a view splitting a dim).

        The channel identity of a merged position follows ONE factor; the others are pinned (kept
        whole), which is exactly right when they are spatial/token dims. The factor chosen is the
        outermost one that already carries channels (live), else ``prefer``, else the outermost
        non-trivial one (attention heads when splitting E into (H, d)).
        """
        self._mark(merged)
        for f in factors:
            self._mark(f)
        sizes = [f.size for f in factors]
        if int(np.prod(sizes)) != merged.size:
            raise ValueError(f"{self.rule_name}: product {sizes} != {merged.size}")
        nontrivial = [i for i, s in enumerate(sizes) if s > 1]
        if not nontrivial:
            self.pin(merged, "size-1 dims")
            return
        live = [i for i in nontrivial if factors[i].key in self.table.live]
        if len(live) == 1 or (live and (prefer is None or prefer not in live)):
            chosen = live[0]
        elif live:
            chosen = prefer
        elif prefer is not None and prefer in nontrivial:
            chosen = prefer
        else:
            chosen = nontrivial[0]
        inner = int(np.prod(sizes[chosen + 1 :]))
        f = factors[chosen]
        # merged position p = outer*(f.size*inner) + i*inner + b  ->  factor index i
        pos = np.arange(merged.size, dtype=np.int64)
        self.table.maps.append((merged.ids(), f.ids((pos // inner) % f.size)))
        self._share_live(merged, f)
        for i in nontrivial:
            if i != chosen:
                self.pin(factors[i], f"reshape merges it with another channel dim (node {self.node.name})")

    def produce(self, a: Axis, root: str | None = None) -> None:
        self._mark(a)
        self.table.producers.append((a.key, root or self._default_root()))
        self.table.live.add(a.key)

    def pin(self, a: Axis, reason: str, block_group: bool = False, idx: np.ndarray | None = None) -> None:
        """These positions of ``a`` must stay; ``block_group`` also blocks every group touching them."""
        self._mark(a)
        self.table.pins.append((a.ids(idx), reason, block_group))

    def free(self, a: Axis) -> None:
        """Declare that this op does not constrain ``a`` (e.g. ``x.size()`` reads only the shape)."""
        self._mark(a)

    def constrain(self, a: Axis, c: Constraint) -> None:
        self._mark(a)
        self.table.constraints.append((a.key, c))

    def lossy(self, a: Axis, reason: str, pin_unless_allowed: bool = False) -> None:
        """Removing positions of ``a`` is not exactly lossless (statistics over them). The group is blocked
        unless ``allow_lossy=True``; with ``pin_unless_allowed`` only these positions are pinned instead
        (the rest of the group stays prunable), as for any op that reads them."""
        self._mark(a)
        self.table.lossy.append((a.ids(), reason, pin_unless_allowed))

    def is_live(self, a: Axis) -> bool:
        """Whether ``a`` already carries channels of some producer (as far as the graph was read)."""
        return a.key in self.table.live

    def _share_live(self, a: Axis, b: Axis) -> None:
        live = self.table.live
        if a.key in live or b.key in live:
            live.add(a.key)
            live.add(b.key)

    def _default_root(self) -> str:
        return str(self.node.target) if self.node.op == "call_module" else self.node.name

    # -- helpers used by many rules -----------------------------------------------------------------
    def all_dims(self, x: fx.Node, index: int | None = None) -> list[Axis]:
        shp = shape_of(x, index)
        return [] if shp is None else [self.act(x, d, index) for d in range(len(shp))]

    def tie_same_shape(self, x: fx.Node, index: int | None = None) -> None:
        """Output dims == input dims one to one (unary element-wise ops)."""
        for a, b in zip(self.all_dims(x), self.all_dims(self.node, index), strict=True):
            self.tie(a, b)

    def tie_broadcast(self, inputs: Iterable[Any]) -> None:
        """Broadcasting element-wise op: align dims from the right; size-1 (broadcast) dims stay free."""
        out = self.out_shape()
        outs = self.all_dims(self.node)
        for x in inputs:
            shp = self.shape(x)
            if shp is None:
                continue
            for k in range(1, len(shp) + 1):
                a = self.act(x, -k)
                if shp[-k] == out[-k]:
                    self.tie(a, outs[-k])
                elif shp[-k] == 1:
                    # a broadcast dim must stay size 1 (it may be a slice of a prunable dim: x[:, :1])
                    self.pin(a, "broadcast dim")

    def finish(self) -> None:
        """Pin every input/output dim the rule did not mention (never guess)."""
        todo: list[tuple[fx.Node, int | None]] = [(x, None) for x in self.tensor_args()]
        tm = self.node.meta.get("tensor_meta")
        if is_multi(tm):
            todo += [(self.node, i) for i in range(len(tm)) if tm[i] is not None]
        elif tm is not None:
            todo.append((self.node, None))
        for x, index in todo:
            shp = shape_of(x, index)
            for d in range(len(shp)):
                key = ("a", x.name, index, d)
                if key not in self.touched:
                    ax = self.table.axis(key, shp[d])
                    self.table.pins.append((ax.ids(), f"{self.rule_name} does not map dim {d} of {x.name}", False))
