"""fxprune.report: the group graph agrees with the analysis, DOT/HTML are well formed and laid out
top-down without overlaps, the markdown/JSON reports agree with the Report, sensitivity and plots."""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune import report as rpt

from models import build


@pytest.fixture(scope="module")
def res():
    model, xs = build("concat", seed=1)
    return fxprune.compile(model, xs, ratio=0.5, verify="none")


@pytest.mark.parametrize("name", ["residual", "concat", "split", "grouped", "mha"])
def test_group_graph_matches_analysis(name):
    model, xs = build(name, seed=2)
    r = fxprune.compile(model, xs, ratio=0.5, verify="none")
    G = rpt.groups_graph(r)
    fx_nodes = [n for n in r.original.graph.nodes if n.op != "get_attr"]
    assert set(G.nodes) == {n.name for n in fx_nodes}
    assert set(G.edges) == {(n.name, u.name) for n in fx_nodes for u in n.users if u.op != "get_attr"}
    for g in r.analysis.groups:
        on = {c.node for c in g.channels if c.node in G}
        assert on == {n for n, a in G.nodes(data=True) if g.id in a["groups"]}
    mods = dict(r.module.named_modules())
    for n, a in G.nodes(data=True):
        if a["group"] is not None:
            assert a["color"] == (rpt.BLOCKED if not r.analysis.groups[a["group"]].prunable
                                  else rpt.PALETTE[a["group"] % len(rpt.PALETTE)])
        # the drawn width after pruning is the pruned module's real width
        node = next(x for x in r.original.graph.nodes if x.name == n)
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.Conv2d) and a["kept"] is not None and a["dim"] == 1:
            assert a["kept"] == mods[node.target].out_channels
            assert a["pruned"] == (a["kept"] < a["shape"][1])


def test_dot_text(res):
    dot = rpt.groups_dot(res)
    G = rpt.groups_graph(res)
    assert dot.startswith("digraph fxprune {") and dot.rstrip().endswith("}")
    node_lines = [ln for ln in dot.splitlines() if re.match(r'^  "[^"]+" \[', ln)]
    edge_lines = [ln for ln in dot.splitlines() if " -> " in ln]
    assert len(node_lines) == G.number_of_nodes() and len(edge_lines) == G.number_of_edges()
    for u, v in G.edges:
        assert f'  "{u}" -> "{v}";' in dot
    for ln in node_lines:  # quotes inside attributes are escaped: an even number of unescaped quotes
        assert len(re.findall(r'(?<!\\)"', ln)) % 2 == 0
    assert rpt._dot_str('a "b"\nc\\') == '"a \\"b\\"\\nc\\\\"'
    assert dot.count("penwidth=2.5") == sum(1 for _, a in G.nodes(data=True) if a["pruned"])


@pytest.mark.parametrize("name", ["residual", "concat", "split"])
def test_html_svg_layout(name):
    model, xs = build(name, seed=0)
    r = fxprune.compile(model, xs, ratio=0.5, verify="none")
    page = rpt.groups_html(r, title="t <&>")
    assert page.startswith("<!DOCTYPE html>") and "t &lt;&amp;&gt;" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    svg = ET.fromstring(page[page.index("<svg"): page.index("</svg>") + 6])
    ns = "{http://www.w3.org/2000/svg}"
    boxes = {}
    for g in svg.iter(f"{ns}g"):
        rect = g.find(f"{ns}rect")
        name_ = g.findall(f"{ns}text")[0].text
        boxes[name_] = tuple(float(rect.get(k)) for k in ("x", "y", "width", "height"))
    G = rpt.groups_graph(r)
    assert set(boxes) == set(G.nodes)
    items = list(boxes.values())
    for i, (x1, y1, w1, h1) in enumerate(items):  # no two boxes overlap
        for x2, y2, w2, h2 in items[i + 1:]:
            assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1
    for u, v in G.edges:  # every edge points down: the layout is layered
        assert boxes[v][1] > boxes[u][1]
    assert len(svg.findall(f"{ns}path")) == G.number_of_edges()
    for gid in G.graph["groups"]:
        assert f'data-g="g{gid}"' in page


def test_markdown_and_json_reports(res):
    md = rpt.report_markdown(res)
    data = rpt.report_dict(res)
    json.dumps(data)  # plain data
    r = res.report
    assert data["params_after"] == r.params_after and data["macs_before"] == r.macs_before
    assert len(data["layers"]) == len(r.layers)
    keep = res.selection.as_dict()
    for g in data["groups"]:
        grp = res.analysis.groups[g["id"]]
        assert g["kept"] == len(keep.get(grp.id, range(grp.size)))
        assert g["status"] == ("blocked" if grp.blocked else "pruned" if g["kept"] < grp.size
                               else "kept" if grp.prunable else "fixed")
    table = rpt.layer_table(r)
    assert table.count("\n") == 1 + len(r.layers)
    changed = [x for x in r.layers if x.before != x.after]
    assert table.count("✂") == len(changed) and table in md
    assert f"{r.groups_pruned} of {r.groups_total} pruned" in md


def test_sensitivity_and_plots(tmp_path):
    model, xs = build("residual", seed=0, dtype=torch.float32)
    with torch.no_grad():
        ref = model(*xs)

    def mse(m):
        with torch.no_grad():
            return float(((m(*xs) - ref) ** 2).mean())

    rows = rpt.sensitivity(model, xs, mse, ratios=(0.25, 0.5, 0.75), progress=False)
    base = [r for r in rows if r["group"] == -1]
    assert len(base) == 1 and base[0]["metric"] == 0.0
    gm, _ = fxprune.prepare(model, xs)
    from fxprune.passes.group import analyze_graph

    prunable = [g for g in analyze_graph(gm).groups if g.prunable]
    scan = [r for r in rows if r["group"] != -1]
    assert len(scan) == 3 * len(prunable)
    for g in prunable:
        rs = sorted((r for r in scan if r["group"] == g.id), key=lambda r: r["ratio"])
        assert [r["kept"] for r in rs] == [max(g.size - int(np.floor(q * g.size + 1e-9)), 1) for q in (0.25, 0.5, 0.75)]
        macs = [r["macs"] for r in rs]
        assert macs == sorted(macs, reverse=True) and macs[-1] < base[0]["macs"]
        assert all(r["metric"] > 0 for r in rs)
    p = rpt.plot_sensitivity(rows, tmp_path / "sens.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trade = [{"method": m, "macs": mc, "accuracy": a} for m in ("l1", "l2") for mc, a in ((1e6, 0.9), (5e5, 0.8))]
    q = rpt.plot_tradeoff(trade, tmp_path / "sub" / "trade.png")
    assert q.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(fxprune.ConfigError, match="accuracy"):
        rpt.plot_tradeoff([{"macs": 1}], tmp_path / "x.png")
    with pytest.raises(fxprune.InputError):
        rpt.plot_tradeoff([], tmp_path / "x.png")


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"fxprune\[plot\]"):
        rpt.plot_tradeoff([{"macs": 1, "accuracy": 1}], tmp_path / "x.png")


def test_bad_inputs():
    with pytest.raises(fxprune.InputError):
        rpt.groups_html(nn.Linear(2, 2))
    gm, _ = fxprune.prepare(nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(fxprune.InputError, match="analysis="):
        rpt.groups_dot(gm)
