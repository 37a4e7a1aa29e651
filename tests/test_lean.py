"""The lean compile: no copy of the user's weights, shapes verified from metadata, one reduction per
tensor for the magnitude criteria, the class copy checked by its traced program."""

from __future__ import annotations

import itertools
import operator

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

import fxprune
from fxprune import meta, shapes
from fxprune.errors import VerificationError
from fxprune.ir import ParamSlice, Span
from fxprune.passes import verify as verify_mod
from fxprune.passes.importance import TensorCache, lp_norm, position_mass, slice_mass, slice_values
from fxprune.pipeline import Context
from fxprune import restore
from fxprune.restore import same_program
from fxprune.testing import assert_model_unchanged, snapshot
from models import randomize


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y))) + y
        return self.fc(y.mean((2, 3)))


def _net(seed: int = 0, zero_gamma: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    m = randomize(_Net()).eval()
    if zero_gamma:
        with torch.no_grad():
            m.b1.weight[:3] = 0
    return m


_X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kwargs", [
    {},
    {"importance": "l1", "verify": "equivalence"},
    {"importance": "bn_scale"},
    {"importance": "taylor", "calib": [(_X,)]},
    {"reconstruct": "lstsq", "calib": [(_X,)]},
    {"sequential": True, "ratio": 0.25},
    {"result": "graph", "absorb": True},
], ids=lambda k: ",".join(sorted(k)) or "defaults")
def test_compile_never_writes_the_shared_weights(kwargs):
    """The traced graph views the user's parameters (no copy); no pass may write them: the version counters
    (bumped by any in-place write, even one undone later) and values stay as they were."""
    model = _net(zero_gamma=True)
    snap = snapshot(model)
    opts = {"ratio": 0.5, **kwargs}
    res = fxprune.compile(model, _X, **opts)
    assert_model_unchanged(model, snap, training=False)
    assert res.report.groups_pruned > 0
    user = {p.data_ptr() for p in model.parameters()}
    assert not user & {p.data_ptr() for p in res.module.parameters()}, "the result shares storage with the user's model"


def test_the_traced_graph_views_the_user_weights_instead_of_copying_them():
    model = _net()
    res = fxprune.compile(model, _X, ratio=0.5)
    user = {n: p.data_ptr() for n, p in model.named_parameters()}
    seen = {n: p.data_ptr() for n, p in res.original.named_parameters()}
    assert seen and all(user[n] == ptr for n, ptr in seen.items())
    assert all(p is not q for p, q in zip(model.parameters(), res.original.parameters()))  # own Parameter objects


def test_an_in_place_write_shows_in_the_snapshot_check():
    model = _net()
    snap = snapshot(model)
    with torch.no_grad():
        model.c1.weight.mul_(1.0)  # the same values, but written
    with pytest.raises(AssertionError, match="written in place"):
        assert_model_unchanged(model, snap)


# -- one reduction per tensor -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dim,groups", [((8, 6, 3, 3), 0, 1), ((8, 6, 3, 3), 1, 1), ((8, 2, 3, 3), 1, 4),
                                              ((8, 6, 1, 1), 1, 1), ((8, 6), 0, 1), ((8, 6), 1, 1), ((7,), 0, 1),
                                              ((4, 5, 2, 3, 2), 1, 1), ((4, 5, 3), 2, 1)])
