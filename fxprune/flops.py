"""Count multiply-accumulates (MACs) and parameters of a shape-propagated torch.fx graph.

fxprune reports **MACs, not FLOPs**: one multiply followed by one add is 1 MAC (about 2 FLOPs). The
counter reads torch's standard shape metadata ``node.meta["tensor_meta"]``, as written by
``torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*example_inputs)``. Input shapes come from the
``tensor_meta`` of a node's tensor arguments, output shapes from the node's own ``tensor_meta`` (the
first element when the node returns a tuple). A costed node whose metadata is missing raises
:class:`MissingShapeMetaError` (a ``ValueError``) naming the node; zero-cost nodes need no metadata.

Conventions (biases are never counted; every count is for one forward pass in eval mode):

* ``nn.Conv1d/2d/3d`` and ``F.conv1d/2d/3d``: ``out_numel * (in_channels // groups) * prod(kernel_size)``
  (read from the weight's shape ``(out, in/groups, *k)``, so strided, dilated, padded, grouped and
  depthwise convolutions all follow from the output shape).
* ``nn.ConvTranspose1d/2d/3d`` and ``F.conv_transpose1d/2d/3d``:
  ``in_numel * (out_channels // groups) * prod(kernel_size)``.
* ``nn.Linear`` (and subclasses, e.g. ``NonDynamicallyQuantizableLinear``) and ``F.linear``:
  ``out_numel * in_features``. ``nn.Bilinear`` / ``F.bilinear``: ``out_numel * in1_features * in2_features``.
* Normalisations, module or functional (``BatchNorm*``, ``SyncBatchNorm``, ``GroupNorm``, ``LayerNorm``,
  ``InstanceNorm*``, ``RMSNorm``; ``F.batch_norm/layer_norm/group_norm/instance_norm/rms_norm`` and their
  ``torch.*`` aliases): ``out_numel`` (one MAC per element for the normalise/affine step).
* Matrix products: ``torch.matmul``, ``operator.matmul`` (``@``), ``torch.mm/bmm/mv/dot`` and the
  ``Tensor.matmul/mm/bmm/mv/dot`` methods: ``out_numel * K`` where ``K`` is the contracted size (the last
  dim of the first operand). ``torch.addmm/baddbmm/addmv`` (function or method): the same, bias add free;
  ``torch.addbmm``: ``out_numel * batch * K``.
* ``nn.MultiheadAttention`` (a leaf module): per batch element, the q/k/v/out projections
  ``L*E*E + S*kdim*E + S*vdim*E + L*E*E`` plus ``L*S'*E`` for ``Q K^T`` and ``L*S'*E`` for ``A V``, where
  ``S' = S (+1 with add_bias_kv) (+1 with add_zero_attn)``. ``batch_first`` both ways and unbatched 2-D
  inputs are handled. Masks do not reduce the count (dense attention). fxprune's
  ``PrunedMultiheadAttention`` (when kept as a leaf) is counted the same way with its own widths:
  ``L*I*query_dim + S*I*key_dim + S*I*value_dim + L*out_dim*I + 2*L*S'*I`` with ``I = num_heads*head_dim``.
* ``F.scaled_dot_product_attention`` with q ``(..., L, E)``, k ``(..., S, E)``, v ``(..., S, Ev)``:
  ``batch*L*S*E + batch*L*S*Ev`` where ``batch = prod(out.shape[:-2])`` (so broadcasting and grouped-query
  attention count per query head). Causal masks do not reduce the count.
* ``nn.RNN/LSTM/GRU`` (per time step, batch element, layer and direction):
  ``gates * (in_l*H + H_r*H)`` plus ``H*proj_size`` for an LSTM projection, where gates is 1/4/3,
  ``H_r`` is ``proj_size`` or ``H``, and ``in_l`` is ``input_size`` for layer 0 else ``dirs*H_r``.
  ``nn.RNNCell/LSTMCell/GRUCell``: ``batch * gates * (input_size*H + H*H)``. Gate nonlinearities and
  elementwise gate arithmetic are free.
* ``nn.TransformerEncoderLayer/DecoderLayer``, ``nn.TransformerEncoder/Decoder`` and ``nn.Transformer``
  (leaf modules under ``symbolic_trace``): the sum of their attention blocks (as above), both
  feed-forward ``Linear`` layers and their norms (as above). Dropout is free.
* **Everything else is 0 MACs**: activations, softmax, elementwise arithmetic (``+``, ``*``, scaling),
  pooling (including adaptive/average pooling), upsampling, reshapes/views/concatenation, embeddings,
  dropout, and ``torch.einsum`` (not analysed; it is counted as 0). A leaf module with parameters that has
  no rule here (for example a user-defined leaf) is counted as 0 and its node name is listed in
  :attr:`Cost.uncounted` so that the caller can tell the total is a lower bound.

Parameters: the number of distinct parameter elements the graph uses, i.e. the parameters (recursively)
of every called leaf module plus every ``get_attr`` that resolves to an ``nn.Parameter`` (or to a module,
whose parameters are then all counted). A parameter shared between several modules or calls is counted
once (by identity). Buffers (BatchNorm running statistics, ...) are excluded.

Note on published figures: torchvision's ``Weights.meta["_ops"]`` counts convolution and linear MACs only.
Counting norms as above adds their output elements: about +0.1% on resnet18 (1.8166 vs 1.814 GMACs at
224x224) and about +2% on mobilenet_v2 (0.3075 vs 0.301 GMACs); the conv/linear subset matches.

Per-module attribution: a ``call_module`` node belongs to ``node.target``; any other node belongs to the
innermost entry of its ``node.meta["nn_module_stack"]`` (recorded by ``symbolic_trace``), or to the root
``""`` when there is none. MACs of repeated calls to one module are summed.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from fxprune.errors import FxpruneError, node_location

__all__ = ["Cost", "MissingShapeMetaError", "count_cost", "node_macs", "module_owner"]


class MissingShapeMetaError(FxpruneError, ValueError):
    """A costed node (or one of its tensor arguments) carries no ``tensor_meta``."""


@dataclass(frozen=True)
class Cost:
    """MACs and parameter count of a graph (see the module docstring for the conventions)."""

    macs: int
    params: int
    per_node: dict[str, int]
    per_module: dict[str, int]
    #: names of call_module nodes whose module owns parameters but has no MAC rule (counted as 0)
    uncounted: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------------
# shape helpers


def _fail(node: torch.fx.Node, what: str) -> MissingShapeMetaError:
    msg = (
        f"node '{node.name}' ({node.op} {_target_name(node)}): no shape metadata for {what}; "
        "run torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*example_inputs) before counting MACs"
    )
    where = node_location(node)
    if where:
        msg += f"\n  at {where}"
    return MissingShapeMetaError(msg)


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        if not hasattr(obj, atom):
            raise AttributeError(f"get_attr target '{target}' does not exist on the module")
        obj = getattr(obj, atom)
    return obj


def _first_meta(meta: Any) -> TensorMetadata | None:
    """The TensorMetadata itself, or the first one found in a (nested) tuple/list of them."""
    if isinstance(meta, TensorMetadata):
        return meta
    if isinstance(meta, (tuple, list)):
        for m in meta:
            found = _first_meta(m)
            if found is not None:
                return found
    return None


def _value_shape(gm: torch.fx.GraphModule, node: torch.fx.Node, value: Any, what: str) -> tuple[int, ...]:
    """Shape of the tensor argument ``value`` of ``node`` (a Node with tensor_meta, or a tensor)."""
    if isinstance(value, torch.fx.Node):
        meta = value.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return tuple(int(d) for d in meta.shape)
        if value.op == "get_attr":
            attr = _fetch_attr(gm, str(value.target))
            if isinstance(attr, torch.Tensor):
                return tuple(attr.shape)
        raise _fail(node, f"{what} (argument node '{value.name}')")
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    raise _fail(node, f"{what} (argument {value!r} is not a tensor)")


def _out_shape(node: torch.fx.Node) -> tuple[int, ...]:
    meta = _first_meta(node.meta.get("tensor_meta"))
    if meta is None:
        raise _fail(node, "its output")
    return tuple(int(d) for d in meta.shape)


def _arg(node: torch.fx.Node, index: int, name: str) -> Any:
    if index < len(node.args):
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    raise _fail(node, f"argument '{name}' (not passed)")


def _in_shape(gm: torch.fx.GraphModule, node: torch.fx.Node, index: int, name: str) -> tuple[int, ...]:
    return _value_shape(gm, node, _arg(node, index, name), f"argument '{name}'")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


# ---------------------------------------------------------------------------------------------------
# module rules

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_MODULES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._BatchNorm,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.modules.instancenorm._InstanceNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)
# modules that own parameters but legitimately cost 0 MACs under our conventions
_ZERO_WITH_PARAMS: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag, nn.PReLU)


def _weight_shape(mod: nn.Module) -> tuple[int, ...]:
    return tuple(mod.weight.shape)


def _conv_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, mod: nn.Module) -> int:
    w = _weight_shape(mod)  # (out, in/groups, *k)
    return _numel(_out_shape(node)) * w[1] * _numel(w[2:])


def _conv_t_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, mod: nn.Module) -> int:
    w = _weight_shape(mod)  # (in, out/groups, *k)
    return _numel(_in_shape(gm, node, 0, "input")) * w[1] * _numel(w[2:])


def _attention_types() -> tuple[type, ...]:
    """nn.MultiheadAttention plus fxprune's PrunedMultiheadAttention (imported lazily, if importable)."""
    try:
        from fxprune.modules import PrunedMultiheadAttention
    except ImportError:  # pragma: no cover - only while fxprune.modules is unavailable
        return (nn.MultiheadAttention,)
    return (nn.MultiheadAttention, PrunedMultiheadAttention)


