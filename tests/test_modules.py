"""Tests for fxprune.modules.PrunedMultiheadAttention.

Reference semantics are nn.MultiheadAttention's (slow path, or the fused fast path under no_grad where
stated). Everything runs in float64 so tolerances can be tight.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxprune.errors import ConfigError
from fxprune.modules import PrunedMultiheadAttention

DT = torch.float64
ATOL = 1e-10


def close(a, b, atol=ATOL):
    if a is None or b is None:
        assert a is None and b is None
        return
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def make_mha(E=8, H=2, *, kdim=None, vdim=None, seed=0, **kw) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, dtype=DT, **kw)
    with torch.no_grad():  # biases are zero-initialised: randomise everything so every path is exercised
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


def make_inputs(m, L=4, S=5, N=3, *, batched=True, self_attn=False, seed=1):
    """query/key/value in `m`'s layout; also returns (L, S, N)."""
    g = torch.Generator().manual_seed(seed)
    if self_attn:
        S = L

    def t(n, length, width):
        if not batched:
            return torch.randn(length, width, generator=g, dtype=DT)
        shape = (n, length, width) if m.batch_first else (length, n, width)
        return torch.randn(*shape, generator=g, dtype=DT)

    q = t(N, L, m.embed_dim)
    k = t(N, S, m.kdim)
    v = t(N, S, m.vdim)
    if self_attn and m.kdim == m.vdim == m.embed_dim:
        k = v = q
    return q, k, v, (L, S, N)


def kpm_bool(N, S, batched=True, seed=2):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(N, S, generator=g) < 0.4
    m[:, 0] = False  # never mask a whole row (NaNs compare unequal)
    return m if batched else m[0]


def as_float(mask):
    return torch.zeros(mask.shape, dtype=DT).masked_fill(mask, float("-inf"))


def attn_mask_bool(shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) < 0.4
    m[..., 0] = False
    return m


