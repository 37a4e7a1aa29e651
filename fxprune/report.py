"""Reports people would rather look at than read.

This module owns the presentation of a compile result; it never changes a model.

* :func:`layer_table` / :func:`report_markdown` / :func:`report_dict`: the per-layer width table
  (before → after, MACs) as markdown, and the whole report as markdown or JSON-ready plain data.
* :func:`groups_graph`: the traced graph as a ``networkx.DiGraph`` whose nodes carry their channel groups,
  widths before/after and a colour per group; :func:`groups_dot` renders it as Graphviz DOT text (no
  graphviz binary needed to produce it) and :func:`groups_html` as one self-contained HTML page with an
  inline SVG (a layered layout computed here, groups coloured, pruned widths shown, a legend that
  highlights a group's nodes on hover).
* :func:`sensitivity`: Li et al.'s sensitivity analysis (prune one group alone at several ratios and
  evaluate, no retraining); :func:`plot_sensitivity` and :func:`plot_tradeoff` (metric vs MACs) draw
  with matplotlib, an optional extra (``pip install 'fxprune[plot]'``; a clear ``ImportError`` otherwise).

>>> import torch, fxprune
>>> from fxprune.report import groups_dot, groups_html
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
>>> res = fxprune.compile(net, torch.randn(1, 3, 8, 8), ratio=0.5)
>>> print(groups_dot(res).splitlines()[0])
digraph fxprune {
>>> "<svg" in groups_html(res)
True
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch
import torch.fx as fx

from . import meta
from .errors import ConfigError, InputError
from .flops import count_cost
from .ir import Selection
from .meta import shape_of
from .passes.group import analyze_graph
from .passes.importance import named_importance
from .passes.rewrite import rewrite_graph
from .passes.select import choose_units, floor_count, validate_ratio
from .pipeline import Context
from .prepare import prepare
from .progress import progress as progress_bar

__all__ = [
    "layer_table", "report_markdown", "report_dict", "groups_graph", "groups_dot", "groups_html",
    "sensitivity", "plot_sensitivity", "plot_tradeoff", "PALETTE",
]

log = logging.getLogger(__name__)

#: Group colours (cycled by group id); blocked groups are grey.
PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
    "#86bcb6", "#d37295", "#a0cbe8", "#ffbe7d", "#8cd17d", "#b6992d", "#499894", "#fabfd2", "#79706e",
)
BLOCKED = "#d3d3d3"


def _h(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


# -- tables -----------------------------------------------------------------------------------------


def layer_table(report: Any, only_changed: bool = False) -> str:
    """The per-layer table as markdown: layer, type, weight shape before → after, MACs before → after."""
    rows = [r for r in report.layers if r.before != r.after or not only_changed]
    out = ["| layer | type | shape before | shape after | MACs before | MACs after | kept |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = (np.prod(r.after) / np.prod(r.before)) if r.before and r.after and np.prod(r.before) else 1.0
        arrow = "" if r.before == r.after else " ✂"
        out.append(f"| `{r.name}` | {r.kind} | {tuple(r.before)} | {tuple(r.after)}{arrow} | {_h(r.macs_before)} | "
                   f"{_h(r.macs_after)} | {kept:.0%} |")
    return "\n".join(out)


def _group_rows(result: Any) -> list[dict[str, Any]]:
    analysis = getattr(result, "analysis", None)
    if analysis is None:
        return []
    keep = result.selection.as_dict()
    rows = []
    for g in analysis.groups:
        kept = len(keep.get(g.id, range(g.size)))
        status = "blocked" if g.blocked else ("pruned" if kept < g.size else ("kept" if g.prunable else "fixed"))
        rows.append({"id": g.id, "root": g.root, "size": g.size, "kept": kept, "status": status,
                     "reason": g.blocked or g.pin_reason if not g.prunable else "", "modules": list(g.modules()),
                     "lossy": g.lossy})
    return rows


def report_dict(result: Any) -> dict[str, Any]:
    """The report of a :class:`~fxprune.CompileResult` as JSON-ready plain data."""
    r = result.report
    return {
        "params_before": r.params_before, "params_after": r.params_after,
        "macs_before": r.macs_before, "macs_after": r.macs_after,
        "macs_ratio": r.macs_ratio, "params_ratio": r.params_ratio, "batch": r.batch, "seconds": r.seconds,
        "pipeline": str(result.pipeline),
        "layers": [{"name": x.name, "type": x.kind, "before": list(x.before), "after": list(x.after),
                    "macs_before": x.macs_before, "macs_after": x.macs_after} for x in r.layers],
        "groups": _group_rows(result),
        "blocked": [{"root": a, "reason": b} for a, b in r.blocked],
        "notes": list(r.notes), "uncounted": list(r.uncounted),
        "passes": [{"pass": name, "stats": json.loads(json.dumps(stats, default=str)), "seconds": dt}
                   for name, stats, dt in result.context.log],
    }


def report_markdown(result: Any, title: str = "fxprune report") -> str:
    """A markdown page: summary, per-pass times, channel groups, the per-layer width table, notes."""
    r = result.report
    lines = [f"# {title}", "",
             f"* params: {_h(r.params_before)} → {_h(r.params_after)} ({r.params_after / max(r.params_before, 1):.1%})",
             f"* MACs (batch {r.batch}): {_h(r.macs_before)} → {_h(r.macs_after)} "
             f"({r.macs_after / max(r.macs_before, 1):.1%}, {r.macs_ratio:.2f}× fewer)",
             f"* channel groups: {r.groups_pruned} of {r.groups_total} pruned",
             f"* pipeline: `{result.pipeline}` ({r.seconds:.2f} s)", ""]
    groups = _group_rows(result)
    if groups:
        lines += ["## Channel groups", "", "| group | root | units | kept | status |", "|---|---|---|---|---|"]
        for g in groups:
            why = f" ({g['reason']})" if g["reason"] else ""
            lines.append(f"| {g['id']} | `{g['root']}` | {g['size']} | {g['kept']} | {g['status']}{why} |")
        lines.append("")
    lines += ["## Layers", "", layer_table(r), ""]
    if r.uncounted:
        lines += [f"MACs not counted for: {', '.join(r.uncounted)}", ""]
    if r.notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in r.notes] + [""]
    return "\n".join(lines)


# -- group graph ------------------------------------------------------------------------------------


def _parts(obj: Any, analysis: Any, selection: Any) -> tuple[fx.GraphModule, Any, Any]:
    if hasattr(obj, "original") and hasattr(obj, "analysis"):  # a CompileResult
        return obj.original, analysis or obj.analysis, selection if selection is not None else obj.selection
    if isinstance(obj, fx.GraphModule):
        analysis = analysis or meta.get(obj, "groups")
        if analysis is None:
            raise InputError("this GraphModule carries no channel groups: pass analysis= (or a CompileResult)")
        return obj, analysis, selection if selection is not None else meta.get(obj, "selection")
    raise InputError(f"expected a CompileResult or a GraphModule with groups, got {type(obj).__name__}")


def _color(g: Any) -> str:
    return BLOCKED if not g.prunable else PALETTE[g.id % len(PALETTE)]


def groups_graph(obj: Any, analysis: Any = None, selection: Any = None) -> nx.DiGraph:
    """The traced graph with channel groups: one node per fx node (``get_attr`` nodes omitted).

    Node attributes: ``op``, ``target``, ``shape`` (before), ``kept`` (the pruned dim's width after, or
    None), ``dim``, ``groups`` (ids of every group with units on this node), ``group`` (the group drawn:
    the one covering most positions), ``color``, ``label``, ``tooltip``.
    """
    gm, analysis, selection = _parts(obj, analysis, selection)
    selection = selection or Selection()
    keep_of = analysis.keep_fn(selection)
    keep = selection.as_dict()
    on_node: dict[str, list[tuple[int, int, int, Any]]] = {}  # node -> (positions, group, dim, output)
    for g in analysis.groups:
        for c in g.channels:
            try:
                n_pos = len(c.span.positions())
            except Exception:  # noqa: BLE001 - any span we cannot enumerate counts once
                n_pos = 1
            on_node.setdefault(c.node, []).append((n_pos, g.id, c.dim, c.output))
    G = nx.DiGraph(name=type(gm).__name__)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        shape = shape_of(node)
        shape = tuple(shape) if shape is not None else None
        refs = sorted(on_node.get(node.name, []), key=lambda t: (not analysis.groups[t[1]].prunable, -t[0], t[1]))
        gids = sorted({t[1] for t in refs})
        main = refs[0][1] if refs else None
        dim = refs[0][2] if refs else None
        kept = None
        if refs and shape is not None and dim is not None and dim < len(shape):
            k = keep_of(("a", node.name, refs[0][3], dim))
            kept = int(k.sum()) if k is not None else shape[dim]
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        kind = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" else str(target)
        width = f"{shape[dim]}→{kept}" if kept is not None and shape is not None and kept != shape[dim] else (
            str(shape[dim]) if kept is not None and shape is not None else "")
        label = f"{node.name}\n{kind}" + (f" · {width}" if width else "")
        tip = [f"{node.name}: {node.op} {target}", f"shape {list(shape) if shape else '-'}"]
        for gid in gids:
            g = analysis.groups[gid]
            n_kept = len(keep.get(gid, range(g.size)))
            state = f"BLOCKED: {g.blocked}" if g.blocked else (f"{n_kept}/{g.size} units kept")
            tip.append(f"group {gid} (root {g.root}): {state}")
        G.add_node(node.name, op=node.op, target=str(target), kind=kind, shape=shape, kept=kept, dim=dim,
                   groups=gids, group=main, color=_color(analysis.groups[main]) if main is not None else "#ffffff",
                   pruned=bool(kept is not None and shape is not None and kept < shape[dim]),
                   label=label, tooltip="\n".join(tip))
    for node in gm.graph.nodes:
        if node.name not in G:
            continue
        for user in node.users:
            if user.name in G:
                G.add_edge(node.name, user.name)
    G.graph["groups"] = {g.id: {"root": g.root, "size": g.size, "kept": len(keep.get(g.id, range(g.size))),
                                "blocked": g.blocked, "color": _color(g)} for g in analysis.groups}
    return G


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def groups_dot(obj: Any, analysis: Any = None, selection: Any = None) -> str:
    """Graphviz DOT text of :func:`groups_graph` (render with ``dot -Tsvg`` wherever graphviz is installed)."""
    G = obj if isinstance(obj, nx.DiGraph) else groups_graph(obj, analysis, selection)
    out = ["digraph fxprune {", '  rankdir=TB;',
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
           '  edge [color="#888888", arrowsize=0.6];']
    for gid, g in G.graph.get("groups", {}).items():
        state = f"blocked: {g['blocked']}" if g["blocked"] else f"{g['kept']}/{g['size']} kept"
        out.append(f"  // group {gid}: root {g['root']}, {state}, colour {g['color']}")
    for n, a in G.nodes(data=True):
        attrs = [f"label={_dot_str(a['label'])}", f"fillcolor={_dot_str(a['color'])}",
                 f"tooltip={_dot_str(a['tooltip'])}"]
        if a["pruned"]:
            attrs.append("penwidth=2.5")
        if a["group"] is not None and G.graph["groups"][a["group"]]["blocked"]:
            attrs.append('style="rounded,filled,dashed"')
        out.append(f"  {_dot_str(n)} [{', '.join(attrs)}];")
    for u, v in G.edges:
        out.append(f"  {_dot_str(u)} -> {_dot_str(v)};")
    out.append("}")
    return "\n".join(out) + "\n"


def _layout(G: nx.DiGraph) -> dict[str, tuple[int, int]]:
    """Layered layout: layer = longest path from a source; order within a layer by the barycentre of the
    predecessors (two sweeps), which keeps residual branches side by side."""
    layer: dict[str, int] = {}
    for n in nx.topological_sort(G):
        preds = list(G.predecessors(n))
        layer[n] = 1 + max((layer[p] for p in preds), default=-1)
    layers: dict[int, list[str]] = {}
    for n in G.nodes:  # fx order inside a layer is a good start
        layers.setdefault(layer[n], []).append(n)
    pos = {n: (i, layer[n]) for L in layers.values() for i, n in enumerate(L)}
    for _ in range(2):
        for li in sorted(layers):
            L = layers[li]
            bary = {n: (np.mean([pos[p][0] for p in G.predecessors(n)]) if G.in_degree(n) else pos[n][0]) for n in L}
            L.sort(key=lambda n: (bary[n], pos[n][0]))
            for i, n in enumerate(L):
                pos[n] = (i, li)
    return pos


def groups_html(obj: Any, analysis: Any = None, selection: Any = None, title: str = "fxprune channel groups") -> str:
    """One self-contained HTML page (inline SVG, no external assets) of the graph with groups coloured.

    Pruned nodes have a thick border and show ``before→after`` widths; blocked groups are grey and dashed;
    hovering a group in the legend highlights its nodes; every node has a tooltip with its groups."""
    G = obj if isinstance(obj, nx.DiGraph) else groups_graph(obj, analysis, selection)
    pos = _layout(G)
    bw, bh, gx, gy = 170, 38, 24, 30
    width_n = max((p[0] for p in pos.values()), default=0) + 1
    height_n = max((p[1] for p in pos.values()), default=0) + 1
    row_w: dict[int, int] = {}
    for x, y in pos.values():
        row_w[y] = max(row_w.get(y, 0), x + 1)
    W = width_n * (bw + gx) + gx
    H = height_n * (bh + gy) + gy

    def xy(n: str) -> tuple[float, float]:
        x, y = pos[n]
        off = (width_n - row_w[y]) * (bw + gx) / 2  # centre each layer
        return gx + off + x * (bw + gx), gy + y * (bh + gy)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="Helvetica,Arial,sans-serif" font-size="11">']
    for u, v in G.edges:
        (x1, y1), (x2, y2) = xy(u), xy(v)
        x1, y1, x2, y2 = x1 + bw / 2, y1 + bh, x2 + bw / 2, y2
        my = (y1 + y2) / 2
        svg.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{my:.1f} {x2:.1f},{my:.1f} {x2:.1f},{y2:.1f}" '
                   'fill="none" stroke="#999" stroke-width="1"/>')
    for n, a in G.nodes(data=True):
        x, y = xy(n)
        groups = " ".join(f"g{g}" for g in a["groups"])
        blocked = a["group"] is not None and G.graph["groups"][a["group"]]["blocked"]
        dash = ' stroke-dasharray="4,3"' if blocked else ""
        sw = 3 if a["pruned"] else 1
        name, _, rest = a["label"].partition("\n")
        svg.append(f'<g class="node {groups}"><title>{html.escape(a["tooltip"])}</title>'
                   f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw}" height="{bh}" rx="6" fill="{a["color"]}" '
                   f'stroke="#333" stroke-width="{sw}"{dash}/>'
                   f'<text x="{x + bw / 2:.1f}" y="{y + 15:.1f}" text-anchor="middle">{html.escape(name[:28])}</text>'
                   f'<text x="{x + bw / 2:.1f}" y="{y + 29:.1f}" text-anchor="middle" fill="#222">'
                   f'{html.escape(rest[:30])}</text></g>')
    svg.append("</svg>")
    legend = ['<table><tr><th></th><th>group</th><th>root</th><th>units</th><th>kept</th><th>status</th></tr>']
    for gid, g in G.graph.get("groups", {}).items():
        status = f"blocked: {g['blocked']}" if g["blocked"] else ("pruned" if g["kept"] < g["size"] else "kept")
        legend.append(f'<tr data-g="g{gid}"><td><span class="sw" style="background:{g["color"]}"></span></td>'
                      f'<td>{gid}</td><td>{html.escape(g["root"])}</td><td>{g["size"]}</td><td>{g["kept"]}</td>'
                      f'<td>{html.escape(status)}</td></tr>')
    legend.append("</table>")
    style = ("body{font-family:Helvetica,Arial,sans-serif;margin:16px} .wrap{display:flex;gap:24px;align-items:flex-start}"
             " table{border-collapse:collapse;font-size:12px} td,th{padding:2px 6px;border-bottom:1px solid #eee}"
             " .sw{display:inline-block;width:14px;height:14px;border:1px solid #333} tr[data-g]:hover{background:#ffe}"
             " .node.hl rect{stroke:#000;stroke-width:4} .dim .node:not(.hl){opacity:.25}"
             " .legend{position:sticky;top:0;max-height:95vh;overflow:auto}")
    script = ("document.querySelectorAll('tr[data-g]').forEach(function(r){var c=r.dataset.g,s=document.querySelector('svg');"
              "r.onmouseenter=function(){s.classList.add('dim');s.querySelectorAll('.'+c).forEach(function(n){n.classList.add('hl')})};"
              "r.onmouseleave=function(){s.classList.remove('dim');s.querySelectorAll('.hl').forEach(function(n){n.classList.remove('hl')})}});")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            "<p>Nodes are coloured by channel group; a thick border marks a pruned tensor "
            "(width before→after); grey dashed = blocked. Hover a legend row to highlight its group.</p>"
            f"<div class='wrap'><div>{''.join(svg)}</div><div class='legend'>{''.join(legend)}</div></div>"
            f"<script>{script}</script></body></html>\n")


# -- sensitivity and plots --------------------------------------------------------------------------


def sensitivity(
    model: torch.nn.Module,
    example_inputs: Any,
    evaluate: Callable[[torch.nn.Module], float],
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    *,
    importance: str = "l2",
    groups: Iterable[int] | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Sensitivity analysis (Li et al. 2016): prune ONE group at a time at each ratio, no retraining.

    ``evaluate(module) -> float`` scores a pruned module (e.g. accuracy on a held-out set). Returns rows
    ``{"group", "root", "ratio", "kept", "macs", "metric"}``; ratio 0 (the unpruned model) is included once
    as group -1. ``groups``: the group ids to scan (default: every prunable group).
    """
    for r in ratios:
        validate_ratio(r)
    gm, inputs = prepare(model, example_inputs)
    analysis = analyze_graph(gm, unknown="block")
    meta.put(gm, "groups", analysis)
    named_importance(importance).run(gm, Context(model=model, example_inputs=inputs, original=gm))
    scores = meta.get(gm, "importance")
    ids = [g.id for g in analysis.groups if g.prunable and g.id in scores] if groups is None else list(groups)
    rows = [{"group": -1, "root": "", "ratio": 0.0, "kept": None, "macs": meta.get(gm, "cost").macs,
             "metric": float(evaluate(gm))}]
    work = [(gid, r) for gid in ids for r in ratios]
    with progress_bar(len(work), "sensitivity", progress) as bar:
        for gid, r in work:
            bar.update(1)
            rows.append(_sensitivity_row(gm, analysis, scores, inputs, gid, r, evaluate))
    return rows