def _attention_core(batch: int, L: int, S: int, mha: nn.Module) -> int:
    """MACs of one attention call with ``batch`` sequences of L queries and S keys/values.

    Widths are read from the projection weights, so this covers nn.MultiheadAttention (packed or
    separate q/k/v projections, where it reduces to the formula in the module docstring) and
    PrunedMultiheadAttention (inner width ``num_heads * head_dim`` independent of the input widths).
    """
    if getattr(mha, "in_proj_weight", None) is not None:
        rows, cols = tuple(mha.in_proj_weight.shape)
        wq = wk = wv = (rows // 3, cols)
    else:
        wq = tuple(mha.q_proj_weight.shape)
        wk = tuple(mha.k_proj_weight.shape)
        wv = tuple(mha.v_proj_weight.shape)
    wo = _weight_shape(mha.out_proj)
    s_att = S + (1 if getattr(mha, "bias_k", None) is not None else 0) + (1 if mha.add_zero_attn else 0)
    proj = L * _numel(wq) + S * _numel(wk) + S * _numel(wv) + L * _numel(wo)
    attn = L * s_att * wq[0] + L * s_att * wv[0]  # Q K^T and A V, summed over heads
    return batch * (proj + attn)


def _seq_dims(shape: tuple[int, ...], batch_first: bool) -> tuple[int, int]:
    """(batch, length) of a (N, L, C) / (L, N, C) / unbatched (L, C) sequence tensor."""
    if len(shape) == 2:
        return 1, shape[0]
    if len(shape) == 3:
        return (shape[0], shape[1]) if batch_first else (shape[1], shape[0])
    raise ValueError(f"expected a 2-D or 3-D sequence tensor, got shape {shape}")


def _mha_macs_from_shapes(
    mha: nn.Module, q: tuple[int, ...], k: tuple[int, ...], batch_first: bool
) -> int:
    n, L = _seq_dims(q, batch_first)
    _, S = _seq_dims(k, batch_first)
    return _attention_core(n, L, S, mha)


def _mha_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, mod: nn.Module) -> int:
    q = _in_shape(gm, node, 0, "query")
    k = _in_shape(gm, node, 1, "key")
    _in_shape(gm, node, 2, "value")  # must exist; its length equals the key's
    return _mha_macs_from_shapes(mod, q, k, bool(mod.batch_first))


