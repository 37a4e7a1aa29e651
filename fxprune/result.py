"""What a compile returns: the report (params and MACs before/after, a per-layer width table, what was kept
and why) and :class:`CompileResult` (the new module, the report, the traced original, the groups, the
selection, the pipeline, and the facts the passes left).

The report's layer types come from the op families (:meth:`fxprune.rules.base.Rule.layer_kind`): a layer reads
``Linear``, ``Conv2d`` or ``LlamaRMSNorm`` on every front end, also where torch.export leaves only plain
``nn.Module`` containers behind. ``repr(result)`` is one line; ``print(result.report)`` the full table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .flops import Cost, module_owner
from .ir import ChannelGroup, Selection
from .pipeline import Context, Pipeline
from .rules import RULES, RuleTable

__all__ = ["LayerRow", "LayerRows", "Report", "CompileResult", "build_report", "merge_reports", "layer_kinds"]


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    macs_before: int
    macs_after: int


class LayerRows(Sequence[LayerRow]):
    """The report's layer table, made on first use: ``rows`` are ``(name, class name, shape before, shape
    after, MACs before, MACs after)``; the op families name each layer's type from ``gm`` then. Compares,
    pickles and copies as the tuple of its rows."""

    def __init__(self, gm: fx.GraphModule, rules: RuleTable, rows: list[tuple]) -> None:
        self._make: tuple | None = (gm, rules, rows)
        self._rows: tuple[LayerRow, ...] = ()

    def _all(self) -> tuple[LayerRow, ...]:
        if self._make is not None:
            gm, rules, rows = self._make
            kinds = layer_kinds(gm, rules, {r[0] for r in rows})
            self._rows = tuple(LayerRow(r[0], kinds.get(r[0]) or r[1], *r[2:]) for r in rows)
            self._make = None
        return self._rows

    def __getitem__(self, i):  # type: ignore[override]
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self):
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        return self._all() == (other._all() if isinstance(other, LayerRows) else other)

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())

    def __reduce__(self):
        return tuple, (self._all(),)


@dataclass(frozen=True)
class Report:
    """Params and MACs before/after, plus a per-layer width table (``print(report)``)."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: Sequence[LayerRow] = ()  # a tuple, or the LayerRows of a compile
    groups_total: int = 0
    groups_pruned: int = 0
    blocked: tuple[tuple[str, str], ...] = ()  # (group root, reason) of groups that could not be pruned
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    batch: int = 1  # MACs are counted for one forward pass over the example inputs (this batch size)
    uncounted: tuple[str, ...] = ()  # modules the MACs counter has no formula for (MACs are a lower bound)
    #: what ``CompileResult.module`` is: "class LlamaForCausalLM" (the user's class, rebuilt) or "GraphModule"
    form: str = ""
    #: what the compile did materially less of than asked (nothing pruned, a criterion that could not score,
    #: a refit that did not run); non-empty means a FxpruneWarning was issued and the first line says so
    shortfall: tuple[str, ...] = ()

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def table(self, only_changed: bool = True) -> str:
        rows = [r for r in self.layers if (r.before != r.after or not only_changed)]
        w = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':<{w}}  {'type':<18} {'shape before':>20} → {'shape after':<20} {'MACs before':>12} → MACs after"]
        for r in rows:
            lines.append(
                f"{r.name:<{w}}  {r.kind:<18} {str(r.before):>20} → {str(r.after):<20} "
                f"{_h(r.macs_before):>12} → {_h(r.macs_after)}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (
            f"fxprune: params {_h(self.params_before)} → {_h(self.params_after)} "
            f"({self.params_after / max(self.params_before, 1):.1%}), MACs {_h(self.macs_before)} → "
            f"{_h(self.macs_after)} ({self.macs_after / max(self.macs_before, 1):.1%}, batch of {self.batch}); "
            f"{self.groups_pruned} of {self.groups_total} channel groups pruned in {self.seconds:.2f}s"
            + (f"; result: {self.form}" if self.form else "")
        )
        parts = [head, self.table()]
        if self.shortfall:
            parts.insert(0, "fxprune: did less than asked: " + "; ".join(self.shortfall))
        if self.uncounted:
            parts.append(f"MACs not counted for: {', '.join(self.uncounted[:10])}"
                         + (f" and {len(self.uncounted) - 10} more" if len(self.uncounted) > 10 else ""))
        if self.blocked:
            parts.append(f"{len(self.blocked)} channel group{'s' if len(self.blocked) > 1 else ''} kept whole:")
            parts += [f"  {root}: {why}" for root, why in self.blocked[:20]]
            if len(self.blocked) > 20:
                parts.append(f"  … and {len(self.blocked) - 20} more")
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)