def rand_float(shape, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


def causal(L, as_bool=False):
    m = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    return m if as_bool else nn.Transformer.generate_square_subsequent_mask(L, dtype=DT)


# ---------------------------------------------------------------------------------------------------------
# 1. keep-all equivalence with nn.MultiheadAttention

# name -> (mha kwargs, input kwargs, forward-kwargs builder(L, S, N, H, batched))
CASES = {
    "default": ({}, {}, lambda L, S, N, H, b: {}),
    "batch_first": ({"batch_first": True}, {}, lambda L, S, N, H, b: {}),
    "unbatched": ({}, {"batched": False}, lambda L, S, N, H, b: {}),
    "unbatched_batch_first": ({"batch_first": True}, {"batched": False}, lambda L, S, N, H, b: {}),
    "self_attn": ({}, {"self_attn": True}, lambda L, S, N, H, b: {}),
    "kdim_vdim": ({"kdim": 5, "vdim": 7}, {}, lambda L, S, N, H, b: {}),
    "kdim_vdim_batch_first": ({"kdim": 5, "vdim": 3, "batch_first": True}, {}, lambda L, S, N, H, b: {}),
    "no_bias": ({"bias": False}, {}, lambda L, S, N, H, b: {}),
    "bias_kv": ({"add_bias_kv": True}, {}, lambda L, S, N, H, b: {}),
    "zero_attn": ({"add_zero_attn": True}, {}, lambda L, S, N, H, b: {}),
    "kpm_bool": ({}, {}, lambda L, S, N, H, b: {"key_padding_mask": kpm_bool(N, S)}),
    "kpm_float": ({}, {}, lambda L, S, N, H, b: {"key_padding_mask": rand_float((N, S))}),
    "kpm_unbatched": ({}, {"batched": False}, lambda L, S, N, H, b: {"key_padding_mask": kpm_bool(N, S, False)}),
    "mask2d_bool": ({}, {}, lambda L, S, N, H, b: {"attn_mask": attn_mask_bool((L, S))}),
    "mask2d_float": ({}, {}, lambda L, S, N, H, b: {"attn_mask": rand_float((L, S))}),
    "mask3d_float": ({}, {}, lambda L, S, N, H, b: {"attn_mask": rand_float((N * H, L, S))}),
    "mask3d_bool": ({}, {}, lambda L, S, N, H, b: {"attn_mask": attn_mask_bool((N * H, L, S))}),
    "mask3d_unbatched": ({}, {"batched": False}, lambda L, S, N, H, b: {"attn_mask": rand_float((H, L, S))}),
    "kpm_and_mask_bool": (
        {},
        {},
        lambda L, S, N, H, b: {"key_padding_mask": kpm_bool(N, S), "attn_mask": attn_mask_bool((L, S))},
    ),
    "kpm_and_mask_float": (
        {"batch_first": True},
        {},
        lambda L, S, N, H, b: {"key_padding_mask": as_float(kpm_bool(N, S)), "attn_mask": rand_float((L, S))},
    ),
    "everything": (
        {"add_bias_kv": True, "add_zero_attn": True, "kdim": 6, "vdim": 4, "batch_first": True},
        {},
        lambda L, S, N, H, b: {"key_padding_mask": as_float(kpm_bool(N, S)), "attn_mask": rand_float((N * H, L, S))},
    ),
    "everything_unbatched": (
        {"add_bias_kv": True, "add_zero_attn": True},
        {"batched": False},
        lambda L, S, N, H, b: {"key_padding_mask": kpm_bool(N, S, False), "attn_mask": attn_mask_bool((L, S))},
    ),
    "causal_float": ({}, {"self_attn": True}, lambda L, S, N, H, b: {"attn_mask": causal(L), "is_causal": True}),
    "causal_bool_batch_first": (
        {"batch_first": True},
        {"self_attn": True},
        lambda L, S, N, H, b: {"attn_mask": causal(L, True), "is_causal": True},
    ),
    "causal_kpm": (
        {},
        {"self_attn": True},
        lambda L, S, N, H, b: {"attn_mask": causal(L), "is_causal": True, "key_padding_mask": as_float(kpm_bool(N, S))},
    ),
    # torch semantics: with need_weights=False and no key_padding_mask, is_causal=True *ignores* attn_mask and
    # applies SDPA's causal mask instead; with need_weights=True the mask is used as given.
    "causal_hint_with_noncausal_mask": (
        {},
        {"self_attn": True},
        lambda L, S, N, H, b: {"attn_mask": rand_float((L, L)), "is_causal": True},
    ),
    # ... which interacts with add_bias_kv / add_zero_attn: SDPA's causal mask is top-left aligned on the padded
    # (L, L+2) scores, so the extra key columns are masked for all but the last rows.
    "causal_bias_kv_zero_attn": (
        {"add_bias_kv": True, "add_zero_attn": True},
        {"self_attn": True},
        lambda L, S, N, H, b: {"attn_mask": causal(L), "is_causal": True},
    ),
}


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_all_matches_mha(case, need_weights, average):
    mha_kw, in_kw, fwd = CASES[case]
    m = make_mha(**mha_kw).eval()
    p = PrunedMultiheadAttention.from_mha(m)
    q, k, v, (L, S, N) = make_inputs(m, **in_kw)
    kw = fwd(L, S, N, m.num_heads, in_kw.get("batched", True))
    kw.update(need_weights=need_weights, average_attn_weights=average)
    out_ref, w_ref = m(q, k, v, **kw)
    out, w = p(q, k, v, **kw)
    assert out.shape == out_ref.shape
    close(out, out_ref)
    close(w, w_ref)
    if need_weights:
        assert w.shape == w_ref.shape


def test_causal_hint_really_ignores_mask_without_weights():
    """Documents the torch behaviour followed above (not an accident of both modules agreeing on garbage)."""
    m = make_mha().eval()
    p = PrunedMultiheadAttention.from_mha(m)
    q, k, v, (L, S, N) = make_inputs(m, self_attn=True)
    junk = rand_float((L, L))
    a, _ = p(q, k, v, attn_mask=junk, is_causal=True, need_weights=False)
    b, _ = p(q, k, v, attn_mask=causal(L), need_weights=False)
    c, _ = p(q, k, v, attn_mask=junk, is_causal=True, need_weights=True)
    d, _ = p(q, k, v, attn_mask=junk, need_weights=True)
    close(a, b)
    close(c, d)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [{}, {"key_padding_mask": "kpm"}, {"attn_mask": "mask"}])