def _sensitivity_row(gm: fx.GraphModule, analysis: Any, scores: Mapping[int, Any], inputs: Any, gid: int, r: float,
                     evaluate: Callable[[torch.nn.Module], float]) -> dict[str, Any]:
    g = analysis.groups[gid]
    kept = choose_units(g, scores[gid], floor_count(r, g.size))
    new = rewrite_graph(gm, analysis, Selection.from_dict({gid: kept} if len(kept) < g.size else {}), inputs)
    return {"group": gid, "root": g.root, "ratio": float(r), "kept": len(kept), "macs": count_cost(new).macs,
            "metric": float(evaluate(new))}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'fxprune[plot]'") from exc
    return plt


def plot_sensitivity(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "metric",
                     max_lines: int = 20) -> Path:
    """One line per group: ``metric`` vs pruning ratio (rows as returned by :func:`sensitivity`)."""
    plt = _plt()
    base = [r[metric] for r in rows if r.get("group") == -1]
    by: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("group") != -1:
            by.setdefault((r["group"], r.get("root", "")), []).append(r)
    if not by:
        raise InputError("plot_sensitivity: no group rows to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (gid, root), rs in list(by.items())[:max_lines]:
        rs = sorted(rs, key=lambda r: r["ratio"])
        xs = ([0.0] if base else []) + [r["ratio"] for r in rs]
        ys = base[:1] + [r[metric] for r in rs]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{gid}: {root}", color=PALETTE[int(gid) % len(PALETTE)])
    ax.set_xlabel("fraction of the group's units removed")
    ax.set_ylabel(metric)
    ax.set_title("sensitivity: each group pruned alone")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, plt, path)


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: str | Path, *, x: str = "macs", y: str = "accuracy",
                  label: str = "method", title: str = "accuracy vs MACs") -> Path:
    """Trade-off plot: one line per ``label`` value, ``y`` against ``x`` (e.g. accuracy vs MACs)."""
    plt = _plt()
    if not rows:
        raise InputError("plot_tradeoff: no rows")
    missing = [k for k in (x, y) if any(k not in r for r in rows)]
    if missing:
        raise ConfigError(f"plot_tradeoff: every row needs the keys {x!r} and {y!r} (missing {missing})")
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault(str(r.get(label, "")), []).append(r)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, rs) in enumerate(by.items()):
        rs = sorted(rs, key=lambda r: r[x])
        ax.plot([r[x] for r in rs], [r[y] for r in rs], marker="o", label=name or None, color=PALETTE[i % len(PALETTE)])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(by) > 1 or next(iter(by)):
        ax.legend()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
