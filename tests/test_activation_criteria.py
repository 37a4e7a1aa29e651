"""APoZ and mean-activation criteria against per-channel statistics computed directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune import meta
from fxprune.passes import ActivationImportance


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x))))


def _setup():
    torch.manual_seed(0)
    m = Net().double().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.bias.copy_(torch.linspace(-1.5, 1.0, 6))
        m.bn.bias[4] = -50.0  # channel 4 is always zero after the ReLU
    calib = [torch.randn(3, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    return m, calib


def _scores(m, calib, name):
    res = fxprune.compile(m, calib[0][:1], pipeline=f"group | {name}", calib=calib, verify="none")
    (gid, s), = meta.get(res.original, "importance").items()
    return s


def _relu_out(m, calib):
    with torch.no_grad():
        return torch.cat([F.relu(m.bn(m.c1(x))) for x in calib])


def test_apoz_equals_direct_zero_fraction():
    m, calib = _setup()
    a = _relu_out(m, calib)
    apoz = (a == 0).double().mean((0, 2, 3)).numpy()
    np.testing.assert_allclose(_scores(m, calib, "apoz"), 1 - apoz, rtol=1e-12)


def test_mean_activation_equals_direct_mean():
    m, calib = _setup()
    mean = _relu_out(m, calib).abs().mean((0, 2, 3)).numpy()
    np.testing.assert_allclose(_scores(m, calib, "activation_mean"), mean / mean.mean(), rtol=1e-10)


@pytest.mark.parametrize("imp", ["apoz", "activation_mean"])
def test_dead_channel_pruned_first(imp):
    m, calib = _setup()
    res = fxprune.compile(m, calib[0][:1], importance=imp, ratio=0.2, calib=calib, verify="equivalence")
    (_, kept), = res.selection.as_dict().items()
    assert 4 not in kept and len(kept) == 5


def test_bad_stat():
    with pytest.raises(fxprune.ConfigError):
        ActivationImportance(stat="median")
