"""Tests of fxprune.testing.strategies: the random-network generators and seeded norm randomisation."""

from __future__ import annotations

import doctest
import operator

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from torch import nn

from fxprune.testing import strategies as S
from fxprune.testing.strategies import (
    ALL_FAMILIES,
    AttentionBlock,
    BlockSpec,
    ConcatBlock,
    ConvBNAct,
    ConvToTokens,
    DepthwiseSeparable,
    FlattenHead,
    GAPHead,
    GroupedConv,
    MultiInputNet,
    NetworkSpec,
    Pool,
    Residual,
    SEGate,
    SelfAttention,
    SharedConv,
    SplitBlock,
    TokenHead,
    build_network,
    init_params_,
    keep_fractions,
    network_specs,
    networks,
    randomize_,
    randomize_bn,
    selection_seeds,
)



@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The drawn networks are tiny; intra-op threading only adds synchronisation cost (large under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Which module class proves that a body family really occurs in a drawn network.
FAMILY_CLASS = {
    "conv": ConvBNAct,
    "residual": Residual,
    "concat": ConcatBlock,
    "split": SplitBlock,
    "depthwise": DepthwiseSeparable,
    "grouped": GroupedConv,
    "se": SEGate,
    "pool": Pool,
    "shared": SharedConv,
    "flatten_linear": FlattenHead,
    "attention": AttentionBlock,
    "multi_io": MultiInputNet,
}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _run(model, inputs):
    with torch.no_grad():
        return _as_tuple(model(*inputs))


def _check_network(model: nn.Module, inputs: tuple[torch.Tensor, ...], spec: NetworkSpec) -> None:
    assert not model.training
    assert all(p.dtype == spec.dtype for p in model.parameters())
    assert all(x.dtype == spec.dtype for x in inputs)
    assert tuple(tuple(x.shape) for x in inputs) == spec.input_shapes
    outs = _run(model, inputs)
    # shapes: logits first, features second for multi-io
    assert outs[0].shape == (spec.input_shapes[0][0], spec.num_classes)
    if spec.kind == "multi_io":
        assert len(outs) == 2 and outs[1].dim() == 4
    else:
        assert len(outs) == 1
    for o in outs:
        assert torch.isfinite(o).all()
    # the logits come from a Linear with a random bias; a feature map after a final ReLU may be all zero
    assert outs[0].abs().max() > 0
    # traceable, and the traced module computes the same function
    gm = fx.symbolic_trace(model)
    gm.graph.lint()
    traced = _run(gm, inputs)
    assert len(traced) == len(outs)
    for a, b in zip(outs, traced):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# networks(): every family generates, traces, runs, is finite and deterministic
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
@PROPERTY
@given(data=st.data())
def test_each_family_generates_traces_runs(family, data):
    spec = data.draw(network_specs(max_blocks=3, families={family}), label="spec")
    assert spec.families == {family}
    model, inputs = build_network(spec)
    assert any(isinstance(m, FAMILY_CLASS[family]) for m in model.modules())
    _check_network(model, inputs, spec)

    # deterministic: the same drawn data builds identical weights, inputs and outputs
    model2, inputs2 = build_network(spec)
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    for a, b in zip(inputs, inputs2):
        assert torch.equal(a, b)
    for a, b in zip(_run(model, inputs), _run(model2, inputs2)):
        assert torch.equal(a, b)


@PROPERTY
@given(net=networks())
def test_default_networks_trace_and_run(net):
    model, inputs = net
    spec = model.fxprune_spec
    assert spec.families and spec.families <= ALL_FAMILIES
    _check_network(model, inputs, spec)


@PROPERTY
@given(net=networks(max_blocks=6, families=ALL_FAMILIES - {"attention", "multi_io"}, dtype=torch.float32))
def test_float32_deep_image_networks(net):
    model, inputs = net
    assert model.fxprune_spec.kind == "image"
    _check_network(model, inputs, model.fxprune_spec)


def test_same_hypothesis_data_gives_same_networks():
    """Replaying the same hypothesis choices end to end (derandomized) draws equal networks and outputs."""

    def collect():
        seen = []

        @seed(20240611)
        @settings(max_examples=8, deadline=None, derandomize=True, database=None, phases=["generate"])
        @given(net=networks(max_blocks=3))
        def run(net):
            model, inputs = net
            seen.append((repr(model.fxprune_spec), _run(model, inputs)))

        run()
        return seen

    first, second = collect(), collect()
    assert len(first) == len(second) > 0
    for (spec_a, out_a), (spec_b, out_b) in zip(first, second):
        assert spec_a == spec_b
        for a, b in zip(out_a, out_b):
            assert torch.equal(a, b)


@settings(max_examples=10, deadline=None)
@given(spec=network_specs(max_blocks=2))
def test_build_independent_of_and_preserving_global_rng(spec):
    torch.manual_seed(0)
    model_a, inputs_a = build_network(spec)
    state = torch.random.get_rng_state()
    torch.manual_seed(12345)
    model_b, inputs_b = build_network(spec)
    torch.manual_seed(0)
    build_network(spec)
    assert torch.equal(torch.random.get_rng_state(), state)  # building does not advance the global RNG
    for (ka, va), (kb, vb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    for a, b in zip(inputs_a, inputs_b):
        assert torch.equal(a, b)


def test_different_seeds_give_different_weights():
    spec = NetworkSpec(
        kind="image",
        input_shapes=((2, 3, 8, 8),),
        layers=(BlockSpec.of("ConvBNAct", in_channels=3, out_channels=4),),
        head=BlockSpec.of("GAPHead", in_channels=4, num_classes=3),
        num_classes=3,
        seed=1,
    )
    m1, x1 = build_network(spec)
    m2, x2 = build_network(NetworkSpec(**{**spec.__dict__, "seed": 2}))
    assert not torch.equal(m1[0].conv.weight, m2[0].conv.weight)
    assert not torch.equal(x1[0], x2[0])
    assert "ConvBNAct(in_channels=3, out_channels=4)" in repr(spec)


@settings(max_examples=30, deadline=None)
@given(spec=network_specs(max_blocks=4))
def test_spec_respects_limits(spec):
    assert spec.dtype == torch.float64
    for shape in spec.input_shapes:
        assert shape[0] == 2
        if len(shape) == 4:
            assert 8 <= shape[2] <= 16 and 8 <= shape[3] <= 16
        else:
            assert 4 <= shape[1] <= 8 and 2 <= shape[2] <= 12
    body = [b for b in spec.layers if b.name not in ("Linear", "ConvToTokens")]
    assert len(body) <= 4 + 1  # body blocks + the conv stem


@pytest.mark.parametrize(
    "kwargs",
    [dict(families={"nope"}), dict(families=set()), dict(max_blocks=0), dict(batch_size=0)],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        networks(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# randomize_
# ---------------------------------------------------------------------------------------------------------------


def _distinct(t: torch.Tensor) -> bool:
    return len(set(t.flatten().tolist())) == t.numel()


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.BatchNorm2d(16),
        lambda: nn.BatchNorm1d(16),
        lambda: nn.GroupNorm(4, 16),
        lambda: nn.LayerNorm(16),
        lambda: nn.InstanceNorm2d(16, affine=True, track_running_stats=True),
    ],
)
def test_randomize_gives_distinct_per_channel_values(make):
    m = make().double()
    assert randomize_(m, seed=3) is m
    assert _distinct(m.weight) and _distinct(m.bias)
    assert torch.all((m.weight.abs() >= 0.5) & (m.weight.abs() <= 1.5))
    if getattr(m, "running_mean", None) is not None:
        assert _distinct(m.running_mean) and _distinct(m.running_var)
        assert torch.all((m.running_var >= 0.5) & (m.running_var <= 2.0))
        assert not torch.equal(m.running_mean, torch.zeros(16, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(seed_=selection_seeds(), channels=st.integers(2, 64))
def test_randomize_bn_statistics_distinct(seed_, channels):
    bn = nn.BatchNorm2d(channels)
    randomize_bn(bn, seed_)
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert _distinct(t)
    # the per-channel affine map of eval BN differs between channels, so a wrong index is visible
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    assert _distinct(torch.stack([scale, shift], 1).sum(1).detach())


def test_randomize_is_seeded_and_signs_about_20_percent():
    a = randomize_(nn.BatchNorm1d(20000), 7)
    b = randomize_(nn.BatchNorm1d(20000), 7)
    c = randomize_(nn.BatchNorm1d(20000), 8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.running_var, b.running_var)
    assert not torch.equal(a.weight, c.weight)
    neg = (a.weight < 0).double().mean().item()
    assert 0.17 < neg < 0.23
    assert abs(a.bias.std().item() - 0.5) < 0.03 and abs(a.running_mean.std().item() - 0.5) < 0.03
    assert randomize_bn is randomize_


def test_randomize_handles_nested_and_nonaffine():
    m = nn.Sequential(ConvBNAct(3, 4), nn.BatchNorm2d(4, affine=False), nn.InstanceNorm2d(4), nn.LayerNorm(4))
    randomize_(m, 0)
    assert _distinct(m[0].norm.weight)
    assert _distinct(m[1].running_mean) and m[1].weight is None
    # different norms get different values (one generator stream over all modules)
    assert not torch.equal(m[0].norm.running_mean, m[1].running_mean)


def test_init_params_is_seeded_and_covers_shared_and_mha():
    torch.manual_seed(1)
    m1 = nn.Sequential(SharedConv(4), ConvToTokens(), AttentionBlock(4, 2))
    torch.manual_seed(2)
    m2 = nn.Sequential(SharedConv(4), ConvToTokens(), AttentionBlock(4, 2))
    init_params_(m1, 5)
    init_params_(m2, 5)
    for (k1, p1), (k2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert k1 == k2 and torch.equal(p1, p2)
    mha = nn.MultiheadAttention(6, 2, batch_first=True)
    before = mha.in_proj_weight.detach().clone()
    init_params_(mha, 1)
    assert not torch.equal(before, mha.in_proj_weight)
    assert torch.all(mha.in_proj_bias.abs() <= 0.5)


# ---------------------------------------------------------------------------------------------------------------
# blocks: shapes, traceability, literal constants in the graph
# ---------------------------------------------------------------------------------------------------------------


def _trace_check(block: nn.Module, *inputs):
    block = block.double().eval()
    randomize_(init_params_(block, 0), 1)
    gm = fx.symbolic_trace(block)
    with torch.no_grad():
        out, out_gm = block(*inputs), gm(*inputs)
    for a, b in zip(_as_tuple(out), _as_tuple(out_gm)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return gm, out


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize(
    "block, in_shape, out_shape",
    [
        (ConvBNAct(3, 5, kernel_size=3, stride=2, dilation=2, bias=True), (2, 3, 9, 9), (2, 5, 5, 5)),
        (ConvBNAct(4, 6, kernel_size=1, norm="gn", act="silu"), (2, 4, 8, 8), (2, 6, 8, 8)),
        (ConvBNAct(4, 6, norm="in", act="gelu"), (2, 4, 8, 8), (2, 6, 8, 8)),
        (Residual(4, 4), (2, 4, 8, 8), (2, 4, 8, 8)),
        (Residual(4, 6, stride=2, mid_channels=3), (2, 4, 8, 8), (2, 6, 4, 4)),
        (ConcatBlock(4, (3, 5), 6, include_input=True), (2, 4, 8, 8), (2, 6, 8, 8)),
        (SplitBlock(8, (2, 4), split_sizes=(3, 5)), (2, 8, 8, 8), (2, 6, 8, 8)),
        (SplitBlock(6, (4, 4, 4), chunks=3, merge="add"), (2, 6, 8, 8), (2, 4, 8, 8)),
        (DepthwiseSeparable(4, 7, stride=2, depth_multiplier=2), (2, 4, 8, 8), (2, 7, 4, 4)),
        (GroupedConv(6, 9, groups=3), (2, 6, 8, 8), (2, 9, 8, 8)),
        (SEGate(6, 2, style="conv"), (2, 6, 8, 8), (2, 6, 8, 8)),
        (SEGate(6, 3, style="linear"), (2, 6, 8, 8), (2, 6, 8, 8)),
        (Pool("max", 3, 2, 1), (2, 4, 9, 9), (2, 4, 5, 5)),
        (Pool("avg", 2, functional=True), (2, 4, 9, 9), (2, 4, 4, 4)),
        (Pool("adaptive_avg", output_size=(3, 5), functional=True), (2, 4, 9, 9), (2, 4, 3, 5)),
        (SharedConv(5, repeats=3), (2, 5, 8, 8), (2, 5, 8, 8)),
        (GAPHead(5, 3), (2, 5, 8, 8), (2, 3)),
        (FlattenHead(5, 4, 3, 7, 2), (2, 5, 4, 3), (2, 2)),
        (ConvToTokens(), (2, 5, 4, 3), (2, 12, 5)),
        (SelfAttention(6, 2, 3), (2, 5, 6), (2, 5, 6)),
        (SelfAttention(6, 3, 4, seq_len=5), (2, 5, 6), (2, 5, 6)),
        (AttentionBlock(6, 2), (2, 5, 6), (2, 5, 6)),
        (AttentionBlock(6, 3, head_dim=2, attention="sdpa", mlp_hidden=0, norm_first=True), (2, 5, 6), (2, 5, 6)),
        (TokenHead(6, 4), (2, 5, 6), (2, 4)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_block_shapes_and_tracing(block, in_shape, out_shape):
    _, out = _trace_check(block, _x(*in_shape))
    assert tuple(out.shape) == out_shape
    if isinstance(block, Pool):
        assert tuple(out.shape[2:]) == block.out_size(*in_shape[2:])


def test_multi_input_net_returns_logits_and_features():
    net = MultiInputNet(ConvBNAct(3, 4), ConvBNAct(1, 5), nn.Sequential(Residual(9, 6)), GAPHead(6, 3))
    gm, (logits, feats) = _trace_check(net, _x(2, 3, 8, 8), _x(2, 1, 8, 8))
    assert logits.shape == (2, 3) and feats.shape == (2, 6, 8, 8)
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 2


def test_literal_constants_appear_in_graph():
    gm = fx.symbolic_trace(SplitBlock(8, (2, 4), split_sizes=(3, 5)))
    splits = [n for n in gm.graph.nodes if n.target is torch.split]
    assert len(splits) == 1 and list(splits[0].args[1]) == [3, 5] and splits[0].kwargs == {"dim": 1}

    gm = fx.symbolic_trace(SplitBlock(6, (2, 2), chunks=2))
    assert any(n.op == "call_method" and n.target == "chunk" and n.args[1] == 2 for n in gm.graph.nodes)

    gm = fx.symbolic_trace(FlattenHead(5, 4, 3, 7, 2))
    views = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views and views[0].args[1:] == (-1, 60)

    gm = fx.symbolic_trace(SEGate(6, 3, style="linear"))
    assert any(n.target == "view" and n.args[1:] == (-1, 6, 1, 1) for n in gm.graph.nodes)

    gm = fx.symbolic_trace(SelfAttention(6, 3, 4, seq_len=5))
    views = [n for n in gm.graph.nodes if n.target == "view"]
    assert len(views) == 3 and all(v.args[1:] == (-1, 5, 3, 4) for v in views)
    assert any(n.target == "reshape" and n.args[1:] == (-1, 5, 12) for n in gm.graph.nodes)
    assert any(n.target is torch.nn.functional.scaled_dot_product_attention for n in gm.graph.nodes)

    gm = fx.symbolic_trace(SelfAttention(6, 3, 4))  # dynamic B, L from x.size(0) / x.shape[1]
    views = [n for n in gm.graph.nodes if n.target == "view"]
    assert all(v.args[3:] == (3, 4) and isinstance(v.args[1], fx.Node) for v in views)
    assert any(n.op == "call_method" and n.target == "size" for n in gm.graph.nodes)
    assert any(n.target is operator.getitem and n.args[1] == 1 for n in gm.graph.nodes)

    gm = fx.symbolic_trace(SharedConv(4, repeats=2))
    assert len([n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv"]) == 2

    gm = fx.symbolic_trace(AttentionBlock(6, 2))
    assert any(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvBNAct(4, 6, groups=4),
        lambda: SplitBlock(8, (2, 2), split_sizes=(3, 4)),
        lambda: SplitBlock(7, (2, 2), chunks=2),
        lambda: SplitBlock(8, (2, 3), chunks=2, merge="add"),
        lambda: Residual(4, 6, projection=False),
        lambda: AttentionBlock(6, 4),
        lambda: AttentionBlock(6, 2, attention="sdpa"),
        lambda: Pool("adaptive_avg"),
    ],
)
def test_block_argument_validation(make):
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------------------------------------------------------
# ratio / seed strategies and the documented examples
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(r=keep_fractions(), s=selection_seeds(), r2=keep_fractions(0.25, 0.75))
def test_keep_fractions_and_seeds(r, s, r2):
    assert isinstance(r, float) and 0.0 <= r < 1.0
    assert 0.25 <= r2 < 0.75
    assert isinstance(s, int) and 0 <= s < 2**32
    torch.Generator().manual_seed(s)


def test_doctests():
    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
