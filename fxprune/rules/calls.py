"""Binders: from one spelling of an op (module, torch function, Tensor method, ATen overload) to its
family's normalised call record, and the helpers every binder shares.

A family (one file of :mod:`fxprune.rules`) writes its meaning once, as methods taking a call record; a
:class:`Bound` rule pairs that family with one binder ``(node, gm) -> record | None`` and is what the rule
table stores. ``None`` from a binder means "this call is outside what the family models": every dim of the
node is then pinned (exact, conservative).

Also here: reading ATen arguments by schema name (:func:`schema_args`, :func:`set_schema_arg`), every
overload of an ATen packet (:func:`aten_overloads`), the ATen name of a node (:func:`aten_name`), where a
tensor operand comes from among the parameters (:func:`param_origin`), and :class:`Consumer`, the record
calibration and reconstruction read for a layer that consumes channels through a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..meta import shape_of
from .axes import submodule
from .base import RULES, RewriteContext, Rule, RuleContext, RuleTable, is_state, lookup_tensor, shrink_tensors

__all__ = ["Bound", "Family", "Consumer", "ParamOrigin", "aten_overloads", "aten_name", "aten_self", "schema_args",
           "set_schema_arg", "call_arg", "param_origin", "label_param", "weight_axis", "weight_owner", "user_type", "layer_name",
           "register_aten"]

A = torch.ops.aten


# ---------------------------------------------------------------------------------------------------------
# arguments


def aten_overloads(*names: str) -> list[Any]:
    """Every overload of the named ATen packets (``out=`` variants excepted); unknown names are skipped."""
    out: list[Any] = []
    for name in names:
        packet = getattr(A, name, None)
        if packet is None:
            continue
        for ov in packet.overloads():
            if "out" in ov.split("_"):
                continue
            out.append(getattr(packet, ov))
    return out


def aten_name(node: Any) -> str | None:
    """The ATen packet name of a call (``"linear"`` for ``aten.linear.default``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else None


def schema_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in (positional and keyword alike)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        raise TypeError(f"{node.target} is not an ATen overload")
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def aten_self(node: fx.Node) -> tuple[dict[str, Any], fx.Node, tuple[int, ...]] | None:
    """``(arguments by name, self, its shape)`` of an ATen call on a tensor ``self``; None when ``self`` has
    no shape (a binder then binds nothing)."""
    a = schema_args(node)
    x = a.get("self")
    xs = shape_of(x)
    return None if xs is None else (a, x, xs)


def set_schema_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set argument ``name`` of an ATen call (a node of the new graph), positionally if it was positional."""
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name == name:
            set_call_arg(node, i, name, value)
            return
    raise KeyError(name)


def call_arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a torch-level call, as written."""
    if pos < len(node.args):
        return node.args[pos]
    return node.kwargs.get(name, default)


def set_call_arg(node: fx.Node, pos: int, name: str, value: Any) -> None:
    """Set the argument at ``pos`` (or keyword ``name``) of a torch-level call in the new graph."""
    if pos < len(node.args):
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def register_aten(table: RuleTable, names: Sequence[str], rule: Rule) -> None:
    """Register ``rule`` for every overload of the named ATen packets."""
    table.register_function(aten_overloads(*names), rule)


# ---------------------------------------------------------------------------------------------------------
# parameters behind operands


@dataclass(frozen=True)
class ParamOrigin:
    """Operand dim ``i`` is dim ``dims[i]`` of parameter ``param`` (same positions)."""

    param: str
    dims: tuple[int, ...]


def param_origin(gm: fx.GraphModule, x: Any, rules: RuleTable = RULES, max_steps: int = 12) -> ParamOrigin | None:
    """Which parameter, dim for dim, the tensor operand ``x`` is (through transposes, reshapes that end in
    the parameter's own shape, casts, scalings and per-channel normalisation); None when it is not one.

    Reshapes preserve the flat order of elements, so a path of reshapes and position-wise ops that ends in
    the parameter's shape is the parameter position for position (timm's weight standardisation
    ``batch_norm(w.reshape(1, O, -1)).reshape_as(w)``)."""
    shape = shape_of(x)
    if shape is None:
        return None
    perm: list[int] | None = list(range(len(shape)))  # operand dim i -> dim perm[i] of the current node
    flat = False  # a reshape was crossed: only the flat order is known
    node = x
    for _ in range(max_steps):
        if not isinstance(node, fx.Node):
            return None
        cur = shape_of(node)
        if node.op == "get_attr":
            if not is_state(gm, str(node.target)):
                return None
            if flat:
                return ParamOrigin(str(node.target), tuple(range(len(shape)))) if cur == shape else None
            return ParamOrigin(str(node.target), tuple(perm))
        rule = rules.lookup(gm, node)
        if rule is None or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src = node.args[0]
        if getattr(rule, "reshapes", False):
            if not flat and perm != list(range(len(perm))):
                return None
            flat = True
            node = src
            continue
        if not getattr(rule, "positionwise", False) and not getattr(rule, "permutes", False):
            return None
        mapping = [_first_operand_dim(rule, node, src, d) for d in range(len(cur))] if cur is not None else []
        if not mapping or any(m is None for m in mapping):
            return None
        if flat:
            if mapping != list(range(len(mapping))):
                return None
        else:
            perm = [mapping[p] for p in perm]
        node = src
    return None


def _first_operand_dim(rule: Rule, node: fx.Node, src: fx.Node, dim: int) -> int | None:
    for x, d in rule.dim_origins(node, dim):
        if x is src:
            return d
    return None


def label_param(rc: RuleContext, x: Any, dim: int, role: str) -> None:
    """State the role of the parameter dim operand ``x``'s ``dim`` comes from (no-op for other tensors)."""
    o = param_origin(rc.gm, x)
    if o is None:
        return
    try:
        rc.param(o.param, o.dims[dim % len(o.dims)], role)
    except (AttributeError, ValueError):  # a plain tensor attribute, not a parameter/buffer
        pass


def weight_axis(rc: RuleContext, w: Any, dim: int, role: str) -> Any:
    """The axis of a weight operand's dim: a parameter of the module being called (``w`` a qualified name),
    or a graph value (``w`` a node, whose parameter, if any, gets the role)."""
    if isinstance(w, str):
        return rc.param(w, dim, role)
    label_param(rc, w, dim, role)
    return rc.act(w, dim)


def weight_owner(gm: fx.GraphModule, w: Any) -> str | None:
    """The layer's name for reports: the owner of the parameter a weight operand is (``"layers.0.fc"``)."""
    if isinstance(w, str):
        return w.rpartition(".")[0]
    o = param_origin(gm, w)
    return o.param.rpartition(".")[0] if o is not None else None


def layer_name(node: fx.Node, gm: fx.GraphModule, default: str) -> str:
    """What a report calls a layer: the module's class (module spelling), else the user class torch.export
    recorded it in, else ``default``."""
    if node.op == "call_module":
        return type(module_of(node, gm)).__name__
    return user_type(node) or default


def user_type(node: fx.Node) -> str | None:
    """Class name of the innermost user module a node was recorded in (torch.export's ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    last = list(stack.values())[-1]
    t = last[1] if isinstance(last, (tuple, list)) and len(last) > 1 else None
    if isinstance(t, type):
        return t.__name__
    return str(t).rpartition(".")[2] if t else None


# ---------------------------------------------------------------------------------------------------------
# families and bound rules


@dataclass(frozen=True)
class Consumer:
    """A call that is a linear map of its input's channels through a parameter (a conv or a linear layer):
    what calibration measures and reconstruction refits.

    ``input``: the node whose value is the layer's input, channels at dim ``input_dim``; ``weight``: the
    parameter, with its input channels at dim ``in_dim`` and outputs at ``out_dim`` (a linear weight stored
    ``(out, in)`` or, as GPT-2's ``Conv1D`` / ``x @ W``, ``(in, out)``); ``bias``: a parameter or None;
    ``kind``: ``"conv"`` (``conv = (kernel, dilation, padding, stride)``, 2-D normalised, ``groups``) or
    ``"linear"`` (every leading dim is a sample)."""

    node: str
    input: str
    input_dim: int
    weight: str
    in_dim: int
    out_dim: int
    bias: str | None
    kind: str
    conv: tuple | None = None
    groups: int = 1


class Family:
    """One op family's meaning, written once over its call record. Subclasses override what they know."""

    name: str = "family"
    lossy: bool = False
    positionwise: bool = False
    permutes: bool = False
    reshapes: bool = False
    expands: bool = False
    local: str | None = None

    def locality(self, call: Any, node: fx.Node) -> str | None:
        return self.local

    def analyze(self, call: Any, node: fx.Node, rc: RuleContext) -> None:
        raise NotImplementedError

    def rewrite_module(self, call: Any, module: nn.Module, qualname: str, rw: RewriteContext,
                       nodes: Sequence[fx.Node]) -> nn.Module | None:
        return None  # default: the generic shrink

    def rewrite_node(self, call: Any, node: fx.Node, old: fx.Node, rw: RewriteContext) -> None:
        pass

    def fix_module(self, call: Any, new: nn.Module, old: nn.Module, qualname: str, rw: RewriteContext) -> None:
        """Size attributes of a module whose tensors were pruned (``call`` may be None: no graph node)."""

    def macs(self, call: Any, node: fx.Node, gm: fx.GraphModule) -> int | None:
        return None

    def consumer(self, call: Any, node: fx.Node, gm: fx.GraphModule) -> Consumer | None:
        return None

    def layer_kind(self, call: Any, node: fx.Node, gm: fx.GraphModule) -> str | None:
        return None

    def dim_origins(self, call: Any, node: fx.Node, dim: int) -> list[tuple[fx.Node, int]]:
        return []

    def produced_dim(self, call: Any, node: fx.Node) -> int | None:
        return None

    def positional_dim(self, call: Any, node: fx.Node) -> int | None:
        return None


Binder = Callable[[fx.Node, fx.GraphModule], Any]


class Bound(Rule):
    """A family bound to one spelling: ``binder(node, gm)`` gives the call record (None: all pinned)."""

    def __init__(self, family: Family, binder: Binder, name: str, leaf: bool = True) -> None:
        self.family = family
        self.binder = binder
        self.name = name
        self.lossy = family.lossy
        self.positionwise = family.positionwise
        self.permutes = family.permutes
        self.reshapes = family.reshapes
        self.expands = family.expands
        self.leaf = leaf  # type: ignore[misc]

    def bind(self, node: fx.Node, gm: fx.GraphModule) -> Any:
        return self.binder(node, gm)

    def analyze(self, node: fx.Node, rc: RuleContext) -> None:
        call = self.bind(node, rc.gm)
        if call is not None:
            self.family.analyze(call, node, rc)

    def rewrite_module(self, module: nn.Module, qualname: str, rw: RewriteContext,
                       nodes: Sequence[fx.Node] = ()) -> nn.Module:
        call = self.bind(nodes[0], rw.gm) if nodes else None
        new = self.family.rewrite_module(call, module, qualname, rw, nodes)
        if new is None:
            new = shrink_tensors(module, qualname, rw)
            self.family.fix_module(call, new, module, qualname, rw)
        return new

    def fix_module(self, new: nn.Module, old: nn.Module, qualname: str, rw: RewriteContext,
                   nodes: Sequence[fx.Node] = ()) -> nn.Module:
        call = self.bind(nodes[0], rw.gm) if nodes else None
        self.family.fix_module(call, new, old, qualname, rw)
        return new

    def rewrite_node(self, node: fx.Node, old: fx.Node, rw: RewriteContext) -> None:
        if old.op == "call_module":
            return  # the module was rebuilt
        call = self.bind(old, rw.gm)
        if call is not None:
            self.family.rewrite_node(call, node, old, rw)

    def macs(self, node: fx.Node, gm: fx.GraphModule) -> int | None:
        call = self.bind(node, gm)
        return None if call is None else self.family.macs(call, node, gm)

    def has_macs(self) -> bool:
        return type(self.family).macs is not Family.macs

    def locality(self, node: fx.Node) -> str | None:
        call = self._call_of(node)
        return None if call is None else self.family.locality(call, node)

    def consumer(self, node: fx.Node, gm: fx.GraphModule) -> Consumer | None:
        call = self.bind(node, gm)
        return None if call is None else self.family.consumer(call, node, gm)

    def layer_kind(self, node: fx.Node, gm: fx.GraphModule) -> str | None:
        call = self.bind(node, gm)
        return None if call is None else self.family.layer_kind(call, node, gm)

    def _call_of(self, node: fx.Node) -> Any:
        try:
            return self.bind(node, node.graph.owning_module)
        except Exception:  # a binder that needs more than the node: no answer
            return None

    def dim_origins(self, node: fx.Node, dim: int) -> list[tuple[fx.Node, int]]:
        if self.positionwise:
            return super().dim_origins(node, dim)
        call = self._call_of(node)
        return [] if call is None else self.family.dim_origins(call, node, dim)

    def produced_dim(self, node: fx.Node, gm: fx.GraphModule) -> int | None:
        call = self.bind(node, gm)
        return None if call is None else self.family.produced_dim(call, node)

    def positional_dim(self, node: fx.Node) -> int | None:
        call = self._call_of(node)
        return None if call is None else self.family.positional_dim(call, node)


def module_of(node: fx.Node, gm: fx.GraphModule) -> nn.Module:
    return submodule(gm, str(node.target))


def tensor_shape(gm: nn.Module, w: Any) -> tuple[int, ...] | None:
    """Shape of a weight operand: a parameter name of ``gm`` or a graph value (a ``get_attr`` without shape
    metadata: its tensor's)."""
    if isinstance(w, str):
        return tuple(lookup_tensor(gm, w)[0].shape)
    shp = shape_of(w)
    if shp is None and isinstance(w, fx.Node) and w.op == "get_attr" and gm is not None:
        try:
            return tuple(lookup_tensor(gm, str(w.target))[0].shape)
        except (AttributeError, ValueError):
            return None
    return shp