@pytest.mark.parametrize("need_weights", [True, False])
def test_keep_all_matches_mha_fast_path(kw, need_weights, monkeypatch):
    """Under no_grad + eval + batch_first, nn.MultiheadAttention runs its fused kernel; same values."""
    fused = torch._native_multi_head_attention
    calls = []
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    m = make_mha(8, 4, batch_first=True).eval()
    p = PrunedMultiheadAttention.from_mha(m)
    q, _, _, (L, S, N) = make_inputs(m, self_attn=True)
    kw = {k: (kpm_bool(N, L) if v == "kpm" else attn_mask_bool((L, L))) for k, v in kw.items()}
    with torch.no_grad():
        out_ref, w_ref = m(q, q, q, need_weights=need_weights, **kw)
        assert len(calls) == 1  # the reference really took the fused path
        out, w = p(q, q, q, need_weights=need_weights, **kw)
    assert len(calls) == 1  # ... and we did not
    close(out, out_ref)
    close(w, w_ref)


def test_mismatched_mask_dtypes_warn_like_torch():
    m = make_mha()
    p = PrunedMultiheadAttention.from_mha(m)
    q, k, v, (L, S, N) = make_inputs(m)
    kw = {"key_padding_mask": as_float(kpm_bool(N, S)), "attn_mask": attn_mask_bool((L, S))}
    with pytest.warns(UserWarning, match="mismatched key_padding_mask"):
        ref = m(q, k, v, **kw)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask"):
        got = p(q, k, v, **kw)
    close(got[0], ref[0])


def test_errors_like_torch():
    m = make_mha(8, 2)
    p = PrunedMultiheadAttention.from_mha(m, keep_heads=[1])
    q, k, v, (L, S, N) = make_inputs(m)
    with pytest.raises(RuntimeError, match="is_causal"):
        p(q, k, v, is_causal=True)
    with pytest.raises(RuntimeError, match="3D attn_mask"):  # 3-D mask must have the *pruned* head count
        p(q, k, v, attn_mask=rand_float((N * 2, L, S)))
    p(q, k, v, attn_mask=rand_float((N * 1, L, S)))
    with pytest.raises(AssertionError, match="query dimension"):
        p(q[..., :5], k, v)
    with pytest.raises(AssertionError, match="unbatched 2D or batched 3D"):
        p(q[0, 0], k, v)
    with pytest.raises(AssertionError, match="only bool and floating"):
        p(q, k, v, key_padding_mask=torch.zeros(N, S, dtype=torch.long))
    with pytest.raises(AssertionError, match="key_padded_mask"):
        p(q, k, v, key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------
# 2. oracle tests: pruned module == masked reference


def head_cols(heads, d):
    return [h * d + j for h in heads for j in range(d)]


def q_block(m):
    """(weight, row offset) of the q/k/v projection blocks of `m`."""
    if m._qkv_same_embed_dim:
        E = m.embed_dim
        return {"q": (m.in_proj_weight, 0), "k": (m.in_proj_weight, E), "v": (m.in_proj_weight, 2 * E)}
    return {"q": (m.q_proj_weight, 0), "k": (m.k_proj_weight, 0), "v": (m.v_proj_weight, 0)}


def masked_reference(m, *, drop_heads=(), drop_query=(), drop_key=(), drop_value=()):
    ref = copy.deepcopy(m)
    E = ref.embed_dim
    with torch.no_grad():
        ref.out_proj.weight[:, head_cols(drop_heads, ref.head_dim)] = 0
        blocks = q_block(ref)
        for name, drop in (("q", drop_query), ("k", drop_key), ("v", drop_value)):
            w, off = blocks[name]
            w[off : off + E, list(drop)] = 0
    return ref


def slice_mask3d(mask, N, H, keep):
    L, S = mask.shape[-2:]
    return mask.view(N, H, L, S)[:, keep].reshape(N * len(keep), L, S)


HEAD_CASES = {
    "plain": ({}, {}),
    "batch_first": ({"batch_first": True}, {}),
    "unbatched": ({}, {"batched": False}),
    "kdim_vdim": ({"kdim": 5, "vdim": 7}, {}),
    "no_bias": ({"bias": False}, {}),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, {}),
}


