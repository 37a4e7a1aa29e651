"""Span algebra (property tests) and golden group snapshots for hand-picked blocks."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.ir import Span, fit_index_map
from fxprune.passes.group import analyze_graph, components
from fxprune.rules.axes import AxisTable

spans = st.builds(
    lambda start, size, block, gap, repeat, pgap: Span(
        start, size, stride=block + gap, block=block, repeat=repeat,
        period=(size * (block + gap) + pgap) if repeat > 1 else 0,
    ),
    st.integers(0, 20), st.integers(1, 12), st.integers(1, 5), st.integers(0, 3), st.integers(1, 4),
    st.integers(0, 5),
)


@given(spans)
@settings(max_examples=300, deadline=None)
def test_span_roundtrip_and_disjoint_units(span):
    idx = span.indices()
    assert idx.shape == (span.size, span.width)
    assert len(np.unique(idx)) == idx.size  # units never overlap
    fitted = fit_index_map(idx)
    assert isinstance(fitted, Span)
    assert np.array_equal(np.sort(fitted.indices(), 1), np.sort(idx, 1))


@given(spans, st.integers(0, 50))
@settings(max_examples=200, deadline=None)
def test_span_shift_and_positions(span, k):
    assert np.array_equal(span.shifted(k).indices(), span.indices() + k)
    units = list(range(0, span.size, 2))
    assert np.array_equal(span.positions(units), np.sort(span.indices()[units].reshape(-1)))


@given(st.lists(st.lists(st.integers(0, 40), min_size=2, max_size=2, unique=True), min_size=1, max_size=6,
                unique_by=lambda r: tuple(r)))
def test_irregular_tables_stay_exact(rows):
    flat = [v for r in rows for v in r]
    if len(set(flat)) != len(flat):
        return
    m = fit_index_map(np.array(rows))
    assert np.array_equal(np.sort(m.indices(), 1), np.sort(np.array(rows), 1))


@given(st.integers(1, 60), st.lists(st.tuples(st.integers(0, 59), st.integers(0, 59)), max_size=80))
@settings(max_examples=200, deadline=None)
def test_components_match_a_naive_union_find(n, edges):
    edges = [(a % n, b % n) for a, b in edges]
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    want = [find(i) for i in range(n)]
    u = np.array([a for a, _ in edges], dtype=np.int64)
    v = np.array([b for _, b in edges], dtype=np.int64)
    got = components(n, u, v)
    assert list(got) == want


@given(st.lists(st.integers(0, 6), min_size=1, max_size=12), st.data())
@settings(max_examples=300, deadline=None)
def test_table_labels_equal_components_over_every_tie(sizes, data):
    """AxisTable.labels joins whole-axis identity ties per axis first; the labels must equal the plain
    element-level components over every tie (whole, partial, index maps, empty axes)."""
    table = AxisTable()
    axes = [table.axis(("a", f"n{i}", 1, None), s) for i, s in enumerate(sizes)]
    for _ in range(data.draw(st.integers(0, 16))):
        a, b = data.draw(st.sampled_from(axes)), data.draw(st.sampled_from(axes))
        kind = data.draw(st.sampled_from(["whole", "slice", "map"]))
        if kind == "whole" and a.size == b.size:
            table.eye.append((a.base, b.base, a.size))
        elif kind == "slice" and a.size >= b.size:
            off = data.draw(st.integers(0, a.size - b.size))
            table.eye.append((a.base + off, b.base, b.size))
        elif kind == "map" and a.size and b.size:
            k = data.draw(st.integers(1, 6))
            ia = np.array(data.draw(st.lists(st.integers(0, a.size - 1), min_size=k, max_size=k)), dtype=np.int64)
            ib = np.array(data.draw(st.lists(st.integers(0, b.size - 1), min_size=k, max_size=k)), dtype=np.int64)
            table.maps.append((a.ids(ia), b.ids(ib)))
    us = [np.arange(a, a + s, dtype=np.int64) for a, _, s in table.eye] + [u for u, _ in table.maps]
    vs = [np.arange(b, b + s, dtype=np.int64) for _, b, s in table.eye] + [v for _, v in table.maps]
    u = np.concatenate(us) if us else np.zeros(0, dtype=np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, dtype=np.int64)
    assert table.labels().tolist() == components(table.n, u, v).tolist()


# -- golden snapshots ---------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.cat_b = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        z = torch.cat([y, self.cat_b(x)], 1)
        z = nn.functional.adaptive_avg_pool2d(z, 2)
        return self.fc(z.flatten(1))


GOLDEN = """\
group 0: 4 units, root conv1
  param conv1.weight:d0[0+4] (out)
  param conv1.bias:d0[0+4] (out)
  param bn1.weight:d0[0+4] (norm)
  param bn1.bias:d0[0+4] (norm)
  param bn1.running_mean:d0[0+4] (norm)
  param bn1.running_var:d0[0+4] (norm)
  param conv2.weight:d0[0+4] (out)
  param conv2.bias:d0[0+4] (out)
  param conv2.weight:d1[0+4] (in)
  param fc.weight:d1[0+4x4/4] (in)
  act   conv1:d1[0+4]
  act   bn1:d1[0+4]
  act   relu:d1[0+4]
  act   conv2:d1[0+4]
  act   add:d1[0+4]
  act   cat:d1[0+4]
  act   adaptive_avg_pool2d:d1[0+4]
  act   flatten:d1[0+4x4/4]
group 1: 2 units, root cat_b
  param cat_b.weight:d0[0+2] (out)
  param cat_b.bias:d0[0+2] (out)
  param fc.weight:d1[16+2x4/4] (in)
  act   cat_b:d1[0+2]
  act   cat:d1[4+2]
  act   adaptive_avg_pool2d:d1[4+2]
  act   flatten:d1[16+2x4/4]
group 2: 5 units, root fc, BLOCKED (all channels pinned: network output)
  param fc.weight:d0[0+5] (out)
  param fc.bias:d0[0+5] (out)
  act   fc:d1[0+5]"""


def test_golden_groups_of_a_residual_concat_flatten_block():
    gm, _ = fxprune.prepare(Block(), torch.randn(2, 3, 8, 8))
    assert analyze_graph(gm).describe() == GOLDEN
