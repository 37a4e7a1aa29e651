"""Transformers on both front ends: attention heads (whole, softmax scale kept), FFN widths, grouped-query
attention, and the lossy hidden-size option.

Oracles: the float64 masked reference (``verify="equivalence"``), exact identities (a head or FFN unit whose
contribution is zeroed is removed and the output does not change, to 1e-10), head counts and kept rows
compared with the original weights, and both front ends agreeing on the pruned sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.modules import PrunedMultiheadAttention
from fxprune.rules.heads import channel_digits

FRONTENDS = ("fx", "export")
A = torch.ops.aten


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm affine parameters (default init makes every channel alike), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def _static(model: nn.Module) -> nn.Module:
    model.fxprune_static_shapes = True  # faster torch.export capture; the rules see the same ops
    return model


def _params(res) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in res.graph_module.named_parameters()}


def _zero_out_importance():
    """Scores a unit by the slices that READ it (out_proj columns, FFN down-projection columns)."""
    return fxprune.MagnitudeImportance(p=2, roles=("in",))


# ---------------------------------------------------------------------------------------------------------
# models


class Encoder(nn.Module):
    def __init__(self, batch_first=True, norm_first=False, bias=True, activation="relu", layers=2, d=8, heads=4,
                 ffn=16):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first, bias=bias, activation=activation)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with kdim/vdim (separate q/k/v projection weights)."""

    def __init__(self, batch_first=True, bias=True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(5, 7)
        self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=7, batch_first=batch_first, bias=bias)
        self.o = nn.Linear(8, 3)

    def forward(self, x):
        return self.o(self.mha(self.q(x), self.k(x), self.v(x), need_weights=False)[0])


class MaskedMHA(nn.Module):
    """need_weights=True (bmm path on export), additive causal mask and key padding mask as buffers."""

    def __init__(self, batch_first=False, weights_used=False):
        super().__init__()
        self.batch_first, self.weights_used = batch_first, weights_used
        self.inp = nn.Linear(5, 8)
        self.mha = nn.MultiheadAttention(8, 4, batch_first=batch_first)
        self.o = nn.Linear(8, 3)
        self.register_buffer("causal", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))
        self.register_buffer("pad", torch.tensor([[False] * 5, [False] * 4 + [True]]))

    def forward(self, x):
        h = self.inp(x)
        y, w = self.mha(h, h, h, attn_mask=self.causal, key_padding_mask=self.pad)
        out = self.o(y)
        return out + w.sum() if self.weights_used else out


class HandAttention(nn.Module):
    """q/k/v Linear + view/transpose into heads + sdpa, or the explicit softmax form."""

    def __init__(self, explicit=False, e=12, heads=3):
        super().__init__()
        self.h, self.d, self.explicit = heads, e // heads, explicit
        self.inp = nn.Linear(5, e)
        self.q, self.k, self.v = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)
        self.o = nn.Linear(e, 4)

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        t = self.inp(x)
        q = self.q(t).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(t).view(b, n, self.h, self.d).transpose(1, 2)
        v = self.v(t).view(b, n, self.h, self.d).transpose(1, 2)
        if self.explicit:
            y = (q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.d))).softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, self.h * self.d))


class GQA(nn.Module):
    """8 query heads share 4 key/value heads (groups of 2), head_dim 2, three spellings."""

    def __init__(self, mode="sdpa"):
        super().__init__()
        self.mode = mode
        self.q, self.k, self.v = nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(8, 8)
        self.o = nn.Linear(16, 5)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 8, 2).transpose(1, 2)
        k = self.k(x).view(b, n, 4, 2).transpose(1, 2)
        v = self.v(x).view(b, n, 4, 2).transpose(1, 2)
        if self.mode == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            if self.mode == "repeat_interleave":
                k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            else:  # Hugging Face's repeat_kv
                k = k[:, :, None].expand(b, 4, 2, n, 2).reshape(b, 8, n, 2)
                v = v[:, :, None].expand(b, 4, 2, n, 2).reshape(b, 8, n, 2)
            y = torch.softmax(q @ k.transpose(-1, -2) * (2 ** -0.5), -1) @ v
        return self.o(y.transpose(1, 2).reshape(b, n, 16))


