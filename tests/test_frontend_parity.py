"""One op, one place: on a model both front ends capture, every criterion and both reconstruction methods give
the same groups, the same scores, the same selection and the same refit on the fx graph and on the
torch.export (ATen) graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune

CRITERIA = ["l1", "l2", "bn_scale", "thinet", "thinet_forward", "lasso", "apoz", "activation_mean", "taylor",
            "taylor_weight", "hessian"]


class CNN(nn.Module):
    """conv → BN → grouped conv → 1x1 conv → flatten → linear → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y)))
        y = torch.relu(self.c3(y))
        return self.fc2(torch.relu(self.fc(y.flatten(1))))


class Block(nn.Module):
    """A pre-norm transformer MLP block on tokens: LayerNorm → linear → GELU → linear, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(nn.functional.gelu(self.up(self.norm(h))))
        return self.head(h)


def _model(name: str) -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    if name == "cnn":
        m = CNN().eval()
        for bn in (m.bn, m.bn2):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        return m, torch.randn(1, 3, 4, 4), [torch.randn(8, 3, 4, 4) for _ in range(3)]
    return Block().eval(), torch.randn(1, 6, 5), [torch.randn(4, 6, 5) for _ in range(3)]


def _key(g) -> frozenset:
    """A group's identity that does not depend on the front end: its parameter slices."""
    return frozenset((p.param, p.dim, p.role, str(p.span)) for p in g.params)


def _compare(a, b) -> None:
    ga = {_key(g): g for g in a.analysis.groups}
    gb = {_key(g): g for g in b.analysis.groups}
    assert set(ga) == set(gb), "the front ends found different groups"
    sa, sb = a.facts.get("importance") or {}, b.facts.get("importance") or {}
    for k, g in ga.items():
        assert (g.id in sa) == (gb[k].id in sb)
        if g.id in sa:
            torch.testing.assert_close(torch.as_tensor(sa[g.id]), torch.as_tensor(sb[gb[k].id]), rtol=1e-6, atol=1e-6)
        assert a.selection.kept(g) == b.selection.kept(gb[k]), f"different selection in group {g.root}"
    pa, pb = dict(a.module.named_parameters()), dict(b.module.named_parameters())
    assert set(pa) == set(pb)
    for n in pa:
        assert pa[n].shape == pb[n].shape, n
        torch.testing.assert_close(pa[n], pb[n], rtol=1e-6, atol=1e-6, msg=f"different weights in {n}")


@pytest.mark.parametrize("model", ["cnn", "block"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_criteria_agree_across_front_ends(model, criterion):
    m, x, calib = _model(model)
    if criterion == "bn_scale" and model == "block":
        pytest.skip("no BatchNorm in the block")
    kw = dict(importance=criterion, ratio=0.5, calib=calib, absorb=False)
    a = fxprune.compile(m, x, frontend="fx", **kw)
    b = fxprune.compile(m, x, frontend="export", **kw)
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in b.graph_module.graph.nodes)  # really ATen
    assert a.report.groups_pruned > 0 and a.report.groups_pruned == b.report.groups_pruned
    _compare(a, b)


@pytest.mark.parametrize("model", ["cnn", "block"])
@pytest.mark.parametrize("method", ["thinet", "lstsq"])
def test_reconstruction_agrees_across_front_ends(model, method):
    m, x, calib = _model(model)
    kw = dict(importance="thinet", ratio=0.5, calib=calib, reconstruct=method, absorb=False)
    a = fxprune.compile(m, x, frontend="fx", **kw)
    b = fxprune.compile(m, x, frontend="export", **kw)
    assert a.reconstruction and set(a.reconstruction) == set(b.reconstruction)
    plain = fxprune.compile(m, x, frontend="export", importance="thinet", ratio=0.5, calib=calib, absorb=False)
    changed = [n for n, p in b.module.named_parameters() if not torch.equal(p, plain.module.get_parameter(n))]
    assert changed, "the refit changed no weight"
    for site, (before, after) in b.reconstruction.items():
        assert after <= before + 1e-9, site
        assert a.reconstruction[site] == pytest.approx((before, after), rel=1e-6, abs=1e-9)
    _compare(a, b)
