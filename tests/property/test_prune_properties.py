"""Hypothesis property tests over random networks and random selections (float64, eval mode, randomised
norm statistics):

* well-formed and faithful: lint passes, shapes kept, output == masked reference, model untouched;
* identity: keeping everything gives bit-identical outputs;
* composition: pruning A then B equals pruning A ∪ B at once.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.ir import Selection, member_units
from fxprune.passes.group import analyze_graph
from fxprune.passes.rewrite import rewrite_graph
from fxprune.passes.verify import flatten_outputs
from fxprune.testing import assert_prune_equivalent, random_selection
from fxprune.testing.strategies import ALL_FAMILIES, keep_fractions, networks, selection_seeds

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outputs(m, xs):
    with torch.no_grad():
        return flatten_outputs(m.eval()(*xs))


@SETTINGS
@given(networks(max_blocks=4), selection_seeds(), keep_fractions(0.1, 0.9))
def test_faithful_to_masked_reference(net, seed, ratio):
    model, xs = net
    assert_prune_equivalent(model, xs, lambda a: random_selection(a, seed, ratio=ratio))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(max_blocks=3), selection_seeds())
def test_random_ratio_per_group(net, seed):
    model, xs = net
    assert_prune_equivalent(model, xs, seed=seed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(max_blocks=4))
def test_keep_all_is_identity(net):
    model, xs = net
    gm, _ = fxprune.prepare(model, xs)
    new = rewrite_graph(gm, analyze_graph(gm), Selection(), xs)
    for a, b in zip(_outputs(new, xs), _outputs(model, xs), strict=True):
        assert torch.equal(a, b)


def _key(member) -> tuple:
    if hasattr(member, "node"):
        return ("a", member.node, member.output, member.dim)
    return ("p", member.param, member.dim)


def _compose(analysis, sel1: Selection, analysis2, sel2: Selection) -> Selection:
    """The one-shot selection on the original equivalent to sel1 followed by sel2 (mapped by positions).

    A unit's fate is read off every member (activation or parameter slice) whose axis exists in both
    analyses (a rewritten module may rename its parameters, e.g. MultiheadAttention's packed in_proj);
    units no such member covers keep sel1's verdict."""
    keep1, keep2 = analysis.keep_fn(sel1), analysis2.keep_fn(sel2)
    first = sel1.as_dict()
    out = {}
    for g in analysis.groups:
        verdict: dict[int, bool] = {}
        for m in (*g.channels, *g.params):
            key = _key(m)
            if key not in analysis2.table.axes:
                continue
            k1 = keep1(key)
            final = np.ones(analysis.table.axes[key].size, dtype=bool) if k1 is None else k1.copy()
            k2 = keep2(key)
            if k2 is not None:
                final[np.flatnonzero(final)] = k2
            for u, r in zip(member_units(m), m.span.indices(), strict=True):
                verdict.setdefault(int(u), bool(final[r].all()))
        after1 = set(first.get(g.id, range(g.size)))
        kept = tuple(u for u in range(g.size) if verdict.get(u, u in after1))
        if len(kept) < g.size:
            out[g.id] = kept
    return Selection.from_dict(out)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(max_blocks=3), selection_seeds(), selection_seeds())
def test_composition_of_two_prunings(net, s1, s2):
    model, xs = net
    gm, _ = fxprune.prepare(model, xs)
    a1 = analyze_graph(gm)
    sel1 = random_selection(a1, s1, ratio=0.4)
    p1 = rewrite_graph(gm, a1, sel1, xs)
    a2 = analyze_graph(p1)
    sel2 = random_selection(a2, s2, ratio=0.4)
    p12 = rewrite_graph(p1, a2, sel2, xs)
    once = rewrite_graph(gm, a1, _compose(a1, sel1, a2, sel2), xs)
    for a, b in zip(_outputs(p12, xs), _outputs(once, xs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    s12 = {k: tuple(v.shape) for k, v in p12.state_dict().items()}
    s1_ = {k: tuple(v.shape) for k, v in once.state_dict().items()}
    assert s12 == s1_


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(max_blocks=3, families=ALL_FAMILIES - {"multi_io"}), st.sampled_from(["l1", "l2", "random"]),
       keep_fractions(0.1, 0.8), st.booleans())
def test_compile_verifies_on_random_networks(net, importance, ratio, global_ranking):
    model, xs = net
    res = fxprune.compile(model, xs, importance=importance, ratio=ratio, global_ranking=global_ranking,
                          verify="equivalence")
    assert res.report.macs_after <= res.report.macs_before
