"""Network Slimming: the BN-L1 regulariser, the global-percentile rule, the guards and the multi-pass helper."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError, InputError
from fxprune.sparsity import BNL1, SlimmingSelect, init_bn_gamma, slimming_prune, slimming_schedule
from fxprune.testing import assert_model_unchanged, snapshot



pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

class VGGish(nn.Module):
    def __init__(self, widths=(6, 8, 10)) -> None:
        super().__init__()
        layers, c = [], 1
        for w in widths:
            layers += [nn.Conv2d(c, w, 3), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class Res(nn.Module):
    def __init__(self, c=6) -> None:
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(1, c, 3), nn.BatchNorm2d(c)
        self.c1, self.b1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 2)

    def forward(self, x):
        x = F.relu(self.b0(self.stem(x)))
        x = F.relu(x + self.b1(self.c1(x)))
        return self.fc(x.mean((2, 3)))


def _set_gammas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 1)  # signs matter for |γ|
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def _x(n=2, hw=12):
    return torch.randn(n, 1, hw, hw, generator=torch.Generator().manual_seed(1))


# -- the regulariser -----------------------------------------------------------------------------------------
def test_bnl1_step_equals_autograd_of_the_l1_penalty():
    torch.manual_seed(0)
    a, b = _set_gammas(VGGish()), _set_gammas(VGGish())
    b.load_state_dict(a.state_dict())
    x, lam = _x(), 3e-3
    reg = BNL1(a, lam=lam)
    a(x).sum().backward()
    reg.step()
    (b(x).sum() + lam * sum(m.weight.abs().sum() for m in b.modules() if isinstance(m, nn.BatchNorm2d))).backward()
    for (_, ma), (_, mb) in zip(reg.layers, BNL1(b, lam=lam).layers, strict=True):
        torch.testing.assert_close(ma.weight.grad, mb.weight.grad, rtol=0, atol=1e-7)
    assert reg.penalty() == pytest.approx(lam * float(reg.scales().sum()))


def test_bnl1_creates_missing_grads_and_init_gamma():
    m = VGGish()
    assert init_bn_gamma(m, 0.5) == 3
    assert all(bool((bn.weight.detach() == 0.5).all()) for _, bn in BNL1(m).layers)
    reg = BNL1(m, lam=1e-2)
    reg.step()
    for g in reg.gammas:
        torch.testing.assert_close(g.grad, torch.full_like(g, 1e-2))


@pytest.mark.parametrize("lam", [-1e-4, float("nan"), float("inf"), 1.5, "1e-4", True])
def test_bnl1_rejects_bad_lambda(lam):
    with pytest.raises(ConfigError, match="lam"):
        BNL1(VGGish(), lam=lam)


def test_bn_methods_need_a_batchnorm():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(InputError, match="no affine BatchNorm"):
        BNL1(net)
    with pytest.raises(InputError, match="no affine BatchNorm"):
        slimming_prune(net, _x(), ratio=0.5)
    with pytest.raises(ConfigError, match="not affine BatchNorm"):
        BNL1(VGGish(), modules=["features.0"])


# -- the selection rule --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.6])
def test_global_percentile_matches_brute_force(ratio):
    model = _set_gammas(VGGish(), seed=int(ratio * 100)).eval()
    snap = snapshot(model)
    gam = {n: m.weight.detach().abs().numpy() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    allg = np.sort(np.concatenate(list(gam.values())))
    k = int(np.floor(ratio * len(allg) + 1e-9))
    thr = allg[k - 1] if k else -np.inf
    res = slimming_prune(model, _x(), ratio=ratio, verify="equivalence")
    assert_model_unchanged(model, snap, training=False)
    assert res.facts["slimming"]["threshold"] == pytest.approx(thr)
    for name, g in gam.items():
        want = model.get_submodule(name).weight.detach()[torch.as_tensor(g > thr)]
        got = res.module.get_submodule(name).weight.detach()
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # exactly the channels with |γ| > threshold, in order


def test_guard_keeps_a_layer_that_the_threshold_would_empty(caplog):
    model = _set_gammas(VGGish()).eval()
    with torch.no_grad():
        model.features[4].weight.mul_(1e-3)  # the middle layer's γ are all tiny
    with caplog.at_level(logging.WARNING, logger="fxprune.sparsity.slimming"):
        res = slimming_prune(model, _x(), ratio=0.4, min_keep=2)
    assert res.module.get_submodule("features.3").out_channels == 2
    assert res.facts["slimming"]["guarded"] == ("features.3",)
    assert any("guard" in n for n in res.report.notes)
    assert any("guard" in r.message for r in caplog.records)
    with pytest.raises(ConfigError, match="features.3"):
        slimming_prune(model, _x(), ratio=0.4, on_empty="error")


def test_max_layer_ratio_caps_each_layer():
    model = _set_gammas(VGGish()).eval()
    res = slimming_prune(model, _x(), ratio=0.9, max_layer_ratio=0.5)
    for name, w in (("features.0", 6), ("features.3", 8), ("features.6", 10)):
        assert res.module.get_submodule(name).out_channels >= w // 2
    assert res.facts["slimming"]["capped"]


def test_residual_unit_kept_if_any_of_its_gammas_is_large():
    model = _set_gammas(Res()).eval()
    with torch.no_grad():
        model.b0.weight.copy_(torch.tensor([0.01, 0.02, 0.9, 0.03, 0.04, 0.8]))
        model.b1.weight.copy_(torch.tensor([0.01, 0.95, 0.05, 0.03, 0.04, 0.7]))
    res = slimming_prune(model, _x(), ratio=0.5, verify="equivalence")
    torch.testing.assert_close(res.module.get_submodule("b0").weight.detach(), torch.tensor([0.02, 0.9, 0.8]))


def test_slimming_select_options_are_checked_and_pipeline_string_works():
    for kw in ({}, {"ratio": 0.5, "threshold": 0.1}, {"ratio": 1.0}, {"ratio": 0.5, "max_layer_ratio": 0},
               {"ratio": 0.5, "min_keep": 0}, {"ratio": 0.5, "on_empty": "ignore"}):
        with pytest.raises(ConfigError):
            SlimmingSelect(**kw)
    model = _set_gammas(VGGish()).eval()
    res = fxprune.compile(model, _x(), pipeline="group | importance(criterion='bn_scale', reduction='max') | "
                                                 "slimming_select(threshold=0.5) | rewrite | absorb | verify")
    kept = sum(int((m.weight.abs() > 0.5).sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(res.module.get_submodule(n).out_channels for n in ("features.0", "features.3", "features.6")) == kept


# -- multi-pass ------------------------------------------------------------------------------------------------
def test_slimming_schedule_runs_the_users_loops():
    torch.manual_seed(0)
    model = VGGish()
    x, y = _x(8), torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    calls = {"sparse": 0, "steps": 0, "finetune": 0}

    def sparse_train(m, reg):
        calls["sparse"] += 1
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            reg.step()
            calls["steps"] += 1
            opt.step()

    def finetune(m):
        calls["finetune"] += 1
        assert m.training

    hist = slimming_schedule(model, x, sparse_train=sparse_train, finetune=finetune, rounds=2, ratio=0.4,
                             lam=1e-3, init_gamma=0.5, evaluate=lambda m: float(F.cross_entropy(m.eval()(x), y).detach()))
    assert calls == {"sparse": 2, "steps": 6, "finetune": 2}
    assert len(hist.rounds) == 2 and hist.rounds[1].params < hist.rounds[0].params < hist.params_before
    widths = [(6, 8, 10)]
    for r in hist.rounds:
        mod = r.result.module
        widths.append(tuple(mod.get_submodule(n).out_channels for n in ("features.0", "features.3", "features.6")))
    for before, after in zip(widths, widths[1:]):
        assert all(a >= b - b // 2 for a, b in zip(after, before))  # ≤ 50 % of a layer per pass
    assert hist.model(x).shape == (8, 3)
    assert "| pass |" in hist.table()
    with pytest.raises(ConfigError):
        slimming_schedule(model, x, sparse_train=None)
