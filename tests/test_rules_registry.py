"""Registry-driven rule tests: every registered rule carries an example, and the masked-reference oracle
holds on it for several random selections (lossy rules: blocked by default, well-formed when allowed)."""

import pytest
import torch

from fxprune.rules import RULES
from fxprune.testing import assert_prune_equivalent, prune_with, random_selection

RULE_LIST = sorted(RULES.all_rules(), key=lambda r: r.name)
EXACT = [r for r in RULE_LIST if r.example is not None and not r.lossy]
LOSSY = [r for r in RULE_LIST if r.example is not None and r.lossy]


def test_every_rule_has_an_example():
    missing = sorted({r.name for r in RULE_LIST if r.example is None})
    # rules whose example is covered elsewhere (tests/test_ops.py) are listed explicitly
    allowed = {"shape_query", "stack", "repeat", "narrow", "unflatten", "local_response_norm", "pixel_shuffle",
               "F.layer_norm", "softmax2d", "squeeze", "upsample", "resample", "conv_transpose", "no_op", "stochastic",
               "swin._patch_merging_pad", "swin.shifted_window_attention", "swin._get_relative_position_bias"}
    assert set(missing) <= allowed, f"rules without an example: {sorted(set(missing) - allowed)}"


@pytest.mark.parametrize("rule", EXACT, ids=lambda r: r.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rule_example_matches_masked_reference(rule, seed):
    torch.manual_seed(seed)
    model, inputs = rule.example()
    ratio = (0.3, 0.5, 0.8)[seed]
    chk = assert_prune_equivalent(model, inputs, lambda a: random_selection(a, seed, ratio=ratio))
    # the example must actually exercise pruning
    assert chk.analysis.prunable, f"example of {rule.name} has nothing to prune"
    assert chk.selection.keep, "the random selection removed nothing"


@pytest.mark.parametrize("rule", LOSSY, ids=lambda r: r.name)
def test_lossy_rule_blocks_by_default_and_prunes_when_allowed(rule):
    torch.manual_seed(0)
    model, inputs = rule.example()
    strict = prune_with(model, inputs)
    assert not strict.analysis.prunable
    assert any("allow_lossy" in g.blocked for g in strict.analysis.groups)
    loose = prune_with(model, inputs, lambda a: random_selection(a, 3, ratio=0.6), allow_lossy=True)
    assert loose.selection.keep
    assert all(g.lossy for g in loose.analysis.groups if g.id in loose.selection.as_dict())
    out = loose.module(*inputs)
    assert out.shape == model(*inputs).shape
