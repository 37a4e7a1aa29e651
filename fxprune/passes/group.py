"""Dependency analysis: run every node's rule, then solve the stated ties into channel groups.

Ops without a rule: an op can only be wrong for pruning where it touches channels that some op produces.
Which values carry such channels is known once every tie is solved, so an op without a rule is pinned
first and becomes an :class:`~fxprune.errors.UnsupportedOpError` only when one of its inputs or outputs is
tied to a produced channel (or it is a module with weights): mask and position arithmetic (comparisons,
``cumsum`` over positions, ``diff``, ``outer`` of ``arange`` s, logical ops on masks) needs no rule, and a
genuinely unknown op on a channel-carrying value still raises. With ``unknown_ops="block"`` every group an
unknown op touches is kept instead.

Solving: all axes' positions form one index space; ties are edges; connected components (a vectorised
union-find in numpy) are *units* — sets of positions that must be removed together. Units that appear in
the same producer axis (a conv's output channels) form a *group*. Everything is linear in the number of
positions, so compile time grows linearly with depth.

The result, :class:`Analysis`, is stored under the ``groups`` meta key; it holds the frozen
:class:`~fxprune.ir.ChannelGroup` list and can turn a :class:`~fxprune.ir.Selection` into per-axis
keep masks for the rewrite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch.fx as fx

from .. import meta
from ..errors import ConfigError, UnsupportedOpError, node_location
from ..ir import ChannelGroup, ChannelRef, Constraint, Explicit, ParamSlice, Selection, Span, fit_index_map, merge_uniform
from ..meta import is_multi, shape_of
from ..pipeline import Context, Pass, PassResult
from ..rules import RULES, RuleTable
from ..rules.axes import components, submodule
from ..rules.base import AxisTable, RuleContext, is_state, op_key

__all__ = ["Analysis", "analyze_graph", "GroupChannels", "components"]

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    """Groups of a graph plus what the rewrite needs to map a selection to keep masks."""

    table: AxisTable
    labels: np.ndarray
    groups: tuple[ChannelGroup, ...]
    unit_labels: tuple[np.ndarray, ...]  # per group: component label of each unit
    notes: tuple[str, ...] = ()
    rules: RuleTable = RULES  # the table that produced the groups; the rewrite uses the same one

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def removed_labels(self, selection: Selection) -> np.ndarray:
        removed = np.zeros(len(self.labels), dtype=bool)
        for gid, kept in selection.keep:
            g = self.groups[gid]
            mask = np.ones(g.size, dtype=bool)
            mask[list(kept)] = False
            if g.pinned and mask[list(g.pinned)].any():
                bad = sorted(set(np.flatnonzero(mask).tolist()) & set(g.pinned))
                raise ConfigError(f"selection removes pinned units {bad[:5]} of group {gid}")
            if g.blocked and mask.any():
                raise ConfigError(f"selection prunes blocked group {gid} ({g.blocked})")
            removed[self.unit_labels[gid][mask]] = True
        return removed

    def keep_fn(self, selection: Selection) -> Callable[[tuple], np.ndarray | None]:
        """``keep_of(axis key)``: the keep mask of that axis under ``selection``, or None if it keeps all.
        The rewrite, the class copy and the post-passes ask for the same selection: made once per selection."""
        return self._keep(selection)[0]

    def changed_tensors(self, selection: Selection) -> frozenset[str]:
        """Names of the parameters and buffers of which some dim loses positions under ``selection``."""
        return self._keep(selection)[1]

    def _keep(self, selection: Selection) -> tuple[Callable[[tuple], np.ndarray | None], frozenset[str]]:
        memo = self.__dict__.get("_keep_memo")
        if memo is not None and (memo[0] is selection or memo[0] == selection):
            return memo[1]
        gone = self.removed_labels(selection)[self.labels]  # per element: is its unit removed
        axes = self.table.axes
        bases, params = self.table.layout()
        # the axes holding a removed element (every other axis keeps all: None); axes tile the element space
        hit = np.logical_or.reduceat(gone, bases) if len(bases) else np.zeros(0, dtype=bool)
        touched = set(bases[hit].tolist())

        def keep_of(key: tuple) -> np.ndarray | None:
            ax = axes.get(key)
            if ax is None or not ax.size or ax.base not in touched:
                return None
            return ~gone[ax.base : ax.base + ax.size]

        changed = frozenset(name for i, name in params if hit[i])
        self.__dict__["_keep_memo"] = (selection, (keep_of, changed))
        return keep_of, changed

    def describe(self, prunable_only: bool = False) -> str:
        gs = self.prunable if prunable_only else self.groups
        return "\n".join(g.describe() for g in gs)


def _tensors_in(x: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(x, lambda n: out.append(n))
    return out


def _run_rules(gm: fx.GraphModule, rules: RuleTable, unknown: str, table: AxisTable,
               deferred: list[fx.Node]) -> list[str]:
    notes: list[str] = []
    attrs: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if shape_of(node) is not None:
                rc = RuleContext(table, gm, node, "input")
                for ax in rc.all_dims(node):
                    rc.pin(ax, "network input")
            continue
        if node.op == "output":
            rc = RuleContext(table, gm, node, "output")
            for x in _tensors_in(node.args):
                tm = x.meta.get("tensor_meta")
                if is_multi(tm):
                    for i, t in enumerate(tm):
                        if t is not None:
                            for ax in rc.all_dims(x, i):
                                rc.pin(ax, "network output")
                elif tm is not None:
                    for ax in rc.all_dims(x):
                        rc.pin(ax, "network output")
            continue
        if node.op == "get_attr":
            attrs.append(node)  # tied after every rule ran (a rule may give a parameter dim a grouped view)
            continue
        rule = rules.lookup(gm, node)
        if rule is None:
            key = op_key(gm, node)
            if unknown == "error":
                # an op without a rule is an error only where it can touch a pruned channel, which is known once
                # every tie is solved (analyze_graph); until then its dims are pinned
                _pin_node(gm, node, table, f"no rule for {key} at node '{node.name}'")
                deferred.append(node)
                continue
            _block_node(gm, node, table, f"no rule for {key} at node '{node.name}'")
            notes.append(f"blocked at {node.name}: no rule for {key}")
            continue
        rc = RuleContext(table, gm, node, rule.name)
        try:
            rule.analyze(node, rc)
        except UnsupportedOpError:
            raise
        except Exception as exc:
            key = op_key(gm, node)
            if unknown == "error":
                err = UnsupportedOpError(
                    node, key, f"rule '{rule.name}' cannot handle this call ({type(exc).__name__}: {exc})",
                    "register a more specific rule for this op, or fxprune.compile(..., unknown_ops='block')",
                )
                raise err from exc
            _block_node(gm, node, table, f"rule {rule.name} failed at '{node.name}': {exc}")
            notes.append(f"blocked at {node.name}: rule {rule.name} failed: {exc}")
            continue
        rc.finish()
    for node in attrs:
        _tie_attribute(gm, node, table)
    return notes


def _tie_attribute(gm: fx.GraphModule, node: fx.Node, table: AxisTable) -> None:
    """A ``get_attr`` value is its parameter/buffer, dim for dim (a constant tensor attribute is pinned); a
    dim a rule gave a grouped view is left to that rule, and a role a rule stated is kept."""
    rc = RuleContext(table, gm, node, "get_attr")
    shp = shape_of(node)
    if shp is None:
        return
    qual = str(node.target)
    state = is_state(gm, qual)
    for d in range(len(shp)):
        if not state:
            rc.pin(rc.out(d), "constant tensor attribute")
            continue
        key = ("p", qual, d)
        ax = table.axes.get(key)
        if ax is None:
            ax = rc.param(qual, d, "other")
        elif ax.size != shp[d]:
            continue  # a grouped view (see fxprune.rules.conv)
        rc.tie(rc.out(d), ax)


def _node_axes(rc: RuleContext, node: fx.Node) -> list[Any]:
    """Every axis of ``node``'s tensor inputs and outputs."""
    out = []
    for x in [*rc.tensor_args(), node]:
        tm = x.meta.get("tensor_meta")
        for i in (list(range(len(tm))) if is_multi(tm) else [None]):
            if shape_of(x, i) is not None:
                out += rc.all_dims(x, i)
    return out


