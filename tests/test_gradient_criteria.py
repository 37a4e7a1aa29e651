"""Gradient criteria (Taylor on activations / weights, OBD with an empirical Fisher) against independent
references computed with plain autograd on the eager model (hooks, naive per-sample loops, finite
differences), plus the compile contract and bad-input errors."""

from __future__ import annotations

import copy
import dataclasses
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune import meta
from fxprune.passes.gradient import HessianImportance, TaylorImportance, calib_batches
from fxprune.testing import assert_model_unchanged, snapshot
from models import build, randomize

DT = torch.float64


class Tiny(nn.Module):
    """conv1 → BN → ReLU → conv2 → mean → fc. ``tap`` (eager only) records intermediates for the oracle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.tap: dict[str, torch.Tensor] | None = None  # None while tracing: the branches vanish

    def _t(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.tap is not None:
            t.retain_grad()
            self.tap[name] = t
        return t

    def forward(self, x):
        a = self._t("conv1", self.conv1(x))
        b = self._t("bn1", self.bn1(a))
        c = self._t("act", self.act(b))
        d = self._t("conv2", self.conv2(c))
        m = self._t("mean", d.mean((2, 3)))
        return self.fc(m)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(Tiny(), seed).to(DT).eval()


def data(n_batches: int = 2, n: int = 3, seed: int = 1, hw: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, hw, hw, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
            for _ in range(n_batches)]


def scored(model, pass_, calib, x=None):
    """Run group + ``pass_`` on a traced copy; return (groups by root, scores by root, pass stats)."""
    x = x if x is not None else torch.randn(1, 3, 6, 6, dtype=DT)
    gm, inputs = fxprune.prepare(model, (x,))
    ctx = fxprune.Context(model=model, example_inputs=inputs, original=gm, calib=calib)
    fxprune.GroupChannels().run(gm, ctx)
    res = pass_.run(gm, ctx)
    groups = {g.root: g for g in meta.get(gm, "groups").groups}
    imp = meta.get(gm, "importance")
    return groups, {g.root: imp[g.id] for g in groups.values() if g.id in imp}, res.stats


def eager_loss(model, x, y, loss_fn):
    out = model(x)
    return loss_fn(out, y) if loss_fn is not None else 0.5 * (out * out).sum()


# -- activation Taylor ------------------------------------------------------------------------------------
def activation_reference(model, calib, loss_fn, granularity, root_nodes):
    """Per node: Σ_batches Σ_n |Σ_positions a·g| (sample) or Σ|a·g| (element), from retain_grad on the eager model."""
    m = copy.deepcopy(model)
    out = {k: 0.0 for k in root_nodes}
    for x, y in calib:
        m.tap = {}
        eager_loss(m, x, y if loss_fn else None, loss_fn).backward()
        for k in root_nodes:
            a, g = m.tap[k].detach(), m.tap[k].grad
            p = a * g
            if granularity == "element":
                out[k] = out[k] + p.abs().sum(tuple(d for d in range(p.dim()) if d != 1)).numpy()
            else:
                per_sample = p.flatten(2).sum(2) if p.dim() > 2 else p  # (n, channels)
                out[k] = out[k] + per_sample.abs().sum(0).numpy()
    return out


@pytest.mark.parametrize("granularity", ["sample", "element"])
@pytest.mark.parametrize("labelled", [True, False])
def test_activation_taylor_matches_autograd_reference(granularity, labelled):
    model = tiny()
    calib = data() if labelled else [x for x, _ in data()]
    loss = F.cross_entropy if labelled else None
    for reduction in ("sum", "max"):
        p = TaylorImportance(mode="activation", granularity=granularity, loss_fn=loss, reduction=reduction, float64=True)
        groups, s, _ = scored(model, p, calib)
        g1, g2 = groups["conv1"], groups["conv2"]
        assert {c.node for c in g1.channels} == {"conv1", "bn1", "act"}
        assert {c.node for c in g2.channels} == {"conv2", "mean"}
        ref = activation_reference(model, data(), loss, granularity, ["conv1", "bn1", "act", "conv2", "mean"])
        red = np.sum if reduction == "sum" else np.max
        np.testing.assert_allclose(s["conv1"], red([ref["conv1"], ref["bn1"], ref["act"]], axis=0), rtol=1e-10)
        np.testing.assert_allclose(s["conv2"], red([ref["conv2"], ref["mean"]], axis=0), rtol=1e-10)
    # ReLU's a·g equals BN's a·g wherever it is positive and both vanish elsewhere: a built-in identity
    np.testing.assert_allclose(ref["bn1"], ref["act"], rtol=1e-10)


def test_activation_taylor_equals_finite_difference():
    """One sample: the score of conv1's channel c at conv1's output is |dL/dt| for that channel scaled by 1+t."""
    model = tiny(3)
    x, y = data(1, 1, seed=5)[0]
    gm, inputs = fxprune.prepare(model, (x,))
    ctx = fxprune.Context(model=model, example_inputs=inputs, original=gm, calib=[(x, y)])
    fxprune.GroupChannels().run(gm, ctx)
    g1 = next(g for g in meta.get(gm, "groups").groups if g.root == "conv1")
    only = dataclasses.replace(g1, channels=tuple(r for r in g1.channels if r.node == "conv1"))
    assert len(only.channels) == 1
    score = TaylorImportance(loss_fn=F.cross_entropy, float64=True)._activation(gm, [only], ctx)[0][g1.id]  # noqa: SLF001
    h = 1e-6
    for c in range(6):
        gate = torch.ones(6, dtype=DT)

        def loss_at(t):
            gate[c] = 1 + t
            hook = model.conv1.register_forward_hook(lambda m, i, o: o * gate[None, :, None, None])
            try:
                with torch.no_grad():
                    return float(F.cross_entropy(model(x), y))
            finally:
                hook.remove()

        fd = (loss_at(h) - loss_at(-h)) / (2 * h)
        assert score[c] == pytest.approx(abs(fd), rel=1e-5, abs=1e-9)


def test_inplace_relu_does_not_change_activation_scores():
    """The tap adds a zero tensor after the node, so an in-place op on its output cannot corrupt the copy."""
    model = tiny()
    inplace = copy.deepcopy(model)
    inplace.act = nn.ReLU(inplace=True)
    calib = data()
    p = TaylorImportance(loss_fn=F.cross_entropy, float64=True)
    _, a, _ = scored(model, p, calib)
    _, b, _ = scored(inplace, p, calib)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12)


# -- weight criteria --------------------------------------------------------------------------------------
CONV1_SLICES = {("conv1.weight", 0), ("conv1.bias", 0), ("bn1.weight", 0), ("bn1.bias", 0), ("conv2.weight", 1)}


def slice_sum(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """Σ over conv1-group slices of each channel, addressed by hand (no fxprune helpers)."""
    return (tensors["conv1.weight"].sum((1, 2, 3)) + tensors["conv1.bias"] + tensors["bn1.weight"]
            + tensors["bn1.bias"] + tensors["conv2.weight"].sum((0, 2, 3))).numpy()


def test_weight_taylor_matches_independent_sum():
    model = tiny()
    calib = data(3)
    groups, s, stats = scored(model, TaylorImportance(mode="weight", loss_fn=F.cross_entropy, float64=True), calib)
    assert {(p.param, p.dim) for p in groups["conv1"].params if not p.is_buffer} == CONV1_SLICES
    m = copy.deepcopy(model)
    G = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for x, y in calib:
        for (n, _), g in zip(m.named_parameters(), torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters())),
                             strict=True):
            G[n] += g
    wg = {n: (p.detach() * G[n]).abs() for n, p in m.named_parameters()}
    np.testing.assert_allclose(s["conv1"], slice_sum(wg), rtol=1e-10)
    assert stats["batches"] == 3 and stats["samples"] == 9


@pytest.mark.parametrize("per_sample", [True, False])
def test_fisher_diagonal_and_obd_saliency_match_naive_loop(per_sample):
    model = tiny(2)
    calib = data(2, 3, seed=4)
    hp = HessianImportance(loss_fn=F.cross_entropy, float64=True, per_sample=per_sample)
    groups, s, stats = scored(model, hp, calib)
    m = copy.deepcopy(model)
    names = [n for n, _ in m.named_parameters()]
    Fi = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    terms = 0
    for x, y in calib:
        pieces = [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))] if per_sample else [(x, y)]
        for xi, yi in pieces:  # naive: one backward per sample (or per batch)
            for n, g in zip(names, torch.autograd.grad(F.cross_entropy(m(xi), yi), list(m.parameters())), strict=True):
                Fi[n] += g**2
            terms += 1
    Fi = {n: f / terms for n, f in Fi.items()}
    assert stats["terms"] == terms == (6 if per_sample else 2)
    # the Fisher diagonal itself
    gm, inputs = fxprune.prepare(model, (calib[0][0][:1],))
    ctx = fxprune.Context(model=model, example_inputs=inputs, original=gm, calib=calib)
    fisher, _ = hp.fisher(gm, names, ctx)
    for n in names:
        torch.testing.assert_close(fisher[n], Fi[n], rtol=1e-10, atol=1e-14)
    # OBD saliency summed over the group's slices
    sal = {n: 0.5 * Fi[n] * p.detach() ** 2 for n, p in m.named_parameters()}
    np.testing.assert_allclose(s["conv1"], slice_sum(sal), rtol=1e-10)
    assert (s["conv1"] >= 0).all()


def test_all_zero_channel_scores_zero():
    model = tiny(1)
    with torch.no_grad():
        for t in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
            t[2] = 0
        model.conv2.weight[:, 2] = 0
    calib = data()
    for p in (TaylorImportance(mode="weight", loss_fn=F.cross_entropy, float64=True),
              HessianImportance(loss_fn=F.cross_entropy, float64=True),
              TaylorImportance(loss_fn=F.cross_entropy, float64=True)):  # its activations are 0 too
        _, s, _ = scored(model, p, calib)
        assert s["conv1"][2] == 0.0
        assert (np.delete(s["conv1"], 2) > 0).all()
    # filters only: zeroing conv1's filter alone is enough when only "out" slices count
    model2 = tiny(1)
    with torch.no_grad():
        model2.conv1.weight[4] = 0
        model2.conv1.bias[4] = 0
    _, s, _ = scored(model2, TaylorImportance(mode="weight", roles=("out",), float64=True), [x for x, _ in calib])
    assert s["conv1"][4] == 0.0 and (np.delete(s["conv1"], 4) > 0).all()


def test_float32_close_to_float64_and_deterministic():
    model = tiny()
    calib = data()
    for mode in ("activation", "weight"):
        _, a, _ = scored(model, TaylorImportance(mode=mode, loss_fn="cross_entropy", float64=True), calib)
        _, b, _ = scored(model, TaylorImportance(mode=mode, loss_fn="cross_entropy", float64=True), calib)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        m32 = tiny().float()
        c32 = [(x.float(), y) for x, y in calib]
        _, c, _ = scored(m32, TaylorImportance(mode=mode, loss_fn="cross_entropy"), c32,
                         x=torch.randn(1, 3, 6, 6))
        for k in a:
            np.testing.assert_allclose(c[k], a[k], rtol=1e-4)


# -- compile end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["taylor", "taylor_weight", "hessian"])
def test_compile_by_name_keeps_top_units_and_is_equivalent(name):
    model = tiny()
    snap = snapshot(model)
    calib = [x for x, _ in data()]
    res = fxprune.compile(model, calib[0][:1], importance=name, calib=calib, ratio=0.5, verify="equivalence")
    assert res.module.get_submodule("conv1").out_channels == 3
    assert res.module.get_submodule("conv2").out_channels == 2
    assert_model_unchanged(model, snap, training=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in res.original.parameters())
    # no labels with a loss_fn: compile's calib is inputs only → 0.5‖out‖²; the kept units are the top scores
    cls = {"taylor": TaylorImportance, "taylor_weight": TaylorImportance, "hessian": HessianImportance}[name]
    kw = {"mode": "weight"} if name == "taylor_weight" else {}
    groups, s, _ = scored(model, cls(**kw), calib)
    g = groups["conv1"]
    assert set(res.selection.as_dict()[g.id]) == set(np.argsort(-s["conv1"])[:3].tolist())


def test_compile_zoo_models_with_labels_and_pipeline_string():
    model, xs = build("residual")
    calib = [(torch.randn_like(xs[0]), torch.randn(2, 4, 8, 8, dtype=DT)) for _ in range(2)]
    out_shape = model(*xs).shape
    calib = [(x, torch.randn(out_shape, dtype=DT)) for x, _ in calib]
    res = fxprune.compile(model, xs, importance=TaylorImportance(loss_fn="mse_loss"), calib=calib, ratio=0.5,
                          verify="equivalence")
    assert res.report.params_after < res.report.params_before
    for spec in ("group | taylor(batches=1, loss_fn='mse_loss') | select(ratio=0.5) | rewrite | verify(equivalence=True)",
                 "group | importance(criterion='hessian') | select(ratio=0.5) | rewrite",
                 "group | taylor_weight(float64=True) | select(ratio=0.5) | rewrite"):
        c = calib if "mse" in spec else [x for x, _ in calib]
        r = fxprune.compile(model, xs, pipeline=spec, calib=c)
        assert r.report.params_after < r.report.params_before
        assert r.context.log[1][1]["batches"] == (1 if "batches=1" in spec else 2)


# -- errors ------------------------------------------------------------------------------------------------
def test_missing_and_bad_calibration_data():
    model = tiny()
    x = torch.randn(1, 3, 6, 6, dtype=DT)
    with pytest.raises(fxprune.ConfigError, match="calib"):
        fxprune.compile(model, x, importance="taylor", ratio=0.5)
    with pytest.raises(fxprune.InputError, match="empty"):
        fxprune.compile(model, x, importance="hessian", calib=[], ratio=0.5)
    with pytest.raises(fxprune.InputError, match=r"shape \(2, 3, 5, 5\)"):
        fxprune.compile(model, x, importance="taylor", calib=[torch.randn(2, 3, 5, 5, dtype=DT)], ratio=0.5)
    bad = torch.randn(2, 3, 6, 6, dtype=DT)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxprune.InputError, match="non-finite"):
        fxprune.compile(model, x, importance="taylor_weight", calib=[bad], ratio=0.5)
    with pytest.raises(fxprune.InputError, match="target"):
        fxprune.compile(model, x, importance=TaylorImportance(loss_fn="cross_entropy"), calib=[bad], ratio=0.5)
    with pytest.raises(fxprune.InputError, match="non-tensors"):
        fxprune.compile(model, x, importance="taylor", calib=[(x, "label")], ratio=0.5)
    with pytest.raises(fxprune.InputError, match="batch sizes"):
        fxprune.compile(model, x, importance=TaylorImportance(loss_fn="cross_entropy"),
                        calib=[(torch.randn(3, 3, 6, 6, dtype=DT), torch.zeros(2, dtype=torch.long))], ratio=0.5)
    with pytest.raises(fxprune.InputError, match="scalar"):
        fxprune.compile(model, x, importance=TaylorImportance(loss_fn=lambda o, t: o), calib=data(1), ratio=0.5)
    with pytest.raises(fxprune.ConfigError, match="calib must be an iterable"):
        list(calib_batches(3, (x,), labels=False))


def test_bad_options():
    for kw in ({"mode": "hessian"}, {"granularity": "channel"}, {"loss_fn": "nope"}, {"loss_fn": 3},
               {"batches": 0}, {"labels": True}, {"reduction": "median"}, {"roles": ("weights",)},
               {"normalize": "softmax"}):
        with pytest.raises(fxprune.ConfigError):
            TaylorImportance(**kw)
    with pytest.raises(fxprune.PipelineError):
        fxprune.Pipeline.parse("group | hessian(per_sample=True, loss_fn='nope')")
