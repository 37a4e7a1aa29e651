"""Calibration engine: exact statistics against contributions computed by re-running layers, streaming
(batch-split) invariance, bad inputs, and all-reduce across 2 gloo processes."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune import meta
from fxprune.passes.calib import collect, group_gram, make_site, plan_groups
from fxprune.pipeline import Context


class Net(nn.Module):
    """c1 -> relu -> [grouped conv g, strided/dilated conv c2] ; c2 -> flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(8, 4, 3, stride=2, padding=2, dilation=2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        return self.fc(torch.flatten(F.relu(self.c2(h)), 1)) + self.g(h).mean((1, 2, 3))[:, None]


def _setup(seed=0, n_batches=2):
    torch.manual_seed(seed)
    m = Net().double().eval()
    calib = [torch.randn(3, 3, 8, 8, dtype=torch.float64) for _ in range(n_batches)]
    gm, inputs = fxprune.prepare(m, calib[0][:1])
    an = fxprune.passes.analyze_graph(gm)
    meta.put(gm, "groups", an)
    ctx = Context(model=m, example_inputs=inputs, original=gm, calib=calib)
    return m, gm, an, ctx, calib


def _group_of(an, producer):
    return next(g for g in an.groups if any(p.param == f"{producer}.weight" and p.role == "out" for p in g.params))


def _naive_gram(m, calib, consumer, unit_positions, flatten=False):
    """Σ over samples, positions, outputs of x̂_u x̂_v, x̂_u = consumer re-run on unit u's input only."""
    cols = []
    for pos in unit_positions:
        parts = []
        for x in calib:
            with torch.no_grad():
                h = F.relu(m.c1(x))
                if flatten:
                    h = torch.flatten(F.relu(m.c2(h)), 1)
                    mask = torch.zeros(h.shape[1], dtype=h.dtype)
                    mask[pos] = 1
                    out = F.linear(h * mask, consumer.weight)
                else:
                    mask = torch.zeros(1, h.shape[1], 1, 1, dtype=h.dtype)
                    mask[0, pos] = 1
                    out = F.conv2d(h * mask, consumer.weight, None, consumer.stride, consumer.padding,
                                   consumer.dilation, consumer.groups)
            parts.append(out.reshape(-1))
        cols.append(torch.cat(parts))
    X = torch.stack(cols, 1)
    return (X.T @ X).numpy()


@pytest.mark.parametrize("mode", ["moment", "contrib"])
def test_group_gram_equals_layer_reruns(mode):
    m, gm, an, ctx, calib = _setup()
    g = _group_of(an, "c1")
    plan = plan_groups(gm, [g])
    assert set(plan.sites) == {"g.weight", "c2.weight"}  # two consumers: the objective sums over both
    stats = collect(ctx, gm, plan.sites, mode=mode)
    G, c, yy = group_gram(g.id, g.size, plan, stats)
    ref = _naive_gram(m, calib, m.g, [[u] for u in range(8)]) + _naive_gram(m, calib, m.c2, [[u] for u in range(8)])
    np.testing.assert_allclose(G, ref, rtol=1e-9, atol=1e-9)
    # one-shot on the original: the target is the full bias-free output, so for a consumer fed only by
    # this group, c = G·1
    Gc2, cc2, _ = stats["c2.weight"].gram()
    np.testing.assert_allclose(cc2.numpy(), Gc2.sum(1).numpy(), rtol=1e-9)


def test_flatten_linear_blocks():
    m, gm, an, ctx, calib = _setup()
    g = _group_of(an, "c2")
    plan = plan_groups(gm, [g])
    assert set(plan.sites) == {"fc.weight"}
    stats = collect(ctx, gm, plan.sites)
    G, _, _ = group_gram(g.id, g.size, plan, stats)
    ref = _naive_gram(m, calib, m.fc, [list(range(u * 16, (u + 1) * 16)) for u in range(4)], flatten=True)
    np.testing.assert_allclose(G, ref, rtol=1e-9, atol=1e-9)


def test_streaming_equals_one_big_batch():
    m, gm, an, ctx, calib = _setup(n_batches=3)
    g = _group_of(an, "c1")
    plan = plan_groups(gm, [g])
    s1 = collect(ctx, gm, plan.sites)
    ctx2 = Context(model=m, example_inputs=ctx.example_inputs, original=gm, calib=[torch.cat(calib)])
    s2 = collect(ctx2, gm, plan.sites)
    for k in s1:
        for a, b in zip(s1[k].tensors(), s2[k].tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
        assert s1[k].A.shape == (8 * 9, 8 * 9)  # memory: statistics only, independent of the sample count


def test_position_subsampling_is_deterministic_and_bounded():
    m, gm, an, ctx, calib = _setup()
    site = make_site(gm, "c2", [np.array([u]) for u in range(8)])
    a = collect(ctx, gm, {"c2": site}, max_positions=5, seed=1)["c2"]
    b = collect(ctx, gm, {"c2": site}, max_positions=5, seed=1)["c2"]
    assert float(a.n) == 2 * 3 * 5
    torch.testing.assert_close(a.A, b.A)


# -- bad input ------------------------------------------------------------------------------------------
def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()


def test_missing_calib_is_config_error():
    with pytest.raises(fxprune.ConfigError, match="calib"):
        fxprune.compile(_small(), torch.randn(1, 3, 8, 8), importance="thinet", ratio=0.5)
    with pytest.raises(fxprune.ConfigError, match="calib"):
        fxprune.compile(_small(), torch.randn(1, 3, 8, 8), ratio=0.5, reconstruct="lstsq")
    with pytest.raises(fxprune.ConfigError, match="iterable"):
        fxprune.compile(_small(), torch.randn(1, 3, 8, 8), importance="apoz", ratio=0.5, calib=5)


@pytest.mark.parametrize("calib", [[], iter([])])
def test_empty_calib(calib):
    with pytest.raises(fxprune.InputError, match="no batches"):
        fxprune.compile(_small(), torch.randn(1, 3, 8, 8), importance="thinet", ratio=0.5, calib=calib)


def test_exhausted_generator():
    gen = (torch.randn(2, 3, 8, 8) for _ in range(2))
    list(gen)
    with pytest.raises(fxprune.InputError, match="no batches"):
        fxprune.compile(_small(), torch.randn(1, 3, 8, 8), importance="lasso", ratio=0.5, calib=gen)


def test_generator_is_reused_by_later_passes():
    gen = (torch.randn(2, 3, 8, 8) for _ in range(2))
    res = fxprune.compile(_small(), torch.randn(1, 3, 8, 8), importance="thinet", ratio=0.5, calib=gen,
                          reconstruct="thinet")
    assert res.module.get_submodule("2").in_channels == 3


@pytest.mark.parametrize("bad,match", [
    ([torch.randn(2, 3, 9, 9)], "shape"),
    ([torch.randn(2, 4, 8, 8)], "shape"),
    ([torch.randn(3, 8, 8)], "shape"),
    (["x"], "str"),
    ([torch.full((2, 3, 8, 8), float("nan"))], "NaN"),
    ([torch.zeros(2, 3, 8, 8, dtype=torch.long)], "dtype"),
])
def test_bad_batches(bad, match):
    with pytest.raises(fxprune.InputError, match=match):
        fxprune.compile(_small(), torch.randn(1, 3, 8, 8), importance="thinet", ratio=0.5, calib=bad)


def test_labels_in_batches_are_ignored():
    calib = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    res = fxprune.compile(_small(), torch.randn(1, 3, 8, 8), importance="thinet", ratio=0.5, calib=calib)
    assert res.module.get_submodule("2").in_channels == 3


def test_nonfinite_activation():
    m = _small()
    with torch.no_grad():
        m[0].bias[2] = float("inf")
    with pytest.raises(fxprune.InputError, match="non-finite"):
        fxprune.compile(m, torch.randn(1, 3, 8, 8), importance="thinet", ratio=0.5, calib=[torch.randn(2, 3, 8, 8)])


def test_user_model_and_data_untouched():
    m = _small()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    calib = [torch.randn(2, 3, 8, 8)]
    c0 = calib[0].clone()
    fxprune.compile(m, torch.randn(1, 3, 8, 8), importance="lasso", ratio=0.5, calib=calib, reconstruct="lstsq")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(calib[0], c0)


# -- distributed ----------------------------------------------------------------------------------------
def _dist_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.Conv2d(8, 4, 1)).double().eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    return m, calib


def _dist_run(calib, importance):
    m, _ = _dist_model()
    res = fxprune.compile(m, calib[0][:1], importance=importance, ratio=0.5, calib=calib, reconstruct="lstsq")
    return [list(map(list, res.selection.keep))], {k: v.tolist() for k, v in res.module.state_dict().items()}


def _worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        _, calib = _dist_model()
        result = {imp: _dist_run(calib[rank::2], imp) for imp in ("thinet_forward", "lasso")}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_distributed_statistics_match_single_process():
    _, calib = _dist_model()
    single = {imp: _dist_run(calib, imp) for imp in ("thinet_forward", "lasso")}
    with tempfile.TemporaryDirectory() as d:
        init = "file://" + os.path.join(d, "init")
        out = os.path.join(d, "res")
        # fork: the children inherit the imported modules (spawning re-imports torch, ~10 s on a loaded box)
        mp.start_processes(_worker, args=(init, out), nprocs=2, join=True, start_method="fork")
        for rank in range(2):
            with open(f"{out}.{rank}") as f:
                got = json.load(f)
            for imp, (sel, state) in single.items():
                assert got[imp][0] == json.loads(json.dumps(sel)), imp
                for k, v in state.items():  # reconstructed weights from all-reduced moments
                    np.testing.assert_allclose(np.asarray(got[imp][1][k]), np.asarray(v), rtol=1e-7, atol=1e-9)