def _norm_elems(norm: nn.Module | None, tokens: int, d: int) -> int:
    return tokens * d if isinstance(norm, _NORM_MODULES) else 0


def _ffn_macs(layer: nn.Module, tokens: int) -> int:
    return tokens * (_numel(_weight_shape(layer.linear1)) + _numel(_weight_shape(layer.linear2)))


def _enc_layer_macs(layer: nn.TransformerEncoderLayer, src: tuple[int, ...], batch_first: bool) -> int:
    d = src[-1]
    tokens = _numel(src[:-1])
    return (
        _mha_macs_from_shapes(layer.self_attn, src, src, batch_first)
        + _ffn_macs(layer, tokens)
        + _norm_elems(layer.norm1, tokens, d)
        + _norm_elems(layer.norm2, tokens, d)
    )


def _dec_layer_macs(
    layer: nn.TransformerDecoderLayer, tgt: tuple[int, ...], mem: tuple[int, ...], batch_first: bool
) -> int:
    d = tgt[-1]
    tokens = _numel(tgt[:-1])
    return (
        _mha_macs_from_shapes(layer.self_attn, tgt, tgt, batch_first)
        + _mha_macs_from_shapes(layer.multihead_attn, tgt, mem, batch_first)
        + _ffn_macs(layer, tokens)
        + _norm_elems(layer.norm1, tokens, d)
        + _norm_elems(layer.norm2, tokens, d)
        + _norm_elems(layer.norm3, tokens, d)
    )


