"""AbsorbConstants: removing channels whose output is a constant (γ = 0, all-zero filters) is exact.

Oracle: the ORIGINAL model's outputs (float64, tolerance 1e-10) on models without zero padding; with
padding, the interior of the output map and the masked reference with the same absorbed constants.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError, PipelineError
from fxprune.ir import Selection
from fxprune.passes.absorb import AbsorbConstants, plan_absorption
from fxprune.testing import assert_model_unchanged, snapshot

D = torch.float64



pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

def _rand_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _zero(bn: nn.Module, idx) -> None:
    """γ = 0 and a positive β (so relu(β) ≠ 0 and dropping the channel would change the output)."""
    with torch.no_grad():
        bn.weight[list(idx)] = 0.0
        bn.bias[list(idx)] = bn.bias[list(idx)].abs() + 0.1


class ConvBNConv(nn.Module):
    def __init__(self, bias: bool = True, pad: int = 0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=pad)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 5, 3, bias=bias, padding=pad)

    def forward(self, x):
        return self.c2(F.relu(self.b1(self.c1(x))))


class NoBiasThenBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, bias=False)
        self.b2 = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        return self.c3(F.relu(self.b2(self.c2(y))))


class ResidualNoPad(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3)
        self.bn0 = nn.BatchNorm2d(c)
        self.c1 = nn.Conv2d(c, c, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(y)))
        return self.head(F.max_pool2d(x, 2).mean((2, 3)))


class FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3)
        self.b1 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.b1(self.c1(x))), 2), 1))


class ConcatDepthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.ba = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(3, 5, 3)
        self.bb = nn.BatchNorm2d(5)
        self.dw = nn.Conv2d(9, 9, 3, groups=9)
        self.bd = nn.BatchNorm2d(9)
        self.pw = nn.Conv2d(9, 3, 1, bias=False)

    def forward(self, x):
        y = torch.cat([F.relu(self.ba(self.a(x))), F.relu6(self.bb(self.b(x)))], 1)
        return self.pw(F.relu(self.bd(self.dw(y))))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(10, 12)
        self.bn = nn.BatchNorm1d(12)
        self.l2 = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        return self.l2(torch.tanh(self.bn(self.l1(x))))


def _fixed(sel: Selection):
    @fxprune.graph_pass(name="fixed", reads=("groups",), writes=("selection",))
    def fixed(gm_, ctx):
        fxprune.meta.put(gm_, "selection", sel)

    return fixed


def _img(n=2, c=3, hw=10):
    return torch.randn(n, c, hw, hw, dtype=D, generator=torch.Generator().manual_seed(5))


def _close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _compile_exact(model, x, **kw):
    snap = snapshot(model)
    res = fxprune.compile(model, x, importance="bn_scale", threshold=0.0, verify="equivalence", **kw)
    assert_model_unchanged(model, snap, training=False)
    with torch.no_grad():
        _close(res.module(x), model(x))
    return res


# -- exactness against the original model -------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_relu_conv_is_exact(bias):
    model = _rand_bn(ConvBNConv(bias=bias)).to(D).eval()
    _zero(model.b1, [1, 4, 6])
    res = _compile_exact(model, _img())
    assert res.module.get_submodule("c1").out_channels == 5
    assert res.module.get_submodule("c2").bias is not None  # created when missing
    assert any("exact" in n for n in res.report.notes)
    # without absorption the same removal loses β's contribution
    plain = fxprune.compile(model, _img(), importance="bn_scale", threshold=0.0, absorb=False)
    with torch.no_grad():
        assert (plain.module(_img()) - model(_img())).abs().max() > 1e-3


def test_no_bias_consumer_followed_by_bn_uses_running_mean():
    model = _rand_bn(NoBiasThenBN()).to(D).eval()
    _zero(model.b1, [0, 3])
    res = _compile_exact(model, _img())
    c2 = res.module.get_submodule("c2")
    assert c2.bias is None  # folded into b2.running_mean instead of creating a bias
    rec = res.absorbed
    assert [(r.module, r.attr) for r in rec] == [("b2", "running_mean")]
    # "bias" mode creates the bias instead; both exact
    pipe = ("group | importance(criterion='bn_scale') | select(threshold=0.0) | rewrite | absorb(into='bias') "
            "| verify(equivalence=True)")
    res2 = fxprune.compile(model, _img(), pipeline=pipe)
    assert res2.module.get_submodule("c2").bias is not None
    with torch.no_grad():
        _close(res2.module(_img()), model(_img()))


def test_residual_group_with_all_gammas_zero_is_exact():
    model = _rand_bn(ResidualNoPad()).to(D).eval()
    _zero(model.bn0, [2, 5])  # residual stream: both BNs of the unit must be 0 to remove it
    _zero(model.b2, [2, 5, 7])  # unit 7: γ_bn0 ≠ 0, so it stays
    _zero(model.b1, [0, 1])  # block-internal group
    res = _compile_exact(model, _img())
    assert res.module.get_submodule("stem").out_channels == 6
    assert res.module.get_submodule("c1").out_channels == 6
    consumers = {r.consumer for r in res.absorbed}
    assert {"c1", "c2", "head"} <= consumers


def test_flatten_linear_consumer_every_position():
    model = _rand_bn(FlattenHead()).to(D).eval()
    _zero(model.b1, [0, 2, 5])
    x = _img(c=1, hw=8)
    res = _compile_exact(model, x)
    assert res.module.get_submodule("fc").in_features == 3 * 9


def test_concat_and_depthwise_are_channel_local():
    model = _rand_bn(ConcatDepthwise()).to(D).eval()
    _zero(model.ba, [1])
    _zero(model.bb, [0, 3])
    with torch.no_grad():
        model.bd.weight[[1, 4, 7]] = 0.0  # same units zeroed after the depthwise conv too: score 0
        model.bd.weight[[0]] = 0.0  # unit 0: γ_ba ≠ 0 (score > 0, kept by threshold) but constant after bd
        model.bd.bias[[0]] = 0.8
    res = _compile_exact(model, _img())
    assert res.module.get_submodule("pw").in_channels == 6
    # removing unit 0 as well (explicit selection) is exact too: the constant is made by bd, after the concat
    g = next(g for g in res.analysis.groups if any(p.param == "bd.weight" for p in g.params))
    sel = Selection.from_dict({g.id: (2, 3, 5, 6, 8)})
    res2 = fxprune.compile(model, _img(), pipeline=[fxprune.GroupChannels(), _fixed(sel), fxprune.Rewrite(),
                                                    AbsorbConstants(), fxprune.Verify(equivalence=True)])
    assert res2.module.get_submodule("pw").in_channels == 5
    with torch.no_grad():
        _close(res2.module(_img()), model(_img()))


def test_mlp_bn1d_tanh():
    model = _rand_bn(MLP()).to(D).eval()
    _zero(model.bn, [3, 4, 9])
    x = torch.randn(6, 10, dtype=D)
    res = _compile_exact(model, x)
    assert res.module.get_submodule("l2").in_features == 9


# -- structural, not data-driven ------------------------------------------------------------------------------
def test_spatially_constant_data_does_not_make_a_channel_constant():
    """A constant image makes every activation spatially constant; nothing must be absorbed."""
    model = _rand_bn(ConvBNConv()).to(D).eval()
    x = torch.ones(1, 3, 10, 10, dtype=D)
    res = fxprune.compile(model, x, importance="l2", ratio=0.5, verify="equivalence")
    assert res.absorbed == ()
    assert res.module.get_submodule("c2").in_channels == 4


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3)
        self.b1 = nn.BatchNorm2d(6)
        self.gate = nn.Conv2d(3, 6, 1)
        self.c2 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        g = torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, 1)))
        return self.c2(F.relu(self.b1(self.c1(x))) * g)


def test_input_dependent_gate_blocks_absorption():
    model = _rand_bn(Gated()).to(D).eval()
    _zero(model.b1, [2])
    x = _img()
    gm, _ = fxprune.prepare(model, x)
    analysis = fxprune.passes.analyze_graph(gm)
    g = next(g for g in analysis.groups if any(p.param == "b1.weight" for p in g.params))
    sel = Selection.from_dict({g.id: tuple(u for u in range(g.size) if u != 2)})
    plans, _ = plan_absorption(gm, analysis, sel)
    assert plans == []  # b1's output is constant, but the product with an input-dependent gate is not

    res = fxprune.compile(model, x, pipeline=[fxprune.GroupChannels(), _fixed(sel), fxprune.Rewrite(), AbsorbConstants(),
                                              fxprune.Verify(equivalence=True)])
    assert res.absorbed == ()


def test_zero_filter_with_bias_is_a_constant_source():
    """A conv unit with an all-zero filter outputs its bias: removing it folds relu(bias) into c2."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).to(D).eval()
    with torch.no_grad():
        model[0].weight[[1, 3]] = 0.0
        model[0].bias[[1, 3]] = torch.tensor([0.7, 1.3], dtype=D)
    x = _img()

    @fxprune.graph_pass(name="fixed", reads=("groups",), writes=("selection",))
    def fixed(gm_, ctx):
        a = fxprune.meta.get(gm_, "groups")
        g = next(g for g in a.groups if g.prunable)
        fxprune.meta.put(gm_, "selection", Selection.from_dict({g.id: (0, 2, 4, 5)}))

    res = fxprune.compile(model, x, pipeline=[fxprune.GroupChannels(), fixed, fxprune.Rewrite(), AbsorbConstants(),
                                              fxprune.Verify(equivalence=True)])
    assert res.module.get_submodule("2").in_channels == 4
    with torch.no_grad():
        _close(res.module(x), model(x))