@pytest.mark.parametrize("masks", ["none", "kpm+2d", "3d"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_head_removal_matches_masked_reference(case, need_weights, masks):
    mha_kw, in_kw = HEAD_CASES[case]
    E, H = 12, 4
    keep, drop = [0, 2], [1, 3]
    m = make_mha(E, H, **mha_kw).eval()
    ref = masked_reference(m, drop_heads=drop)
    p = PrunedMultiheadAttention.from_mha(m, keep_heads=keep)
    assert (p.num_heads, p.head_dim, p.inner_dim) == (2, 3, 6)
    assert p.q_proj_weight.shape == (6, E) and p.out_proj.weight.shape == (E, 6)
    batched = in_kw.get("batched", True)
    q, k, v, (L, S, N) = make_inputs(m, **in_kw)
    kw_ref, kw_p = {}, {}
    if masks == "kpm+2d":
        kw_ref = kw_p = {"key_padding_mask": as_float(kpm_bool(N, S, batched)), "attn_mask": rand_float((L, S))}
    elif masks == "3d":
        n = N if batched else 1
        full = rand_float((n * H, L, S))
        kw_ref, kw_p = {"attn_mask": full}, {"attn_mask": slice_mask3d(full, n, H, keep)}
    out_ref, _ = ref(q, k, v, need_weights=need_weights, **kw_ref)
    out, _ = p(q, k, v, need_weights=need_weights, **kw_p)
    close(out, out_ref)

    # per-head weights of kept heads are unchanged; the average is over the kept heads only
    _, wh_ref = ref(q, k, v, average_attn_weights=False, **kw_ref)
    _, wh = p(q, k, v, average_attn_weights=False, **kw_p)
    head_dim = 1 if batched else 0
    close(wh, wh_ref.index_select(head_dim, torch.tensor(keep)))
    _, wa_ref = ref(q, k, v, **kw_ref)
    _, wa = p(q, k, v, **kw_p)
    close(wa, wh_ref.index_select(head_dim, torch.tensor(keep)).mean(head_dim))
    assert (wa - wa_ref).abs().max() > 1e-6  # differs from the original's 4-head average


@pytest.mark.parametrize("kdim_vdim", [(None, None), (6, 5)])
@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_input_channel_removal_matches_masked_reference(which, kdim_vdim):
    kdim, vdim = kdim_vdim
    m = make_mha(8, 2, kdim=kdim, vdim=vdim, add_bias_kv=True).eval()
    width = {"query": m.embed_dim, "key": m.kdim, "value": m.vdim}[which]
    drop = [1, 4]
    keep = [i for i in range(width) if i not in drop]
    ref = masked_reference(m, **{f"drop_{which}": drop})
    p = PrunedMultiheadAttention.from_mha(m, **{f"keep_{which}": keep})
    assert getattr(p, f"{which}_dim") == len(keep)
    q, k, v, (L, S, N) = make_inputs(m)
    args = {"query": q, "key": k, "value": v}
    sliced = dict(args)
    sliced[which] = args[which][..., keep]
    for nw in (True, False):
        out_ref, w_ref = ref(q, k, v, need_weights=nw, key_padding_mask=kpm_bool(N, S))
        out, w = p(sliced["query"], sliced["key"], sliced["value"], need_weights=nw, key_padding_mask=kpm_bool(N, S))
        close(out, out_ref)
        close(w, w_ref)  # same head count, so even the averaged weights agree


@pytest.mark.parametrize("batch_first", [False, True])
def test_output_channel_removal(batch_first):
    m = make_mha(8, 2, batch_first=batch_first).eval()
    keep = [0, 3, 5, 6]
    p = PrunedMultiheadAttention.from_mha(m, keep_out=keep)
    assert p.out_proj.weight.shape == (4, 8) and p.out_dim == 4
    q, k, v, _ = make_inputs(m)
    for nw in (True, False):
        out_ref, w_ref = m(q, k, v, need_weights=nw)
        out, w = p(q, k, v, need_weights=nw)
        close(out, out_ref[..., keep])
        close(w, w_ref)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_pruning_matches_masked_reference(data):
    H = data.draw(st.integers(1, 4), label="H")
    d = data.draw(st.integers(1, 3), label="d")
    E = H * d
    separate = data.draw(st.booleans(), label="separate")
    kdim = data.draw(st.integers(1, 5)) if separate else None
    vdim = data.draw(st.integers(1, 5)) if separate else None
    flags = {
        "bias": data.draw(st.booleans(), label="bias"),
        "add_bias_kv": data.draw(st.booleans(), label="bias_kv"),
        "add_zero_attn": data.draw(st.booleans(), label="zero_attn"),
        "batch_first": data.draw(st.booleans(), label="batch_first"),
    }
    m = make_mha(E, H, kdim=kdim, vdim=vdim, seed=data.draw(st.integers(0, 100)), **flags).eval()

    def subset(n, label, nonempty=False):
        s = data.draw(st.lists(st.integers(0, n - 1), unique=True, min_size=1 if nonempty else 0), label=label)
        return sorted(s)

    keep_heads = subset(H, "keep_heads", nonempty=True)
    keep_q = subset(E, "keep_q")
    keep_k = subset(m.kdim, "keep_k")
    keep_v = subset(m.vdim, "keep_v")
    keep_o = subset(E, "keep_o")
    ref = masked_reference(
        m,
        drop_heads=[h for h in range(H) if h not in keep_heads],
        drop_query=[i for i in range(E) if i not in keep_q],
        drop_key=[i for i in range(m.kdim) if i not in keep_k],
        drop_value=[i for i in range(m.vdim) if i not in keep_v],
    )
    p = PrunedMultiheadAttention.from_mha(m, keep_heads, keep_q, keep_k, keep_v, keep_o)
    batched = data.draw(st.booleans(), label="batched")
    q, k, v, (L, S, N) = make_inputs(m, batched=batched, seed=data.draw(st.integers(0, 100)))
    kw = {}
    if data.draw(st.booleans(), label="kpm"):
        kw["key_padding_mask"] = as_float(kpm_bool(N, S, batched))
    if data.draw(st.booleans(), label="mask"):
        kw["attn_mask"] = rand_float((L, S))
    nw = data.draw(st.booleans(), label="need_weights")
    out_ref, _ = ref(q, k, v, need_weights=nw, **kw)
    out, _ = p(q[..., keep_q], k[..., keep_k], v[..., keep_v], need_weights=nw, **kw)
    close(out, out_ref[..., keep_o])


def test_keep_heads_order_and_index_forms():
    m = make_mha(12, 4).eval()
    q, k, v, _ = make_inputs(m)
    base = PrunedMultiheadAttention.from_mha(m, keep_heads=[1, 3])
    perm = PrunedMultiheadAttention.from_mha(m, keep_heads=torch.tensor([3, 1]))
    mask = PrunedMultiheadAttention.from_mha(m, keep_heads=torch.tensor([False, True, False, True]))
    o1, w1 = base(q, k, v, average_attn_weights=False)
    o2, w2 = perm(q, k, v, average_attn_weights=False)
    o3, w3 = mask(q, k, v, average_attn_weights=False)
    close(o1, o2)
    close(w1, w2.flip(1))  # per-head weights come in keep_heads order
    close(o1, o3)
    close(w1, w3)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"keep_heads": [0, 2]}, "out of range"),
        ({"keep_heads": [0, 0]}, "duplicate"),
        ({"keep_heads": []}, "empty"),
        ({"keep_query": [8]}, "out of range"),
        ({"keep_key": [-1]}, "out of range"),
        ({"keep_out": [0.5]}, "integers"),
        ({"keep_value": [True]}, "integers"),
        ({"keep_out": torch.tensor([[0]])}, "1-D"),
        ({"keep_out": torch.ones(3, dtype=torch.bool)}, "bool mask"),
    ],
)
def test_from_mha_rejects_bad_indices(kw, match):
    with pytest.raises(ConfigError, match=match):
        PrunedMultiheadAttention.from_mha(make_mha(8, 2), **kw)


