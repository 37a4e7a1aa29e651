"""Traceable stand-ins for torch's transformer containers, registered in :data:`fxprune.trace.TRACE_THROUGH`.

torch.fx keeps every torch.nn module whole, and the forwards of nn.TransformerEncoderLayer, nn.TransformerEncoder
and nn.Transformer cannot be traced through: they test tensor properties (``src.dim()``, ``src.is_nested``) to
pick a fused fast path or to detect a causal mask. The stand-ins below are their slow (reference) paths in eval
mode, so the symbolic trace reaches the attention (a rule leaf), the feed-forward Linear layers and the norms.
Masks are passed to the attention uncanonicalised (it canonicalises them itself, with the same result); an
``is_causal`` of None (torch would test the mask's values) becomes False, so the mask itself is applied, which is
the same function. Not reproduced: the nested-tensor fast path that eager eval-mode encoders take under
``no_grad`` with a key padding mask (it returns zeros at padded positions where the slow path returns values).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..trace import TRACE_THROUGH

__all__ = ["register_trace_through"]


def _encoder_layer_forward(m: nn.TransformerEncoderLayer, src: Tensor, src_mask: Optional[Tensor] = None,
                           src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _encoder_forward(m: nn.TransformerEncoder, src: Tensor, mask: Optional[Tensor] = None,
                     src_key_padding_mask: Optional[Tensor] = None, is_causal: Optional[bool] = None) -> Tensor:
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return m.norm(out) if m.norm is not None else out


def _decoder_forward(m: nn.TransformerDecoder, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                     memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                     memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                     memory_is_causal: bool = False) -> Tensor:
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return m.norm(out) if m.norm is not None else out


def _transformer_forward(m: nn.Transformer, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None,
                         tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                         src_key_padding_mask: Optional[Tensor] = None,
                         tgt_key_padding_mask: Optional[Tensor] = None,
                         memory_key_padding_mask: Optional[Tensor] = None, src_is_causal: Optional[bool] = None,
                         tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False) -> Tensor:
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def register_trace_through() -> None:
    """Make fxprune trace through torch's transformer containers (see the module docstring)."""
    TRACE_THROUGH.update({
        nn.TransformerEncoderLayer: _encoder_layer_forward,
        nn.TransformerEncoder: _encoder_forward,
        nn.TransformerDecoderLayer: None,  # its forward is traceable as it is
        nn.TransformerDecoder: _decoder_forward,
        nn.Transformer: _transformer_forward,
    })


register_trace_through()