def _encoder_macs(enc: nn.TransformerEncoder, src: tuple[int, ...]) -> int:
    total = 0
    for layer in enc.layers:
        total += _enc_layer_macs(layer, src, bool(layer.self_attn.batch_first))
    return total + _norm_elems(enc.norm, _numel(src[:-1]), src[-1])


def _decoder_macs(dec: nn.TransformerDecoder, tgt: tuple[int, ...], mem: tuple[int, ...]) -> int:
    total = 0
    for layer in dec.layers:
        total += _dec_layer_macs(layer, tgt, mem, bool(layer.self_attn.batch_first))
    return total + _norm_elems(dec.norm, _numel(tgt[:-1]), tgt[-1])


def _transformer_module_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, mod: nn.Module) -> int | None:
    if isinstance(mod, nn.TransformerEncoderLayer):
        return _enc_layer_macs(mod, _in_shape(gm, node, 0, "src"), bool(mod.self_attn.batch_first))
    if isinstance(mod, nn.TransformerDecoderLayer):
        tgt = _in_shape(gm, node, 0, "tgt")
        mem = _in_shape(gm, node, 1, "memory")
        return _dec_layer_macs(mod, tgt, mem, bool(mod.self_attn.batch_first))
    if isinstance(mod, nn.TransformerEncoder):
        return _encoder_macs(mod, _in_shape(gm, node, 0, "src"))
    if isinstance(mod, nn.TransformerDecoder):
        return _decoder_macs(mod, _in_shape(gm, node, 0, "tgt"), _in_shape(gm, node, 1, "memory"))
    if isinstance(mod, nn.Transformer):
        src = _in_shape(gm, node, 0, "src")
        tgt = _in_shape(gm, node, 1, "tgt")
        # the encoder output (memory) has the source's shape
        return _encoder_macs(mod.encoder, src) + _decoder_macs(mod.decoder, tgt, src)
    return None


_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1, nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def _gates(mod: nn.Module) -> int:
    for t, g in _GATES.items():
        if isinstance(mod, t):
            return g
    raise TypeError(type(mod))


