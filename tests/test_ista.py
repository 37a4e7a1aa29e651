"""ISTA on BN scales: the proximal step, per-layer penalties from the graph, exact α rescaling, exact removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError, InputError
from fxprune.sparsity import ISTA, ista_penalties, scale_bn

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


class Net(nn.Module):
    """No zero padding anywhere: removing γ = 0 channels is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)  # 12 -> 10 -> 5
        x = F.relu(self.b2(self.c2(x)))  # 5 -> 3
        return self.fc(F.adaptive_max_pool2d(x, 2).flatten(1))


class Res(nn.Module):
    def __init__(self, c=6) -> None:
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(1, c, 3), nn.BatchNorm2d(c)
        self.c1, self.b1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = F.relu(self.b0(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(y)))
        return self.fc(F.avg_pool2d(x, 2).mean((2, 3)))


def _rand(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _x(n=2, hw=12, dtype=torch.float32):
    return torch.randn(n, 1, hw, hw, generator=torch.Generator().manual_seed(3)).to(dtype)


# -- penalties from the graph ---------------------------------------------------------------------------------
def test_memory_penalties_follow_the_formula():
    pen = ista_penalties(Net(), _x())
    area = 12 * 12
    # b1: producer c1 (k²·c_in = 9·1), consumer c2 (k²·c_out = 9·8), activation map 10·10
    assert pen["b1"] == pytest.approx((9 * 1 + 9 * 8 + 10 * 10) / area)
    # b2: producer c2 (9·6); consumer fc reads each channel at 2·2 flattened positions (4·4 weights); map 3·3
    assert pen["b2"] == pytest.approx((9 * 6 + 4 * 4 + 3 * 3) / area)


def test_residual_group_shares_one_penalty():
    pen = ista_penalties(Res(), _x())
    assert pen["b0"] == pen["b2"] != pen["b1"]


# -- the proximal step ------------------------------------------------------------------------------------------
def test_step_is_the_soft_threshold_of_the_oracle():
    model = _rand(Net())
    before = {n: m.weight.detach().clone().numpy() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    ista = ISTA(model, _x(), rho=2.0, lr=0.05)
    zeros = ista.step()
    n_zero = 0
    for name, g0 in before.items():
        t = 0.05 * 2.0 * ista.penalties[name]
        want = np.sign(g0) * np.maximum(np.abs(g0) - t, 0)
        got = model.get_submodule(name).weight.detach().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
        n_zero += int((want == 0).sum())
    assert zeros == n_zero == sum(ista.zeros().values())


def test_optimizer_groups_keep_momentum_and_weight_decay_off_gamma():
    model = _rand(Net())
    ista = ISTA(model, _x(), rho=1.0, lr=0.1, penalties="uniform")
    groups = ista.param_groups(momentum=0.9, weight_decay=1e-3)
    opt = torch.optim.SGD(groups, lr=0.1)
    ista.check_optimizer(opt)  # accepted
    assert opt.param_groups[1]["momentum"] == 0 and opt.param_groups[1]["weight_decay"] == 0
    assert len(opt.param_groups[0]["params"]) + len(opt.param_groups[1]["params"]) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="momentum"):
        ISTA(model, rho=1.0, penalties="uniform", optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ConfigError, match="moments"):
        ISTA(model, rho=1.0, penalties="uniform", optimizer=torch.optim.Adam(model.parameters()))
    # with an optimiser, γ's learning rate (and its schedule) comes from it
    ista2 = ISTA(model, rho=1.0, penalties="uniform", optimizer=opt)
    opt.param_groups[1]["lr"] = 0.25
    assert ista2._lr(None) == 0.25


@pytest.mark.parametrize("kw", [{"rho": -1.0, "lr": 0.1}, {"rho": float("nan"), "lr": 0.1}, {"rho": 1.0, "lr": 0.0},
                                {"rho": 1.0, "lr": -0.1}, {"rho": 1.0}, {"rho": 1.0, "lr": 0.1, "penalties": "l2"},
                                {"rho": 1.0, "lr": 0.1, "penalties": {"b1": 1.0}}])
def test_bad_options(kw):
    with pytest.raises(ConfigError):
        ISTA(Net(), _x(), **kw)


def test_memory_penalties_need_inputs_and_a_bn():
    with pytest.raises(ConfigError, match="example_inputs"):
        ISTA(Net(), rho=1.0, lr=0.1)
    with pytest.raises(InputError, match="BatchNorm"):
        ISTA(nn.Sequential(nn.Conv2d(1, 2, 3)), _x(), rho=1.0, lr=0.1)


# -- training produces exact zeros whose removal is exact -----------------------------------------------------------
def test_ista_training_then_exact_removal():
    torch.manual_seed(0)
    model = Net()
    x = _x(16)
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for m in (model.b1, model.b2):
            m.weight.uniform_(0, 1, generator=torch.Generator().manual_seed(5))
    ista = ISTA(model, x[:1], rho=1.0, lr=0.05)
    opt = torch.optim.SGD(ista.param_groups(momentum=0.9), lr=0.05)
    model.train()
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ista.step()
    assert 0 < ista.sparsity() < 1
    model = model.to(D).eval()
    xd = x.to(D)
    res = fxprune.compile(model, xd, importance="bn_scale", threshold=0.0, verify="equivalence")
    assert res.report.params_after < res.report.params_before
    with torch.no_grad():
        torch.testing.assert_close(res.module(xd), model(xd), rtol=0, atol=1e-10)


# -- α rescaling --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [Net, Res])
def test_scale_bn_is_exact_and_unscale_restores(factory):
    model = _rand(factory()).to(D).eval()
    x = _x(dtype=D)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
    sc = scale_bn(model, 0.1, x)
    assert not sc.skipped and set(sc.scaled_layers) == {n for n, m in model.named_modules()
                                                        if isinstance(m, nn.BatchNorm2d)}
    name = sc.scaled_layers[0]
    torch.testing.assert_close(model.get_submodule(name).weight, state[f"{name}.weight"] * 0.1)
    torch.testing.assert_close(model.get_submodule(name).bias, state[f"{name}.bias"] * 0.1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-10)
    sc.unscale()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=1e-14, atol=1e-14)
    with pytest.raises(ConfigError):
        sc.unscale()


class Sig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c3(F.relu(self.b2(self.c2(torch.sigmoid(self.b1(self.c1(x)))))))


def test_scale_bn_skips_non_homogeneous_paths():
    model = _rand(Sig()).to(D).eval()
    x = _x(dtype=D)
    with torch.no_grad():
        want = model(x)
    sc = scale_bn(model, 0.5, x)
    assert "b1" in sc.skipped and sc.scaled_layers == ("b2",)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-10)
    sc.unscale()
    with pytest.raises(ConfigError, match="b1"):
        scale_bn(model, 0.5, x, strict=True)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ConfigError, match="alpha"):
            scale_bn(model, bad, x)
