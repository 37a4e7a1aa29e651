"""Reconstruction post-pass and sequential mode: ŵ and the full least-squares refit against solutions
computed from materialised patches, dead channels (ridge, no NaN), grouped consumers, multi-consumer
groups, and the layer-by-layer mode with its callback."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.passes import Reconstruct
from fxprune.passes.reconstruct import unit_atoms

sys.path.insert(0, str(Path(__file__).parent))
from models import build  # noqa: E402


class TwoConv(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1, groups=groups)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


def _setup(groups=1, seed=0):
    torch.manual_seed(seed)
    m = TwoConv(groups).double().eval()
    calib = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    return m, calib


def _kept(res):
    (_, k), = res.selection.as_dict().items()
    return list(k)


def test_lstsq_equals_materialised_least_squares():
    m, calib = _setup()
    res = fxprune.compile(m, calib[0][:1], importance="l1", ratio=0.5, calib=calib,
                          reconstruct=Reconstruct(method="lstsq", ridge=0.0))
    k = _kept(res)
    with torch.no_grad():
        x = torch.cat(calib)
        h = F.relu(m.c1(x))[:, k]
        P = F.unfold(h, 3, padding=1).transpose(1, 2).reshape(-1, len(k) * 9)
        P = torch.cat([P, torch.ones(P.shape[0], 1, dtype=P.dtype)], 1)
        Y = m.c2(F.relu(m.c1(x))).permute(0, 2, 3, 1).reshape(-1, 4)
    sol = torch.linalg.lstsq(P, Y).solution
    c2 = res.module.c2
    torch.testing.assert_close(c2.weight.detach().reshape(4, -1), sol[:-1].T, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(c2.bias.detach(), sol[-1], rtol=1e-7, atol=1e-9)
    (name, st, _), = [e for e in res.context.log if e[0] == "reconstruct"]
    assert st["rel_err_after"] <= st["rel_err_before"]


def test_thinet_what_equals_per_channel_least_squares():
    m, calib = _setup(seed=1)
    res = fxprune.compile(m, calib[0][:1], importance="thinet", ratio=0.5, calib=calib,
                          reconstruct=Reconstruct(method="thinet", ridge=0.0))
    k = _kept(res)
    with torch.no_grad():
        x = torch.cat(calib)
        h = F.relu(m.c1(x))
        X = torch.stack([F.conv2d(h[:, u : u + 1], m.c2.weight[:, u : u + 1], padding=1).reshape(-1) for u in k], 1)
        y = (m.c2(h) - m.c2.bias[None, :, None, None]).reshape(-1)
    w = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    expect = m.c2.weight.detach()[:, k] * w[None, :, None, None]
    torch.testing.assert_close(res.module.c2.weight.detach(), expect, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(res.module.c2.bias.detach(), m.c2.bias.detach())  # bias excluded


def test_dead_channel_gets_ridge_not_nan():
    m, calib = _setup(seed=2)
    with torch.no_grad():  # channels 0, 1 dead after ReLU; 2 == 3 (collinear)
        m.c1.weight[:2] = 0
        m.c1.bias[:2] = -1
        m.c1.weight[3] = m.c1.weight[2]
        m.c1.bias[3] = m.c1.bias[2]
        m.c2.weight[:, :4] *= 100  # large consumer kernels: the L2 criterion keeps channels 0..3
    for method in ("lstsq", "thinet"):
        res = fxprune.compile(m, calib[0][:1], importance="l2", ratio=0.5, calib=calib, reconstruct=method)
        assert _kept(res) == [0, 1, 2, 3]
        for p in res.module.parameters():
            assert torch.isfinite(p).all()
        k = _kept(res)
        for j, u in enumerate(k):
            if u in (0, 1):  # dead inputs keep their original weights
                torch.testing.assert_close(res.module.c2.weight[:, j].detach(), m.c2.weight[:, u].detach())


def test_grouped_consumer_keeps_structure_and_improves():
    m, calib = _setup(groups=2, seed=3)
    res = fxprune.compile(m, calib[0][:1], importance="l1", ratio=0.5, calib=calib, reconstruct="lstsq")
    assert res.module.c2.groups == 2
    st = dict(res.reconstruction)["c2"]
    assert st[1] < st[0]


def test_residual_multi_consumer_all_reconstructed():
    m, xs = build("residual")
    calib = [torch.randn(4, 3, 8, 8, dtype=torch.float64)]
    res = fxprune.compile(m, xs, importance="thinet", ratio=0.5, calib=calib, reconstruct="lstsq")
    rec = res.reconstruction
    assert {"c1", "c2", "head"} <= set(rec)  # the stem/residual stream group is read by c1 and head; c1's by c2
    assert all(after <= before + 1e-12 for before, after in rec.values())


def test_unit_atoms_map_through_pruning():
    m, xs = build("flatten_linear")
    calib = [torch.randn(2, 1, 32, 32, dtype=torch.float64)]
    res = fxprune.compile(m, xs, importance="thinet", ratio=0.5, calib=calib, reconstruct="thinet")
    atoms = unit_atoms(res.original, res.analysis, res.selection, "fc1.weight", res.module.fc1.in_features)
    assert len(atoms) == 8 and all(len(a) == 25 for a in atoms)  # 8 kept channels, 5x5 blocks
    assert sorted(np.concatenate(atoms).tolist()) == list(range(200))


def test_verify_equivalence_runs_before_reconstruction():
    m, calib = _setup()
    res = fxprune.compile(m, calib[0][:1], importance="thinet", ratio=0.5, calib=calib, reconstruct="lstsq",
                          verify="equivalence")
    names = [e[0] for e in res.context.log]
    assert names.index("verify") < names.index("reconstruct")


def test_bad_method():
    with pytest.raises(fxprune.ConfigError):
        Reconstruct(method="magic")
    m, calib = _setup()
    with pytest.raises(fxprune.PipelineError):
        fxprune.compile(m, calib[0][:1], pipeline="group | reconstruct(method='lstsq')", calib=calib)


# -- sequential -------------------------------------------------------------------------------------------
class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))


def test_sequential_with_callback_and_reconstruction():
    torch.manual_seed(0)
    m = Chain().double().eval()
    calib = [torch.randn(4, 3, 6, 6, dtype=torch.float64)]
    seen = []

    def cb(module, info):
        seen.append((info["root"], module.c2.in_channels, module.c2.out_channels))

    res = fxprune.compile(m, calib[0][:1], importance="thinet", ratio=0.5, calib=calib, sequential=True,
                          reconstruct="lstsq", step_callback=cb)
    assert seen == [("c1", 4, 8), ("c2", 4, 4)]  # the 2nd step sees the network pruned by the 1st
    one = fxprune.compile(m, calib[0][:1], importance="thinet", ratio=0.5, calib=calib)
    # step 1 runs on the unpruned network: it picks what the one-shot run picks for that group
    first = min(one.selection.as_dict())
    assert res.selection.as_dict()[first] == one.selection.as_dict()[first]
    x = calib[0]
    with torch.no_grad():
        err_seq = float(((res.module(x) - m(x)) ** 2).mean())
        err_plain = float(((one.module(x) - m(x)) ** 2).mean())
    assert err_seq < err_plain  # refitting every step against the original's targets helps on its data


def test_sequential_config_errors():
    m = Chain().eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(fxprune.ConfigError):
        fxprune.compile(m, x, importance="thinet", ratio=0.5, calib=[x], sequential=True, reconstruct="lstsq",
                        verify="equivalence")
    with pytest.raises(fxprune.ConfigError):
        fxprune.compile(m, x, importance="thinet", ratio=0.5, calib=[x], sequential=True, global_ranking=True)


def test_sequential_pipeline_string():
    torch.manual_seed(0)
    m = Chain().double().eval()
    calib = [torch.randn(2, 3, 6, 6, dtype=torch.float64)]
    res = fxprune.compile(m, calib[0][:1], pipeline="group | sequential(criterion='apoz', ratio=0.5) | verify",
                          calib=calib)
    assert res.module.c2.in_channels == 4 and res.module.c3.in_channels == 4