def test_constructor_validation_and_shapes():
    p = PrunedMultiheadAttention(5, 6, 7, 3, 4, 9, add_bias_kv=True, dtype=DT)
    assert p.q_proj_weight.shape == (12, 5)
    assert p.k_proj_weight.shape == (12, 6)
    assert p.v_proj_weight.shape == (12, 7)
    assert p.in_proj_bias.shape == (36,)
    assert p.bias_k.shape == p.bias_v.shape == (1, 1, 12)
    assert p.out_proj.weight.shape == (9, 12) and p.out_proj.bias.shape == (9,)
    assert p.in_proj_weight is None
    q, k, v = torch.randn(4, 2, 5, dtype=DT), torch.randn(6, 2, 6, dtype=DT), torch.randn(6, 2, 7, dtype=DT)
    out, w = p(q, k, v)
    assert out.shape == (4, 2, 9) and w.shape == (2, 4, 7)
    nb = PrunedMultiheadAttention(5, 6, 7, 3, 4, 9, bias=False)
    assert nb.in_proj_bias is None and nb.out_proj.bias is None and nb.bias_k is None
    for bad in ({"num_heads": 0}, {"head_dim": 0}, {"query_dim": -1}, {"out_dim": 2.0}, {"dropout": 1.5}):
        args = {"query_dim": 5, "key_dim": 6, "value_dim": 7, "num_heads": 3, "head_dim": 4, "out_dim": 9}
        args.update(bad)
        with pytest.raises(ConfigError):
            PrunedMultiheadAttention(**args)