def _pin_node(gm: fx.GraphModule, node: fx.Node, table: AxisTable, reason: str) -> None:
    rc = RuleContext(table, gm, node, "unknown")
    for ax in _node_axes(rc, node):
        rc.pin(ax, reason)


def _carries_channels(gm: fx.GraphModule, node: fx.Node, table: AxisTable, labels: np.ndarray,
                      produced: np.ndarray) -> bool:
    """Whether some dim of ``node``'s inputs or outputs is tied to channels some op produces."""
    rc = RuleContext(table, gm, node, "unknown")
    if node.op == "call_module" and any(True for _ in submodule(gm, node.target).parameters()):
        return True  # a layer with weights of its own
    return any(produced[labels[ax.ids()]].any() for ax in _node_axes(rc, node))


def _block_node(gm: fx.GraphModule, node: fx.Node, table: AxisTable, reason: str) -> None:
    rc = RuleContext(table, gm, node, "blocked")
    where = node_location(node)
    full = reason + (f" ({where.splitlines()[0]})" if where else "")
    for x in [*rc.tensor_args(), node]:
        tm = x.meta.get("tensor_meta")
        idxs = list(range(len(tm))) if is_multi(tm) else [None]
        for i in idxs:
            if shape_of(x, i) is not None:
                for ax in rc.all_dims(x, i):
                    rc.pin(ax, full, block_group=True)
    if node.op == "call_module":  # its parameters cannot shrink either
        for pname, p in submodule(gm, node.target).named_parameters():
            for d in range(p.dim()):
                rc.pin(rc.param(f"{node.target}.{pname}", d, "other"), full, block_group=True)


