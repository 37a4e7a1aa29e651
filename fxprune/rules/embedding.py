"""Embeddings: integer indices in, one learned vector per index out.

:class:`EmbeddingCall` normalises ``nn.Embedding``, ``F.embedding(input, weight)`` and
``aten.embedding(weight, indices)``. Meaning: every dim of the indices passes to the output; the vector dim
is produced by the weight's columns (role ``"out"``); the vocabulary dim is free. Embeddings cost 0 MACs
(a lookup). A weight shared with an output head (tied embeddings) is one parameter: its columns are the
head's input channels too, so both prune together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import shape_of
from .base import RULES, RuleContext
from .calls import Bound, Family, aten_overloads, call_arg, layer_name, schema_args, weight_axis, weight_owner

__all__ = ["EmbeddingCall", "EmbeddingFamily", "EMBEDDING"]


@dataclass(frozen=True)
class EmbeddingCall:
    indices: fx.Node
    weight: Any  # parameter name (module spelling) or graph value


class EmbeddingFamily(Family):
    name = "embedding"

    def analyze(self, call: EmbeddingCall, node: fx.Node, rc: RuleContext) -> None:
        idx = call.indices
        if not rc.is_tensor(idx) or rc.out_shape() is None:
            return
        for d in range(len(rc.shape(idx))):
            rc.tie(rc.act(idx, d), rc.out(d))
        out = rc.out(-1)
        rc.produce(out, root=weight_owner(rc.gm, call.weight))
        rc.tie(out, weight_axis(rc, call.weight, 1, "out"))
        rc.free(weight_axis(rc, call.weight, 0, "other"))

    def fix_module(self, call, new, old, qualname, rw) -> None:
        new.embedding_dim = new.weight.shape[1]

    def macs(self, call, node, gm) -> int | None:
        return 0

    def produced_dim(self, call, node) -> int | None:
        os_ = shape_of(node)
        return None if os_ is None else len(os_) - 1

    def layer_kind(self, call, node, gm) -> str | None:
        return layer_name(node, gm, "Embedding")


EMBEDDING = EmbeddingFamily()


def bind_module(node: fx.Node, gm: fx.GraphModule) -> EmbeddingCall:
    return EmbeddingCall(call_arg(node, 0, "input"), f"{node.target}.weight")


def bind_function(node: fx.Node, gm: fx.GraphModule) -> EmbeddingCall | None:
    idx, w = call_arg(node, 0, "input"), call_arg(node, 1, "weight")
    return EmbeddingCall(idx, w) if isinstance(idx, fx.Node) and isinstance(w, fx.Node) else None


def bind_aten(node: fx.Node, gm: fx.GraphModule) -> EmbeddingCall | None:
    a = schema_args(node)
    idx, w = a["indices"], a["weight"]
    return EmbeddingCall(idx, w) if isinstance(idx, fx.Node) and isinstance(w, fx.Node) else None


RULES.register_module(nn.Embedding, Bound(EMBEDDING, bind_module, "embedding"))
RULES.register_function(F.embedding, Bound(EMBEDDING, bind_function, "F.embedding"))
RULES.register_function(aten_overloads("embedding"), Bound(EMBEDDING, bind_aten, "aten.embedding"))
