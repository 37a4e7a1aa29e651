"""The torch.export front end and the ATen rules.

Oracles: the masked reference (random constraint-respecting selections), exact identities (pruning units
that contribute nothing leaves the output unchanged), and round trips (backward, torch.save/load).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError, TraceError
from fxprune.testing.examples.exported import ExportOnly
from fxprune.testing import assert_prune_equivalent, random_selection

from models import Concat, Residual, Split  # noqa: E402  (tests/ is on sys.path under pytest)


# ---------------------------------------------------------------------------------------------------------
# a BERT-style encoder with Hugging Face-like control flow


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def split_heads(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dh).transpose(1, 2)

    def forward(self, x, mask):
        q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + mask
        ctx = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.norm(x + self.out(ctx))


class FeedForward(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(d, f), nn.Linear(f, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.down(F.gelu(self.up(x))))


class TinyBert(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 16, heads: int = 4, ffn: int = 24, layers: int = 1,
                 max_len: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_len, d)
        self.norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(nn.ModuleDict({"attention": SelfAttention(d, heads), "ffn": FeedForward(d, ffn)})
                                    for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, classes)

    def forward(self, ids, attention_mask):
        b, t = ids.shape
        if t > self.position.num_embeddings:  # shape-dependent branch
            raise ValueError("sequence too long")
        mask = torch.zeros(b, 1, 1, t, dtype=torch.float32)
        mask[attention_mask[:, None, None, :] == 0] = -1e4  # mask construction by item assignment
        x = self.norm(self.word(ids) + self.position(torch.arange(t)))
        for layer in self.layers:
            x = layer["ffn"](layer["attention"](x, mask))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def bert_inputs(b: int = 2, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (b, t), generator=g)
    att = torch.ones(b, t, dtype=torch.long)
    att[-1, t - 2 :] = 0
    return ids, att


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def bert_result():
    torch.manual_seed(0)
    model = _randomize(TinyBert(layers=2))
    inputs = bert_inputs()
    res = fxprune.compile(model, inputs, ratio=0.5, verify="equivalence")
    return model, inputs, res


def test_bert_falls_back_to_export_and_prunes_heads_and_ffn(bert_result):
    model, inputs, res = bert_result
    assert any("torch.export" in n for n in res.report.notes)
    assert any(n.target is torch.ops.aten.linear.default for n in res.graph_module.graph.nodes)
    mods = dict(res.module.named_modules())
    for i in range(2):
        q = mods[f"layers.{i}.attention.query"].weight
        o = mods[f"layers.{i}.attention.out"].weight
        assert q.shape == (8, 16) and o.shape == (16, 8)  # 2 of 4 heads, head width 4 unchanged
        assert mods[f"layers.{i}.ffn.up"].weight.shape == (12, 16)
        assert mods[f"layers.{i}.ffn.down"].weight.shape == (16, 12)
    # the hidden size is behind LayerNorm: kept unless allow_lossy
    assert mods["word"].weight.shape == (40, 16)
    assert any("allow_lossy" in why for _, why in res.report.blocked)
    # the verify pass compared with the masked reference in float64
    assert dict((p, st) for p, st, _ in res.context.log)["verify"]["equivalence"] == "ok"


def test_bert_heads_are_whole(bert_result):
    _, _, res = bert_result
    heads = [g for g in res.analysis.groups if any(p.param == "layers.0.attention.query.weight" and p.dim == 0 for p in g.params)]
    assert len(heads) == 1 and heads[0].size == 4
    kept = res.selection.as_dict()[heads[0].id]
    q = dict(res.module.named_parameters())["layers.0.attention.query.weight"]
    q0 = dict(res.original.named_parameters())["layers.0.attention.query.weight"]
    rows = torch.cat([torch.arange(h * 4, h * 4 + 4) for h in kept])
    assert torch.equal(q.detach(), q0.detach()[rows])


def test_bert_result_has_dynamic_batch_and_length(bert_result):
    model, _, res = bert_result
    ids, att = bert_inputs(b=3, t=5, seed=1)
    out = res.module(ids, att)
    assert out.shape == model(ids, att).shape == (3, 3)


def test_zero_contribution_heads_and_ffn_units_leave_output_unchanged():
    torch.manual_seed(1)
    model = _randomize(TinyBert()).double()
    model.fxprune_static_shapes = True  # faster capture; the result then takes the example shapes only
    att, ffn = model.layers[0]["attention"], model.layers[0]["ffn"]
    with torch.no_grad():
        for h in (0, 2):
            att.out.weight[:, h * 4 : h * 4 + 4] = 0  # the head's output is never read
        ffn.down.weight[:, [0, 5, 7, 20]] = 0  # nor are these FFN units'
    imp = fxprune.MagnitudeImportance(p=2, roles=("in",))
    res = fxprune.compile(model, bert_inputs(), importance=imp, threshold=0.0, verify="shapes")
    mods = dict(res.module.named_modules())
    assert mods["layers.0.attention.query"].weight.shape[0] == 8
    assert mods["layers.0.attention.out"].weight.shape[1] == 8
    assert mods["layers.0.ffn.up"].weight.shape[0] == 20
    for seed in (0, 1):
        ids, mask = bert_inputs(seed=seed)
        torch.testing.assert_close(res.module(ids, mask), model(ids, mask), rtol=1e-12, atol=1e-12)


def test_hidden_size_prunes_through_layernorm_only_when_allowed():
    torch.manual_seed(2)
    model = _randomize(TinyBert())
    model.fxprune_static_shapes = True
    res = fxprune.compile(model, bert_inputs(), ratio=0.25, allow_lossy=True, verify="equivalence")
    mods = dict(res.module.named_modules())
    assert mods["word"].weight.shape == (40, 12) and mods["position"].weight.shape == (16, 12)
    assert mods["norm"].weight.shape == (12,)
    assert any("lossy" in n for n in res.report.notes)  # the verify pass says why it skipped equivalence
    out = res.module(*bert_inputs(seed=4))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_result_trains_and_round_trips_through_torch_save(bert_result):
    _, inputs, res = bert_result
    m = res.module
    m.train()
    loss = m(*inputs).square().sum()
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    m.zero_grad()
    m.eval()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ids, att = bert_inputs(b=4, t=6, seed=3)
    torch.testing.assert_close(loaded(ids, att), m(ids, att))
    sd = io.BytesIO()
    torch.save(m.state_dict(), sd)
    sd.seek(0)
    assert set(torch.load(sd)) == set(m.state_dict())


def test_model_untouched_by_export_path(bert_result):
    model, inputs, res = bert_result
    torch.manual_seed(0)
    fresh = _randomize(TinyBert(layers=2))
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert not model.training


# ---------------------------------------------------------------------------------------------------------
# front-end selection and errors


class DataDependent(nn.Module):
    """Neither front end can capture a branch on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            return y * 2
        return y