def analyze_graph(
    gm: fx.GraphModule,
    rules: RuleTable = RULES,
    unknown: str = "error",
    ignore: Iterable[str] = (),
    allow_lossy: bool = False,
) -> Analysis:
    """Group the coupled channels of ``gm`` (whose nodes must carry ``tensor_meta``)."""
    if unknown not in ("error", "block"):
        raise ConfigError(f"unknown_ops must be 'error' or 'block', got {unknown!r}")
    table = AxisTable()
    deferred: list[fx.Node] = []
    notes = _run_rules(gm, rules, unknown, table, deferred)
    ignore = list(ignore)
    if ignore:
        for key in list(table.axes):
            if key[0] == "p" and any(key[1].startswith(m + ".") for m in ignore):
                table.pins.append((table.axes[key].ids(), f"ignored module {key[1].rpartition('.')[0]}", True))
    n = table.n
    labels = table.labels()
    if deferred:
        produced = np.zeros(n, dtype=bool)
        for key, _ in table.producers:
            ax = table.axes[key]
            produced[labels[ax.base : ax.base + ax.size]] = True
        for node in deferred:
            if _carries_channels(gm, node, table, labels, produced):
                raise rules.missing(gm, node)
        log.debug("ops without a rule on values that carry no channels (pinned): %s", [d.name for d in deferred])
    analysis = _build_groups(table, labels, allow_lossy, tuple(notes))
    analysis.rules = rules
    return analysis


def _merge_groups(gids: np.ndarray, group_of: np.ndarray, unit_lists: list[list[int]]) -> int:
    """Merge the groups ``gids`` into the first; returns its id."""
    gid = int(gids[0])
    for other in (int(o) for o in gids[1:] if int(o) != gid):
        group_of[unit_lists[other]] = gid
        unit_lists[gid].extend(unit_lists[other])
        unit_lists[other] = []
    return gid