def _rnn_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, mod: nn.RNNBase) -> int:
    x = _in_shape(gm, node, 0, "input")
    n, steps = _seq_dims(x, bool(mod.batch_first))
    g = _gates(mod)
    H = int(mod.hidden_size)
    P = int(getattr(mod, "proj_size", 0) or 0)
    h_r = P if P > 0 else H
    dirs = 2 if mod.bidirectional else 1
    per_step = 0
    for layer in range(int(mod.num_layers)):
        in_l = int(mod.input_size) if layer == 0 else dirs * h_r
        per_step += dirs * (g * (in_l * H + h_r * H) + H * P)
    return n * steps * per_step


def _rnn_cell_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, mod: nn.RNNCellBase) -> int:
    x = _in_shape(gm, node, 0, "input")
    n = x[0] if len(x) == 2 else 1
    H = int(mod.hidden_size)
    return n * _gates(mod) * (int(mod.input_size) * H + H * H)


def _module_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, mod: nn.Module) -> int | None:
    """MACs of a call to ``mod``, or None when no rule applies."""
    if isinstance(mod, _CONV_T):
        return _conv_t_macs(gm, node, mod)
    if isinstance(mod, _CONV):
        return _conv_macs(gm, node, mod)
    if isinstance(mod, nn.Linear):
        return _numel(_out_shape(node)) * _weight_shape(mod)[1]
    if isinstance(mod, nn.Bilinear):
        w = _weight_shape(mod)  # (out, in1, in2)
        return _numel(_out_shape(node)) * w[1] * w[2]
    if isinstance(mod, _NORM_MODULES):
        return _numel(_out_shape(node))
    if isinstance(mod, _attention_types()):
        return _mha_macs(gm, node, mod)
    if isinstance(mod, nn.RNNBase):
        return _rnn_macs(gm, node, mod)
    if isinstance(mod, nn.RNNCellBase):
        return _rnn_cell_macs(gm, node, mod)
    return _transformer_module_macs(gm, node, mod)


# ---------------------------------------------------------------------------------------------------
# function / method rules

_Rule = Callable[[torch.fx.GraphModule, torch.fx.Node], int]


