"""Count multiply-accumulates (MACs) and parameters of a shape-propagated torch.fx graph.

fxprune reports **MACs, not FLOPs**: one multiply followed by one add is 1 MAC (about 2 FLOPs). The
counter reads torch's standard shape metadata ``node.meta["tensor_meta"]``, as written by
``torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*example_inputs)``. Input shapes come from the
``tensor_meta`` of a node's tensor arguments, output shapes from the node's own ``tensor_meta`` (the
first element when the node returns a tuple). A costed node whose metadata is missing raises
:class:`~fxprune.errors.MissingShapeMetaError` (a ``ValueError``) naming the node; zero-cost nodes need no
metadata.

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

Where the formulas live: each op family owns its formula (:meth:`fxprune.rules.base.Rule.macs`, written
once for every spelling of the op: module, function, method, ATen overload), so the counter is the same on
graphs of every front end; this module only walks the graph.

Per-module attribution: a ``call_module`` node belongs to ``node.target``; any other node belongs to the
innermost entry of its ``node.meta["nn_module_stack"]`` (recorded by ``symbolic_trace``), or to the root
``""`` when there is none. MACs of repeated calls to one module are summed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from .errors import MissingShapeMetaError, node_location
from .rules import RULES, RuleTable
from .rules.axes import submodule

__all__ = ["Cost", "MissingShapeMetaError", "count_cost", "node_macs", "module_owner"]


@dataclass(frozen=True)
class Cost:
    """MACs and parameter count of a graph (see the module docstring for the conventions)."""

    macs: int
    params: int
    per_node: dict[str, int]
    per_module: dict[str, int]
    #: names of call_module nodes whose module owns parameters but has no MAC rule (counted as 0)
    uncounted: tuple[str, ...] = field(default=())


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)


def _fail(node: torch.fx.Node, what: str) -> MissingShapeMetaError:
    msg = (f"node '{node.name}' ({node.op} {_target_name(node)}): no shape metadata for {what}; "
           "run torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*example_inputs) before counting MACs")
    where = node_location(node)
    return MissingShapeMetaError(msg + (f"\n  at {where}" if where else ""))


def _check_meta(node: torch.fx.Node) -> None:
    """A costed node and its tensor operands must carry shape metadata (get_attr operands excepted: their
    shapes come from the module)."""
    if node.meta.get("tensor_meta") is None:
        raise _fail(node, "its output")
    for x in node.all_input_nodes:
        if x.op != "get_attr" and x.meta.get("tensor_meta") is None and "val" not in x.meta \
                and x.meta.get("fxprune.value") is None:
            raise _fail(node, f"argument node '{x.name}'")


def node_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, rules: RuleTable = RULES) -> int:
    """MACs of one node of ``gm`` (0 for ops without a formula; see the module docstring).

    Raises :class:`~fxprune.errors.MissingShapeMetaError` (a ``ValueError``) when a costed node lacks
    ``tensor_meta``.
    """
    if node.op not in ("call_module", "call_function", "call_method"):
        return 0
    return _rule_macs(gm, node, rules.lookup(gm, node))


def _rule_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, rule: Any) -> int:
    """:func:`node_macs` with the node's rule already looked up."""
    if rule is None:
        return 0
    macs = rule.macs(node, gm)
    if macs is None and rule.has_macs():
        _check_meta(node)
    return int(macs or 0)


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


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        if not hasattr(obj, atom):
            raise AttributeError(f"get_attr target '{target}' does not exist on the module")
        obj = getattr(obj, atom)
    return obj


def _params(mod: nn.Module) -> list[torch.Tensor]:
    """``list(mod.parameters())``, without the generator machinery for a module with no submodules."""
    if not mod._modules:
        return [p for p in mod._parameters.values() if p is not None]
    return list(mod.parameters())


def count_cost(gm: torch.fx.GraphModule, rules: RuleTable = RULES) -> Cost:
    """Total MACs, distinct parameter count and per-node / per-module MACs of ``gm``."""
    per_node: dict[str, int] = {}
    per_module: dict[str, int] = {}
    uncounted: list[str] = []
    seen: dict[int, int] = {}  # id(parameter) -> numel

    def add_params(params: Any) -> None:
        for p in params:
            seen.setdefault(id(p), p.numel())

    for node in gm.graph.nodes:
        macs = 0
        if node.op == "call_module":
            mod = submodule(gm, str(node.target))
            params = _params(mod)
            add_params(params)
            rule = rules.lookup(gm, node)
            if rule is None or not rule.has_macs():
                if params:
                    uncounted.append(node.name)
            else:
                macs = _rule_macs(gm, node, rule)
        elif node.op == "get_attr":
            attr = _fetch_attr(gm, str(node.target))
            if isinstance(attr, nn.Parameter):
                add_params([attr])
            elif isinstance(attr, nn.Module):
                add_params(attr.parameters())
        else:
            macs = node_macs(gm, node, rules)
        if macs:
            per_node[node.name] = int(macs)
            owner = module_owner(node)
            per_module[owner] = per_module.get(owner, 0) + int(macs)

    return Cost(macs=sum(per_node.values()), params=sum(seen.values()), per_node=per_node, per_module=per_module,
                uncounted=tuple(uncounted))
