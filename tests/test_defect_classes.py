"""Regression tests for the defect classes of the adversarial review: what the graph cannot carry is
refused, a channel count used as a number keeps its value, tied tensors stay tied, a compile that does
less than asked says so. Oracles are the user's own model (exact removals of dead channels) or its outputs,
never fxprune's plan."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ConfigError, FxpruneWarning, InputError, ShortfallError, summary
from fxprune.fileformat import checksum
from fxprune.serialize import FormatError
from fxprune.testing import assert_pruned_like_original
from fxprune.testing.strategies.adversarial import GroupedConcat

FRONTENDS = ["fx", "export"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


# -- 1. what the tracer does not see is refused -------------------------------------------------------------
@pytest.mark.parametrize("where", ["root", "child"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_module_hooks_are_refused_not_dropped(where, kind):
    model = _mlp()
    mod = model if where == "root" else model[0]
    if kind == "forward":
        mod.register_forward_hook(lambda m, i, o: o.softmax(-1))
    else:
        mod.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    with pytest.raises(InputError, match="hook") as err:
        fxprune.compile(model, torch.randn(3, 8), ratio=0.0, verify="equivalence")
    assert "the model itself" in str(err.value) if where == "root" else "model.0" in str(err.value)
    assert __file__.split("/")[-1] in str(err.value)  # names where the hook was defined


def test_parametrizations_and_weight_norm_are_refused_with_the_fix():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(InputError, match="remove_parametrizations"):
        fxprune.compile(model, torch.randn(3, 8), ratio=0.5)
    old = nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(InputError, match="remove_weight_norm"):
        fxprune.compile(old, torch.randn(3, 8), ratio=0.5)
    # after the documented fix, it compiles
    nn.utils.parametrize.remove_parametrizations(model[0], "weight", leave_parametrized=True)
    assert fxprune.compile(model, torch.randn(3, 8), ratio=0.5).report.groups_pruned == 1


def test_meta_device_model_is_an_input_error():
    model = nn.Sequential(nn.Linear(8, 16, device="meta"), nn.ReLU(), nn.Linear(16, 4, device="meta"))
    with pytest.raises(InputError, match="meta device"):
        fxprune.compile(model, torch.randn(3, 8), ratio=0.5)


# -- 2. a channel count used as a number keeps its original value ---------------------------------------------
class _SizeAsValue(nn.Module):
    """Channels 4..7 of ``a`` are dead and unread (zero weights, bias and consumer columns: the lowest L1 in
    the group, so exactly those go); removing them is exact, but the scale reads the channel count."""

    def __init__(self, use_size: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.use_size = use_size
        with torch.no_grad():
            self.a.weight[4:] = 0
            self.a.bias[4:] = 0
            self.b.weight[:, 4:] = 0

    def forward(self, x):
        y = torch.relu(self.a(x))
        c = y.size(1) if self.use_size else y.shape[1]
        return self.b(y * c ** -0.5 * (1.0 + 1.0 / c))


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("use_size", [False, True])
def test_channel_count_in_arithmetic_keeps_its_value(frontend, use_size):
    model = _SizeAsValue(use_size).eval()
    x = torch.randn(5, 8)
    res = fxprune.compile(model, (x,), ratio=0.5, importance="l1", frontend=frontend)
    assert res.report.groups_pruned == 1 and res.graph_module.b.weight.shape == (4, 4)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-6)
    # the user's own forward recomputes the count, so the class is not kept (and the report says why)
    assert res.report.form == "GraphModule"


def test_channel_count_feeding_a_view_still_follows_the_pruning():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            y = self.a(x)
            z = y.view(y.shape[0], y.shape[1] // 2, 2).flatten(1)
            return self.b(z)

    torch.manual_seed(0)
    model = M().eval()
    res = fxprune.compile(model, torch.randn(4, 8), ratio=0.5, verify="equivalence")
    assert res.module(torch.randn(6, 8)).shape == (6, 3)


# -- 3. tied parameters stay one tensor -----------------------------------------------------------------------
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.relu(self.mid(self.emb(t))))


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("result", ["graph", "auto"])
def test_tied_embedding_and_head_stay_one_parameter(frontend, result):
    torch.manual_seed(0)
    model = _Tied().eval()
    t = torch.randint(0, 10, (2, 5))
    n0 = sum(p.numel() for p in model.parameters())
    same = fxprune.compile(model, (t,), ratio=0.0, frontend=frontend, result=result)
    assert sum(p.numel() for p in same.module.parameters()) == n0
    res = fxprune.compile(model, (t,), ratio=0.5, frontend=frontend, result=result, verify="equivalence")
    pm = res.module
    tied = [p for n, p in pm.named_parameters(remove_duplicate=False) if n.startswith(("emb", "head"))]
    assert len({id(p) for p in tied}) == 1  # (the export graph names it once)
    w = tied[0]
    assert sum(p.numel() for p in pm.parameters()) == 10 * 4 + 4 * 4 + 4
    # the one tensor: the lookup and the head read the same kept columns (an independent oracle: the
    # original with the dropped columns of the shared weight zeroed, and mid's dropped rows/columns zeroed)
    kept = [i for i in range(8) if any(torch.equal(model.emb.weight[:, i], w[:, j]) for j in range(4))]
    assert len(kept) == 4
    ref = _Tied().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        drop = [i for i in range(8) if i not in kept]
        ref.emb.weight[:, drop] = 0
        ref.mid.weight[drop] = 0
        ref.mid.weight[:, drop] = 0
        ref.mid.bias[drop] = 0
    torch.testing.assert_close(pm(t), ref(t), rtol=1e-5, atol=1e-6)


# -- 5. grouped (non-depthwise) transposed convolutions ---------------------------------------------------------
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_grouped_transposed_conv_prunes_exactly_dead_channels(frontend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 12, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(12, 4, 1)).eval()
    with torch.no_grad():  # one dead input per conv group (1, 5) and one dead output per group (0, 6)
        for c in (1, 5):
            model[0].weight[c] = 0
            model[0].bias[c] = 0
            model[2].weight[c] = 0
        model[2].weight[:, 0] = 0
        model[2].bias[[0, 6]] = 0
        model[4].weight[:, [0, 6]] = 0
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(model, (x,), ratio=0.25, importance="l1", frontend=frontend)
    sd = res.graph_module.state_dict()
    assert sd["2.weight"].shape == (6, 5, 3, 3) and sd["2.bias"].shape == (10,)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-6)  # the oracle: the model itself
    torch.testing.assert_close(res.module(torch.randn(3, 3, 8, 8)).shape, torch.Size([3, 4, 8, 8]))


# -- 6. grouped convs reading a concat: the blocks mix two channel groups, selected as one ------------------------
@pytest.mark.parametrize("seed", range(8))
def test_grouped_conv_over_a_concat_prunes_its_inputs_uniformly(seed):
    torch.manual_seed(seed)
    g = 2 + seed % 3
    total = g * (2 + seed % 4)
    ca = 1 + (seed * 7) % (total - 1)  # includes one-channel branches and blocks straddling the boundary
    model = GroupedConcat(ca, total - ca, g).eval()
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(model, x, ratio=0.5 + 0.1 * (seed % 3), verify="equivalence", absorb=False)
    conv = res.graph_module.g
    assert conv.in_channels < total and conv.in_channels % g == 0 and conv.groups == g
    assert res.graph_module.a.out_channels >= 1 and res.graph_module.b.out_channels >= 1
    assert_pruned_like_original(model, res.module, x)


# -- 4. a fold is called exact only where it is ---------------------------------------------------------------
def test_absorb_says_when_a_constant_channel_also_reaches_a_gated_consumer():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc, self.c2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 3, padding=1)
            with torch.no_grad():
                self.bn.weight[:4] = 0
                self.bn.bias.uniform_(0.5, 1.0)

        def forward(self, x):
            y = torch.relu(self.bn(self.c1(x)))
            return self.c2(y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True))))

    torch.manual_seed(0)
    res = fxprune.compile(SE().eval(), torch.randn(2, 3, 8, 8), ratio=0.5, importance="bn_scale", frontend="fx")
    notes = " ".join(res.report.notes)
    assert "also reach c2" in notes and "(exact)" not in notes


# -- 8. options are checked before any work --------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(ratios={"nope": 0.3}), dict(seed="a"), dict(global_ranking=1),
                                 dict(strict="yes"), dict(ratio="0.5"), dict(verify="all")])
def test_bad_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        fxprune.compile(_mlp(), torch.randn(3, 8), **({"ratio": 0.5} | bad))


def test_ignore_none_means_none():
    assert fxprune.compile(_mlp(), torch.randn(3, 8), ratio=0.5, ignore=None).report.groups_pruned == 1


# -- 9. a compile that does less than asked says so -----------------------------------------------------------
def test_nothing_pruned_warns_heads_the_report_and_strict_raises():
    model = nn.Sequential(nn.Linear(8, 4))  # its only group is the network output
    with pytest.warns(FxpruneWarning, match="nothing pruned"):
        res = fxprune.compile(model, torch.randn(3, 8), ratio=0.5)
    assert str(res.report).splitlines()[0].startswith("fxprune: did less than asked: nothing pruned")
    assert res.report.shortfall
    with pytest.raises(ShortfallError, match="network output"):
        fxprune.compile(model, torch.randn(3, 8), ratio=0.5, strict=True)


def test_a_compile_that_does_what_was_asked_is_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxpruneWarning)
        res = fxprune.compile(_mlp(), torch.randn(3, 8), ratio=0.5, strict=True)
    assert not res.report.shortfall and res.report.groups_pruned == 1
    # a threshold may rightly find nothing below it: not a shortfall
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxpruneWarning)
        fxprune.compile(_mlp(), torch.randn(3, 8), threshold=0.0)


def test_a_criterion_that_cannot_score_is_a_shortfall():
    # BN scale on a network without a norm: every group lacks a score and is kept
    with pytest.warns(FxpruneWarning, match="have no score"):
        res = fxprune.compile(_mlp(), torch.randn(3, 8), ratio=0.5, importance="bn_scale")
    first = str(res.report).splitlines()[0]
    assert "nothing pruned" in first and "have no score" in first
    with pytest.raises(ShortfallError, match="have no score"):
        fxprune.compile(_mlp(), torch.randn(3, 8), ratio=0.5, importance="bn_scale", strict=True)


@pytest.mark.parametrize("x", [torch.full((3, 8), float("nan")), torch.randn(0, 8)], ids=["nan", "empty"])
def test_equivalence_check_refuses_vacuous_inputs(x):
    with pytest.raises(InputError, match="proves nothing|compare equal"):
        fxprune.compile(_mlp(), x, ratio=0.5, verify="equivalence")


# -- 10. saved files: dtypes checked against the plan, optional HMAC --------------------------------------------
def _edited(path, tmp_path, change):
    body = torch.load(path, weights_only=True)
    change(body)
    body["checksum"] = checksum(body)  # an edit that recomputes the unkeyed checksum
    out = tmp_path / "edited.fxp"
    torch.save(body, out)
    return out


def test_load_checks_dtypes_and_the_optional_hmac(tmp_path):
    model = _mlp()
    res = fxprune.compile(model, torch.randn(3, 8), ratio=0.5)
    plain, keyed = tmp_path / "plain.fxp", tmp_path / "keyed.fxp"
    fxprune.save(res, plain)
    fxprune.save(res, keyed, key=b"secret")
    x = torch.randn(5, 8)
    torch.testing.assert_close(fxprune.load(keyed, _mlp(), key=b"secret")(x), res.module(x))
    torch.testing.assert_close(fxprune.load(keyed, _mlp())(x), res.module(x))  # no key given: checksum only

    def widen_bias(body):
        body["state_dict"]["0.bias"] = body["state_dict"]["0.bias"].double()

    with pytest.raises(FormatError, match="dtype"):
        fxprune.load(_edited(plain, tmp_path, widen_bias), _mlp())

    def scale(body):
        body["state_dict"]["2.weight"] = body["state_dict"]["2.weight"] * 2

    edited = _edited(keyed, tmp_path, scale)
    fxprune.load(edited, _mlp())  # without the key the edit is undetectable: that is what the key is for
    with pytest.raises(FormatError, match="HMAC"):
        fxprune.load(edited, _mlp(), key=b"secret")
    with pytest.raises(FormatError, match="HMAC"):
        fxprune.load(keyed, _mlp(), key=b"other")
    with pytest.raises(FormatError, match="no HMAC"):
        fxprune.load(plain, _mlp(), key=b"secret")
    # a model cast as a whole before saving loads in that dtype
    res.graph_module.to(torch.float64)
    fxprune.save(res, tmp_path / "f64.fxp")
    back = fxprune.load(tmp_path / "f64.fxp", _mlp())
    assert all(p.dtype == torch.float64 for p in back.parameters())


def test_notes_quote_errors_without_cutting_a_sentence():
    assert summary(ValueError("neither front end can capture Net:\n  fx: x\n  export: y")) == \
        "neither front end can capture Net: fx: x"
    assert summary(RuntimeError("one line\nsecond")) == "one line"
    assert summary(RuntimeError("")) == "RuntimeError"


def test_a_pipeline_asked_to_prune_that_prunes_nothing_warns():
    with pytest.warns(FxpruneWarning, match="nothing pruned"):
        fxprune.compile(nn.Sequential(nn.Linear(8, 4)), torch.randn(3, 8),
                        pipeline="group | importance | select(ratio=0.5) | rewrite | verify")