def test_both_front_ends_fail_with_one_error_naming_both():
    with pytest.raises(TraceError) as info:
        fxprune.compile(DataDependent(), torch.randn(2, 4), ratio=0.5)
    msg = str(info.value)
    assert "neither front end" in msg and "symbolic tracing" in msg and "torch.export" in msg


def test_frontend_option():
    model, inputs = TinyBert().eval(), bert_inputs()
    with pytest.raises(TraceError, match="symbolic tracing failed"):
        fxprune.compile(model, inputs, ratio=0.5, frontend="fx")
    with pytest.raises(ConfigError, match="frontend"):
        fxprune.compile(model, inputs, ratio=0.5, frontend="jit")
    torch.manual_seed(0)
    net = _randomize(Residual())
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.compile(net, x, ratio=0.5, verify="none")  # auto: symbolic tracing works, no fallback
    b = fxprune.compile(net, x, ratio=0.5, frontend="export", verify="equivalence")
    assert any(n.op == "call_module" for n in a.graph_module.graph.nodes)
    assert not any("captured with" in n for n in a.report.notes)
    assert not any(n.op == "call_module" for n in b.graph_module.graph.nodes)
    # the same groups, the same pruned sizes and the same MACs on both paths
    assert sorted(g.size for g in a.analysis.prunable) == sorted(g.size for g in b.analysis.prunable)
    assert a.report.params_after == b.report.params_after
    assert b.report.macs_before == a.report.macs_before and b.report.macs_after == a.report.macs_after


def test_every_aten_rule_example_needs_the_export_front_end():
    from fxprune.testing.examples import EXAMPLES

    examples = {f for name, fs in EXAMPLES.items() if name.startswith("aten.") for f in fs}
    assert len(examples) >= 8
    for ex in examples:
        model, inputs = ex()
        with pytest.raises(TraceError):
            fxprune.prepare(model, inputs, frontend="fx")


# ---------------------------------------------------------------------------------------------------------
# the ATen rules on fx-traceable models, forced through export: masked-reference oracle


@pytest.mark.parametrize("make", [Residual, Concat, Split], ids=lambda m: m.__name__)
def test_export_path_matches_masked_reference(make):
    torch.manual_seed(0)
    model = ExportOnly(_randomize(make()), static_shapes=True)
    chk = assert_prune_equivalent(model, torch.randn(2, 3, 8, 8), lambda a: random_selection(a, 1, ratio=0.5))
    assert chk.selection.keep
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in chk.module.graph.nodes)