class RMSBlock(nn.Module):
    """Embedding -> RMSNorm -> gated residual MLP -> RMSNorm -> head (a Llama-style residual stream)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.n1, self.n2 = nn.RMSNorm(8), nn.RMSNorm(8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.n1(self.emb(ids))
        h = h + self.down(F.silu(self.up(h)))
        return self.head(self.n2(h))


# ---------------------------------------------------------------------------------------------------------
# nn.TransformerEncoder: heads + FFN on both front ends


ENCODER_CASES = [
    dict(batch_first=True),
    dict(batch_first=False, norm_first=True, bias=False, activation="gelu"),
]


@pytest.mark.parametrize("kw", ENCODER_CASES, ids=["bf", "seq_first-norm_first-nobias-gelu"])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_encoder_prunes_whole_heads_and_ffn(frontend, kw):
    torch.manual_seed(0)
    model = _static(_randomize(Encoder(**kw)))
    x = torch.randn(2, 5, 5) if kw["batch_first"] else torch.randn(5, 2, 5)
    res = fxprune.compile(model, x, ratio=0.5, frontend=frontend, verify="equivalence")
    assert dict((p, st) for p, st, _ in res.context.log)["verify"]["equivalence"] == "ok"
    mods = dict(res.module.named_modules())
    for i in range(2):
        att = mods[f"enc.layers.{i}.self_attn"]
        p = _params(res)
        if frontend == "fx":
            assert isinstance(att, PrunedMultiheadAttention)
            assert att.num_heads == 2 and att.head_dim == 2  # 2 of 4 heads; head width (softmax scale) kept
        else:
            assert p[f"enc.layers.{i}.self_attn.in_proj_weight"].shape == (3 * 2 * 2, 8)
        assert p[f"enc.layers.{i}.self_attn.out_proj.weight"].shape == (8, 4)
        assert p[f"enc.layers.{i}.linear1.weight"].shape == (8, 8)
        assert p[f"enc.layers.{i}.linear2.weight"].shape == (8, 8)
    # the hidden size sits behind LayerNorm: kept, and the report says why
    assert any("allow_lossy" in why for _, why in res.report.blocked)
    assert res.module(x).shape == model(x).shape


def test_encoder_both_front_ends_agree_and_model_untouched():
    torch.manual_seed(0)
    model = _static(_randomize(Encoder()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 5)
    a = fxprune.compile(model, x, ratio=0.5, frontend="fx")
    b = fxprune.compile(model, x, ratio=0.5, frontend="export")
    assert a.report.params_after == b.report.params_after < a.report.params_before
    assert a.report.macs_after == b.report.macs_after
    torch.testing.assert_close(a.module(x), b.module(x), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # fx: the encoder is traced through (torch's own forward cannot be), the attention stays a module
    assert any(n.op == "call_module" and n.target == "enc.layers.0.self_attn" for n in a.graph_module.graph.nodes)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_zeroed_heads_and_ffn_units_of_an_encoder_are_removed_exactly(frontend):
    """Oracle: heads whose out_proj columns are zero (and FFN units whose down-projection columns are zero)
    contribute nothing; pruning exactly those leaves the output unchanged."""
    torch.manual_seed(1)
    model = _static(_randomize(Encoder(layers=1))).double()
    layer = model.enc.layers[0]
    wq0 = layer.self_attn.in_proj_weight.detach().clone()
    with torch.no_grad():
        for h in (0, 2):
            layer.self_attn.out_proj.weight[:, 2 * h : 2 * h + 2] = 0
        layer.linear2.weight[:, [1, 4, 9]] = 0
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    res = fxprune.compile(model, x, importance=_zero_out_importance(), threshold=0.0, frontend=frontend)
    p = _params(res)
    rows = [r for part in range(3) for h in (1, 3) for r in range(part * 8 + 2 * h, part * 8 + 2 * h + 2)]
    if frontend == "fx":
        att = res.module.get_submodule("enc.layers.0.self_attn")
        assert att.num_heads == 2 and att.head_dim == 2
        got = torch.cat([att.q_proj_weight, att.k_proj_weight, att.v_proj_weight]).detach()
    else:
        got = p["enc.layers.0.self_attn.in_proj_weight"]
    assert torch.equal(got, wq0[rows])  # q, k and v rows of heads 1 and 3, nothing else
    assert p["enc.layers.0.linear1.weight"].shape[0] == 13
    for seed in (0, 1):
        xx = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(res.module(xx), model(xx), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_full_transformer_encoder_decoder(frontend):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(8, 2, 1, 1, 12, dropout=0.0, batch_first=True)
            self.o = nn.Linear(8, 3)
            self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(4))

        def forward(self, src, tgt):
            # tgt_is_causal given: torch would otherwise test the mask's values (export cannot trace that)
            return self.o(self.t(src, tgt, tgt_mask=self.causal, tgt_is_causal=True))

    torch.manual_seed(0)
    model = _static(_randomize(M()))
    res = fxprune.compile(model, (torch.randn(2, 5, 8), torch.randn(2, 4, 8)), ratio=0.5, frontend=frontend,
                          verify="equivalence")
    p = _params(res)
    assert p["t.encoder.layers.0.linear1.weight"].shape == (6, 8)
    assert p["t.decoder.layers.0.multihead_attn.out_proj.weight"].shape == (8, 4)  # 1 of 2 heads


# ---------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention variants


@pytest.mark.parametrize("kw", [dict(batch_first=True), dict(batch_first=False, bias=False)], ids=["bf", "sf-nobias"])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_cross_attention_kdim_vdim(frontend, kw):
    torch.manual_seed(0)
    model = _static(CrossAttention(**kw).eval())
    x = torch.randn(2, 5, 5) if kw["batch_first"] else torch.randn(5, 2, 5)
    res = fxprune.compile(model, x, ratio=0.5, frontend=frontend, verify="equivalence")
    p = _params(res)
    assert p["mha.q_proj_weight"].shape[0] == p["mha.k_proj_weight"].shape[0] == p["mha.v_proj_weight"].shape[0] == 4
    assert p["mha.out_proj.weight"].shape[1] == 4  # 1 of 2 heads of width 4
    assert p["k.weight"].shape[0] == 3  # key input channels (kdim) pruned through the projection


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_masked_attention_with_weights_path(frontend, batch_first):
    torch.manual_seed(0)
    # float64 model: torch.export bakes the mask dtype into the graph
    model = _static(MaskedMHA(batch_first).double().eval())
    x = torch.randn((2, 5, 5) if batch_first else (5, 2, 5), dtype=torch.float64)
    res = fxprune.compile(model, x, ratio=0.5, frontend=frontend, verify="equivalence")
    p = _params(res)
    assert p["mha.out_proj.weight"].shape[1] == 4  # 2 of 4 heads of width 2
    if frontend == "export":
        assert p["mha.in_proj_weight"].shape[0] == 12
        assert any(n.target is A.baddbmm.default for n in res.graph_module.graph.nodes)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_used_attention_weights_keep_every_head(frontend):
    torch.manual_seed(0)
    model = _static(MaskedMHA(True, weights_used=True).double().eval())
    res = fxprune.compile(model, torch.randn(2, 5, 5, dtype=torch.float64), ratio=0.5, frontend=frontend,
                          verify="equivalence")
    assert res.module.get_parameter("mha.out_proj.weight").shape[1] == 8
    assert res.module.get_parameter("o.weight").shape[1] == 4  # the rest still prunes


def test_export_with_dynamic_shapes_prunes_heads_and_generalises():
    """Dynamic batch/length: the head count inside symbolic sizes (``s1 * 4``) is rescaled too."""
    torch.manual_seed(1)
    model = _randomize(Encoder(layers=1)).double()
    with torch.no_grad():
        model.enc.layers[0].self_attn.out_proj.weight[:, 0:4] = 0  # heads 0 and 1 contribute nothing
    res = fxprune.compile(model, torch.randn(2, 5, 5, dtype=torch.float64), importance=_zero_out_importance(),
                          threshold=0.0, frontend="export")
    assert _params(res)["enc.layers.0.self_attn.in_proj_weight"].shape == (12, 8)
    assert any(n.target is operator_mul and any(isinstance(a, int) for a in n.args) for n in res.graph_module.graph.nodes)
    for shape in ((3, 7, 5), (1, 2, 5)):
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-10, atol=1e-10)


operator_mul = __import__("operator").mul


def test_encoder_with_mask_inputs_traces_through_on_fx():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(8), enable_nested_tensor=False)
            self.o = nn.Linear(8, 2)

        def forward(self, x, mask, pad):
            return self.o(self.enc(x, mask=mask, src_key_padding_mask=pad))

    torch.manual_seed(0)
    model = _randomize(M())
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    x = torch.randn(2, 5, 8)
    res = fxprune.compile(model, (x, mask, pad), ratio=0.5, frontend="fx", verify="equivalence")
    assert res.module.get_submodule("enc.layers.0.self_attn").num_heads == 1
    assert res.module.get_parameter("enc.layers.0.linear1.weight").shape == (6, 8)
    keep_all = fxprune.compile(model, (x, mask, pad), ratio=0.0, frontend="fx")
    torch.testing.assert_close(keep_all.module(x, mask, pad), model(x, mask, pad), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# hand-written attention


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit_softmax"])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_hand_written_attention_zeroed_head_removed_exactly(frontend, explicit):
    torch.manual_seed(0)
    model = _static(HandAttention(explicit).double().eval())
    wq = model.q.weight.detach().clone()
    with torch.no_grad():
        model.o.weight[:, 4:8] = 0  # head 1 of 3 (width 4) is never read
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    res = fxprune.compile(model, x, importance=_zero_out_importance(), threshold=0.0, frontend=frontend,
                          verify="equivalence")
    p = _params(res)
    assert torch.equal(p["q.weight"], wq[[0, 1, 2, 3, 8, 9, 10, 11]])  # whole head 1 gone, head width kept
    assert p["k.weight"].shape == p["v.weight"].shape == (8, 12) and p["o.weight"].shape == (4, 8)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-10, atol=1e-10)
    if explicit:  # the literal softmax scale is untouched: 1/sqrt(original head width)
        consts = [a for n in res.graph_module.graph.nodes for a in n.args if isinstance(a, float)]
        assert 0.5 in consts


# ---------------------------------------------------------------------------------------------------------
# grouped-query attention


@pytest.mark.parametrize("mode", ["sdpa", "repeat_interleave", "expand"])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_gqa_removes_kv_head_with_its_query_heads(frontend, mode):
    torch.manual_seed(0)
    model = _static(GQA(mode).double().eval())
    wq, wk = model.q.weight.detach().clone(), model.k.weight.detach().clone()
    with torch.no_grad():
        model.o.weight[:, 4:8] = 0  # query heads 2 and 3 = the group of key/value head 1
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    res = fxprune.compile(model, x, importance=_zero_out_importance(), threshold=0.0, frontend=frontend,
                          verify="equivalence")
    p = _params(res)
    q_rows = [r for r in range(16) if not 4 <= r < 8]
    kv_rows = [r for r in range(8) if not 2 <= r < 4]
    assert torch.equal(p["q.weight"], wq[q_rows]) and torch.equal(p["k.weight"], wk[kv_rows])
    assert p["v.weight"].shape == (6, 8)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_gqa_ratio_keeps_groups_consistent(frontend):
    torch.manual_seed(0)
    res = fxprune.compile(_static(GQA("sdpa").eval()), torch.randn(2, 5, 8), ratio=0.5, frontend=frontend,
                          verify="equivalence")
    p = _params(res)
    assert p["k.weight"].shape[0] == p["v.weight"].shape[0] == 4  # 2 of 4 key/value heads
    assert p["q.weight"].shape[0] == 8  # and their 4 of 8 query heads: still 2 query heads per k/v head


# ---------------------------------------------------------------------------------------------------------
# hidden size (residual stream) through RMSNorm / LayerNorm / Embedding: lossy, opt-in


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_hidden_size_through_rmsnorm_and_embedding_only_when_allowed(frontend):
    torch.manual_seed(0)
    model = _static(_randomize(RMSBlock()))
    ids = torch.randint(0, 20, (2, 5))
    strict = fxprune.compile(model, ids, ratio=0.5, frontend=frontend)
    assert strict.module.get_parameter("emb.weight").shape == (20, 8)
    assert any("RMSNorm" in why or "rms_norm" in why for _, why in strict.report.blocked)
    assert any("allow_lossy" in why for _, why in strict.report.blocked)
    assert not any("NOT exactly" in n for n in strict.report.notes)
    loose = fxprune.compile(model, ids, ratio=0.5, frontend=frontend, allow_lossy=True)
    p = _params(loose)
    assert p["emb.weight"].shape == (20, 4) and p["n1.weight"].shape == p["n2.weight"].shape == (4,)
    assert p["head.weight"].shape == (3, 4) and p["up.weight"].shape == (8, 4)
    assert any("NOT exactly equivalent" in n for n in loose.report.notes)
    out = loose.module(ids)
    assert out.shape == (2, 5, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_hidden_size_of_an_encoder_with_allow_lossy(frontend):
    torch.manual_seed(0)
    model = _static(_randomize(Encoder(layers=1)))
    x = torch.randn(2, 5, 5)
    res = fxprune.compile(model, x, ratio=0.5, frontend=frontend, allow_lossy=True, verify="equivalence")
    p = _params(res)
    assert p["inp.weight"].shape == (4, 5) and p["enc.layers.0.norm1.weight"].shape == (4,)
    assert p["enc.layers.0.self_attn.out_proj.weight"].shape == (4, 4)  # hidden 8->4, heads 4->2
    assert any("NOT exactly equivalent" in n for n in res.report.notes)
    assert res.module(x).shape == (2, 5, 3)


# ---------------------------------------------------------------------------------------------------------
# the digit analysis behind the export path's head splits


def test_channel_digits_on_multihead_attention_graph():
    from fxprune.export import export_graph
    from fxprune.shapes import propagate_shapes

    model = nn.MultiheadAttention(8, 4).eval()  # seq-first: (L, B, E) -> (L, B*H, d) -> (B, H, L, d)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x, x, x, need_weights=False)[0]

    x = torch.randn(5, 2, 8)
    gm = export_graph(_static(M()), (x,))
    propagate_shapes(gm, (x,))
    nodes = list(gm.graph.nodes)
    unflat = next(n for n in nodes if n.target is A.unflatten.int)  # (L, B, 3, E)
    assert channel_digits(unflat, 3) == (1, 8) and channel_digits(unflat, 2) == (1, 3)
    views = [n for n in nodes if n.target is A.view.default and len(n.args[1]) == 3 and n.args[1][2] == 2]
    assert views, "expected views to (L, B*H, d)"
    assert channel_digits(views[0], 1) == (1, 4)  # B*H: heads are the inner digit
    assert channel_digits(views[0], 0) is None  # sequence positions carry no channels
    split = [n for n in nodes if n.target is A.view.default and len(n.args[1]) == 4]
    assert channel_digits(split[0], 0) is None and channel_digits(split[0], 1) == (1, 4)
