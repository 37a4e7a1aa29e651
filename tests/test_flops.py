"""Tests for fxprune.flops: MACs and parameter counting over a shape-propagated fx graph.

Expected numbers are written out as hand arithmetic from the conventions in fxprune/flops.py, and where
possible double-checked against an independent oracle: torch.utils.flop_counter.FlopCounterMode, which
counts 2 FLOPs per MAC for the matmul/conv/attention kernels torch actually runs (it does not count
norms, so norm elements are added from forward hooks where needed).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fxprune.flops import Cost, MissingShapeMetaError, count_cost, node_macs


def traced(model: nn.Module, *inputs: torch.Tensor, leaves: tuple[type, ...] = ()) -> torch.fx.GraphModule:
    model.eval()
    if leaves:

        class Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

        gm = torch.fx.GraphModule(model, Tracer().trace(model))
    else:
        gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return gm


def oracle_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of the kernels torch runs (conv/mm/bmm/sdpa), via FlopCounterMode (FLOPs / 2).

    Runs in training mode with grad enabled so that no fused inference fast path is taken, and with
    scaled_dot_product_attention forced to its math backend (FlopCounterMode does not see into the fused
    CPU flash-attention kernel); every test model here has dropout 0 / no dropout.
    """
    was_training = model.training
    model.train()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model(*inputs)
    finally:
        model.train(was_training)
    flops = fc.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Seq(nn.Module):
    """A single module called on one input (keeps graphs trivially small)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


def cost_of(module: nn.Module, *inputs: torch.Tensor) -> Cost:
    return count_cost(traced(module, *inputs))


# ----------------------------------------------------------------------------------------- convolution


def test_conv2d_basic():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    c = cost_of(Seq(conv), torch.randn(2, 3, 8, 8))
    assert c.macs == 2 * 8 * 8 * 16 * 3 * 3 * 3
    assert c.params == 16 * 3 * 3 * 3 + 16
    assert c.per_node == {"m": 2 * 8 * 8 * 16 * 3 * 3 * 3}
    assert c.per_module == {"m": 2 * 8 * 8 * 16 * 3 * 3 * 3}
    assert c.uncounted == ()


def test_conv2d_stride_dilation_padding():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=3, dilation=2, bias=False)
    x = torch.randn(2, 8, 17, 13)
    # H_out = floor((H + 2p - d(k-1) - 1) / s) + 1
    h_out = (17 + 2 * 3 - 2 * (3 - 1) - 1) // 2 + 1  # 10
    w_out = (13 + 2 * 3 - 2 * (3 - 1) - 1) // 2 + 1  # 8
    assert (h_out, w_out) == (10, 8)
    c = cost_of(Seq(conv), x)
    assert c.macs == 2 * 16 * 10 * 8 * 8 * 3 * 3
    assert c.macs == oracle_macs(conv, x)
    assert c.params == 16 * 8 * 9


def test_conv2d_asymmetric_kernel_and_same_padding():
    conv = nn.Conv2d(4, 6, (3, 5), padding="same")
    x = torch.randn(1, 4, 7, 9)
    c = cost_of(Seq(conv), x)
    assert c.macs == 1 * 6 * 7 * 9 * 4 * 3 * 5
    assert c.macs == oracle_macs(conv, x)


def test_grouped_and_depthwise_conv():
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    x = torch.randn(2, 8, 6, 6)
    c = cost_of(Seq(grouped), x)
    assert c.macs == 2 * 16 * 6 * 6 * (8 // 4) * 3 * 3
    assert c.macs == oracle_macs(grouped, x)
    assert c.params == 16 * 2 * 9 + 16

    depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
    c = cost_of(Seq(depthwise), x)
    assert c.macs == 2 * 8 * 3 * 3 * 1 * 3 * 3
    assert c.macs == oracle_macs(depthwise, x)

    multiplier = nn.Conv2d(8, 24, 3, groups=8)  # depthwise with channel multiplier 3
    c = cost_of(Seq(multiplier), x)
    assert c.macs == 2 * 24 * 4 * 4 * 1 * 3 * 3


def test_conv1d_and_conv3d():
    conv1 = nn.Conv1d(4, 6, 5)
    x1 = torch.randn(2, 4, 20)
    c = cost_of(Seq(conv1), x1)
    assert c.macs == 2 * 6 * 16 * 4 * 5
    assert c.macs == oracle_macs(conv1, x1)

    conv3 = nn.Conv3d(2, 4, 3, stride=(1, 2, 1))
    x3 = torch.randn(2, 2, 6, 7, 6)
    c = cost_of(Seq(conv3), x3)
    assert c.macs == 2 * 4 * (4 * 3 * 4) * 2 * 27
    assert c.macs == oracle_macs(conv3, x3)
    assert c.params == 4 * 2 * 27 + 4


def test_conv_transpose():
    convt = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    x = torch.randn(2, 4, 5, 5)
    c = cost_of(Seq(convt), x)
    # in_numel * (out_channels // groups) * k*k
    assert c.macs == (2 * 4 * 5 * 5) * (6 // 2) * 3 * 3
    assert c.params == 4 * 3 * 9 + 6

    convt1 = nn.ConvTranspose1d(3, 5, 4, stride=3)
    x1 = torch.randn(2, 3, 7)
    assert cost_of(Seq(convt1), x1).macs == (2 * 3 * 7) * 5 * 4

    convt3 = nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False)
    x3 = torch.randn(1, 2, 3, 3, 3)
    assert cost_of(Seq(convt3), x3).macs == (1 * 2 * 27) * 2 * 8


def test_functional_conv_with_get_attr_weight():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 2, 3, 3))  # 4 in channels, groups=2
            self.register_buffer("scale", torch.ones(1))

        def forward(self, x):
            return F.conv2d(x, self.weight, None, 2, 1, 1, 2) * self.scale

    m = M()
    x = torch.randn(2, 4, 9, 9)
    gm = traced(m, x)
    assert any(n.op == "get_attr" and n.target == "weight" for n in gm.graph.nodes)
    c = count_cost(gm)
    out_hw = (9 + 2 - 3) // 2 + 1  # 5
    assert c.macs == 2 * 6 * out_hw * out_hw * 2 * 3 * 3
    assert c.macs == oracle_macs(m, x)
    assert c.params == 6 * 2 * 9  # the buffer is excluded
    assert c.per_module == {"": c.macs}  # a root-level function belongs to the root

    # without tensor_meta on the get_attr node the weight is fetched from the module
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            del n.meta["tensor_meta"]
    assert count_cost(gm).macs == c.macs


def test_functional_conv_transpose_and_linear_and_bilinear():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wt = nn.Parameter(torch.randn(4, 3, 2, 2))  # (in, out/groups, kh, kw)
            self.wl = nn.Parameter(torch.randn(7, 3 * 10 * 10))
            self.wb = nn.Parameter(torch.randn(5, 7, 7))

        def forward(self, x):
            y = F.conv_transpose2d(x, self.wt, stride=2)  # (2, 3, 10, 10)
            z = F.linear(y.flatten(1), self.wl)  # (2, 7)
            return F.bilinear(z, z, self.wb)  # (2, 5)

    m = M()
    x = torch.randn(2, 4, 5, 5)
    c = cost_of(m, x)
    assert c.per_node["conv_transpose2d"] == (2 * 4 * 5 * 5) * 3 * 2 * 2
    assert c.per_node["linear"] == 2 * 7 * 300
    assert c.per_node["bilinear"] == 2 * 5 * 7 * 7
    assert c.macs == (2 * 4 * 5 * 5) * 3 * 4 + 2 * 7 * 300 + 2 * 5 * 7 * 7
    assert c.params == n_params(m)


# ----------------------------------------------------------------------------------------------- linear


def test_linear_on_3d_input():
    lin = nn.Linear(7, 11)
    x = torch.randn(2, 5, 7)
    c = cost_of(Seq(lin), x)
    assert c.macs == 2 * 5 * 11 * 7
    assert c.macs == oracle_macs(lin, x)
    assert c.params == 7 * 11 + 11


def test_linear_subclass_and_bilinear_module():
    lin = nn.modules.linear.NonDynamicallyQuantizableLinear(6, 4)
    assert cost_of(Seq(lin), torch.randn(3, 6)).macs == 3 * 4 * 6

    class Bi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Bilinear(3, 5, 4)

        def forward(self, x, y):
            return self.b(x, y)

    c = cost_of(Bi(), torch.randn(6, 3), torch.randn(6, 5))
    assert c.macs == 6 * 4 * 3 * 5
    assert c.params == 4 * 3 * 5 + 4


# ------------------------------------------------------------------------------------------------ norms


def test_norm_modules():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(16)
            self.gn = nn.GroupNorm(4, 16)
            self.inorm = nn.InstanceNorm2d(16, affine=True)
            self.ln = nn.LayerNorm([4, 4])
            self.bn1 = nn.BatchNorm1d(16)

        def forward(self, x):
            x = self.ln(self.inorm(self.gn(self.bn(x))))
            return self.bn1(x.flatten(2))

    m = M()
    x = torch.randn(2, 16, 4, 4)
    c = cost_of(m, x)
    numel = 2 * 16 * 4 * 4
    assert c.per_node == {"bn": numel, "gn": numel, "inorm": numel, "ln": numel, "bn1": numel}
    assert c.macs == 5 * numel
    # running stats are buffers and excluded
    assert c.params == 2 * 16 + 2 * 16 + 2 * 16 + 2 * 16 + 2 * 16
    assert c.params == n_params(m)


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch has no nn.RMSNorm")
def test_rmsnorm_module():
    c = cost_of(Seq(nn.RMSNorm(8)), torch.randn(3, 5, 8))
    assert c.macs == 3 * 5 * 8
    assert c.params == 8


def test_functional_norms():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(6))
            self.register_buffer("rm", torch.zeros(6))
            self.register_buffer("rv", torch.ones(6))

        def forward(self, x):
            y = F.batch_norm(x, self.rm, self.rv, self.w)
            y = F.layer_norm(y, (5,))
            y = F.group_norm(y, 3)
            y = F.instance_norm(y)
            if hasattr(F, "rms_norm"):
                y = F.rms_norm(y, (5,))
            return y

    x = torch.randn(2, 6, 5)
    c = cost_of(M(), x)
    n_norms = 5 if hasattr(F, "rms_norm") else 4
    assert c.macs == n_norms * 2 * 6 * 5
    assert c.params == 6


# -------------------------------------------------------------------------------------------- attention


def mha_hand(N, L, S, E, kdim, vdim, extra_s=0):
    """Hand formula: q/k/v/out projections + QK^T + AV (per batch element)."""
    s_att = S + extra_s
    return N * (L * E * E + S * kdim * E + S * vdim * E + L * E * E + L * s_att * E + L * s_att * E)


class CrossAttn(nn.Module):
    def __init__(self, mha: nn.Module) -> None:
        super().__init__()
        self.attn = mha

    def forward(self, q, k, v):
        out, _ = self.attn(q, k, v)
        return out


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_cross_attention_kdim_vdim(batch_first):
    N, L, S, E, kdim, vdim = 3, 5, 7, 8, 6, 4
    mha = nn.MultiheadAttention(E, 2, kdim=kdim, vdim=vdim, batch_first=batch_first)

    def seq(n, length, d):
        return torch.randn(n, length, d) if batch_first else torch.randn(length, n, d)

    q, k, v = seq(N, L, E), seq(N, S, kdim), seq(N, S, vdim)
    model = CrossAttn(mha)
    c = cost_of(model, q, k, v)
    expected = mha_hand(N, L, S, E, kdim, vdim)
    assert expected == 3 * (5 * 64 + 7 * 48 + 7 * 32 + 5 * 64 + 2 * 5 * 7 * 8)
    assert c.macs == expected
    assert c.per_module == {"attn": expected}
    assert c.macs == oracle_macs(model, q, k, v)
    assert c.params == n_params(mha)  # out_proj's parameters included


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_self_attention_packed_projection(batch_first):
    N, L, E = 2, 6, 12
    mha = nn.MultiheadAttention(E, 3, batch_first=batch_first)

    class Self(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    model = Self()
    c = cost_of(model, x)
    assert c.macs == mha_hand(N, L, L, E, E, E)
    assert c.macs == N * (4 * L * E * E + 2 * L * L * E)
    assert c.macs == oracle_macs(model, x)
    assert c.params == 3 * E * E + 3 * E + E * E + E


def test_mha_unbatched_and_bias_kv_zero_attn():
    L, S, E = 4, 9, 8
    mha = nn.MultiheadAttention(E, 2, add_bias_kv=True, add_zero_attn=True)
    q, k = torch.randn(L, E), torch.randn(S, E)
    model = CrossAttn(mha)
    c = cost_of(model, q, k, k)
    assert c.macs == mha_hand(1, L, S, E, E, E, extra_s=2)
    assert c.macs == oracle_macs(model, q, k, k)
    assert c.params == n_params(mha)


def test_pruned_mha_leaf():
    from fxprune.modules import PrunedMultiheadAttention

    N, L, S = 2, 5, 6
    pm = PrunedMultiheadAttention(10, 7, 9, num_heads=3, head_dim=4, out_dim=11, batch_first=True)
    q, k, v = torch.randn(N, L, 10), torch.randn(N, S, 7), torch.randn(N, S, 9)
    model = CrossAttn(pm)
    c = count_cost(traced(model, q, k, v, leaves=(PrunedMultiheadAttention,)))
    inner = 3 * 4
    expected = N * (L * inner * 10 + S * inner * 7 + S * inner * 9 + L * 11 * inner + 2 * L * S * inner)
    assert c.macs == expected
    assert c.macs == oracle_macs(model, q, k, v)
    assert c.uncounted == ()
    assert c.params == n_params(pm)


def test_sdpa():
    class M(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=False)

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)
    c = cost_of(M(), q, k, v)
    assert c.macs == 2 * 4 * 5 * 7 * 8 + 2 * 4 * 5 * 7 * 6
    assert c.macs == oracle_macs(M(), q, k, v)
    assert c.params == 0

    v8 = torch.randn(2, 4, 7, 8)  # Ev == E (the shape the fused CPU kernels accept)
    c = cost_of(M(), q, k, v8)
    assert c.macs == 2 * (2 * 4 * 5 * 7 * 8)
    assert c.macs == oracle_macs(M(), q, k, v8)

    # broadcast batch dims: the output's batch is what is computed
    kb, vb = torch.randn(1, 4, 7, 8), torch.randn(1, 4, 7, 6)
    assert cost_of(M(), q, kb, vb).macs == 2 * 4 * 5 * 7 * 8 + 2 * 4 * 5 * 7 * 6


# --------------------------------------------------------------------------------------------- matmul


def test_matmul_family():
    class M(nn.Module):
        def forward(self, a, b, m1, m2, v):
            x = torch.matmul(a, b)  # (2, 3, 4, 6) @ (3, 6, 5) -> (2, 3, 4, 5), K=6
            y = a @ b  # operator.matmul, same
            z = torch.bmm(m1, m2)  # (3, 4, 6) @ (3, 6, 5), K=6
            w = m1.bmm(m2)  # method
            u = m1[0].mm(m2[0])  # (4, 6) @ (6, 5)
            t = torch.mm(m1[0], m2[0])
            s = m1[0].matmul(v)  # (4, 6) @ (6,) -> (4,)
            r = torch.matmul(v, v)  # dot via matmul -> scalar, K=6
            return x.sum() + y.sum() + z.sum() + w.sum() + u.sum() + t.sum() + s.sum() + r

    inputs = (torch.randn(2, 3, 4, 6), torch.randn(3, 6, 5), torch.randn(3, 4, 6), torch.randn(3, 6, 5), torch.randn(6))
    gm = traced(M(), *inputs)
    assert any(n.target is operator.matmul for n in gm.graph.nodes)
    c = count_cost(gm)
    mv_and_dot = 4 * 6 + 6
    expected = 2 * (2 * 3 * 4 * 5 * 6) + 2 * (3 * 4 * 5 * 6) + 2 * (4 * 5 * 6) + mv_and_dot
    assert c.macs == expected
    # FlopCounterMode has no formula for aten.mv / aten.dot, so it sees everything but those two
    assert c.macs - mv_and_dot == oracle_macs(M(), *inputs)


def test_addmm_baddbmm_addbmm():
    class M(nn.Module):
        def forward(self, bias, a, b, ba, bb):
            x = torch.addmm(bias, a, b)  # (4, 6) @ (6, 5)
            y = torch.baddbmm(bias, ba, bb)  # (3, 4, 6) @ (3, 6, 5)
            z = torch.addbmm(bias, ba, bb)  # sum over 3 products -> (4, 5)
            return x + y + z

    inputs = (torch.randn(4, 5), torch.randn(4, 6), torch.randn(6, 5), torch.randn(3, 4, 6), torch.randn(3, 6, 5))
    c = cost_of(M(), *inputs)
    assert c.per_node == {"addmm": 4 * 5 * 6, "baddbmm": 3 * 4 * 5 * 6, "addbmm": 3 * 4 * 5 * 6}
    # FlopCounterMode has no formula for aten.addbmm; it checks the other two
    assert c.per_node["addmm"] + c.per_node["baddbmm"] == oracle_macs(M(), *inputs)


def test_zero_cost_ops():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.MaxPool2d(2)
            self.act = nn.ReLU()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x, idx):
            y = self.act(self.pool(x)) * 2 + 1
            y = F.adaptive_avg_pool2d(y, 1).flatten(1).softmax(-1)
            e = self.emb(idx)
            return torch.einsum("bi,bj->bij", y, e), torch.cat([y, y], 1).view(-1)

    c = cost_of(M(), torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
    assert c.macs == 0
    assert c.per_node == {} and c.per_module == {}
    assert c.params == 10 * 4
    assert c.uncounted == ()


# ----------------------------------------------------------------------------------- recurrent / transformer


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_rnn_family_against_flop_counter():
    x = torch.randn(5, 2, 4)  # (L, N, C)
    lstm = nn.LSTM(4, 3, num_layers=2, bidirectional=True, proj_size=2)
    c = cost_of(Seq(lstm), x)
    per_step = 2 * (4 * (4 * 3 + 2 * 3) + 3 * 2) + 2 * (4 * (2 * 2 * 3 + 2 * 3) + 3 * 2)
    assert c.macs == 5 * 2 * per_step
    assert c.macs == oracle_macs(lstm, x)
    assert c.params == n_params(lstm)

    gru = nn.GRU(4, 3, batch_first=True)
    xb = torch.randn(2, 5, 4)
    c = cost_of(Seq(gru), xb)
    assert c.macs == 2 * 5 * 3 * (4 * 3 + 3 * 3)
    assert c.macs == oracle_macs(gru, xb)

    cell = nn.LSTMCell(4, 3)
    xc = torch.randn(6, 4)
    c = cost_of(Seq(cell), xc)
    assert c.macs == 6 * 4 * (4 * 3 + 3 * 3)
    assert c.macs == oracle_macs(cell, xc)


def norm_elements(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Independent oracle for the norm part: output elements of every norm module, via forward hooks."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        total += out.numel()

    norms = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, norms)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_layers(batch_first):
    d, ff, N, L, S = 8, 16, 2, 5, 3
    enc = nn.TransformerEncoderLayer(d, 2, ff, dropout=0.0, batch_first=batch_first)
    dec = nn.TransformerDecoderLayer(d, 2, ff, dropout=0.0, batch_first=batch_first)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = enc
            self.dec = dec

        def forward(self, src, tgt):
            return self.dec(tgt, self.enc(src))

    def seq(length):
        return torch.randn(N, length, d) if batch_first else torch.randn(length, N, d)

    src, tgt = seq(S), seq(L)
    model = M()
    c = cost_of(model, src, tgt)
    enc_macs = mha_hand(N, S, S, d, d, d) + N * S * (2 * d * ff) + 2 * N * S * d
    dec_macs = mha_hand(N, L, L, d, d, d) + mha_hand(N, L, S, d, d, d) + N * L * (2 * d * ff) + 3 * N * L * d
    assert c.per_module == {"enc": enc_macs, "dec": dec_macs}
    assert c.macs == oracle_macs(model, src, tgt) + norm_elements(model, src, tgt)
    assert c.params == n_params(model)


def test_nn_transformer():
    d, N, S, L = 8, 2, 4, 3
    tr = nn.Transformer(
        d, 2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=12, dropout=0.0, batch_first=True
    )

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tr = tr

        def forward(self, src, tgt):
            return self.tr(src, tgt)

    src, tgt = torch.randn(N, S, d), torch.randn(N, L, d)
    model = M()
    c = cost_of(model, src, tgt)
    assert c.macs == oracle_macs(model, src, tgt) + norm_elements(model, src, tgt)
    assert c.params == n_params(model)


def test_encoder_layer_with_pruned_attention():
    from fxprune.modules import PrunedMultiheadAttention

    d, ff, N, L = 8, 10, 2, 5
    layer = nn.TransformerEncoderLayer(d, 2, ff, dropout=0.0, batch_first=True)
    # heads pruned to 2 heads of width 3 (inner 6), FFN pruned to 6 hidden units
    layer.self_attn = PrunedMultiheadAttention(d, d, d, num_heads=2, head_dim=3, out_dim=d, batch_first=True)
    layer.linear1 = nn.Linear(d, 6)
    layer.linear2 = nn.Linear(6, d)
    x = torch.randn(N, L, d)
    c = cost_of(Seq(layer), x)
    inner = 6
    attn = N * (3 * L * inner * d + L * d * inner + 2 * L * L * inner)
    assert c.macs == attn + N * L * (d * 6 + 6 * d) + 2 * N * L * d
    assert c.macs == oracle_macs(layer, x) + norm_elements(layer, x)
    assert c.params == n_params(layer)


# ------------------------------------------------------------------------------ sharing, attribution, errors


def test_weight_shared_module_called_twice():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    m = M()
    x = torch.randn(1, 4, 6, 6)
    c = cost_of(m, x)
    one = 1 * 4 * 6 * 6 * 4 * 3 * 3
    assert c.macs == 2 * one
    assert c.macs == oracle_macs(m, x)
    assert c.per_node == {"conv": one, "conv_1": one}
    assert c.per_module == {"conv": 2 * one}
    assert c.params == 4 * 4 * 9 + 4


def test_parameter_tied_between_two_modules():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 5, bias=False)
            self.b.weight = self.a.weight  # tied

        def forward(self, x):
            return self.b(self.a(x))

    c = cost_of(M(), torch.randn(3, 5))
    assert c.macs == 2 * 3 * 5 * 5
    assert c.params == 25 + 5


def test_per_module_uses_nn_module_stack():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) @ x.transpose(-1, -2)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x):
            y = self.block(x)
            return y @ y

    c = cost_of(M(), torch.randn(2, 3, 4))
    lin, inner, outer = 2 * 3 * 4 * 4, 2 * 3 * 3 * 4, 2 * 3 * 3 * 3
    assert c.per_module == {"block.lin": lin, "block": inner, "": outer}
    assert sum(c.per_module.values()) == sum(c.per_node.values()) == c.macs == lin + inner + outer


def test_uncounted_custom_leaf():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.custom = Custom()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(self.custom(x))

    c = count_cost(traced(M(), torch.randn(3, 4), leaves=(Custom,)))
    assert c.macs == 3 * 2 * 4
    assert c.uncounted == ("custom",)
    assert c.params == 16 + 8 + 2


def test_missing_metadata_raises_value_error_naming_node():
    gm = torch.fx.symbolic_trace(Seq(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match=r"node 'm'.*ShapeProp"):
        count_cost(gm)
    with pytest.raises(MissingShapeMetaError):
        node_macs(gm, next(n for n in gm.graph.nodes if n.op == "call_module"))

    # zero-cost nodes need no metadata
    gm2 = torch.fx.symbolic_trace(Seq(nn.ReLU()))
    assert count_cost(gm2).macs == 0

    # a costed function whose argument lacks metadata names the node and the argument
    class M(nn.Module):
        def forward(self, a, b):
            return torch.bmm(a, b)

    gm3 = traced(M(), torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    next(n for n in gm3.graph.nodes if n.op == "placeholder").meta.pop("tensor_meta")
    with pytest.raises(ValueError, match=r"node 'bmm'.*'a'"):
        count_cost(gm3)


def test_node_macs_matches_per_node():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    gm = traced(m, torch.randn(2, 3, 6, 6))
    c = count_cost(gm)
    for n in gm.graph.nodes:
        assert node_macs(gm, n) == c.per_node.get(n.name, 0)
    by_target = {n.target: c.per_node[n.name] for n in gm.graph.nodes if n.name in c.per_node}
    assert by_target == {"0": 2 * 8 * 16 * 3 * 9, "1": 2 * 8 * 16, "4": 2 * 10 * 128}
    assert c.per_module == by_target


# ------------------------------------------------------------------------------------ torchvision models


def _conv_linear_macs(gm: torch.fx.GraphModule, c: Cost) -> int:
    total = 0
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear)):
            total += c.per_node.get(n.name, 0)
    return total


@pytest.mark.parametrize(
    ("builder", "weights_enum", "total_tolerance"),
    [("resnet18", "ResNet18_Weights", 0.01), ("mobilenet_v2", "MobileNet_V2_Weights", 0.025)],
)
def test_torchvision_models(builder, weights_enum, total_tolerance):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, builder)(weights=None).eval()
    published_gmacs = getattr(torchvision.models, weights_enum).IMAGENET1K_V1.meta["_ops"]
    x = torch.randn(1, 3, 224, 224)
    gm = traced(model, x)
    c = count_cost(gm)

    # parameters: every parameter of the model is used exactly once
    assert c.params == n_params(model)
    assert c.uncounted == ()

    # conv + linear part vs torchvision's published figure (which counts only conv/linear MACs)
    conv_linear = _conv_linear_macs(gm, c)
    assert abs(conv_linear / 1e9 - published_gmacs) / published_gmacs < 0.01

    # exact: conv/linear MACs as torch's FlopCounterMode sees them, plus BN output elements from hooks
    with torch.no_grad():
        assert conv_linear == oracle_macs(model, x)
    assert c.macs == conv_linear + norm_elements(model, x)

    # total (including the BN elements, ~0.1% on resnet18 and ~2% on mobilenet_v2)
    assert abs(c.macs / 1e9 - published_gmacs) / published_gmacs < total_tolerance


def test_a_composite_leafs_parameters_are_counted_once_even_through_a_cycle():
    from fxprune.flops import _params

    inner = nn.Linear(3, 2)
    outer = nn.Sequential(inner, nn.Sequential(inner))
    outer[1].add_module("back", outer)  # a module tree with a cycle: named_modules() terminates, so must this
    got = _params(outer)
    assert {id(p) for p in got} == {id(p) for p in outer.parameters()} and len(got) == 2
