"""Magnitude connection pruning (Han et al.): masks, masked gradients, schedule, dropout, report, export,
and the structural payoff through the compiler (``importance="dead"``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError, InputError
from fxprune.sparsity import (
    MagnitudePruner,
    export_sparse,
    iterative_magnitude_prune,
    load_sparse,
    sparsity_report,
)


def mlp(seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Dropout(0.5), nn.Linear(20, 16), nn.ReLU(),
                         nn.Linear(16, 4)).to(dtype)


# -- masks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "1"])
def test_q_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="q"):
        MagnitudePruner(mlp(), q=bad)
    p = MagnitudePruner(mlp(), q=1.0)
    with pytest.raises(ConfigError, match="q"):
        p.prune(bad)


def test_bad_options():
    with pytest.raises(ConfigError, match="not pruned layers"):
        MagnitudePruner(mlp(), q={"nope": 1.0})
    with pytest.raises(ConfigError, match="sigma"):
        MagnitudePruner(mlp(), sigma="median")
    with pytest.raises(ConfigError, match="no module named"):
        MagnitudePruner(mlp(), layers=["9"])
    with pytest.raises(ConfigError, match="no weight"):
        MagnitudePruner(mlp(), layers=["1"])
    with pytest.raises(InputError):
        MagnitudePruner("model")  # type: ignore[arg-type]


def test_prune_matches_brute_force_threshold_and_masks_only_shrink():
    net = mlp()
    dense = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    qs = {"0": 0.7, "3": 1.1, "5": 0.3}
    p = MagnitudePruner(net, q=qs)
    step = p.prune()
    for n, w in dense.items():
        t = qs[n] * w.double().std().item()
        assert step.thresholds[n] == pytest.approx(t)
        want = w.abs() > t
        assert torch.equal(p.masks[n], want)
        assert torch.equal(net.get_submodule(n).weight.detach(), w * want)
    # a lower q later never brings a connection back
    before = {n: m.clone() for n, m in p.masks.items()}
    p.prune(0.1)
    for n in before:
        assert torch.equal(p.masks[n], before[n])
    tot = sum(w.numel() for w in dense.values())
    assert p.sparsity() == pytest.approx(1 - sum(int(m.sum()) for m in before.values()) / tot)


def test_sigma_current_uses_the_surviving_weights():
    net = mlp()
    p = MagnitudePruner(net, q=0.5, sigma="current")
    p.prune()
    w = net[0].weight.detach().clone()
    alive = w[p.masks["0"]]
    t = 0.5 * alive.double().std().item()
    p.prune()
    assert torch.equal(p.masks["0"], (w.abs() > t) & (w != 0))


def train_steps(net, opt, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = next(net.parameters()).dtype
    for _ in range(n):
        x = torch.randn(16, 12, generator=g, dtype=dt)
        y = torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
])
def test_masked_gradients_keep_pruned_weights_zero(make_opt):
    net = mlp()
    p = MagnitudePruner(net, q=1.0)
    p.prune()
    snap = {n: net.get_submodule(n).weight.detach().clone() for n in p.masks}
    train_steps(net, make_opt(net.parameters()))
    for n, m in p.masks.items():
        w = net.get_submodule(n).weight.detach()
        assert (w[~m] == 0).all()
        assert not torch.equal(w[m], snap[n][m])  # survivors did train


def test_attach_reapplies_masks_for_optimisers_with_old_state():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    train_steps(net, opt, 3)  # momentum buffers now non-zero everywhere
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_opt.load_state_dict(opt.state_dict())
    p, q = MagnitudePruner(net, q=1.0), MagnitudePruner(ref, q=1.0)
    p.prune(), q.prune()
    p.attach(opt)
    train_steps(net, opt, 2, seed=1)
    train_steps(ref, ref_opt, 2, seed=1)
    m = p.masks["0"]
    assert (net[0].weight.detach()[~m] == 0).all()
    assert (ref[0].weight.detach()[~m] != 0).any()  # the oracle: without attach, momentum revives them
    p.remove()


def test_guard_never_empties_a_layer_and_error_mode():
    net = mlp()
    w = net[3].weight.detach().clone()
    p = MagnitudePruner(net, q={"3": 1e6}, default_q=0.0, min_keep=3)
    step = p.prune()
    assert step.guarded == ("3",) and p.guarded == ["3"]
    kept = p.masks["3"]
    assert int(kept.sum()) == 3
    top = torch.topk(w.abs().reshape(-1), 3).indices
    assert kept.reshape(-1)[top].all()
    assert int(p.masks["0"].sum()) == net[0].weight.numel()  # q=0: only exact zeros go
    with pytest.raises(ConfigError, match="would remove every weight of layer '0'"):
        MagnitudePruner(mlp(), q=1e6, on_empty="error").prune()


def test_dropout_adjustment_follows_han_formula():
    net = mlp()
    p = MagnitudePruner(net, q=1.0)
    p.prune()
    ps = p.adjust_dropout()
    kept, tot = int(p.masks["3"].sum()), p.masks["3"].numel()
    assert ps == {"2": pytest.approx(0.5 * math.sqrt(kept / tot))}
    assert net[2].p == pytest.approx(ps["2"])
    with pytest.raises(ConfigError):
        p.adjust_dropout({"0": "3"})


def test_sparsity_report_counts_exact_zeros():
    net = mlp()
    with torch.no_grad():
        net[0].weight[:5] = 0
        net[5].weight[0, 0] = 0
    r = sparsity_report(net)
    assert [row[0] for row in r.rows] == ["0", "3", "5"]
    assert r.rows[0] == ("0", 240, 240 - 60) and r.rows[2] == ("5", 64, 63)
    assert r.total == 240 + 320 + 64 and r.nonzero == r.total - 61
    assert r.compression == pytest.approx(r.total / r.nonzero)
    md = r.to_markdown()
    assert "| 0 | 240 | 180 | 75.0 |" in md and "**total**" in md


def test_iterative_schedule_calls_train_fn_and_grows_sparsity():
    net = mlp()
    p = MagnitudePruner(net, q=0.0)
    seen = []

    def train(model, rnd):
        assert model is net
        seen.append(rnd)
        train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 2, seed=rnd)
        return float(rnd)

    hist = iterative_magnitude_prune(p, train, [0.4, 0.8, 1.2], progress=False)
    assert seen == [0, 1, 2]
    sp = [h["sparsity"] for h in hist]
    assert sp == sorted(sp) and sp[-1] > sp[0] > 0
    assert [h["metric"] for h in hist] == [0.0, 1.0, 2.0]
    for n, m in p.masks.items():
        assert (net.get_submodule(n).weight.detach()[~m] == 0).all()
    with pytest.raises(ConfigError):
        iterative_magnitude_prune(p, train, [], progress=False)


# -- export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 8])
def test_export_round_trip_is_exact_and_small(tmp_path, bits):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    p = MagnitudePruner(net, q=1.8)
    p.prune()
    with torch.no_grad():  # a long run of zeros forces filler entries (gap > 2**bits - 1)
        net[0].weight[:50] = 0
    path = tmp_path / "m.pt"
    st = export_sparse(net, path, index_bits=bits)
    raw = torch.load(path, weights_only=True)
    assert raw["format"].startswith("fxprune.sparse")
    assert st.fillers > 0
    state = load_sparse(path)
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v), k
    fresh = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    load_sparse(path, fresh)
    x = torch.randn(3, 300)
    assert torch.equal(fresh(x), net(x))
    assert st.file_bytes == path.stat().st_size
    assert st.ratio > 1.5 and st.payload_bytes < st.dense_payload_bytes / 2


def test_export_bad_input(tmp_path):
    with pytest.raises(ConfigError):
        export_sparse(mlp(), tmp_path / "a.pt", index_bits=1)
    with pytest.raises(InputError):
        export_sparse([1, 2], tmp_path / "a.pt")  # type: ignore[arg-type]
    torch.save({"x": torch.zeros(2)}, tmp_path / "b.pt")
    with pytest.raises(InputError, match="not a file written"):
        load_sparse(tmp_path / "b.pt")


# -- structural payoff ----------------------------------------------------------------------------
def test_compiler_removes_dead_units_exactly():
    net = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    torch.manual_seed(1)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    with torch.no_grad():
        net[0].weight[[2, 5]] = 0       # hidden units 2, 5: zero producer ...
        net[0].bias[2] = 0              # ... and zero bias only for unit 2 (relu(b5) != 0 stays)
        net[2].weight[:, [7, 8]] = 0    # hidden units 7, 8 of layer 0: nobody reads them
        net[4].weight[:, 4] = 0         # unit 4 of layer 2 (tanh): dead consumer
        net[2].weight[6] = 0            # unit 6 of layer 2: zero producer but bias != 0 -> stays
    x = torch.randn(6, 10, dtype=torch.float64)
    res = fxprune.compile(net, x, importance="dead", threshold=0.0, verify="equivalence")
    assert res.module.get_submodule("0").out_features == 12 - 3  # 2, 7, 8
    assert res.module.get_submodule("2").out_features == 9 - 1  # 4
    xs = torch.randn(50, 10, dtype=torch.float64) * 3
    torch.testing.assert_close(res.module(xs), net(xs), rtol=0, atol=1e-12)
    kept = res.selection.as_dict()
    g0 = next(g for g in res.analysis.groups if g.root == "0")
    assert set(range(12)) - set(kept[g0.id]) == {2, 7, 8}
    # l1 + threshold 0 is the strict form: a unit goes only when *all* its slices are zero
    with torch.no_grad():
        net[2].weight[:, 2] = 0
    strict = fxprune.compile(net, x, importance="l1", threshold=0.0, verify="equivalence")
    assert strict.module.get_submodule("0").out_features == 11
    torch.testing.assert_close(strict.module(xs), net(xs), rtol=0, atol=1e-12)


def test_dead_rule_is_conservative_for_norms_and_nonzero_activations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.Sigmoid(),
                        nn.Conv2d(5, 2, 1)).double().eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].bias.uniform_(0.5, 1)
        net[0].weight[1] = 0
        net[0].bias[1] = 0      # zero filter, but the BN turns 0 into a constant: must stay
        net[3].weight[2] = 0
        net[3].bias[2] = 0      # zero filter, but sigmoid(0) = 0.5: must stay
        net[3].weight[:, 4] = 0  # channel 4 of the BN group is never read: goes
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    res = fxprune.compile(net, x, importance="dead", threshold=0.0, verify="equivalence")
    assert res.module.get_submodule("0").out_channels == 5
    assert res.module.get_submodule("3").out_channels == 5
    torch.testing.assert_close(res.module(x), net(x), rtol=0, atol=1e-12)


def test_han_masks_then_compile_equals_masked_model():
    """End to end: prune connections, retrain with masks, then the compiler drops the dead neurons."""
    net = mlp(dtype=torch.float64)
    p = MagnitudePruner(net, q=1.0)
    p.prune()
    with torch.no_grad():  # make a few neurons fully disconnected, as high sparsity does
        for i in (1, 4):
            p.masks["3"][:, i] = False
        p.masks["0"][7] = False
        net[0].bias[7] = 0
    p.apply()
    train_steps(net, torch.optim.SGD(net.parameters(), lr=0.05), 2)
    net.eval()
    snap = copy.deepcopy(net.state_dict())
    x = torch.randn(8, 12, dtype=torch.float64)
    res = fxprune.compile(net, x, importance="dead", threshold=0.0, verify="equivalence")
    assert res.module.get_submodule("0").out_features <= 20 - 3
    torch.testing.assert_close(res.module(x), net(x), rtol=0, atol=1e-12)
    for k, v in net.state_dict().items():
        assert torch.equal(v, snap[k])  # compile never touched the trained model


def test_prune_to_reaches_the_sparsity_with_one_scaled_q():
    net = mlp()
    p = MagnitudePruner(net, q={"0": 1.0, "3": 2.0, "5": 0.5})
    step = p.prune_to(0.6)
    n = sum(m.numel() for m in p.masks.values())
    assert 0.6 <= p.sparsity() <= 0.6 + 2 / n
    # the per-layer q proportions are kept: t_l / (q_l * sigma_l) is the same factor for every layer
    factors = {k: step.thresholds[k] / (p.q[k] * p.dense_std[k]) for k in p.masks}
    assert max(factors.values()) == pytest.approx(min(factors.values()))
    p.prune_to(0.3)  # below the current sparsity: nothing changes
    assert 0.6 <= p.sparsity() <= 0.6 + 2 / n
    for bad in (1.0, -0.1, "x"):
        with pytest.raises(ConfigError, match="sparsity"):
            p.prune_to(bad)  # type: ignore[arg-type]
