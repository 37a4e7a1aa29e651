"""Li et al. extras: sensitivity analysis against a brute-force oracle, ratio choice, plot, and the
projection-shortcut rule."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError, InputError
from fxprune.sparsity import (
    MissingDependencyError,
    ProjectionShortcutImportance,
    SensitivityRow,
    SensitivityTable,
    choose_ratios,
    sensitivity,
)


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 3, 1)).double().eval()


X = torch.randn(3, 2, 6, 6, dtype=torch.float64)


def mse_to(ref_model):
    ref = ref_model(X).detach()
    return lambda m: -float((m(X) - ref).pow(2).mean().detach())


def brute_force(model, layer: str, ratio: float) -> float:
    """Oracle without the compiler: zero the smallest-L1 filters (and biases) of ``layer`` (ReLU(0)=0)."""
    m = copy.deepcopy(model)
    conv = m.get_submodule(layer)
    l1 = conv.weight.detach().abs().sum((1, 2, 3))
    n = int(math.floor(ratio * len(l1) + 1e-9))
    drop = torch.argsort(l1)[:n]
    with torch.no_grad():
        conv.weight[drop] = 0
        conv.bias[drop] = 0
    return mse_to(model)(m)


def test_sensitivity_matches_brute_force_and_leaves_model_alone():
    net = cnn()
    snap = copy.deepcopy(net.state_dict())
    ratios = (0.1, 0.3, 0.5, 0.9)
    t = sensitivity(net, X, mse_to(net), ratios=ratios, importance=fxprune.MagnitudeImportance(p=1, roles=("out",)),
                    progress=False)
    assert t.baseline == 0.0 and t.ratios == ratios
    assert [(r.root, r.ratio) for r in t.rows] == [(root, q) for root in ("0", "2") for q in ratios]
    for r in t.rows:
        assert r.kept == max(r.size - int(math.floor(r.ratio * r.size + 1e-9)), 1)
        assert r.metric == pytest.approx(brute_force(net, r.root, r.ratio), rel=1e-9, abs=1e-15)
    for k, v in net.state_dict().items():
        assert torch.equal(v, snap[k])
    # pruning more filters of one layer never lowers the MACs less
    for rows in t.groups().values():
        macs = [r.macs for r in rows]
        assert macs == sorted(macs, reverse=True)


def test_sensitivity_bad_input():
    net = cnn()
    with pytest.raises(ConfigError, match="ratio"):
        sensitivity(net, X, mse_to(net), ratios=(0.5, 1.0), progress=False)
    with pytest.raises(ConfigError, match="evaluate"):
        sensitivity(net, X, "acc", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no prunable group rooted at 'nope'"):
        sensitivity(net, X, mse_to(net), groups=["nope"], progress=False)
    with pytest.raises(InputError, match="non-finite"):
        sensitivity(net, X, lambda m: float("nan"), progress=False)
    t = sensitivity(net, X, mse_to(net), ratios=(0.5,), groups=["2"], progress=False)
    assert {r.root for r in t.rows} == {"2"}


def table(rows: dict[str, list[float]], ratios=(0.2, 0.4, 0.6, 0.8), baseline=0.9, hib=True) -> SensitivityTable:
    out = []
    for i, (root, ms) in enumerate(rows.items()):
        out += [SensitivityRow(i, root, 10, q, 10, m, 0, 0) for q, m in zip(ratios, ms, strict=True)]
    return SensitivityTable(tuple(out), baseline, tuple(ratios), hib)


def test_choose_ratios_rules():
    t = table({
        "layer1.0.conv1": [0.9, 0.89, 0.85, 0.5],   # robust up to 0.4 (drop 0.01), 0.6 drops 0.05
        "layer1.1.conv1": [0.9, 0.9, 0.9, 0.9],     # insensitive
        "layer2.0.conv1": [0.7, 0.9, 0.9, 0.9],     # sensitive at the first ratio: skipped (0.0), even if later recovers
    })
    assert choose_ratios(t, 0.02) == {"layer1.0.conv1": 0.4, "layer1.1.conv1": 0.8, "layer2.0.conv1": 0.0}
    assert choose_ratios(t, 0.05)["layer1.0.conv1"] == 0.6
    assert choose_ratios(t, 0.02, stage=1) == {"layer1.0.conv1": 0.4, "layer1.1.conv1": 0.4, "layer2.0.conv1": 0.0}
    assert choose_ratios(t, 0.02, stage=lambda r: "all")["layer1.1.conv1"] == 0.0
    assert choose_ratios(t, 0.06 / 0.9, relative=True)["layer1.0.conv1"] == 0.6
    lower = table({"a": [1.0, 1.05, 1.3, 2.0]}, baseline=1.0, hib=False)  # a loss: lower is better
    assert choose_ratios(lower, 0.1) == {"a": 0.4}
    for bad in (-1, float("nan"), "x"):
        with pytest.raises(ConfigError, match="max_drop"):
            choose_ratios(t, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        choose_ratios(t, 0.1, stage=0)


def test_chosen_ratios_drive_compile():
    net = cnn()
    t = sensitivity(net, X, mse_to(net), ratios=(0.5, 0.9), progress=False)
    ratios = choose_ratios(t, max_drop=float("inf"))
    assert ratios == {"0": 0.9, "2": 0.9}
    ratios = {"0": 0.5, "2": 0.3}
    res = fxprune.compile(net, X, importance="l1", ratios=ratios, verify="equivalence")
    assert res.module.get_submodule("0").out_channels == 4
    assert res.module.get_submodule("2").out_channels == 6 - 1


def test_markdown_and_plot(tmp_path, monkeypatch):
    t = table({"a": [0.9, 0.8, 0.7, 0.1], "b": [0.9, 0.9, 0.85, 0.6]})
    md = t.to_markdown()
    assert "| a | 10 | 0.9 | 0.8 | 0.7 | 0.1 |" in md and "baseline (unpruned): 0.9" in md and "| 20% |" in md
    pytest.importorskip("matplotlib")
    fig = t.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert len(fig.axes[0].lines) == 3  # two groups + baseline
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match="fxprune\\[plot\\]"):
        t.plot()


# -- projection shortcut ----------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block(4, 10)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        return self.head(self.block(F.relu(self.stem(x))).mean((2, 3)))


def test_projection_shortcut_dictates_the_block_output():
    torch.manual_seed(0)
    net = TinyResNet().double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    res = fxprune.compile(net, x, importance="l1_projection", ratio=0.5, verify="equivalence")
    res_l1 = fxprune.compile(net, x, importance=fxprune.MagnitudeImportance(p=1, roles=("out",)), ratio=0.5)
    kept = res.selection.as_dict()
    sc = net.block.downsample[0].weight.detach().abs().sum((1, 2, 3))
    want = tuple(sorted(torch.argsort(sc, descending=True)[:5].tolist()))
    out_group = next(g for g in res.analysis.groups if any(p.param == "block.downsample.0.weight" and p.role == "out" for p in g.params))
    assert kept[out_group.id] == want
    # the other groups are ranked by their filters' L1, as plain filter-L1 pruning does
    kept_l1 = res_l1.selection.as_dict()
    for g in res.analysis.groups:
        if g.id != out_group.id and g.id in kept:
            assert kept[g.id] == kept_l1[g.id]
    assert kept_l1[out_group.id] != want  # the rule does change the outcome on this model
    imp = ProjectionShortcutImportance(modules=("block.conv1",), match=())
    assert imp.shortcut_slices(next(g for g in res.analysis.groups if g.root == "block.conv1"),
                               lambda n: res.original.get_parameter(n)) == []  # one producer: not residual
    with pytest.raises(ConfigError):
        ProjectionShortcutImportance(match="downsample")  # type: ignore[arg-type]
