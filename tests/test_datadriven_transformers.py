"""Data-driven pruning of Hugging Face-style transformers captured by torch.export (a BERT-style encoder
and a Llama-style decoder, tests/transformer_models.py): ThiNet + least-squares refit prunes the requested
ratio of heads and MLP width and has a lower held-out output error than plain L2 magnitude."""

from __future__ import annotations

import pytest
import torch

import fxprune
from transformer_models import TinyBert, TinyLlama, token_batches, train_briefly


def _setup(kind: str):
    torch.manual_seed(0)
    mask = kind == "bert"
    model = train_briefly((TinyBert if mask else TinyLlama)(), token_batches(20, mask=mask, seed=1))
    calib = token_batches(4, mask=mask, seed=2)
    held = token_batches(4, mask=mask, seed=3)
    example = tuple(x[:1] for x in calib[0]) if mask else (calib[0][:1],)  # a batch of one, as users pass it
    return model, example, calib, held


def held_out_error(model, pruned, held) -> float:
    """‖y_pruned − y‖² / ‖y − mean(y)‖² over held-out batches (other sentences than the calibration's)."""
    num = den = 0.0
    with torch.no_grad():
        for b in held:
            args = b if isinstance(b, tuple) else (b,)
            y0, y1 = model(*args), pruned(*args)
            num += float(((y1 - y0) ** 2).sum())
            den += float(((y0 - y0.mean()) ** 2).sum())
    return num / den


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_thinet_lstsq_beats_l2_on_exported_transformers(kind):
    model, example, calib, held = _setup(kind)
    l2 = fxprune.compile(model, example, importance="l2", ratio=0.5)
    th = fxprune.compile(model, example, importance="thinet", ratio=0.5, calib=calib, reconstruct="lstsq")
    for res in (l2, th):
        assert res.report.notes and "torch.export" in res.report.notes[0]  # really the export path
        p = dict(res.module.named_parameters())
        if kind == "bert":
            assert p["layers.0.query.weight"].shape == (16, 32)  # 4 -> 2 heads of 8
            assert p["layers.0.attn_out.weight"].shape == (32, 16)
            assert p["layers.1.intermediate.weight"].shape == (32, 32)  # FFN 64 -> 32
        else:
            assert p["layers.0.q_proj.weight"].shape == (16, 32)  # GQA 4:2 -> 2:1, whole kv-groups
            assert p["layers.0.k_proj.weight"].shape == (8, 32)
            assert p["layers.1.up_proj.weight"].shape == (32, 32) and p["layers.1.gate_proj.weight"].shape == (32, 32)
    assert th.reconstruction and all(after <= before + 1e-9 for before, after in th.reconstruction.values())
    e_l2, e_th = held_out_error(model, l2.module, held), held_out_error(model, th.module, held)
    assert e_th < e_l2, (e_th, e_l2)
    assert e_th < 0.5 * e_l2  # the refit recovers most of the error (measured: bert 0.07 vs 0.30, llama 0.06 vs 0.16)


def test_hidden_size_behind_rms_norm_is_reported_and_prunable_when_lossy_is_allowed():
    model, example, calib, held = _setup("llama")
    res = fxprune.compile(model, example, ratio=0.5)
    assert any("allow_lossy" in why for _, why in res.report.blocked)  # the written-out RMSNorm's mean
    lossy = fxprune.compile(model, example, ratio=0.5, allow_lossy=True)
    p = dict(lossy.module.named_parameters())
    assert p["embed_tokens.weight"].shape == (50, 16) and p["norm.weight"].shape == (16,)
    assert any("lossy" in n for n in lossy.report.notes)
    assert lossy.module(*example).shape == model(*example).shape
