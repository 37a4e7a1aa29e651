"""ThiNet: Gram-form greedy against the literal brute force, forward selection against exhaustive least
squares, and end-to-end selections against contributions computed by re-running the consumer layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fxprune
from fxprune.passes.thinet import ThiNetImportance, forward_selection, thinet_bruteforce, thinet_greedy


class TwoConv(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, 5, 3, stride=2, padding=1)

    def forward(self, x):
        return self.c2(F.max_pool2d(F.relu(self.bn(self.c1(x))), 2, 1))


def _model(seed: int = 0) -> TwoConv:
    torch.manual_seed(seed)
    m = TwoConv().double().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)
    return m


def _contributions(m: TwoConv, batches) -> np.ndarray:
    """Per-channel contributions to c2's bias-free output, by re-running c2 on one channel at a time."""
    cols = []
    for c in range(m.c1.out_channels):
        parts = []
        for x in batches:
            with torch.no_grad():
                h = F.max_pool2d(F.relu(m.bn(m.c1(x))), 2, 1)
                mask = torch.zeros(1, h.shape[1], 1, 1, dtype=h.dtype)
                mask[0, c] = 1
                parts.append(F.conv2d(h * mask, m.c2.weight, None, 2, 1).reshape(-1))
        cols.append(torch.cat(parts).numpy())
    return np.stack(cols, 1)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 9), st.integers(1, 30))
def test_greedy_matches_bruteforce(seed, units, samples):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(samples, units)) * rng.uniform(0.1, 2.0, size=units)
    n = int(rng.integers(1, units))
    assert thinet_greedy(X.T @ X, n) == thinet_bruteforce(X, n)
    pinned = [int(rng.integers(units))]
    assert thinet_greedy(X.T @ X, n - 1 if n > 1 else 1, pinned) == thinet_bruteforce(X, n - 1 if n > 1 else 1, pinned)


def test_greedy_prefix_consistent():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 12))
    full = thinet_greedy(X.T @ X)
    for n in range(1, 12):
        assert thinet_greedy(X.T @ X, n) == full[:n]


def _best_error(X, y, S):
    if not S:
        return float(y @ y)
    w, *_ = np.linalg.lstsq(X[:, S], y, rcond=None)
    r = y - X[:, S] @ w
    return float(r @ r)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_forward_selection_matches_exhaustive_step(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(30, 7))
    y = X @ rng.normal(size=7) + 0.3 * rng.normal(size=30)
    order = forward_selection(X.T @ X, X.T @ y)
    S: list[int] = []
    for j in order[:5]:
        cand = [k for k in range(7) if k not in S]
        best = min(cand, key=lambda k: _best_error(X, y, S + [k]))
        assert np.isclose(_best_error(X, y, S + [j]), _best_error(X, y, S + [best]), rtol=1e-9)
        S.append(j)


def test_forward_selection_handles_duplicates_and_dead():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 4))
    X = np.concatenate([X, X[:, :1], np.zeros((20, 1))], 1)  # unit 4 duplicates unit 0; unit 5 dead
    y = X[:, 0] + X[:, 2]
    order = forward_selection(X.T @ X, X.T @ y)
    assert sorted(order) == list(range(6))
    assert set(order[:2]) == {0, 2} or set(order[:2]) == {4, 2}
    assert order[-1] in (5, 4, 0)


def test_compile_thinet_matches_layer_rerun():
    m = _model()
    torch.manual_seed(1)
    calib = [torch.randn(3, 3, 9, 9, dtype=torch.float64) for _ in range(2)]
    res = fxprune.compile(m, calib[0][:1], importance="thinet", ratio=0.5, calib=calib, verify="equivalence")
    X = _contributions(m, calib)
    removed = thinet_bruteforce(X, 3)
    kept = res.selection.as_dict()
    assert len(kept) == 1
    (gid, k), = kept.items()
    assert sorted(set(range(6)) - set(k)) == sorted(removed)
    assert res.module.c2.in_channels == 3


def test_thinet_random_sampling_deterministic_and_valid():
    m = _model(2)
    calib = [torch.randn(4, 3, 9, 9, dtype=torch.float64) for _ in range(2)]
    imp = ThiNetImportance(sampling="random", samples_per_image=20, seed=3)
    a = fxprune.compile(m, calib[0][:1], importance=imp, ratio=0.5, calib=calib)
    b = fxprune.compile(m, calib[0][:1], importance=imp, ratio=0.5, calib=calib)
    assert a.selection == b.selection and len(a.selection.keep) == 1


class ConvFlat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.c(x)), 1))


def test_flatten_linear_consumer_blocks():
    torch.manual_seed(0)
    m = ConvFlat().double().eval()
    calib = [torch.randn(8, 2, 5, 5, dtype=torch.float64)]
    res = fxprune.compile(m, calib[0][:1], importance="thinet", ratio=0.5, calib=calib, verify="equivalence")
    with torch.no_grad():
        h = torch.flatten(F.relu(m.c(calib[0])), 1)
    X = np.stack([(h[:, u * 9 : (u + 1) * 9] @ m.fc.weight[:, u * 9 : (u + 1) * 9].T).reshape(-1).detach().numpy()
                  for u in range(4)], 1)
    removed = thinet_bruteforce(X, 2)
    (_, k), = res.selection.as_dict().items()
    assert sorted(set(range(4)) - set(k)) == sorted(removed)


def test_thinet_forward_runs_on_residual():
    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from models import build

    m, xs = build("residual")
    calib = [torch.randn(4, 3, 8, 8, dtype=torch.float64)]
    res = fxprune.compile(m, xs, importance="thinet_forward", ratio=0.5, calib=calib, verify="equivalence")
    assert res.report.params_after < res.report.params_before


def test_bad_options():
    with pytest.raises(fxprune.ConfigError):
        ThiNetImportance(method="nope")
    with pytest.raises(fxprune.ConfigError):
        ThiNetImportance(sampling="sometimes")
    with pytest.raises(fxprune.ConfigError):
        ThiNetImportance(samples_per_image=0)


def test_speed_benchmark_smoke():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "thinet_speed.py"
    spec = importlib.util.spec_from_file_location("thinet_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.main(["--channels", "12", "--remove", "4", "--repeats", "1", "--out", "-"])
    assert "Identical picks: **True**" in text