# -- zero padding: documented approximation ---------------------------------------------------------------------
def test_padding_is_exact_in_the_interior_and_reported():
    model = _rand_bn(ConvBNConv(pad=1)).to(D).eval()
    _zero(model.b1, [2, 3])
    x = _img()
    res = fxprune.compile(model, x, importance="bn_scale", threshold=0.0, verify="equivalence")  # masked ref + absorbed
    assert any("approximate at borders" in n for n in res.report.notes)
    with torch.no_grad():
        got, want = res.module(x), model(x)
    _close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1])
    assert (got - want).abs().max() > 1e-6  # the borders do differ (c2 sees zero padding of a constant channel)


# -- options, bad input ---------------------------------------------------------------------------------------------
def test_bad_options_and_misplaced_pass():
    with pytest.raises(ConfigError):
        AbsorbConstants(into="weights")
    with pytest.raises(ConfigError):
        AbsorbConstants(min_agreement=0)
    model = ConvBNConv().eval()
    # the misplaced pass is rejected before any work: it reads the rewrite's provenance
    with pytest.raises(PipelineError, match=r"'absorb' reads \['pruned_from'\]"):
        fxprune.compile(model, torch.randn(1, 3, 8, 8), pipeline="group | importance | select(ratio=0.5) | absorb")


def test_absorb_is_a_noop_for_ordinary_pruning():
    model = _rand_bn(ResidualNoPad()).to(D).eval()
    x = _img()
    a = fxprune.compile(model, x, ratio=0.5, verify="equivalence")
    b = fxprune.compile(model, x, ratio=0.5, absorb=False)
    assert a.absorbed == ()
    with torch.no_grad():
        _close(a.module(x), b.module(x), atol=0)
