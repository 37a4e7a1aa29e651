"""fxprune.compile: the public contract, options, bad input, and exact removal of dead channels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.passes.group import analyze_graph
from fxprune.testing import assert_model_unchanged, assert_prune_equivalent, snapshot
from models import ZOO, Residual, build, img, randomize


# -- the contract -------------------------------------------------------------------------------------
def test_contract_on_torchvision_resnet18():
    import torchvision

    model = randomize(torchvision.models.resnet18()).eval()
    snap = snapshot(model)
    x = torch.randn(1, 3, 64, 64)
    res = fxprune.compile(model, (x,), importance="l2", ratio=0.5, verify="equivalence")
    # the result is a copy of the user's own class (checked against the graph result), the graph is kept too
    assert type(res.module) is type(model) and isinstance(res.graph_module, fx.GraphModule)
    assert res.report.form == "class ResNet" and "result: class ResNet" in str(res.report).splitlines()[0]
    assert res.module is not model
    assert torch.equal(res.module(x), res.graph_module(x))
    r = res.report
    assert r.params_after < r.params_before and r.macs_after < r.macs_before
    assert res.module(x).shape == model(x).shape == (1, 1000)
    text = str(r)
    assert "→" in text and "layer1.0.conv1" in text
    assert_model_unchanged(model, snap, training=False)
    # no parameter is shared with the user's model
    ids = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ids for p in res.module.parameters())
    # per-group ratio: conv1 of every basic block loses half its filters
    assert res.module.get_submodule("layer1.0.conv1").out_channels == 32
    assert res.module.get_submodule("fc").out_features == 1000


def test_single_tensor_input_and_training_flag_preserved():
    model = Residual().train()
    res = fxprune.compile(model, img(), ratio=0.5)
    assert res.module.training and model.training
    res.module.eval()
    assert not res.module.training
    loss = res.module(img()).sum()
    loss.backward()  # the pruned module trains
    assert all(p.grad is not None for p in res.module.parameters())


def test_keep_all_is_identity():
    model, xs = build("residual")
    res = fxprune.compile(model, xs, ratio=0.0, verify="equivalence")
    assert res.report.params_after == res.report.params_before
    torch.testing.assert_close(res.module(*xs), model(*xs), rtol=0, atol=0)


# -- exact removal of channels that contribute nothing ---------------------------------------------------
def _kill_units(model: nn.Module, xs, n_units: int = 2, seed: int = 0):
    """Zero every parameter slice of a few units of every prunable group, in place; return how many."""
    gm, _ = fxprune.prepare(model, xs)
    analysis = analyze_graph(gm)
    rng = np.random.default_rng(seed)
    killed = 0
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    with torch.no_grad():
        for g in analysis.prunable:
            free = [u for u in range(g.size) if u not in g.pinned]
            uniform = [c for c in g.constraints if c.kind == "uniform"]
            if uniform:  # a grouped conv loses the same count in every group: one dead unit per block
                victims = [int(rng.choice(b)) for b in uniform[0].blocks]
            else:
                victims = rng.choice(free, size=min(n_units, len(free) - 1), replace=False) if len(free) > 1 else []
            for u in victims:
                for ps in g.params:
                    from fxprune.ir import member_units

                    units = list(member_units(ps))
                    if u not in units:
                        continue
                    row = units.index(u)
                    pos = ps.span.indices()[row]
                    t = state[ps.param]
                    if ps.groups > 1:
                        og, cg = t.shape[0] // ps.groups, t.shape[1]
                        for c in pos:
                            q, j = divmod(int(c), cg)
                            t[q * og : (q + 1) * og, j] = 0
                    else:
                        t.index_fill_(ps.dim, torch.as_tensor(pos), 0.0)
                killed += 1
    return killed


@pytest.mark.parametrize("name", sorted(ZOO))
def test_dead_channels_are_removed_without_changing_the_output(name):
    model, xs = build(name, seed=3)
    killed = _kill_units(model, xs)
    assert killed > 0
    want = model(*xs)
    res = fxprune.compile(model, xs, importance="l2", threshold=0.0, verify="equivalence")
    assert res.report.params_after < res.report.params_before
    got = res.module(*xs)
    for a, b in zip(fxprune.passes.verify.flatten_outputs(got), fxprune.passes.verify.flatten_outputs(want),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_dead_heads_of_multihead_attention_are_removed():
    model, xs = build("mha", seed=1)
    want = model(*xs)
    with torch.no_grad():  # kill head 2 of 4 (d = 2): q/k/v rows and out_proj columns
        e, d = 8, 2
        rows = [k * e + 2 * d + j for k in range(3) for j in range(d)]
        model.att.in_proj_weight[rows] = 0
        model.att.in_proj_bias[rows] = 0
        model.att.out_proj.weight[:, 2 * d : 3 * d] = 0
    want = model(*xs)
    res = fxprune.compile(model, xs, importance="l2", threshold=0.0, verify="equivalence")
    att = res.module.get_submodule("att")
    assert isinstance(att, fxprune.PrunedMultiheadAttention) and att.num_heads == 3 and att.head_dim == 2
    torch.testing.assert_close(res.module(*xs), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_zoo_matches_masked_reference(name, ratio):
    model, xs = build(name, seed=7)
    res = fxprune.compile(model, xs, importance="l1", ratio=ratio, verify="equivalence")
    assert res.report.macs_after <= res.report.macs_before


# -- options -------------------------------------------------------------------------------------------
def test_ignore_keeps_every_group_touching_the_module():
    model, xs = build("residual")
    res = fxprune.compile(model, xs, ratio=0.5, ignore=["c1"])
    assert res.module.get_submodule("c1").out_channels == 8
    assert res.module.get_submodule("c1").in_channels == 8  # the residual stream touches c1's input
    assert any("ignored module c1" in why for _, why in res.report.blocked)


def test_round_to_and_min_keep():
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 30, 3), nn.ReLU(), nn.Conv2d(30, 2, 1))
    res = fxprune.compile(model, img(hw=10), ratio=0.7, round_to=8)
    assert res.module.get_submodule("0").out_channels == 16  # 40 - 28 = 12 -> 16
    assert res.module.get_submodule("2").out_channels == 16  # 30 - 21 = 9 -> 16
    res = fxprune.compile(model, img(hw=10), ratio=0.99, min_keep=3)
    assert res.module.get_submodule("0").out_channels == 3


def test_grouped_conv_keeps_groups_uniform():
    model, xs = build("grouped")
    res = fxprune.compile(model, xs, ratio=0.5, verify="equivalence")
    g = res.module.get_submodule("g")
    assert g.groups == 4 and g.in_channels % 4 == 0 and g.out_channels % 4 == 0
    assert g.in_channels == 4 and g.out_channels == 8


def test_global_ranking_removes_the_requested_fraction():
    model, xs = build("concat")
    res = fxprune.compile(model, xs, ratio=0.5, global_ranking=True, verify="equivalence")
    a = res.analysis
    total = sum(g.size for g in a.prunable)
    removed = sum(a.groups[gid].size - len(k) for gid, k in res.selection.keep)
    assert removed == math.floor(0.5 * total)


def test_threshold_removes_exactly_the_low_scores():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 7, dtype=torch.float32)[:, None].repeat(1, 4))
        model[0].bias.zero_()
        model[2].weight.fill_(0.0)
    res = fxprune.compile(model, torch.randn(3, 4), importance="l1", threshold=8.0)
    # L1 of unit i = 4*(i+1): units 0 and 1 (4, 8) go, units 2..5 stay
    assert res.selection.keep == ((0, (2, 3, 4, 5)),)


def test_target_macs():
    model, xs = build("residual")
    base = fxprune.compile(model, xs, ratio=0.0).report.macs_before
    res = fxprune.compile(model, xs, target_macs=0.5, verify="equivalence")
    assert res.report.macs_after <= 0.5 * base
    assert res.report.macs_after > 0.2 * base  # the search does not overshoot wildly
    with pytest.raises(fxprune.ConfigError, match="not reachable"):
        fxprune.compile(model, xs, target_macs=10)


def test_per_module_ratios():
    model, xs = build("residual")
    res = fxprune.compile(model, xs, ratio=0.0, ratios={"c1": 0.5})
    assert res.module.get_submodule("c1").out_channels == 4
    assert res.module.get_submodule("stem").out_channels == 8


def test_importance_choices_and_objects():
    model, xs = build("concat")
    for imp in ("l1", "l2", "bn_scale", "random", fxprune.MagnitudeImportance(p=1, roles=("out",))):
        res = fxprune.compile(model, xs, importance=imp, ratio=0.5, verify="equivalence")
        assert res.report.params_after < res.report.params_before


def test_bn_scale_removes_smallest_gammas():
    model, xs = build("concat")
    with torch.no_grad():
        model.bn.weight.copy_(torch.arange(1.0, 12.0, dtype=torch.float64))
    res = fxprune.compile(model, xs, importance="bn_scale", ratio=0.5)
    kept = set()
    for gid, k in res.selection.keep:
        kept |= set(k)
    # groups: a (6 ch, γ 1..6) and b (5 ch, γ 7..11): each keeps its largest γ
    keep = dict(res.selection.keep)
    sizes = sorted(res.analysis.groups[g].size for g in keep)
    assert sizes == [5, 6]
    for gid, k in keep.items():
        g = res.analysis.groups[gid]
        assert k == tuple(range(g.size - len(k), g.size))


# -- pipelines ---------------------------------------------------------------------------------------------
def test_pipeline_string_and_objects_agree():
    model, xs = build("split")
    a = fxprune.compile(model, xs, pipeline="group | importance(criterion='l1') | select(ratio=0.5) | rewrite | verify")
    b = fxprune.compile(model, xs, pipeline=[fxprune.GroupChannels(), fxprune.MagnitudeImportance(p=1),
                                             fxprune.Select(ratio=0.5), fxprune.Rewrite(), fxprune.Verify()])
    c = fxprune.compile(model, xs, importance="l1", ratio=0.5)
    assert a.selection == b.selection == c.selection


def test_malformed_pipeline_fails_before_running():
    calls = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            calls.append(1)
            return self.c(x)

    with pytest.raises(fxprune.PipelineError, match="'select' reads"):
        fxprune.compile(Spy(), img(), pipeline="group | select(ratio=0.5) | importance | rewrite")
    with pytest.raises(fxprune.PipelineError, match="unknown pass"):
        fxprune.compile(Spy(), img(), pipeline="group | frobnicate")
    assert calls == []


def test_user_function_pass_reads_meta():
    seen = {}

    @fxprune.graph_pass(name="spy", reads=("groups",))
    def spy(gm, ctx):
        seen["n"] = len(fxprune.meta.get(gm, "groups").groups)

    model, xs = build("concat")
    fxprune.compile(model, xs, pipeline=[fxprune.GroupChannels(), spy, fxprune.MagnitudeImportance(),
                                         fxprune.Select(ratio=0.5), fxprune.Rewrite()])
    assert seen["n"] >= 3


def test_composition_of_two_prunings_equals_one():
    """Prune A, then prune B from the result == prune A ∪ B at once (same module weights)."""
    model, xs = build("concat", seed=2)
    gm, _ = fxprune.prepare(model, xs)
    analysis = analyze_graph(gm)
    ga = next(g for g in analysis.prunable if g.size == 6)
    gb = next(g for g in analysis.prunable if g.size == 5)
    sel_a = fxprune.Selection.from_dict({ga.id: (0, 2, 3, 5)})
    sel_both = fxprune.Selection.from_dict({ga.id: (0, 2, 3, 5), gb.id: (1, 2, 4)})
    one = fxprune.passes.rewrite_graph(gm, analysis, sel_both, xs)
    first = fxprune.passes.rewrite_graph(gm, analysis, sel_a, xs)
    a2 = analyze_graph(first)
    gb2 = next(g for g in a2.prunable if g.size == 5)
    two = fxprune.passes.rewrite_graph(first, a2, fxprune.Selection.from_dict({gb2.id: (1, 2, 4)}), xs)
    torch.testing.assert_close(one(*xs), two(*xs), rtol=0, atol=0)
    for (n1, p1), (n2, p2) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


# -- bad input ----------------------------------------------------------------------------------------------
class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 2, 3)
        self.calls = 0

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(ratio=1.0), fxprune.ConfigError, "0 <= ratio < 1"),
        (dict(ratio=-0.1), fxprune.ConfigError, "0 <= ratio < 1"),
        (dict(ratio="0.5"), fxprune.ConfigError, "ratio"),
        (dict(ratio=float("nan")), fxprune.ConfigError, "ratio"),
        (dict(threshold=float("inf")), fxprune.ConfigError, "threshold"),
        (dict(threshold="low"), fxprune.ConfigError, "threshold"),
        (dict(ratio=0.5, threshold=0.1), fxprune.ConfigError, "only one"),
        (dict(), fxprune.ConfigError, "ratio"),
        (dict(ratio=0.5, ignore=["nope"]), fxprune.ConfigError, "no module named 'nope'"),
        (dict(ratio=0.5, importance="l3"), fxprune.ConfigError, "unknown importance"),
        (dict(ratio=0.5, round_to=0), fxprune.ConfigError, "round_to"),
        (dict(ratio=0.5, min_keep=0), fxprune.ConfigError, "min_keep"),
        (dict(ratio=0.5, unknown_ops="guess"), fxprune.ConfigError, "unknown_ops"),
        (dict(ratio=0.5, verify="maybe"), fxprune.ConfigError, "verify"),
    ],
)
def test_bad_options_fail_before_any_work(kwargs, err, match, monkeypatch):
    model = Counting()
    snap = snapshot(model)
    traced = []
    monkeypatch.setattr(fxprune.api, "prepare_with_note", lambda *a, **k: traced.append(1))
    with pytest.raises(err, match=match):
        fxprune.compile(model, img(), **kwargs)
    assert traced == []
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("inputs, match", [
    ([1, 2], "no tensor"), ("x", "tensor"), ((), "empty"), ({"x": [object()]}, "tensor"),
])
def test_non_tensor_inputs(inputs, match):
    with pytest.raises(fxprune.InputError, match=match):
        fxprune.compile(Counting(), inputs, ratio=0.5)


def test_keyword_example_inputs():
    """A mapping is keyword arguments (a tokenizer's BatchEncoding); calibration batches then are mappings too."""
    torch.manual_seed(0)
    model = Counting().eval()
    x = img()
    res = fxprune.compile(model, {"x": x}, ratio=0.5, importance="thinet", calib=[{"x": img()} for _ in range(2)])
    assert type(res.module) is Counting and res.module.a.out_channels == 4
    assert torch.equal(res.module(x=x), res.graph_module(x=x))
    with pytest.raises(fxprune.InputError, match="mapping"):
        fxprune.compile(model, {"x": x}, ratio=0.5, importance="thinet", calib=[(img(),)])


def test_model_that_fails_on_the_inputs():
    model = Counting()
    snap = snapshot(model)
    with pytest.raises(fxprune.InputError, match="fails to run on the example inputs") as ei:
        fxprune.compile(model, img(c=5), ratio=0.5)
    assert "node 'a'" in str(ei.value)
    assert_model_unchanged(model, snap)


def test_untraceable_model_names_the_module():
    class Inner(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value
                return x
            return -x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.body = Inner()

        def forward(self, x):
            return self.body(self.conv(x))

    model = Outer()
    snap = snapshot(model)
    with pytest.raises(fxprune.TraceError, match=r"module 'body' \(Inner\)") as ei:
        fxprune.compile(model, img(), ratio=0.5)
    assert "hint" in str(ei.value) and "leaf_modules" in str(ei.value)
    assert_model_unchanged(model, snap)


def test_model_not_a_module():
    with pytest.raises(fxprune.InputError, match="nn.Module"):
        fxprune.compile(lambda x: x, img(), ratio=0.5)


def test_user_model_untouched_even_in_train_mode_with_batchnorm():
    model = randomize(Residual()).train()
    snap = snapshot(model)
    fxprune.compile(model, img(), ratio=0.5, verify="equivalence")
    assert_model_unchanged(model, snap, training=True)  # running stats were not updated


# -- unknown and channel-reordering ops --------------------------------------------------------------------
def _reorder_channels(x):
    return x.flip(1)


torch.fx.wrap("_reorder_channels")  # one graph node whose channel behaviour fxprune has no rule for


class Reordered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 3, 1)
        self.c = nn.Conv2d(3, 6, 1)
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.b(_reorder_channels(self.a(x)))  # reorders channels
        return self.d(F.relu(self.c(y)))


def test_unknown_op_raises_with_node_source_line_and_fix():
    with pytest.raises(fxprune.UnsupportedOpError) as ei:
        fxprune.compile(Reordered(), img(), ratio=0.5, frontend="fx")  # (auto would trace through it: below)
    msg = str(ei.value)
    assert "node '_reorder_channels'" in msg
    assert "test_compile.py" in msg and "_reorder_channels(self.a(x))" in msg  # the user's source line
    assert "register_function_rule" in msg and "unknown_ops='block'" in msg


def test_auto_traces_through_a_wrapped_function_with_torch_export():
    """fx keeps a torch.fx.wrap'd Python function whole; with no rule for it, auto retries on the export path,
    which traces through it into ATen ops (here a flip along the channels: that group is kept whole)."""
    torch.manual_seed(0)
    res = fxprune.compile(Reordered().eval(), img(), ratio=0.5, verify="equivalence")
    assert any("traced through test_compile._reorder_channels" in n for n in res.report.notes)
    assert res.report.macs_after < res.report.macs_before
    assert res.module.get_parameter("a.weight").shape[0] == 8  # flipped channels: kept
    assert res.module.get_parameter("c.weight").shape[0] == 3  # unrelated group: pruned


def _reorder_if_positive(x):
    return x.flip(1) if x.sum() > 0 else x  # data-dependent: torch.export cannot trace through it


torch.fx.wrap("_reorder_if_positive")


class Irreparable(nn.Module):
    """A wrapped function whose channel behaviour no front end can see: the error names both attempts."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.b(_reorder_if_positive(self.a(x)))


def test_wrapped_function_without_rule_and_export_failing_raises_the_fx_error():
    with pytest.raises(fxprune.UnsupportedOpError) as ei:
        fxprune.compile(Irreparable(), img(), ratio=0.5)
    assert "node '_reorder_if_positive'" in str(ei.value)
    assert any("also tried the torch.export front end" in n for n in getattr(ei.value, "__notes__", []))


def test_unknown_op_in_block_mode_blocks_and_reports():
    res = fxprune.compile(Reordered(), img(), ratio=0.5, unknown_ops="block", verify="equivalence")
    assert res.module.get_submodule("a").out_channels == 8  # feeds the unknown op: kept
    assert res.module.get_submodule("c").out_channels == 3  # unrelated group: pruned
    assert any("_reorder_channels" in why for _, why in res.report.blocked)
    assert any("_reorder_channels" in n for n in res.report.notes)


def _custom(x):
    return x * 2


torch.fx.wrap("_custom")


class CustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.b(_custom(self.a(x)))


def test_custom_function_is_unknown_until_registered():
    with pytest.raises(fxprune.UnsupportedOpError, match="_custom"):
        fxprune.compile(CustomOp(), img(), ratio=0.5, frontend="fx")
    table = fxprune.RuleTable()
    table.modules, table.methods = dict(fxprune.RULES.modules), dict(fxprune.RULES.methods)
    table.functions = dict(fxprune.RULES.functions)
    from fxprune.rules.elementwise import Unary

    fxprune.register_function_rule(_custom, Unary("custom"), table=table)
    res = fxprune.compile(CustomOp(), img(), ratio=0.5, rules=table, verify="equivalence")
    assert res.module.get_submodule("a").out_channels == 4
    assert fxprune.RULES.functions.get(_custom) is None  # the global table was not touched


def test_channel_shuffle_by_index_is_not_guessed():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 3, 1)
            self.register_buffer("perm", torch.randperm(8))

        def forward(self, x):
            return self.b(self.a(x)[:, self.perm])

    res = fxprune.compile(Shuffle(), img(), ratio=0.5, verify="equivalence")
    assert res.module.get_submodule("a").out_channels == 8
    assert res.report.blocked  # and the report says why


def test_view_transpose_channel_shuffle_keeps_groups():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
            return self.b(y)

    res = fxprune.compile(Shuffle(), img(), ratio=0.5, verify="equivalence")
    assert res.module.get_submodule("a").out_channels == 4  # channel j of both shuffle groups together


def test_lossy_norm_is_blocked_unless_allowed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(1, 8), nn.ReLU(), nn.Conv2d(8, 2, 3))
    res = fxprune.compile(model, img(), ratio=0.5)
    assert res.module.get_submodule("0").out_channels == 8
    assert any("allow_lossy" in why for _, why in res.report.blocked)
    res = fxprune.compile(model, img(), ratio=0.5, allow_lossy=True, verify="equivalence")
    assert res.module.get_submodule("0").out_channels == 4
    assert res.module.get_submodule("1").num_channels == 4
    assert any("skipped" in n for n in res.report.notes)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_group_norm_prunes_whole_groups_exactly(frontend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.GroupNorm(4, 12), nn.ReLU(), nn.Conv2d(12, 2, 3)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    res = fxprune.compile(model, img(), ratio=0.5, frontend=frontend, verify="equivalence")
    assert not res.report.blocked and not any("lossy" in n for n in res.report.notes)
    convs = [m for m in res.module.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        assert convs[0].out_channels == 6 and res.module.get_submodule("1").num_groups == 2
    assert res.report.macs_after < res.report.macs_before


def test_negative_index_into_split_output():
    """Res2Net-style block: ``torch.split`` by an int size, the last piece read as ``spx[-1]``."""

    class Res2(nn.Module):
        def __init__(self, width=4, scale=4):
            super().__init__()
            self.width = width
            self.conv1 = nn.Conv2d(3, width * scale, 1)
            self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(scale - 1))
            self.pool = nn.AvgPool2d(3, 1, 1)
            self.conv3 = nn.Conv2d(width * scale, 5, 1)

        def forward(self, x):
            spx = torch.split(self.conv1(x), self.width, 1)
            spo, sp = [], spx[0]
            for i, conv in enumerate(self.convs):
                sp = spx[i] if i == 0 else sp + spx[i]
                sp = conv(sp)
                spo.append(sp)
            spo.append(self.pool(spx[-1]))
            return self.conv3(torch.cat(spo, 1))

    model = Res2().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for seed in range(3):
        assert_prune_equivalent(model, (x,), seed=seed)
    res = fxprune.compile(model, x, ratio=0.5, verify="equivalence")
    assert res.module.get_submodule("conv3").in_channels < 16


def test_reshape_to_a_shape_computed_at_run_time_is_kept():
    """``x.reshape(x.shape[:2] + (-1,))`` (timm MaxViT): no literal to patch, so those dims keep their size."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            z = y.reshape(y.shape[:2] + (-1,))
            return self.fc(z.transpose(1, 2))

    model = M().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    res = fxprune.compile(model, x, ratio=0.5, verify="equivalence")
    assert res.module.get_submodule("a").out_channels == 4  # the inner group is free
    assert res.module.get_submodule("b").out_channels == 8  # feeds the run-time reshape: kept
    assert any("computed at run time" in why for _, why in res.report.blocked)
    assert res.module(x).shape == model(x).shape


def test_result_class_refuses_a_forward_that_hard_codes_a_pruned_size():
    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            y = self.a(x).view(x.shape[0], 2, 4)  # 8 channels as 2 x 4, written as literals
            return self.b(y.flatten(1))

    torch.manual_seed(0)
    x = torch.randn(3, 5)
    auto = fxprune.compile(HardCoded(), x, ratio=0.5)
    assert auto.report.form == "GraphModule" and auto.module is auto.graph_module
    assert "could not be kept" in str(auto.report)
    with pytest.raises(fxprune.VerificationError, match="could not be kept"):
        fxprune.compile(HardCoded(), x, ratio=0.5, result="class")
