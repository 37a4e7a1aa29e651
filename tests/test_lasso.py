"""LASSO channel selection: coordinate descent against the KKT conditions, the λ search's exact count,
and the end-to-end selection against the same problem built from layer re-runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fxprune
from fxprune.passes.lasso import LassoImportance, lasso_cd, lasso_path_order, lasso_select


def _problem(seed, n=40, u=8):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, u)) * rng.uniform(0.2, 2.0, size=u)
    y = Z @ rng.normal(size=u) + 0.2 * rng.normal(size=n)
    return Z.T @ Z / n, Z.T @ y / n


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.001, 0.5))
def test_cd_satisfies_kkt(seed, frac):
    G, c = _problem(seed)
    lam = frac * np.max(np.abs(c))
    b = lasso_cd(G, c, lam, tol=1e-12, max_sweeps=5000)
    grad = c - G @ b  # optimality: |grad_j| <= lam where b_j = 0, grad_j = lam*sign(b_j) elsewhere
    nz = b != 0
    np.testing.assert_allclose(grad[nz], lam * np.sign(b[nz]), atol=1e-7)
    assert np.all(np.abs(grad[~nz]) <= lam + 1e-7)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 7))
def test_lambda_search_hits_exact_count(seed, k):
    G, c = _problem(seed)
    order, beta = lasso_select(G, c, k)
    assert sorted(order) == list(range(8))
    assert int((beta != 0).sum()) <= k
    if int((beta != 0).sum()) == k:  # exact count reached: the kept set is the support
        assert set(order[:k]) == set(np.flatnonzero(beta))


def test_pinned_units_are_unpenalised_and_kept():
    G, c = _problem(3)
    order, beta = lasso_select(G, c, 3, pinned=[int(np.argmin(np.abs(c)))])
    assert int(np.argmin(np.abs(c))) in order[:3]


def test_dead_units_never_selected():
    G, c = _problem(4)
    G[5, :] = G[:, 5] = 0
    c[5] = 0
    order, beta = lasso_select(G, c, 4)
    assert beta[5] == 0 and 5 not in order[:4]
    assert 5 in lasso_path_order(G, c)[-3:]


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


def test_compile_lasso_matches_direct_problem():
    torch.manual_seed(0)
    m = TwoConv().double().eval()
    calib = [torch.randn(4, 3, 6, 6, dtype=torch.float64)]
    res = fxprune.compile(m, calib[0][:1], importance="lasso", ratio=0.5, calib=calib, verify="equivalence")
    (_, kept), = res.selection.as_dict().items()
    assert len(kept) == 4
    with torch.no_grad():
        h = F.relu(m.c1(calib[0]))
        Z = torch.stack([F.conv2d(h[:, u : u + 1], m.c2.weight[:, u : u + 1], padding=1).reshape(-1)
                         for u in range(8)], 1).numpy()
        y = (m.c2(h) - m.c2.bias[None, :, None, None]).reshape(-1).numpy()
    n = calib[0].shape[0] * 36  # rows of the engine's statistics (positions); the scale cancels in the ranking
    order, beta = lasso_select(Z.T @ Z / n, Z.T @ y / n, 4)
    assert sorted(kept) == sorted(order[:4])


def test_lasso_with_threshold_uses_path_and_notes():
    torch.manual_seed(0)
    m = TwoConv().double().eval()
    calib = [torch.randn(2, 3, 6, 6, dtype=torch.float64)]
    res = fxprune.compile(m, calib[0][:1], importance="lasso", threshold=2.5, calib=calib)
    assert any("path" in n for n in res.report.notes)


def test_bad_ratio():
    with pytest.raises(fxprune.ConfigError):
        LassoImportance(ratio=1.5)