def _build_groups(table: AxisTable, labels: np.ndarray, allow_lossy: bool, notes: tuple[str, ...]) -> Analysis:
    n = len(labels)
    # label -> group via producers: units sharing a producer axis are one group
    group_of = np.full(n, -1, dtype=np.int64)
    unit_of = np.full(n, -1, dtype=np.int64)
    unit_lists: list[list[int]] = []
    roots: list[str] = []
    # union groups that share a label (a unit appearing in two producers merges their groups)
    for key, root in table.producers:
        ax = table.axes[key]
        labs = labels[ax.base : ax.base + ax.size]
        uniq, first = np.unique(labs, return_index=True)
        uniq = uniq[np.argsort(first)]  # in position order
        known = group_of[uniq]
        gids = np.unique(known[known >= 0])
        if len(gids) == 0:
            gid = len(unit_lists)
            unit_lists.append([])
            roots.append(root)
        else:
            gid = _merge_groups(gids, group_of, unit_lists)
        new = uniq[group_of[uniq] < 0]
        group_of[new] = gid
        unit_lists[gid].extend(new.tolist())
    for key, c in table.constraints:  # conv groups over a concat mix channel groups: select those as one
        if c.kind == "uniform":
            ax = table.axes[key]
            gids = np.unique(group_of[labels[ax.base : ax.base + ax.size]])
            if len(gids[gids >= 0]) > 1:
                _merge_groups(gids[gids >= 0], group_of, unit_lists)
    # compact away merged-empty groups
    live = [g for g in range(len(unit_lists)) if unit_lists[g]]
    remap = np.full(len(unit_lists) + 1, -1, dtype=np.int64)
    for new_id, g in enumerate(live):
        remap[g] = new_id
        unit_of[np.asarray(unit_lists[g], dtype=np.int64)] = np.arange(len(unit_lists[g]))
    group_of = remap[group_of]  # remap[-1] (no group) is -1
    unit_lists = [unit_lists[g] for g in live]
    roots = [roots[g] for g in live]
    ng = len(unit_lists)

    # pins, blocks, lossy reasons per label
    pinned = np.zeros(n, dtype=bool)
    pin_reason: dict[int, str] = {}
    block_reason: dict[int, str] = {}
    hit = np.zeros(len(table.pins), dtype=bool)  # most pins hold spatial/token dims of no group: find the others
    if table.pins:
        pin_labs = labels[np.concatenate([ids for ids, _, _ in table.pins])]
        pinned[pin_labs] = True
        lens = np.array([len(ids) for ids, _, _ in table.pins], dtype=np.int64)
        full = lens > 0
        if full.any():
            hit[full] = np.maximum.reduceat(group_of[pin_labs], (np.cumsum(lens) - lens)[full]) >= 0
    for i in np.flatnonzero(hit):
        ids, reason, block = table.pins[i]
        for g in np.unique(group_of[labels[ids]]):
            if g >= 0:
                pin_reason.setdefault(int(g), reason)
                if block:
                    block_reason.setdefault(int(g), reason)
    lossy_reason: dict[int, str] = {}
    for ids, reason, pin_unless_allowed in table.lossy:
        labs = labels[ids]
        if pin_unless_allowed and not allow_lossy:  # an op that reads these channels: they stay
            pinned[labs] = True
            for g in np.unique(group_of[labs]):
                if g >= 0:
                    pin_reason.setdefault(int(g), f"{reason} (pass allow_lossy=True to prune through it)")
            continue
        for g in np.unique(group_of[labs]):
            if g >= 0:
                lossy_reason.setdefault(int(g), reason)

    # members: every axis position that belongs to a group. Per axis (vectorised over all axes at once):
    # does any element belong to a group, and is the whole axis one group with position i = unit i?
    members: list[list[Any]] = [[] for _ in range(ng)]
    params: list[list[ParamSlice]] = [[] for _ in range(ng)]
    elem_group = group_of[labels]
    axes = [table.axes[key] for key in table.order if table.axes[key].size]
    if axes:
        sizes = np.array([ax.size for ax in axes], dtype=np.int64)
        starts = np.array([ax.base for ax in axes], dtype=np.int64)
        identity = unit_of[labels] == np.arange(n, dtype=np.int64) - np.repeat(starts, sizes)
        g_lo = np.minimum.reduceat(elem_group, starts)
        g_hi = np.maximum.reduceat(elem_group, starts)
        whole = np.logical_and.reduceat(identity, starts) & (g_lo == g_hi)
    spans: dict[int, Span] = {}
    for i, ax in enumerate(axes):
        if g_hi[i] < 0:
            continue
        key = ax.key
        g0 = int(g_lo[i])
        if whole[i] and len(unit_lists[g0]) == ax.size:  # the common case: position i is unit i of one group
            span = spans.get(ax.size) or spans.setdefault(ax.size, Span(0, ax.size))
            if key[0] == "p":
                info = table.params[key]
                params[g0].append(ParamSlice(key[1], key[2], span, info.role, info.groups, info.is_buffer, None))
            elif key[0] == "a":
                members[g0].append(ChannelRef(key[1], key[3], span, key[2], None))
            continue
        eg = elem_group[ax.base : ax.base + ax.size]
        el = labels[ax.base : ax.base + ax.size]
        for g in np.unique(eg[eg >= 0]):
            g = int(g)
            pos = np.flatnonzero(eg == g)
            units = unit_of[el[pos]]
            order = np.argsort(units, kind="stable")
            pos, units = pos[order], units[order]
            uu, counts = np.unique(units, return_counts=True)
            if (counts == counts[0]).all():
                span = fit_index_map(pos.reshape(len(uu), counts[0]))
            else:
                splits = np.split(pos, np.cumsum(counts)[:-1])
                span = Explicit(tuple(tuple(int(p) for p in s) for s in splits))
            unit_field = None if (len(uu) == len(unit_lists[g]) and (uu == np.arange(len(uu))).all()) else tuple(
                int(x) for x in uu
            )
            if key[0] == "p":
                info = table.params[key]
                params[g].append(ParamSlice(key[1], key[2], span, info.role, info.groups, info.is_buffer, unit_field))
            elif key[0] == "a":
                members[g].append(ChannelRef(key[1], key[3], span, key[2], unit_field))

    # constraints
    cons: list[list[Constraint]] = [[] for _ in range(ng)]
    for key, c in table.constraints:
        ax = table.axes[key]
        el = labels[ax.base : ax.base + ax.size]
        eg = group_of[el]
        if c.kind == "uniform":
            nb = c.value
            size = ax.size // nb
            block_of = np.arange(ax.size) // size if size else np.full(ax.size, nb)  # nb: in no block
            units = unit_of[el]
            for g in np.unique(eg[eg >= 0]):
                g = int(g)
                sel = (eg == g) & (block_of < nb)
                # the group's units in each block, sorted and without repeats: (block, unit) pairs, sorted
                stride = int(units[sel].max()) + 1 if sel.any() else 1
                pairs = np.unique(block_of[sel] * stride + units[sel])
                in_block, unit = np.divmod(pairs, stride)
                unit = unit.tolist()
                if len(set(unit)) != len(unit):
                    block_reason.setdefault(g, f"units span several blocks of constraint {c.origin}")
                    continue
                ends = np.cumsum(np.bincount(in_block, minlength=nb)).tolist()
                blocks = tuple(tuple(unit[a:b]) for a, b in zip([0] + ends[:-1], ends))
                cons[g].append(Constraint("uniform", nb, c.origin, blocks))
        else:
            for g in np.unique(eg[eg >= 0]):
                cons[int(g)].append(c)

    groups = []
    unit_labels = []
    for g in range(ng):
        labs = np.asarray(unit_lists[g], dtype=np.int64)
        pin_units = tuple(np.flatnonzero(pinned[labs]).tolist())
        blocked = block_reason.get(g, "")
        lossy = lossy_reason.get(g, "")
        if lossy and not allow_lossy and not blocked:
            blocked = f"{lossy}; pass allow_lossy=True to prune it anyway"
        if not blocked and len(pin_units) == len(labs):
            blocked = f"all channels pinned: {pin_reason.get(g, '')}"
        c = merge_uniform(cons[g])
        if isinstance(c, str):
            blocked = blocked or c
            c = ()
        groups.append(
            ChannelGroup(
                id=g,
                size=len(labs),
                channels=tuple(members[g]),
                params=tuple(params[g]),
                constraints=c,
                blocked=blocked,
                lossy=lossy if allow_lossy else "",
                root=roots[g],
                pinned=pin_units,
                pin_reason=pin_reason.get(g, "") if pin_units else "",
            )
        )
        unit_labels.append(labs)
    return Analysis(table, labels, tuple(groups), tuple(unit_labels), notes)


@dataclass(frozen=True)
class GroupChannels(Pass):
    """Analysis pass: writes ``groups``.

    ``unknown_ops``: ``"error"`` (default) raises on an op without a rule; ``"block"`` keeps every channel
    it touches and records why. ``ignore``: module names whose channels all stay. ``allow_lossy``: prune
    through GroupNorm/LayerNorm over channels (not exactly lossless; reported).
    """

    name: ClassVar[str] = "group"
    reads: ClassVar[tuple[str, ...]] = ("shapes",)
    writes: ClassVar[tuple[str, ...]] = ("groups",)

    unknown_ops: str = "error"
    ignore: tuple[str, ...] = ()
    allow_lossy: bool = False
    rules: RuleTable | None = None

    def __post_init__(self) -> None:
        if self.unknown_ops not in ("error", "block"):
            raise ConfigError(f"unknown_ops must be 'error' or 'block', got {self.unknown_ops!r}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis = analyze_graph(gm, self.rules or RULES, self.unknown_ops, tuple(self.ignore), self.allow_lossy)
        meta.put(gm, "groups", analysis)
        ctx.notes.extend(analysis.notes)
        return PassResult(gm, False, {"groups": len(analysis.groups), "prunable": len(analysis.prunable)})
