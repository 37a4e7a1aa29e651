"""Registry-driven rule tests: every registered rule has examples in the database
(:mod:`fxprune.testing.examples`), and the masked-reference oracle holds on each of them for several random
selections (lossy rules: blocked by default, well-formed when allowed)."""

import pytest
import torch

from fxprune.rules import RULES
from fxprune.testing import assert_prune_equivalent, prune_with, random_selection
from fxprune.testing.examples import COVERED_ELSEWHERE, EXAMPLES

RULE_LIST = sorted(RULES.all_rules(), key=lambda r: r.name)
CASES = [(r, f) for r in RULE_LIST if not r.lossy for f in EXAMPLES.get(r.name, ())]
LOSSY = [(r, f) for r in RULE_LIST if r.lossy for f in EXAMPLES.get(r.name, ())]


def _id(case):
    rule, factory = case
    return f"{rule.name}-{factory.__name__}"


def test_every_rule_has_an_example():
    missing = sorted({r.name for r in RULE_LIST if r.name not in EXAMPLES and r.name not in COVERED_ELSEWHERE})
    assert not missing, f"rules without an example in fxprune.testing.examples: {missing}"
    stale = sorted(set(EXAMPLES) - {r.name for r in RULE_LIST})
    assert not stale, f"examples for rules that are not registered: {stale}"


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rule_example_matches_masked_reference(case, seed):
    rule, factory = case
    torch.manual_seed(seed)
    model, inputs = factory()
    ratio = (0.3, 0.5, 0.8)[seed]
    chk = assert_prune_equivalent(model, inputs, lambda a: random_selection(a, seed, ratio=ratio))
    # the example must actually exercise pruning
    assert chk.analysis.prunable, f"example {factory.__name__} of {rule.name} has nothing to prune"
    assert chk.selection.keep, "the random selection removed nothing"


@pytest.mark.parametrize("case", LOSSY, ids=_id)
def test_lossy_rule_blocks_by_default_and_prunes_when_allowed(case):
    rule, factory = case
    torch.manual_seed(0)
    model, inputs = factory()
    strict = prune_with(model, inputs)
    assert any("allow_lossy" in g.blocked for g in strict.analysis.groups)
    loose = prune_with(model, inputs, lambda a: random_selection(a, 3, ratio=0.6), allow_lossy=True)
    assert loose.selection.keep
    assert any(loose.analysis.groups[gid].lossy for gid in loose.selection.as_dict())
    out = loose.module(*inputs)
    assert out.shape == model(*inputs).shape