@pytest.mark.parametrize("packed", [True, False])
def test_from_mha_copies_never_shares(packed):
    m = make_mha(8, 2, add_bias_kv=True, kdim=None if packed else 5)
    m.out_proj.weight.requires_grad_(False)
    m.train(False)
    p = PrunedMultiheadAttention.from_mha(m)
    src_ptrs = {t.untyped_storage().data_ptr() for t in m.parameters()}
    for t in p.parameters():
        assert t.untyped_storage().data_ptr() not in src_ptrs
    assert not p.training
    assert not p.out_proj.weight.requires_grad and p.q_proj_weight.requires_grad
    assert p.q_proj_weight.dtype == DT
    q, k, v, _ = make_inputs(m)
    before = p(q, k, v)[0].detach().clone()
    with torch.no_grad():
        for t in m.parameters():
            t.add_(1.0)
    close(p(q, k, v)[0], before)


def test_separate_in_and_out_bias_flags():
    m = make_mha(8, 2)
    m.out_proj.bias = None
    p = PrunedMultiheadAttention.from_mha(m, keep_heads=[0])
    assert p.in_proj_bias is not None and p.out_proj.bias is None
    q, k, v, _ = make_inputs(m)
    ref = masked_reference(m, drop_heads=[1])
    close(p(q, k, v)[0], ref(q, k, v)[0])


# ---------------------------------------------------------------------------------------------------------
# 3. training, gradients, fx, serialisation


def test_gradients_match_mha_keep_all():
    m = make_mha(8, 2, add_bias_kv=True)
    p = PrunedMultiheadAttention.from_mha(m)
    q, k, v, (L, S, N) = make_inputs(m)
    kw = {"key_padding_mask": as_float(kpm_bool(N, S)), "attn_mask": rand_float((L, S))}
    for nw in (True, False):
        m.zero_grad()
        p.zero_grad()
        (m(q, k, v, need_weights=nw, **kw)[0] ** 2).sum().backward()
        (p(q, k, v, need_weights=nw, **kw)[0] ** 2).sum().backward()
        g = m.in_proj_weight.grad
        close(p.q_proj_weight.grad, g[:8])
        close(p.k_proj_weight.grad, g[8:16])
        close(p.v_proj_weight.grad, g[16:])
        close(p.in_proj_bias.grad, m.in_proj_bias.grad)
        close(p.bias_k.grad, m.bias_k.grad)
        close(p.bias_v.grad, m.bias_v.grad)
        close(p.out_proj.weight.grad, m.out_proj.weight.grad)
        close(p.out_proj.bias.grad, m.out_proj.bias.grad)