class GQA(nn.Module):
    """Grouped-query attention through scaled_dot_product_attention(enable_gqa=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.o = nn.Linear(8, 6)

    def forward(self, x):
        b, n, _ = x.shape
        if n < 1:
            raise ValueError("empty sequence")
        q = self.q(x).view(b, n, 4, 2).transpose(1, 2)
        k = self.k(x).view(b, n, 2, 2).transpose(1, 2)
        v = self.v(x).view(b, n, 2, 2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, n, 8))


def test_grouped_query_attention_keeps_kv_heads_with_their_query_heads():
    torch.manual_seed(0)
    res = fxprune.compile(GQA().eval(), torch.randn(2, 5, 8), ratio=0.5, verify="equivalence")
    mods = dict(res.module.named_modules())
    assert mods["k"].weight.shape == (2, 8) and mods["v"].weight.shape == (2, 8)
    assert mods["q"].weight.shape == (4, 8)  # one kv head and its two query heads removed together


def test_multihead_attention_module_through_export_is_exact():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ffn = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))

        def forward(self, x):
            h = self.inp(x)
            return self.ffn(self.mha(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    chk = assert_prune_equivalent(ExportOnly(M().eval(), static_shapes=True), torch.randn(2, 4, 5),
                                  lambda a: random_selection(a, 0, ratio=0.5))
    assert chk.selection.keep  # at least the FFN width


class AutocastOff(nn.Module):
    """A block run with autocast disabled (timm EfficientViT): export wraps it in wrap_with_autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.autocast("cpu", enabled=False):
            h = torch.relu(self.b(h))
        return self.c(h)


def test_autocast_disabled_regions_are_inlined_and_pruned():
    torch.manual_seed(0)
    res = fxprune.compile(AutocastOff().eval(), torch.randn(2, 3, 6, 6), ratio=0.5, frontend="export",
                          verify="equivalence")
    assert not any("wrap_with_autocast" in str(n.target) for n in res.graph_module.graph.nodes)
    convs = [n for n in res.graph_module.graph.nodes if "conv" in str(n.target)]
    assert len(convs) == 3 and res.report.macs_after < 0.5 * res.report.macs_before


def test_export_keeps_image_sizes_static_unless_asked():
    """Symbolic reasoning over spatial sizes can take minutes: image/video inputs get a dynamic batch only."""
    from fxprune.export import _dynamic_shapes

    auto = torch.export.Dim.AUTO
    img, seq = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4)
    assert _dynamic_shapes((img, seq)) == ({0: auto}, {0: auto, 1: auto, 2: auto})
    assert _dynamic_shapes((img,), spatial=True) == ({0: auto, 1: auto, 2: auto, 3: auto},)
    torch.manual_seed(0)
    net = _randomize(Residual())
    res = fxprune.compile(net, torch.randn(2, 3, 8, 8), ratio=0.5, frontend="export")
    assert res.module(torch.randn(5, 3, 8, 8)).shape[0] == 5  # another batch size works
    net.fxprune_dynamic_shapes = True
    res = fxprune.compile(net, torch.randn(2, 3, 8, 8), ratio=0.5, frontend="export", verify="equivalence")
    assert res.module(torch.randn(1, 3, 12, 10)).shape[0] == 1  # and, when asked, another image size


class TensorSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(5, 4, 1)
        self.d = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        p, q, r = torch.tensor_split(self.a(x), [3, 8], dim=1)  # pieces of 3, 5 and 4 channels
        return self.b(p) + self.c(q) + self.d(r)


def test_tensor_split_on_the_export_path():
    torch.manual_seed(0)
    res = fxprune.compile(TensorSplit().eval(), torch.randn(2, 3, 5, 5), ratio=0.5, frontend="export",
                          verify="equivalence")
    assert res.module.get_parameter("a.weight").shape[0] < 12
    assert res.module(torch.randn(1, 3, 5, 5)).shape == (1, 4, 5, 5)


class _LiteralFirstFill(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        z = torch.zeros(1, x.shape[1], 8) + torch.full((1, x.shape[0], 8), 2.0)[:, :1]
        return self.fc(x) + z + torch.ones(1, x.shape[1], 1, dtype=torch.long)


def test_fill_with_literal_then_runtime_sizes_pickles(tmp_path):
    """torch re-traces a GraphModule's code to unpickle it, and ATen's size parser rejects [1, proxy, 8]:
    such fills are captured as new_zeros/new_full/new_ones on a tensor, with the fill's own dtype."""
    torch.manual_seed(0)
    model = _LiteralFirstFill().eval()
    x = torch.randn(2, 5, 8)
    res = fxprune.compile(model, (x,), ratio=0.0, frontend="export", result="graph")
    torch.save(res.module, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    x2 = torch.randn(3, 7, 8)
    out = back(x2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x2), rtol=0, atol=0)
