"""Hand-written Hugging Face-style transformers that symbolic tracing cannot capture (a Python check on a
sequence length, as Hugging Face models do), so fxprune takes them through torch.export: a BERT-style
encoder and a Llama-style decoder (RMSNorm written out, rotary embeddings, grouped-query attention through
``repeat_kv``, a causal mask, SwiGLU MLP). Used by the data-driven and front-end tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.intermediate = nn.Linear(d, ffn)
        self.output = nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, h, ext_mask):
        b, t, _ = h.shape
        q = self.query(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.key(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        v = self.value(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd) + ext_mask, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, t, self.heads * self.hd)
        h = self.ln1(h + self.attn_out(ctx))
        return self.ln2(h + self.output(F.gelu(self.intermediate(h))))


class TinyBert(nn.Module):
    """Embeddings + LayerNorm, BERT layers with a padding mask, mean-pooled sentence output."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, ffn: int = 64, layers: int = 2,
                 max_len: int = 16) -> None:
        super().__init__()
        self.max_len = max_len
        self.word = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.ModuleList(BertLayer(d, heads, ffn) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        if input_ids.shape[1] > self.max_len:  # Hugging Face-style length check: Python control flow
            raise ValueError("sequence too long")
        t = input_ids.shape[1]
        h = self.ln(self.word(input_ids) + self.pos(torch.arange(t, device=input_ids.device))[None])
        ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
        for layer in self.layers:
            h = layer(h, ext)
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


class RMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, as written there."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(dtype)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class LlamaLayer(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, d, bias=False)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.input_layernorm = RMSNorm(d)
        self.post_attention_layernorm = RMSNorm(d)

    def _repeat_kv(self, x):
        b, kv, t, hd = x.shape
        g = self.heads // self.kv
        return x[:, :, None, :, :].expand(b, kv, g, t, hd).reshape(b, kv * g, t, hd)

    def forward(self, h, cos, sin, mask):
        b, t, _ = h.shape
        x = self.input_layernorm(h)
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd) + mask, dim=-1)
        h = h + self.o_proj((att @ v).transpose(1, 2).reshape(b, t, -1))
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyLlama(nn.Module):
    """Token embedding, Llama layers (GQA 4:2), final RMSNorm, LM head; causal mask and rotary tables
    built at run time."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, kv_heads: int = 2, ffn: int = 64,
                 layers: int = 2, max_len: int = 16) -> None:
        super().__init__()
        self.max_len, self.hd = max_len, d // heads
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        if input_ids.shape[1] > self.max_len:
            raise ValueError("sequence too long")
        t = input_ids.shape[1]
        h = self.embed_tokens(input_ids)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = torch.triu(torch.full((t, t), -1e9), diagonal=1)[None, None]
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.lm_head(self.norm(h))


def train_briefly(model: nn.Module, batches, steps: int = 60, lr: float = 3e-3) -> nn.Module:
    """A few steps of a self-supervised objective so the weights carry structure a criterion can find
    (next-token prediction for the decoder, a fixed random projection of the mean embedding for the
    encoder). Deterministic for a fixed seed."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    proj = None
    for step in range(steps):
        batch = batches[step % len(batches)]
        if isinstance(model, TinyLlama):
            ids = batch
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        else:
            ids, mask = batch
            out = model(ids, mask)
            if proj is None:
                g = torch.Generator().manual_seed(1)
                proj = torch.randn(out.shape[-1], out.shape[-1], generator=g) / math.sqrt(out.shape[-1])
            target = torch.tanh(model.word(ids).mean(1).detach() @ proj)
            loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def token_batches(n: int, batch: int = 8, t: int = 12, vocab: int = 50, seed: int = 0, mask: bool = False):
    """Batches of token ids drawn from a small Markov chain (so there is something to learn), with
    right-padding attention masks when ``mask``."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(123)) * 3, -1)
    out = []
    for _ in range(n):
        ids = torch.zeros(batch, t, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for j in range(1, t):
            ids[:, j] = torch.multinomial(trans[ids[:, j - 1]], 1, generator=g)[:, 0]
        if mask:
            lengths = torch.randint(t // 2, t + 1, (batch,), generator=g)
            m = (torch.arange(t)[None] < lengths[:, None]).long()
            out.append((ids, m))
        else:
            out.append(ids)
    return out