def test_gradients_flow_pruned():
    m = make_mha(12, 4, kdim=5, vdim=7, add_bias_kv=True, batch_first=True)
    p = PrunedMultiheadAttention.from_mha(m, keep_heads=[0, 3], keep_query=[0, 1, 2], keep_key=[4], keep_out=[1, 2])
    q = torch.randn(2, 4, 3, dtype=DT, requires_grad=True)
    k = torch.randn(2, 6, 1, dtype=DT, requires_grad=True)
    v = torch.randn(2, 6, 7, dtype=DT, requires_grad=True)
    out, w = p(q, k, v)
    (out.sum() + w.sum()).backward()
    for name, t in list(p.named_parameters()) + [("q", q), ("k", k), ("v", v)]:
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_train_eval(need_weights):
    m = make_mha(8, 2, dropout=0.5)
    p = PrunedMultiheadAttention.from_mha(m)
    assert p.dropout == 0.5 and p.training
    q, k, v, _ = make_inputs(m)
    # training mode: same RNG draws as torch, so seeded runs agree exactly
    torch.manual_seed(123)
    ref = m(q, k, v, need_weights=need_weights)
    torch.manual_seed(123)
    got = p(q, k, v, need_weights=need_weights)
    close(got[0], ref[0])
    close(got[1], ref[1])
    torch.manual_seed(7)
    a = p(q, k, v, need_weights=need_weights)[0]
    b = p(q, k, v, need_weights=need_weights)[0]
    assert (a - b).abs().max() > 1e-6
    # eval: no dropout, deterministic, equals the dropout-free module
    p.eval()
    m.eval()
    a = p(q, k, v, need_weights=need_weights)[0]
    close(a, p(q, k, v, need_weights=need_weights)[0])
    close(a, m(q, k, v, need_weights=need_weights)[0])
    p.train()
    assert p.training


class _Wrapper(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.proj = nn.Linear(attn.out_dim, 3, dtype=DT)

    def forward(self, x, kpm):
        out, w = self.attn(x, x, x, key_padding_mask=kpm, need_weights=True)
        y = self.attn(x, x, x, need_weights=False)[0]
        return self.proj(out + y), w


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, PrunedMultiheadAttention) or super().is_leaf_module(m, qualname)


def test_fx_leaf_tracing():
    m = make_mha(12, 4, batch_first=True)
    w = _Wrapper(PrunedMultiheadAttention.from_mha(m, keep_heads=[1, 2], keep_out=[0, 5, 7])).eval()
    graph = _LeafTracer().trace(w)
    gm = torch.fx.GraphModule(w, graph)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "attn"]
    assert len(calls) == 2
    assert calls[0].kwargs["need_weights"] is True
    x = torch.randn(2, 5, 12, dtype=DT)
    kpm = kpm_bool(2, 5)
    ref = w(x, kpm)
    got = gm(x, kpm)
    close(got[0], ref[0])
    close(got[1], ref[1])
    assert isinstance(gm.attn, PrunedMultiheadAttention)


def test_state_dict_roundtrip_weights_only():
    m = make_mha(12, 4, kdim=5, vdim=7, add_bias_kv=True)
    p = PrunedMultiheadAttention.from_mha(m, keep_heads=[0, 2, 3], keep_value=[0, 2, 4, 6], keep_out=[1, 2, 3])
    sd = p.state_dict()
    assert set(sd) == {
        "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
        "bias_k", "bias_v", "out_proj.weight", "out_proj.bias",
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = PrunedMultiheadAttention(12, 5, 4, 3, 3, 3, add_bias_kv=True, dtype=DT)
    fresh.load_state_dict(loaded, strict=True)
    q = torch.randn(4, 2, 12, dtype=DT)
    k = torch.randn(6, 2, 5, dtype=DT)
    v = torch.randn(6, 2, 4, dtype=DT)
    close(fresh(q, k, v)[0], p(q, k, v)[0])
    close(fresh(q, k, v)[1], p(q, k, v)[1])


@pytest.mark.parametrize("keep_heads", [None, [0, 3]])
def test_drop_in_for_transformer_encoder_layer(keep_heads):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 4, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=DT).eval()
    x = torch.randn(2, 5, 8, dtype=DT)
    kpm = kpm_bool(2, 5)
    ref_layer = copy.deepcopy(layer)
    if keep_heads is not None:
        ref_layer.self_attn = masked_reference(layer.self_attn, drop_heads=[1, 2])
    layer.self_attn = PrunedMultiheadAttention.from_mha(layer.self_attn, keep_heads=keep_heads)
    with torch.no_grad():  # the reference may take torch's fused path; ours must fall back cleanly
        close(layer(x, src_key_padding_mask=kpm), ref_layer(x, src_key_padding_mask=kpm))
    close(layer(x, src_mask=causal(5), is_causal=True), ref_layer(x, src_mask=causal(5), is_causal=True))