def _matmul_rule(a_index: int, a_name: str, batch_sum: bool = False) -> _Rule:
    def rule(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
        a = _in_shape(gm, node, a_index, a_name)
        macs = _numel(_out_shape(node)) * (a[-1] if a else 1)
        if batch_sum:  # addbmm sums the batch of products into one matrix
            macs *= a[0]
        return macs

    return rule


def _linear_fn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    return _numel(_out_shape(node)) * _in_shape(gm, node, 0, "input")[-1]


def _bilinear_fn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    w = _in_shape(gm, node, 2, "weight")
    return _numel(_out_shape(node)) * w[1] * w[2]


def _conv_fn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    w = _in_shape(gm, node, 1, "weight")
    return _numel(_out_shape(node)) * w[1] * _numel(w[2:])


def _conv_t_fn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    w = _in_shape(gm, node, 1, "weight")
    return _numel(_in_shape(gm, node, 0, "input")) * w[1] * _numel(w[2:])


def _norm_fn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    return _numel(_out_shape(node))


def _sdpa_fn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    q = _in_shape(gm, node, 0, "query")
    k = _in_shape(gm, node, 1, "key")
    v = _in_shape(gm, node, 2, "value")
    batch = _numel(_out_shape(node)[:-2])
    L, E, S, Ev = q[-2], q[-1], k[-2], v[-1]
    return batch * L * S * E + batch * L * S * Ev


def _zero(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    return 0


_FUNCTION_RULES: dict[Any, _Rule] = {}


def _register(fns: Sequence[Any], rule: _Rule) -> None:
    for fn in fns:
        if fn is not None:
            _FUNCTION_RULES[fn] = rule


_T = torch.Tensor
_register([torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.mv, torch.dot], _matmul_rule(0, "input"))
_register([_T.matmul, _T.mm, _T.bmm, _T.mv, _T.dot, _T.__matmul__], _matmul_rule(0, "input"))
_register([torch.addmm, torch.baddbmm, torch.addmv, _T.addmm, _T.baddbmm, _T.addmv], _matmul_rule(1, "mat1"))
_register([torch.addbmm, _T.addbmm], _matmul_rule(1, "batch1", batch_sum=True))
_register([F.linear], _linear_fn)
_register([F.bilinear, torch.bilinear], _bilinear_fn)
_register([F.conv1d, F.conv2d, F.conv3d], _conv_fn)
_register([F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d], _conv_t_fn)
_register(
    [
        F.batch_norm,
        F.layer_norm,
        F.group_norm,
        F.instance_norm,
        getattr(F, "rms_norm", None),
        torch.batch_norm,
        torch.layer_norm,
        torch.group_norm,
        torch.instance_norm,
        getattr(torch, "rms_norm", None),
    ],
    _norm_fn,
)
_register([F.scaled_dot_product_attention], _sdpa_fn)
_register([torch.einsum], _zero)  # documented: einsum is not analysed

_METHOD_RULES: dict[str, _Rule] = {
    "matmul": _matmul_rule(0, "self"),
    "__matmul__": _matmul_rule(0, "self"),
    "mm": _matmul_rule(0, "self"),
    "bmm": _matmul_rule(0, "self"),
    "mv": _matmul_rule(0, "self"),
    "dot": _matmul_rule(0, "self"),
    "addmm": _matmul_rule(1, "mat1"),
    "baddbmm": _matmul_rule(1, "batch1"),
    "addmv": _matmul_rule(1, "mat"),
    "addbmm": _matmul_rule(1, "batch1", batch_sum=True),
}


# ---------------------------------------------------------------------------------------------------
# public API


def node_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    """MACs of one node of ``gm`` (0 for ops without a rule; see the module docstring).

    Raises :class:`MissingShapeMetaError` (a ``ValueError``) when a costed node lacks ``tensor_meta``.
    """
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        macs = _module_macs(gm, node, mod)
        return int(macs or 0)
    if node.op == "call_function":
        try:
            rule = _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            rule = None
        return int(rule(gm, node)) if rule is not None else 0
    if node.op == "call_method":
        rule = _METHOD_RULES.get(str(node.target))
        return int(rule(gm, node)) if rule is not None else 0
    return 0


def module_owner(node: torch.fx.Node) -> str:
    """Qualified name of the module a node belongs to ('' for the root); see the module docstring."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        if isinstance(last, (tuple, list)) and last:
            return str(last[0])
        return str(list(stack.keys())[-1])
    return ""


def _is_uncounted(mod: nn.Module) -> bool:
    if isinstance(mod, _ZERO_WITH_PARAMS):
        return False
    return next(mod.parameters(), None) is not None


def count_cost(gm: torch.fx.GraphModule) -> Cost:
    """Total MACs, distinct parameter count and per-node / per-module MACs of ``gm``."""
    per_node: dict[str, int] = {}
    per_module: dict[str, int] = {}
    uncounted: list[str] = []
    seen: dict[int, int] = {}  # id(parameter) -> numel

    def add_params(params: Any) -> None:
        for p in params:
            seen.setdefault(id(p), p.numel())

    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            add_params(mod.parameters())
            macs = _module_macs(gm, node, mod)
            if macs is None:
                if _is_uncounted(mod):
                    uncounted.append(node.name)
                macs = 0
        elif node.op == "get_attr":
            attr = _fetch_attr(gm, str(node.target))
            if isinstance(attr, nn.Parameter):
                add_params([attr])
            elif isinstance(attr, nn.Module):
                add_params(attr.parameters())
            macs = 0
        else:
            macs = node_macs(gm, node)
        if macs:
            per_node[node.name] = int(macs)
            owner = module_owner(node)
            per_module[owner] = per_module.get(owner, 0) + int(macs)

    return Cost(
        macs=sum(per_node.values()),
        params=sum(seen.values()),
        per_node=per_node,
        per_module=per_module,
        uncounted=tuple(uncounted),
    )