@pytest.mark.parametrize("p", [1, 2])
def test_position_mass_equals_the_norm_of_every_slice(shape, dim, groups, p):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    n = t.shape[dim] * groups
    got = position_mass(t, dim, groups, p)
    if groups > 1:  # oracle: input channel c of block q reads t[q*og:(q+1)*og, c % cg]
        og, cg = t.shape[0] // groups, t.shape[1]
        want = [float(t[(c // cg) * og:(c // cg + 1) * og, c % cg].abs().pow(p).sum()) for c in range(n)]
    else:
        want = [float(t.select(dim, i).abs().pow(p).sum()) for i in range(n)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("shape,dim,groups", [((8, 6, 3, 3), 0, 1), ((8, 6, 3, 3), 1, 1), ((8, 2, 3, 3), 1, 4),
                                              ((8, 2, 3, 3), 0, 4), ((8, 6, 1, 1), 0, 1), ((8, 6, 1, 1), 1, 1),
                                              ((8, 6), 0, 1), ((8, 6), 1, 1), ((7,), 0, 1), ((300, 301), 1, 1),
                                              ((300, 301), 0, 1), ((70000,), 0, 1), ((64, 48, 5, 5), 1, 1),
                                              ((64, 8, 3, 3), 1, 8), ((4, 5, 3), 2, 1), ((128, 64, 3, 3), 0, 1),
                                              ((256, 16, 3, 3), 1, 16), ((600, 600, 3, 3), 1, 1)])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_cache_mass_equals_the_norm_of_every_slice(shape, dim, groups, p, dtype):
    """Both of the cache's paths (numpy for small tensors, one torch reduction for large ones) against the
    norm of each slice taken on its own."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    gm.register_parameter("w", nn.Parameter(t))
    got = TensorCache(gm).mass("w", dim, groups, p)
    t = t.double()
    n = t.shape[dim] * groups
    if groups > 1 and dim == 1:
        og, cg = t.shape[0] // groups, t.shape[1]
        want = [float(t[(c // cg) * og:(c // cg + 1) * og, c % cg].abs().pow(p).sum()) for c in range(n)]
    else:
        want = [float(t.select(dim, i).abs().pow(p).sum()) for i in range(t.shape[dim])]
    assert got.dtype == np.float64 and got.shape == (len(want),)
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("span", [Span(0, 4, 2, 2), Span(1, 3, 2, 1), Span(0, 2, 1, 1, 2, 4)])
def test_slice_mass_equals_the_gathered_slice_norm(span):
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3)))
    ps = ParamSlice("0.weight", 0, span, "out")
    units, vals = slice_values(gm.get_parameter("0.weight"), ps)
    want = lp_norm(vals, 2, 1)
    for tensor in (TensorCache(gm), lambda n: gm.get_parameter(n)):
        u, got = slice_mass(tensor, ps, 2)
        assert list(u) == list(units)
        np.testing.assert_allclose(got, want, rtol=1e-5)


# -- shapes from metadata --------------------------------------------------------------------------------------

def test_shape_verification_runs_no_forward(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("verify='shapes' ran the model")

    monkeypatch.setattr(verify_mod, "run_outputs", boom)
    res = fxprune.compile(_net(), _X, ratio=0.5, verify="shapes", result="graph")
    assert res.report.groups_pruned > 0


def test_shape_verification_from_metadata_still_catches_a_changed_output():
    gm, inputs = fxprune.prepare(_net(), _X)
    other, _ = fxprune.prepare(nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), _X)
    ctx = Context(model=_net(), example_inputs=inputs, original=gm)
    assert verify_mod.output_shapes(gm) == [(2, 5)] and verify_mod.output_shapes(other) == [(2, 4)]
    with pytest.raises(VerificationError, match=r"\(2, 5\)\] -> \[\(2, 4\)"):
        verify_mod.Verify().run(other, ctx)
    meta.drop(other, "shapes")  # no metadata: a real run decides, and finds the same
    with pytest.raises(VerificationError, match="changes the output shapes"):
        verify_mod.Verify().run(other, ctx)


# -- the class copy's program ------------------------------------------------------------------------------------

def _trace(m: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(m)


def test_same_program_accepts_the_same_forward_and_refuses_a_different_one():
    a = _net()
    g = fx.symbolic_trace(a)
    assert same_program(a, g, _trace) == ""
    b = _net()
    b.c1.stride = (2, 2)  # the same tensors are not enough: an attribute differs
    for name, p in a.named_parameters():
        b.get_parameter(name).data = p.data
    assert "module c1" in same_program(b, g, _trace)

    class Other(_Net):
        def forward(self, x):
            return super().forward(x * 2)

    c = Other()
    c.load_state_dict(a.state_dict())
    assert same_program(c, g, _trace) != ""


class _HardCoded(nn.Module):
    """A forward that hard-codes the width the pruning changes: its copy does not trace to the graph's program."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 4, 3)

    def forward(self, x):
        return self.fc(self.c(x).reshape(x.shape[0], 8 * 4))


def test_a_class_copy_that_is_not_the_same_program_is_checked_by_its_outputs():
    x = torch.randn(2, 3, 2, 2)
    res = fxprune.compile(randomize(_HardCoded()), x, ratio=0.5)
    notes = " ".join(res.report.notes)
    assert res.report.groups_pruned > 0
    assert "traces to the same program" not in notes
    assert res.report.form == "GraphModule" and "could not be kept" in notes
    out = res.module(x)
    assert out.shape == (2, 3)


def test_a_traced_class_copy_is_accepted_without_running():
    res = fxprune.compile(_net(), _X, ratio=0.5)
    assert res.report.form == "class _Net"
    assert any("traces to the same program" in n for n in res.report.notes)
    torch.testing.assert_close(res.module(_X), res.graph_module(_X))
    x3 = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(res.module(x3), res.graph_module(x3))


# -- the structural copy ------------------------------------------------------------------------------------------

class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cfg = {"width": 4}
        self.a = nn.Linear(4, 4)
        self.b = self.a  # one module under two names
        self.rnn = nn.GRU(4, 4)  # a class whose __setstate__ does real work: copied by deepcopy itself
        self.blocks = nn.ModuleList([nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)])
        self.blocks[0].extra = self.cfg  # one plain object shared by two modules
        self.register_buffer("steps", torch.tensor(3))


def test_copy_module_is_a_deepcopy():
    import copy as pycopy

    from fxprune.clone import copy_module

    m = _Shared()
    c = copy_module(m)
    ref = pycopy.deepcopy(m)
    assert type(c) is _Shared and c.b is c.a and c.a is not m.a
    assert c.blocks[0].extra is c.cfg and c.cfg is not m.cfg and c.cfg == m.cfg
    assert {k: v.shape for k, v in c.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert all(torch.equal(c.state_dict()[k], v) for k, v in m.state_dict().items())
    assert not {t.data_ptr() for t in c.state_dict().values()} & {t.data_ptr() for t in m.state_dict().values()}
    x = torch.randn(2, 4)
    torch.testing.assert_close(c.rnn(x[None])[0], m.rnn(x[None])[0])
    shared = copy_module(m, {id(p): p for p in m.parameters()})  # a memo maps tensors to replacements
    assert shared.a.weight is m.a.weight and shared.blocks[1].running_mean is not m.blocks[1].running_mean


# -- meta shortcuts agree with torch's kernels ---------------------------------------------------------------------

@pytest.mark.parametrize("mod,shape", [(nn.AdaptiveAvgPool2d(1), (2, 3, 5, 7)), (nn.AdaptiveAvgPool2d((2, None)), (2, 3, 5, 7)),
                                       (nn.AdaptiveMaxPool1d(3), (4, 9)), (nn.AdaptiveAvgPool3d((1, 2, 3)), (1, 2, 4, 4, 4))])
def test_adaptive_pool_shortcut_matches_the_kernel(mod, shape):
    gm = fx.symbolic_trace(nn.Sequential(mod))
    x = torch.randn(shape)
    shapes.propagate_shapes(gm, (x,))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert tuple(meta.shape_of(node)) == tuple(mod(x).shape)


@pytest.mark.parametrize("a,b", [((2, 8, 4, 4), (2, 8, 1, 1)), ((8, 1, 4), (1, 3, 4)), ((5,), (3, 5))])
@pytest.mark.parametrize("op", ["mul", "add", "iadd"])
def test_broadcast_shortcut_matches_the_kernel(a, b, op):
    import operator


    f = getattr(operator, op)

    class M(nn.Module):
        def forward(self, x, y):
            return f(x, y)

    gm = fx.symbolic_trace(M())
    xs = (torch.randn(a), torch.randn(b))
    try:  # oracle: the traced graph run for real (fx records x += y on proxies as x + y)
        want = tuple(gm(xs[0].clone(), xs[1]).shape)
    except RuntimeError:
        with pytest.raises(Exception):
            shapes.propagate_shapes(gm, xs)
        return
    shapes.propagate_shapes(gm, xs)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert tuple(meta.shape_of(node)) == want
    assert meta.tensor_meta(node).dtype == torch.float32


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("pruned", [False, True])
def test_attention_shortcut_matches_the_module(batch_first, pruned):
    from fxprune.modules.mha import PrunedMultiheadAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    mod = PrunedMultiheadAttention.from_mha(mha, [0, 2], keep_out=list(range(0, 16, 2))) if pruned else mha

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = mod

        def forward(self, x):
            return self.a(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 5, 16)
    gm, _ = fxprune.prepare(M(), x)
    q = torch.empty(2, 5, 16, device="meta")
    out = shapes._attention_output(gm.a, (q, q, q), {"need_weights": False})
    assert out is not None and out[1] is None  # the shortcut applies, and agrees with the real module:
    real = mod(x, x, x, need_weights=False)[0]
    assert tuple(out[0].shape) == tuple(real.shape) and out[0].stride() == real.stride()
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert tuple(meta.tensor_meta(node)[0].shape) == tuple(real.shape)


def test_timm_same_padding_conv_is_a_leaf_with_the_conv_rule():
    timm = pytest.importorskip("timm")
    m = timm.create_model("tf_efficientnetv2_b0", pretrained=False).eval()
    from models import randomize as rnd
    rnd(m)
    x = torch.randn(2, 3, 64, 64)
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")
    assert not any("torch.export" in n for n in res.report.notes)  # the fx front end captured it
    assert res.report.macs_after < 0.5 * res.report.macs_before
    y = torch.randn(1, 3, 48, 80)  # "SAME" padding depends on the input size: another size must work too
    torch.testing.assert_close(res.module(y), res.graph_module(y))


class _TwoRegions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 8, 3, padding=1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        y = self.body(x)
        if float(y.mean()) > 1e9:  # data-dependent Python control flow: no whole-model graph
            y = y * 0
        return self.head(y)


def test_hierarchical_front_end_shares_no_storage_and_writes_nothing():
    model = randomize(_TwoRegions()).eval()
    snap = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(model, x, ratio=0.5, frontend="hierarchical")
    assert_model_unchanged(model, snap, training=False)
    assert res.regions and res.report.groups_pruned > 0
    user = {p.data_ptr() for p in model.parameters()}
    assert not user & {p.data_ptr() for p in res.module.parameters()}
    assert res.module(x).shape == (2, 4)


def test_a_user_pass_that_writes_weights_gets_its_own_copy():
    """A pass fxprune does not know may write the graph it is given: the traced graph then holds a copy of
    the weights, and the user's model stays as it was."""
    from fxprune.passes import GroupChannels, MagnitudeImportance, Rewrite, Select
    from fxprune.pipeline import PassResult, graph_pass

    @graph_pass(name="scribble", reads=("groups",))
    def scribble(gm, ctx):
        with torch.no_grad():
            for p in gm.parameters():
                p.mul_(2.0)
        return PassResult(gm, True, {})

    model = _net()
    snap = snapshot(model)
    res = fxprune.compile(model, _X, pipeline=[GroupChannels(), scribble, MagnitudeImportance(),
                                                    Select(ratio=0.5), Rewrite()])
    assert_model_unchanged(model, snap)
    assert res.report.groups_pruned > 0
    seen = {p.data_ptr() for p in res.original.parameters()}
    assert not seen & {p.data_ptr() for p in model.parameters()}


class BatchNormAct2d(nn.BatchNorm2d):
    """Stand-in for timm's ``timm.layers.norm_act.BatchNormAct2d`` (same module path and forward: batch norm,
    then ``drop``, then ``act``), so the rule is tested without timm installed."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, self.momentum or 0.0, self.eps)
        return self.act(self.drop(x))


BatchNormAct2d.__module__ = "timm.layers.norm_act"


class _NormActNet(nn.Module):
    def __init__(self, act: type) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.n1 = BatchNormAct2d(16, act(16) if act is nn.PReLU else act())
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(self.n1(self.c1(x)))


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, nn.Identity, nn.PReLU])
def test_batchnorm_act_is_one_node_when_its_tail_is_position_wise(act):
    torch.manual_seed(0)
    m = randomize(_NormActNet(act).eval())
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")  # the masked reference checks the function
    ops = {n.target: n.op for n in res.original.graph.nodes}
    leaf = act is not nn.PReLU  # a per-channel PReLU holds tensors: traced through, its weight pruned
    assert (ops.get("n1") == "call_module") is leaf
    assert res.module.c1.weight.shape[0] == 8 and res.module.n1.num_features == 8
    torch.testing.assert_close(res.module(x), res.graph_module(x))
    if leaf:  # the class copy took the pruned module as it is: checked by its program, no re-trace or run
        assert any("traces to the same program" in n for n in res.report.notes)
    else:
        assert res.module.n1.act.weight.shape == (8,)


def test_timm_batchnorm_act_is_a_leaf():
    timm = pytest.importorskip("timm")
    m = randomize(timm.create_model("efficientnet_b0", pretrained=False).eval())
    x = torch.randn(2, 3, 64, 64)
    snap = snapshot(m)
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")
    assert_model_unchanged(m, snap, training=False)
    bn_act = [n for n in res.original.graph.nodes if n.op == "call_module"
              and type(res.original.get_submodule(n.target)).__name__ == "BatchNormAct2d"]
    assert len(bn_act) == 49
    # its forward writes its statistics only in training, like torch's norms: the traced copy views them
    first = bn_act[0].target
    assert res.original.get_submodule(first).running_var.data_ptr() == m.get_submodule(first).running_var.data_ptr()
    assert any("traces to the same program" in n for n in res.report.notes)
    torch.testing.assert_close(res.module(x), res.graph_module(x))


def test_graph_result_generates_its_code_when_first_used(tmp_path):
    """The graph result (and the traced original) are lazy GraphModules: no code is generated during compile
    unless something runs them; run, printed, scripted-away or saved they behave as eager ones."""
    m, x = _net(), torch.randn(2, 3, 8, 8)
    res = fxprune.compile(m, x, ratio=0.5)
    gm = res.graph_module
    assert "_code" not in vars(gm) and "_code" not in vars(res.original)  # nothing ran them yet
    torch.testing.assert_close(gm(x), res.module(x))
    assert "def forward" in gm.code and "def forward" in res.original.code
    torch.save(gm, tmp_path / "g.pt")
    again = torch.load(tmp_path / "g.pt", weights_only=False)
    torch.testing.assert_close(again(x), gm(x))
    scripted = torch.jit.script(fx.GraphModule(gm, gm.graph))  # the README's recipe for TorchScript
    torch.testing.assert_close(scripted(x), gm(x))


def test_reduction_shortcut_matches_the_kernels():
    """The meta run's reduction shortcut gives the shape, strides and dtype torch's own kernels give."""
    checked = 0
    for shape in [(2, 3, 4, 5), (3,), (1, 4), (2, 1, 3)]:
        x = torch.randn(*shape)
        nd = len(shape)
        for dims in [d for r in (1, 2) for d in itertools.combinations(range(-nd, nd), r)]:
            d = dims[0] if len(dims) == 1 else dims
            for keep, fn in itertools.product((True, False), ("mean", "sum", "amax", "amin")):
                got = shapes._reduction_output((x.to("meta"), d, keep), {})
                try:
                    real = getattr(x, fn)(d, keep)
                except RuntimeError:  # a repeated dim: the shortcut must leave it to the kernel
                    assert got is None
                    continue
                assert got is not None
                assert (got.shape, got.stride(), got.dtype) == (real.shape, real.stride(), real.dtype)
                checked += 1
    assert checked > 200
    assert shapes._reduction_output((torch.zeros(2, 3, dtype=torch.long, device="meta"), 1, False), {}) is None


@pytest.mark.parametrize("layout", ["contiguous", "nhwc_view", "channels_last", "2d_transposed"])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_shortcut_matches_the_kernel(layout, affine):
    """F.layer_norm on meta tensors skips its decomposition: the same shape, strides and dtype as the kernel."""
    x = {"contiguous": torch.randn(2, 5, 4, 3), "nhwc_view": torch.randn(2, 5, 4, 3).permute(0, 2, 3, 1),
         "channels_last": torch.randn(2, 5, 4, 3).to(memory_format=torch.channels_last),
         "2d_transposed": torch.randn(3, 8).t()}[layout]
    for k in range(1, x.dim() + 1):
        ns = tuple(x.shape[-k:])
        w, b = (torch.randn(ns), torch.randn(ns)) if affine else (None, None)
        real = nn.functional.layer_norm(x, ns, w, b, 1e-6)
        meta_args = [t.to("meta") if t is not None else None for t in (x, w, b)]
        got = shapes._layer_norm_output((meta_args[0], ns, meta_args[1], meta_args[2], 1e-6), {})
        assert got is not None and (got.shape, got.stride(), got.dtype) == (real.shape, real.stride(), real.dtype)
    bad = shapes._layer_norm_output((x.to("meta"), (7,)), {})  # trailing dims do not match: the kernel decides
    assert bad is None


def test_elementwise_method_shortcut_is_the_function_shortcut():
    y, w = torch.empty(1, 4, 3, 3, device="meta"), torch.empty(1, 4, 1, 1, device="meta")
    gm = fx.symbolic_trace(nn.Sequential())  # any module: the interpreter's method dispatch is what is tested
    interp = shapes._MetaInterpreter(gm)
    for name, args in [("mul", (y, w)), ("add", (y, y)), ("sigmoid", (y,)), ("div", (y, 2.0))]:
        got = interp.call_method(name, args, {})
        real = getattr(torch.randn(1, 4, 3, 3), name)(*[torch.randn(a.shape) if isinstance(a, torch.Tensor) else a
                                                         for a in args[1:]])
        assert (got.shape, got.stride(), got.dtype) == (real.shape, real.stride(), real.dtype)


class _Ghost(nn.Module):
    """GhostNet's module: ``cat(primary, cheap)[:, :self.out]`` (an int attribute the rebuild leaves as is;
    here it keeps every channel, and a slice that keeps fewer is the rejected case of the test below)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = 16
        self.primary = nn.Conv2d(3, 8, 1)
        self.cheap = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        p = self.primary(x)
        return self.head(torch.cat([p, self.cheap(p)], 1)[:, : self.out])


def test_slice_of_a_pruned_dim_is_checked_by_the_program():
    torch.manual_seed(0)
    m, x = _Ghost().eval(), torch.randn(2, 3, 8, 8)
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")
    assert any("traces to the same program" in n for n in res.report.notes), res.report.notes
    torch.testing.assert_close(res.module(x), res.graph_module(x))
    y = torch.randn(1, 3, 5, 7)  # another input size: the program check holds at every size
    torch.testing.assert_close(res.module(y), res.graph_module(y))


@pytest.mark.parametrize("stop_x,stop_y,before,after,same", [
    (16, 8, 16, 8, True),      # [:16] of the 8 kept channels selects what [0:8] does
    (16, 6, 16, 8, False),     # the graph keeps 6 of 8: the copy would keep all 8
    (16, 8, 16, 16, False),    # an unpruned dim: the literal must match exactly
])
def test_same_slices_decides_by_the_pruned_size(stop_x, stop_y, before, after, same):
    def graph(stop, c):
        g = fx.symbolic_trace(lambda x: x[:, :stop]).graph
        inp = next(iter(g.nodes))
        inp.meta["tensor_meta"] = shapes.tensor_metadata(torch.empty(2, c, 4))
        return g

    gx, gy = graph(stop_x, before), graph(stop_y, after)
    x, y = [n for n in gx.nodes if n.op == "call_function"][0], [n for n in gy.nodes if n.op == "call_function"][0]
    pos = {n: i for i, n in enumerate(gx.nodes)}
    pos_b = {n: i for i, n in enumerate(gy.nodes)}
    assert restore._same_slices(x, y, pos, pos_b) is same


class _Counting(nn.Module):
    """A forward that writes its own buffer in place, in eval mode too (a call counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.c2(torch.relu(self.b1(self.c1(x))))


@pytest.mark.parametrize("kwargs", [{"reconstruct": "lstsq", "calib": [(_X,)]}, {"verify": "equivalence"}, {}])
def test_a_forward_that_writes_its_buffers_never_reaches_the_users(kwargs):
    """Only torch's own norms' buffers (written only in training) are viewed; the calibration and verification
    runs of the traced graph write their own copy of any other buffer."""
    torch.manual_seed(0)
    model = randomize(_Counting().eval())
    snap = snapshot(model)
    res = fxprune.compile(model, _X, ratio=0.5, **kwargs)
    assert_model_unchanged(model, snap, training=False)
    assert float(model.calls) == 0 and res.report.groups_pruned > 0
    assert res.original.b1.running_mean.data_ptr() == model.b1.running_mean.data_ptr()  # the norm's: viewed


@pytest.mark.parametrize("seed", range(40))
def test_grouped_input_gather_keeps_each_blocks_columns(seed):
    """A grouped conv's input slice is one gather: row r keeps the columns its block (r // og) kept, exactly as
    slicing each row block on its own; a mask that keeps unequal numbers per block is refused."""
    from fxprune.rules import base
    rng = np.random.default_rng(seed)
    groups, cg, og = int(rng.integers(1, 9)), int(rng.integers(1, 6)), int(rng.integers(1, 4))
    m = int(rng.integers(0, cg + 1))
    keep = np.zeros(groups * cg, dtype=bool)
    for q in range(groups):
        keep[q * cg + rng.choice(cg, m, replace=False)] = True
    data = torch.randn(groups * og, cg, 3, 2)
    got = base._gather_grouped(data, keep, groups, "w")
    want = torch.cat([data[q * og:(q + 1) * og][:, np.flatnonzero(keep[q * cg:(q + 1) * cg])] for q in range(groups)])
    assert got.shape == (groups * og, m, 3, 2) and torch.equal(got, want)
    assert got.untyped_storage().data_ptr() != data.untyped_storage().data_ptr()
    if groups > 1 and m > 0:
        keep[np.flatnonzero(keep)[0]] = False
        with pytest.raises(ValueError, match="not pruned uniformly"):
            base._gather_grouped(data, keep, groups, "w")


def test_set_training_equals_train_and_respects_overrides():
    from fxprune.clone import set_training

    class Freezing(nn.Sequential):  # a train() override: BN stays in eval whatever the mode
        def train(self, mode=True):
            super().train(mode)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            return self

    for make in (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())),
                 lambda: Freezing(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))):
        for mode in (True, False):
            a, b = make(), make()
            for m in (a, b):
                m[0].train(not mode)  # mixed flags before
            a.train(mode)
            assert set_training(b, mode) is b
            assert [m.training for m in a.modules()] == [m.training for m in b.modules()]


class _IdentityNet(nn.Module):
    """conv -> Identity (as timm's ``aa``, ``drop_path``, ``se`` placeholders) -> bn -> Identity -> conv."""

    def __init__(self, last: nn.Module | None = None) -> None:
        super().__init__()
        self.c1, self.n1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)
        self.aa, self.drop = nn.Identity(), last if last is not None else nn.Identity(16, unused=True)

    def forward(self, x):
        return self.c2(self.drop(torch.relu(self.n1(self.aa(self.c1(x))))))


class _NotQuiteIdentity(nn.Identity):
    def forward(self, x):
        return x * 2


def _module_calls(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def test_identity_calls_are_left_out_of_the_graph_and_kept_in_the_class_copy():
    m = randomize(_IdentityNet().eval())
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")
    assert _module_calls(res.original) == ["c1", "n1", "c2"]  # no node for aa / drop
    assert type(res.module.aa) is nn.Identity and type(res.module.drop) is nn.Identity  # the user's class, whole
    assert res.module.c1.out_channels == 8
    torch.testing.assert_close(res.module(x), res.graph_module(x))
    torch.testing.assert_close(m(x), ref)  # the user's model is untouched
    assert any("traces to the same program" in n for n in res.report.notes)


def test_an_identity_listed_as_a_leaf_or_with_its_own_forward_stays_in_the_program():
    x = torch.randn(2, 3, 8, 8)
    listed = fxprune.compile(randomize(_IdentityNet().eval()), x, ratio=0.5, leaf_modules=[nn.Identity])
    assert {"aa", "drop"} <= set(_module_calls(listed.original))
    named = fxprune.compile(randomize(_IdentityNet().eval()), x, ratio=0.5, leaf_modules=["aa"])
    assert "aa" in _module_calls(named.original) and "drop" not in _module_calls(named.original)
    own = randomize(_IdentityNet(_NotQuiteIdentity()).eval())
    res = fxprune.compile(own, x, ratio=0.5, verify="equivalence")
    torch.testing.assert_close(res.module(x), res.graph_module(x))
    assert any(n.op == "call_function" and n.target is operator.mul for n in res.original.graph.nodes) or \
        "drop" in _module_calls(res.original)  # its own forward runs (traced through or kept), never dropped


def test_keep_masks_match_the_removed_units_axis_by_axis():
    res = fxprune.compile(_net(3), _X, ratio=0.5, result="graph")
    a, sel = res.analysis, res.selection
    keep_of = a.keep_fn(sel)
    gone = a.removed_labels(sel)[a.labels]  # per element: its unit is removed
    assert gone.any()
    changed = set()
    for key, ax in a.table.axes.items():
        seg = gone[ax.base : ax.base + ax.size]
        if seg.any():
            np.testing.assert_array_equal(keep_of(key), ~seg)
            if key[0] == "p":
                changed.add(key[1])
        else:
            assert keep_of(key) is None, key
    assert keep_of(("a", "no such node", None, 0)) is None
    assert changed and a.changed_tensors(sel) == changed
    assert {n for n, p in res.graph_module.named_parameters()} >= {"c1.weight", "fc.weight"}
    assert res.graph_module.c1.weight.shape[0] == int((~gone[a.table.axes[("p", "c1.weight", 0)].ids()]).sum())


def test_the_layer_table_is_the_compile_time_one_named_on_first_read():
    import copy
    import pickle

    from fxprune.result import LayerRows, layer_kinds

    res = fxprune.compile(_net(4), _X, ratio=0.5)
    rows = res.report.layers
    assert isinstance(rows, LayerRows) and rows._make is not None  # not made yet
    shapes_after = {n: tuple(m.weight.shape) for n, m in res.module.named_modules() if hasattr(m, "weight")}
    with torch.no_grad():  # the user changes the result afterwards: the report still describes the compile
        res.module.fc.weight = nn.Parameter(torch.zeros(1, 1))
    kinds = layer_kinds(res.original)  # every node's kind, without the "only these layers" shortcut
    table = {r.name: r for r in rows}
    assert set(table) == {"c1", "b1", "c2", "b2", "fc"}
    for name, r in table.items():
        assert r.kind == kinds[name]
        assert r.after == shapes_after[name]
        assert r.before == tuple(res.original.get_submodule(name).weight.shape)
    assert table["c1"].kind == "Conv2d" and table["b1"].kind == "BatchNorm2d" and table["fc"].kind == "Linear"
    assert table["c1"].after[0] < table["c1"].before[0]
    assert pickle.loads(pickle.dumps(res.report)).layers == tuple(rows)
    assert type(copy.deepcopy(res.report).layers) is tuple and copy.deepcopy(res.report) == res.report
    assert "c1" in str(res.report)


class _PadBlock(nn.Module):
    """timm RexNet's block: the shortcut is added to the first ``self.in_channels`` channels (a plain int the
    forward reads, so the traced graph holds it as a literal)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.conv = nn.Conv2d(cin, cout, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        shortcut = x
        x = self.bn(self.conv(x))
        return torch.cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]], dim=1)


class _PadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = _PadBlock(8, 12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.b1(torch.relu(self.stem(x)))))


def test_an_int_attribute_read_as_a_literal_follows_the_pruned_width_in_the_class_copy():
    from fxprune.literals import literal_changes

    m = randomize(_PadNet().eval())
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")
    assert type(res.module) is _PadNet, res.report.notes  # the user's class is kept
    kept = res.graph_module.stem.out_channels
    assert kept < 8 and res.module.b1.in_channels == kept and m.b1.in_channels == 8  # the user's is untouched
    assert literal_changes(res.original, res.graph_module)["b1"][8] == {kept}
    assert any(f"b1.in_channels: 8 -> {kept}" in n for n in res.report.notes)
    for xb in (x, torch.randn(3, 3, 5, 7)):
        torch.testing.assert_close(res.module(xb), res.graph_module(xb))


def test_a_loaded_class_copy_gets_its_literal_sizes_too(tmp_path):
    m = randomize(_PadNet().eval())
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(m, x, ratio=0.5)
    fxprune.save(res, tmp_path / "m.pt")
    loaded = fxprune.load(tmp_path / "m.pt", randomize(_PadNet().eval()))
    assert type(loaded) is _PadNet and loaded.b1.in_channels == res.module.b1.in_channels < 8
    torch.testing.assert_close(loaded(x), res.module(x))


def test_an_ambiguous_literal_leaves_the_attribute_alone():
    from fxprune.literals import update_literal_attributes

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n = 4

    traced, pruned = fx.Graph(), fx.Graph()
    for g, stops in ((traced, (4, 4)), (pruned, (2, 3))):  # the value 4 became 2 in one place and 3 in another
        x = g.placeholder("x")
        a = g.call_function(operator.getitem, (x, (slice(None), slice(0, stops[0]))))
        b = g.call_function(operator.getitem, (x, (slice(None), slice(0, stops[1]))))
        g.output((a, b))
    old, new = Two(), Two()
    assert update_literal_attributes(new, old, fx.GraphModule(old, traced), fx.GraphModule(old, pruned)) == []
    assert new.n == 4


def test_timm_rexnet_keeps_its_class():
    timm = pytest.importorskip("timm")
    m = timm.create_model("rexnet_100").eval()
    x = torch.randn(2, 3, 64, 64)
    res = fxprune.compile(m, x, ratio=0.5)
    assert type(res.module).__name__ == "RexNet", res.report.notes
    block = res.module.features[2]
    assert block.in_channels == res.module.features[1].conv_pwl.conv.out_channels < m.features[2].in_channels
    torch.testing.assert_close(res.module(x), res.graph_module(x))


class _ConstNet(nn.Module):
    """Its forward makes a tensor from no input (torch.fx stores it on the traced copy as ``_tensor_constant0``,
    as timm's Swin and torchvision's MaxViT do with their attention masks and position indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        pos = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6)
        return self.c2(torch.relu(self.c1(x)) + pos)


def test_a_class_whose_forward_makes_a_constant_tensor_is_kept_by_its_program():
    m = randomize(_ConstNet().eval())
    x = torch.randn(2, 3, 6, 6)
    res = fxprune.compile(m, x, ratio=0.5, verify="equivalence")
    assert any(n.op == "get_attr" and str(n.target).startswith("_tensor_constant") for n in res.original.graph.nodes)
    assert type(res.module) is _ConstNet, res.report.notes
    assert any("traces to the same program" in n for n in res.report.notes)
    assert not hasattr(res.module, "_tensor_constant0") and not hasattr(m, "_tensor_constant0")
    assert res.module.c1.out_channels < 8
    torch.testing.assert_close(res.module(x), res.graph_module(x))


def test_the_literal_retry_reports_the_first_failure_and_skips_an_unchanged_copy():
    from types import SimpleNamespace

    from fxprune.literals import with_literal_retry

    checked = []

    def check(copy):
        checked.append(copy.attributes)
        return ("" if copy.attributes == ["b.n: 8 -> 4"] else "differs", "detail")

    def build(attrs):
        return lambda literals: SimpleNamespace(attributes=attrs + (["b.n: 8 -> 4"] if literals else []))

    copy, out = with_literal_retry(build([]), check, lambda exc: (str(exc), ""))
    assert out == ("", "detail") and copy.attributes == ["b.n: 8 -> 4"] and len(checked) == 2
    checked.clear()
    copy, out = with_literal_retry(lambda literals: SimpleNamespace(attributes=[]), check, lambda exc: ("x", ""))
    assert out == ("differs", "detail") and len(checked) == 1  # the second copy is the same: not checked again

    def boom(literals):
        raise ValueError("no copy")

    assert with_literal_retry(boom, check, lambda exc: (f"failed: {exc}", "")) == (None, ("failed: no copy", ""))
