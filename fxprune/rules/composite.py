"""Layers fxprune keeps whole: recurrent layers, ``nn.Bilinear``, and the ``nn.Transformer*`` containers.

Their channels are pinned (every dim they touch stays: exact, never a guess); they carry their cost so the
MACs of a graph that holds them are complete. The ``nn.Transformer*`` containers are traced through when
fxprune captures a model (their parts have rules: see :mod:`fxprune.modules`); their rules describe them
only where they are already leaves of a given graph (``fxprune.count_cost`` on a plain
``torch.fx.symbolic_trace``).

MACs (per time step, batch element, layer and direction for recurrent layers):
``gates * (in_l*H + H_r*H)`` plus ``H*proj_size`` for an LSTM projection (gates 1/4/3 for RNN/LSTM/GRU,
``H_r`` = ``proj_size`` or ``H``, ``in_l`` = ``input_size`` for layer 0 else ``dirs*H_r``); cells:
``batch * gates * (input_size*H + H*H)``; ``nn.Bilinear``: ``out_numel * in1 * in2``; transformer layers:
their attention blocks, both feed-forward layers and their norms.
"""

from __future__ import annotations

import math

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import shape_of
from .attention import mha_macs
from .base import RULES, Rule, RuleContext

__all__ = ["KeptWhole", "RECURRENT_GATES"]

RECURRENT_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1, nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def _gates(mod: nn.Module) -> int:
    return next(g for t, g in RECURRENT_GATES.items() if isinstance(mod, t))


def _seq(shape: tuple[int, ...], batch_first: bool) -> tuple[int, int]:
    if len(shape) == 2:
        return 1, shape[0]
    return (shape[0], shape[1]) if batch_first else (shape[1], shape[0])


def _rnn_macs(mod: nn.RNNBase, x: tuple[int, ...]) -> int:
    n, steps = _seq(x, bool(mod.batch_first))
    g, H = _gates(mod), int(mod.hidden_size)
    P = int(getattr(mod, "proj_size", 0) or 0)
    h_r = P if P > 0 else H
    dirs = 2 if mod.bidirectional else 1
    per_step = 0
    for layer in range(int(mod.num_layers)):
        in_l = int(mod.input_size) if layer == 0 else dirs * h_r
        per_step += dirs * (g * (in_l * H + h_r * H) + H * P)
    return n * steps * per_step


def _norm(norm: nn.Module | None, tokens: int, d: int) -> int:
    return tokens * d if isinstance(norm, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) else 0


def _ffn(layer: nn.Module, tokens: int) -> int:
    return tokens * (layer.linear1.weight.numel() + layer.linear2.weight.numel())


def _enc_layer(layer: nn.TransformerEncoderLayer, src: tuple[int, ...]) -> int:
    d, tokens = src[-1], math.prod(src[:-1])
    bf = bool(layer.self_attn.batch_first)
    return mha_macs(layer.self_attn, src, src, bf) + _ffn(layer, tokens) + _norm(layer.norm1, tokens, d) \
        + _norm(layer.norm2, tokens, d)


def _dec_layer(layer: nn.TransformerDecoderLayer, tgt: tuple[int, ...], mem: tuple[int, ...]) -> int:
    d, tokens = tgt[-1], math.prod(tgt[:-1])
    bf = bool(layer.self_attn.batch_first)
    return (mha_macs(layer.self_attn, tgt, tgt, bf) + mha_macs(layer.multihead_attn, tgt, mem, bf)
            + _ffn(layer, tokens) + sum(_norm(n, tokens, d) for n in (layer.norm1, layer.norm2, layer.norm3)))


def _encoder(enc: nn.TransformerEncoder, src: tuple[int, ...]) -> int:
    return sum(_enc_layer(layer, src) for layer in enc.layers) + _norm(enc.norm, math.prod(src[:-1]), src[-1])


def _decoder(dec: nn.TransformerDecoder, tgt: tuple[int, ...], mem: tuple[int, ...]) -> int:
    return sum(_dec_layer(layer, tgt, mem) for layer in dec.layers) + _norm(dec.norm, math.prod(tgt[:-1]), tgt[-1])


def _arg_shape(node: fx.Node, pos: int, name: str) -> tuple[int, ...] | None:
    v = node.args[pos] if pos < len(node.args) else node.kwargs.get(name)
    return shape_of(v)


class KeptWhole(Rule):
    """A layer whose channels all stay (see the module docstring); ``leaf=False`` for layers fxprune traces
    through when it captures a model itself."""

    def __init__(self, name: str, leaf: bool = True) -> None:
        self.name = name
        self.leaf = leaf  # type: ignore[misc]

    def analyze(self, node, rc: RuleContext) -> None:
        return  # RuleContext.finish() pins every dim the layer touches; its parameters never shrink

    def macs(self, node, gm) -> int | None:
        mod = gm.get_submodule(str(node.target))
        x = _arg_shape(node, 0, "input")
        if isinstance(mod, nn.RNNBase):
            return None if x is None else _rnn_macs(mod, x)
        if isinstance(mod, nn.RNNCellBase):
            return None if x is None else (x[0] if len(x) == 2 else 1) * _gates(mod) * (
                int(mod.input_size) * int(mod.hidden_size) + int(mod.hidden_size) ** 2)
        if isinstance(mod, nn.Bilinear):
            out = shape_of(node)
            return None if out is None else math.prod(out) * mod.weight.shape[1] * mod.weight.shape[2]
        if isinstance(mod, nn.TransformerEncoderLayer):
            src = _arg_shape(node, 0, "src")
            return None if src is None else _enc_layer(mod, src)
        if isinstance(mod, nn.TransformerDecoderLayer):
            tgt, mem = _arg_shape(node, 0, "tgt"), _arg_shape(node, 1, "memory")
            return None if tgt is None or mem is None else _dec_layer(mod, tgt, mem)
        if isinstance(mod, nn.TransformerEncoder):
            src = _arg_shape(node, 0, "src")
            return None if src is None else _encoder(mod, src)
        if isinstance(mod, nn.TransformerDecoder):
            tgt, mem = _arg_shape(node, 0, "tgt"), _arg_shape(node, 1, "memory")
            return None if tgt is None or mem is None else _decoder(mod, tgt, mem)
        if isinstance(mod, nn.Transformer):
            src, tgt = _arg_shape(node, 0, "src"), _arg_shape(node, 1, "tgt")
            return None if src is None or tgt is None else _encoder(mod.encoder, src) + _decoder(mod.decoder, tgt, src)
        return None

    def layer_kind(self, node, gm) -> str | None:
        return type(gm.get_submodule(str(node.target))).__name__


class _BilinearFn(Rule):
    name = "F.bilinear"

    def analyze(self, node, rc: RuleContext) -> None:
        return

    def macs(self, node, gm) -> int | None:
        out, w = shape_of(node), _arg_shape(node, 2, "weight")
        return None if out is None or w is None else math.prod(out) * w[1] * w[2]


RULES.register_module((nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell), KeptWhole("recurrent"))
RULES.register_module(nn.Bilinear, KeptWhole("bilinear"))
RULES.register_module((nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                       nn.TransformerDecoder, nn.Transformer), KeptWhole("transformer", leaf=False))
RULES.register_function(F.bilinear, _BilinearFn())