def _h(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@dataclass
class CompileResult:
    """What :func:`compile` returns: the new module, the report, and everything needed to inspect it.

    ``module`` is what to keep: a copy of the user's own class with the pruned layers swapped in when that
    copy verifies against the graph result (``result="auto"``, see :mod:`fxprune.restore`), else the graph
    result. ``graph_module`` is always the graph result (a ``torch.fx.GraphModule``); the two share their
    parameters."""

    module: nn.Module
    report: Report
    original: fx.GraphModule
    analysis: Any
    selection: Selection
    pipeline: Pipeline
    context: Context
    #: hierarchical front end only: the compile result of each pruned region, by its path in the model
    regions: dict[str, "CompileResult"] = field(default_factory=dict)
    #: the facts the passes left (:mod:`fxprune.meta` keys): the traced graph's, then the result's
    facts: dict[str, Any] = field(default_factory=dict)
    #: the graph result (the same object as ``module`` unless the user's class was rebuilt)
    graph_module: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.graph_module is None:
            self.graph_module = self.module

    @property
    def absorbed(self) -> tuple[Any, ...]:
        """The constants the absorb pass folded (:class:`fxprune.passes.absorb.Absorbed` records)."""
        return tuple(self.facts.get("absorbed") or ())

    @property
    def reconstruction(self) -> dict[str, tuple[float, float]]:
        """Per refitted layer: relative reconstruction error on the calibration data before and after."""
        return dict(self.facts.get("reconstruction") or {})

    @property
    def groups(self) -> tuple[ChannelGroup, ...]:
        if self.regions:
            return tuple(g for r in self.regions.values() for g in r.groups)
        return self.analysis.groups if self.analysis is not None else ()

    def __repr__(self) -> str:
        r = self.report
        regions = f", regions={list(self.regions)}" if self.regions else ""
        return (f"CompileResult(module={type(self.module).__name__}, params {r.params_before} -> {r.params_after}, "
                f"MACs {r.macs_before} -> {r.macs_after}, {r.groups_pruned}/{r.groups_total} groups pruned{regions})")


def _main_weight(m: nn.Module | None) -> tuple[int, ...]:
    if m is None:
        return ()
    for pname in ("weight", "q_proj_weight", "in_proj_weight"):
        t = getattr(m, pname, None)
        if isinstance(t, torch.Tensor):
            return tuple(t.shape)
    return ()


def layer_kinds(gm: fx.GraphModule, rules: RuleTable = RULES, only: set[str] | None = None) -> dict[str, str]:
    """Module path -> what the op families call the layer there (``"Linear"``, ``"Conv2d"``...); ``only``:
    just these paths (the first op of a module that has a kind names it)."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if only is not None:
            owner = module_owner(node)
            if owner not in only or owner in out:
                continue
        rule = rules.lookup(gm, node)
        kind = rule.layer_kind(node, gm) if rule is not None else None
        if kind:
            out.setdefault(module_owner(node), kind)
    return out


def build_report(gm: fx.GraphModule, out: nn.Module, before: Cost, after: Cost, analysis: Any, selection: Selection,
                 ctx: Context, seconds: float, rules: RuleTable = RULES) -> Report:
    """The report of one compile: ``gm`` the traced original, ``out`` the result."""
    new_mods = dict(out.named_modules())
    # the widths and MACs are taken now (the user may change the result later); the layer types, read from
    # the traced graph (fxprune's private copy), are named when the table is first read
    rows = [(name, type(m).__name__, _main_weight(m), _main_weight(new_mods.get(name)),
             before.per_module.get(name, 0), after.per_module.get(name, 0))
            for name, m in gm.named_modules() if name and any(p is not None for p in m._parameters.values())]
    blocked: tuple[tuple[str, str], ...] = ()
    total = 0
    if analysis is not None:
        total = len(analysis.groups)
        # a group pinned only because it is a network input/output is by design, not worth reporting
        blocked = tuple((g.root, g.blocked) for g in analysis.groups
                        if g.blocked and g.size > 1 and not g.blocked.endswith(("network output", "network input")))
    batch = int(ctx.example_inputs[0].shape[0]) if ctx.example_inputs and ctx.example_inputs[0].dim() else 1
    return Report(before.params, after.params, before.macs, after.macs, LayerRows(gm, rules, rows), total,
                  len(selection.keep), blocked, tuple(ctx.notes), seconds, batch, tuple(before.uncounted),
                  shortfall=tuple(dict.fromkeys(ctx.shortfalls)))


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def merge_reports(model: nn.Module, pruned: nn.Module, regions: list[tuple[str, Report]], ctx: Context,
                  seconds: float) -> Report:
    """One report over the pruned regions of a hierarchical compile (layer names prefixed by region)."""
    layers, blocked, notes, uncounted, short = [], [], list(ctx.notes), [], list(ctx.shortfalls)
    mb = ma = gt = gp = 0
    for path, r in regions:
        mb += r.macs_before
        ma += r.macs_after
        gt += r.groups_total
        gp += r.groups_pruned
        p = path + "."
        layers += [LayerRow(p + x.name, x.kind, x.before, x.after, x.macs_before, x.macs_after) for x in r.layers]
        blocked += [(p + root, why) for root, why in r.blocked]
        notes += [f"[{path}] {n}" for n in r.notes]
        uncounted += [p + u for u in r.uncounted]
        short += [f"[{path}] {n}" for n in r.shortfall]
    notes.append("MACs are summed over the pruned regions (the uncaptured code between them is not counted)")
    first = pytree.tree_leaves(ctx.example_inputs)[:1]
    batch = int(first[0].shape[0]) if first and first[0].dim() else 1
    return Report(_count(model), _count(pruned), mb, ma, tuple(layers), gt, gp, tuple(blocked), tuple(notes),
                  seconds, batch, tuple(uncounted), shortfall=tuple(dict.fromkeys(short)))
