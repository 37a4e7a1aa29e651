"""Rule objects, the rule table, and the per-node contexts rules state facts in.

A *rule* is one op family's meaning bound to one spelling of the op (a module type, a torch function, a
Tensor method, an ATen overload). It says (a) how the op's input and output channels are tied
(:meth:`Rule.analyze`), (b) how to build the smaller op (:meth:`Rule.rewrite_module` for modules,
:meth:`Rule.rewrite_node` for literal arguments), (c) its cost (:meth:`Rule.macs`), (d) what calibration
sees when the op consumes channels (:meth:`Rule.consumer`), and (e) what a report calls it
(:meth:`Rule.layer_kind`). The families live one per file in this package; a family writes its meaning once and
registers one thin binder per spelling (:mod:`fxprune.rules.calls`).

Rules talk about *axes*: one axis per dim of every tensor a node produces, per dim of every parameter,
plus optional virtual axes (e.g. the heads inside ``nn.MultiheadAttention``). Every position of every axis
is an element of one global index space; a rule only states facts about elements:

* ``tie(a, b)``: position ``i`` of ``a`` and of ``b`` are the same channel (removed together);
* ``tie_slice(big, offset, small)``: ``small`` is ``big[offset : offset + len(small)]`` (cat, split);
* ``tie_product(merged, factors)``: ``merged`` is the row-major product of ``factors`` (flatten, view);
  it is tied to one factor (see :meth:`RuleContext.tie_product`) and the other factors are pinned;
* ``produce(a)``: ``a`` creates channels (a conv's output dim): channels that share a producer axis
  form one *group*;
* ``pin(a, reason)``: these channels must stay (network inputs/outputs, unknown ops, ...);
* ``constrain(a, Constraint)``, ``lossy(a, reason)``.

Any dim of a node's tensor inputs or outputs that its rule leaves unmentioned is pinned automatically,
so a rule that forgets a dim can only make pruning more conservative, never wrong. Rules never guess: an
op without a rule is an error (or, in conservative mode, pins everything it touches).

Parameters: ``rc.param(name, dim, role)`` is the axis of a parameter dim. A *grouped view* of a dim
(``groups > 1``: a grouped convolution's weight dim 1 addressed in the full ``in_channels`` index space,
``groups`` times its length) is registered by the rule that knows the layout; :func:`slice_param` then
gathers each group block's kept inputs. Parameters read by ``get_attr`` nodes are tied to their node's dims
after every rule ran, except for a dim some rule gave a grouped view.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..clone import shallow_copy
from ..errors import UnsupportedOpError
from ..meta import shape_of
from .axes import Axis, AxisTable, ParamInfo, RuleContext, is_state, lookup_tensor, op_key, submodule

__all__ = ["Axis", "AxisTable", "ParamInfo", "Rule", "RuleContext", "RewriteContext", "RuleTable", "RULES", "is_state", "patch_sizes", "class_name",
           "op_key", "lookup_tensor", "slice_param", "shrink_tensors"]


class RewriteContext:
    """What a rule sees while building the smaller op: keep masks for every axis."""

    def __init__(self, gm: fx.GraphModule, new_gm: fx.GraphModule | None,
                 keep_of: Callable[[tuple], np.ndarray | None],
                 groups_of: Callable[[str, int], int] | None = None):
        self.gm = gm  # the original (traced) module: read-only
        self.new_gm = new_gm  # the module being built
        self._keep_of = keep_of
        self._groups_of = groups_of
        self._index: dict[tuple[bytes, torch.device], torch.Tensor] = {}

    def keep(self, key: tuple) -> np.ndarray | None:
        """Boolean keep mask of an axis, or None when nothing is removed from it."""
        return self._keep_of(key)

    def index(self, keep: np.ndarray, device: torch.device) -> torch.Tensor:
        """The positions ``keep`` (a boolean mask) selects, as an index tensor on ``device``; made once per
        distinct mask (the axes of one group share it: a conv's outputs, its norm, the next conv's inputs)."""
        key = (keep.tobytes(), device)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = torch.as_tensor(np.flatnonzero(keep), device=device)
        return idx

    def keep_act(self, node: fx.Node, dim: int, index: int | None = None) -> np.ndarray | None:
        shp = shape_of(node, index)
        return self._keep_of(("a", node.name, index, dim % len(shp)))

    def keep_param(self, qualname: str, dim: int) -> np.ndarray | None:
        return self._keep_of(("p", qualname, dim))

    def param_groups(self, qualname: str, dim: int) -> int:
        """``groups`` of the grouped view of a parameter dim (1: a plain dim)."""
        return self._groups_of(qualname, dim) if self._groups_of is not None else 1

    def new_shape(self, node: fx.Node, index: int | None = None) -> tuple[int, ...]:
        shp = shape_of(node, index)
        out = []
        for d, s in enumerate(shp):
            k = self._keep_of(("a", node.name, index, d))
            out.append(s if k is None else int(k.sum()))
        return tuple(out)


def _gather_grouped(data: torch.Tensor, keep: np.ndarray, groups: int, what: str) -> torch.Tensor:
    """Keep, in each of the ``groups`` row blocks of ``data`` (dim 0), the dim-1 columns of that block's
    slice of ``keep`` (a mask over ``groups * data.shape[1]`` positions)."""
    cg = data.shape[1]
    og = data.shape[0] // groups
    per_block = keep[: groups * cg].reshape(groups, cg)
    kept = per_block.sum(1)
    if (kept != kept[0]).any():
        raise ValueError(f"{what}: the grouped input channels are not pruned uniformly across its {groups} "
                         f"groups (kept per group: {kept.tolist()})")
    # row r (of block r // og) takes its block's kept columns: one gather for all blocks
    cols = np.flatnonzero(per_block.reshape(-1)).reshape(groups, int(kept[0])) % cg
    idx = torch.as_tensor(np.repeat(cols, og, axis=0), device=data.device)
    return data[torch.arange(data.shape[0], device=data.device)[:, None], idx]


def patch_sizes(sizes: Any, new: tuple[int, ...]) -> Any:
    """Replace literal ints (except -1) in a size list by the new sizes; keep graph values and -1."""
    out = [n if isinstance(s, int) and s != -1 else s for s, n in zip(sizes, new, strict=True)]
    return type(sizes)(out) if isinstance(sizes, tuple) else out


def slice_param(t: torch.Tensor, qualname: str, rw: RewriteContext) -> torch.Tensor:
    """A fresh copy of parameter/buffer ``t`` (named ``qualname``) with every dim sliced by its keep mask;
    a grouped view's mask gathers each group block's kept columns."""
    data = t.detach()
    sliced = False
    for d in range(t.dim()):
        k = rw.keep(("p", qualname, d))
        if k is None:
            continue
        g = rw.param_groups(qualname, d)
        if g > 1 and d == 1 and len(k) == t.shape[d] * g:
            data = _gather_grouped(data, k, g, qualname)
        else:
            data = data.index_select(d, rw.index(k, data.device))
        sliced = True
    return data if sliced else data.clone()  # a gather already made a fresh tensor


class Rule:
    """Base class: override :meth:`analyze`; override :meth:`rewrite_module` / :meth:`rewrite_node` when
    the op holds sizes that must change (module attributes, literal arguments).

    Optional knowledge a family adds (the defaults say "nothing known"): :meth:`macs`, :meth:`consumer`,
    :meth:`layer_kind`, :meth:`dim_origins`, :meth:`produced_dim`, :meth:`positional_dim` and the flags
    :attr:`positionwise`, :attr:`permutes`, :attr:`reshapes`, :attr:`expands`. Tiny example models exercising each rule
    live in :mod:`fxprune.testing.examples`, keyed by :attr:`name`.
    """

    name: str = "rule"
    #: True when pruning through the op is never exactly lossless (statistics over channels)
    lossy: bool = False
    #: False: the rule describes a module fxprune traces through when it can (it is used only where the
    #: module is already a leaf of a given graph, e.g. for its MACs)
    leaf: ClassVar[bool] = True
    #: True: output position ``i`` of every dim is an operand's position ``i`` (element-wise ops, casts)
    positionwise: bool = False
    #: True: the op only permutes dims (:meth:`dim_origins` says how)
    permutes: bool = False
    #: True: the op is a reshape (flat element order kept)
    reshapes: bool = False
    #: True: the op broadcasts size-1 dims to a given size (expand)
    expands: bool = False
    #: how a channel's values flow through the op: "positional" (pure data movement: reshapes, permutes,
    #: concat, slicing), "channel_local" (a unit's output positions depend only on the unit's input
    #: positions: element-wise ops, pooling, per-channel norms), or None (channels mix)
    local: str | None = None

    def analyze(self, node: fx.Node, rc: RuleContext) -> None:
        raise NotImplementedError

    def rewrite_module(
        self, module: nn.Module, qualname: str, rw: RewriteContext, nodes: Sequence[fx.Node] = ()
    ) -> nn.Module:
        """Return a smaller copy of ``module`` (default: slice every parameter/buffer, then
        :meth:`fix_attributes`). ``nodes`` are the original graph's calls of the module."""
        new = shrink_tensors(module, qualname, rw)
        self.fix_attributes(new)
        return new

    def fix_attributes(self, module: nn.Module) -> None:
        """Update size attributes (in_channels...) after the tensors shrank."""

    def fix_module(self, new: nn.Module, old: nn.Module, qualname: str, rw: RewriteContext,
                   nodes: Sequence[fx.Node] = ()) -> nn.Module:
        """Make ``new`` (a copy of ``old`` whose tensors already have their pruned shapes) consistent: its size
        attributes follow its tensors. Returns the module to use (the default fixes attributes in place)."""
        self.fix_attributes(new)
        return new

    def rewrite_node(self, node: fx.Node, old: fx.Node, rw: RewriteContext) -> None:
        """Patch literal arguments of ``node`` (a node of the new graph; ``old`` its original)."""

    def macs(self, node: fx.Node, gm: fx.GraphModule) -> int | None:
        """Multiply-accumulates of one call (None: no formula; see :mod:`fxprune.flops`)."""
        return None

    def locality(self, node: fx.Node) -> str | None:
        """:attr:`local` for this call (a family may answer per call)."""
        return self.local

    def has_macs(self) -> bool:
        """Whether the rule has a MACs formula (a call it cannot cost then lacks shape metadata)."""
        return type(self).macs is not Rule.macs

    def consumer(self, node: fx.Node, gm: fx.GraphModule) -> Any:
        """The :class:`~fxprune.rules.calls.Consumer` record when the call is a linear map of its input's
        channels through a parameter (what calibration and reconstruction model), else None."""
        return None

    def layer_kind(self, node: fx.Node, gm: fx.GraphModule) -> str | None:
        """What a report calls the op (``"Conv2d"``, ``"Linear"``...), or None."""
        return None

    def dim_origins(self, node: fx.Node, dim: int) -> list[tuple[fx.Node, int]]:
        """The operand dims that output ``dim`` is, position for position (``[]``: none known). The default
        for position-wise ops: every tensor operand whose right-aligned dim has the output's size."""
        if not self.positionwise:
            return []
        os_ = shape_of(node)
        if os_ is None:
            return []
        dim %= len(os_)
        out = []
        for x in node.all_input_nodes:
            xs = shape_of(x)
            k = dim - (len(os_) - len(xs)) if xs is not None else -1
            if k >= 0 and xs[k] == os_[dim]:
                out.append((x, k))
        return out

    def produced_dim(self, node: fx.Node, gm: fx.GraphModule) -> int | None:
        """The output dim whose channels the op creates (a conv's channels, a linear's features), or None."""
        return None

    def positional_dim(self, node: fx.Node) -> int | None:
        """The input dim the op reads position by position (select, unbind, split), or None."""
        return None

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


def shrink_tensors(module: nn.Module, qualname: str, rw: RewriteContext) -> nn.Module:
    """A copy of ``module`` whose direct parameters/buffers are sliced by their axes' keep masks.

    Never shares storage with the original: parameters are cloned even when unchanged.
    """
    new = shallow_copy(module)  # its own hook tables etc.: a dict shared with the original would leak
    prefix = f"{qualname}." if qualname else ""
    for store, is_param in ((new._parameters, True), (new._buffers, False)):
        for name, t in list(store.items()):
            if t is None:
                continue
            data = slice_param(t, prefix + name, rw)
            store[name] = nn.Parameter(data, requires_grad=t.requires_grad) if is_param else data
    return new


def class_name(cls: type) -> str:
    """``module.QualName`` of ``cls``: the key of :data:`SAME_CHANNELS_AS` and :data:`BASE_THEN_POSITIONWISE`."""
    return f"{cls.__module__}.{cls.__qualname__}"


#: subclasses (by qualified name) whose ``forward`` computes their base's channels exactly, so the base's rule
#: describes them: timm's TensorFlow-style "SAME" convolution (it pads the spatial dims by a size computed
#: from the input, which symbolic tracing cannot follow) and timm's Linear (it differs only under TorchScript,
#: where it casts the weight to the input's dtype)
SAME_CHANNELS_AS: dict[str, type] = {"timm.layers.conv2d_same.Conv2dSame": nn.Conv2d,
                                     "timm.layers.linear.Linear": nn.Linear}

#: subclasses whose ``forward`` is their base's followed by the named submodules, each applied to the whole
#: output: timm's BatchNorm + activation (``BatchNormAct2d``: batch norm, then ``drop``, then ``act``). When
#: those submodules hold no tensors and are position-wise leaves (an activation, dropout, identity), the
#: base's rule describes the module's channels exactly and it stays one node (fewer nodes to trace, group
#: and rewrite, and the class copy takes the pruned module as it is)
BASE_THEN_POSITIONWISE: dict[str, tuple[type, tuple[str, ...]]] = {
    "timm.layers.norm_act.BatchNormAct2d": (nn.BatchNorm2d, ("drop", "act")),
}


class RuleTable:
    """The rule table: keyed by module type (looked up along the MRO), function object, or method name."""

    def __init__(self) -> None:
        self.modules: dict[type, Rule] = {}
        self.functions: dict[Any, Rule] = {}
        self.methods: dict[str, Rule] = {}
        self._by_type: dict[type, Rule | None] = {}  # module_rule's answers that depend on the class alone

    def register_module(self, types: type | Iterable[type], rule: Rule) -> Rule:
        for t in (types,) if isinstance(types, type) else types:
            self.modules[t] = rule
        self._by_type.clear()
        return rule

    def register_function(self, fns: Any, rule: Rule) -> Rule:
        for f in fns if isinstance(fns, (list, tuple, set)) else (fns,):
            self.functions[f] = rule
        return rule

    def register_method(self, names: str | Iterable[str], rule: Rule) -> Rule:
        for n in (names,) if isinstance(names, str) else names:
            self.methods[n] = rule
        return rule

    def module_rule(self, m: nn.Module) -> Rule | None:
        """Rule of ``type(m)`` or its nearest registered base class — unless ``type(m)`` overrides
        ``forward`` relative to that base (then the base's rule would describe the wrong computation,
        e.g. torchvision's LayerNorm2d permutes around nn.LayerNorm; such modules are traced through)."""
        cls = type(m)
        hit = self._by_type.get(cls, self)
        if hit is not self:  # the answer depends on the class alone
            return hit
        for t in cls.__mro__:
            r = self.modules.get(t)
            if r is not None:
                if t is not cls and getattr(cls, "forward", None) is not getattr(t, "forward", None):
                    name = class_name(cls)
                    r = r if self._computes_as(m, t, name) else None
                    if name in BASE_THEN_POSITIONWISE:
                        return r  # the answer depends on this module's submodules: not cached
                break
        self._by_type[cls] = r
        return r

    def _computes_as(self, m: nn.Module, base: type, name: str) -> bool:
        """Whether ``m`` (whose class, :func:`class_name` ``name``, overrides ``base.forward``) computes
        ``base``'s channels exactly (:data:`SAME_CHANNELS_AS`, :data:`BASE_THEN_POSITIONWISE`)."""
        if SAME_CHANNELS_AS.get(name) is base:
            return True
        then = BASE_THEN_POSITIONWISE.get(name)
        if then is None or then[0] is not base:
            return False
        for attr in then[1]:
            sub = m._modules.get(attr)
            if sub is None or sub._modules or any(t is not None for t in (*sub._parameters.values(),
                                                                          *sub._buffers.values())):
                return False
            r = self.module_rule(sub)
            if r is None or not r.positionwise or not r.leaf:
                return False
        return True

    def has_module_rule(self, m: nn.Module) -> bool:
        """Whether ``m`` is kept as one node by the tracer: a rule describes it and does not ask to be
        traced through."""
        r = self.module_rule(m)
        return r is not None and r.leaf

    def lookup(self, gm: fx.GraphModule, node: fx.Node) -> Rule | None:
        if node.op == "call_module":
            return self.module_rule(submodule(gm, node.target))
        if node.op == "call_function":
            try:
                return self.functions.get(node.target)
            except TypeError:  # unhashable target
                return None
        if node.op == "call_method":
            return self.methods.get(node.target)
        return None

    def all_rules(self) -> list[Rule]:
        seen: dict[int, Rule] = {}
        for r in [*self.modules.values(), *self.functions.values(), *self.methods.values()]:
            seen.setdefault(id(r), r)
        return list(seen.values())

    def copy(self) -> "RuleTable":
        """A private table starting from this one's rules (user rules added to it stay private)."""
        new = RuleTable()
        new.modules, new.functions, new.methods = dict(self.modules), dict(self.functions), dict(self.methods)
        return new

    def missing(self, gm: fx.GraphModule, node: fx.Node) -> UnsupportedOpError:
        key = op_key(gm, node)
        if node.op == "call_module":
            t = type(submodule(gm, node.target))
            fix = (
                f"fxprune.register_module_rule({t.__module__}.{t.__qualname__}, rule) with a rule that "
                "states how its channels are tied (see examples/custom_rule.py), or "
                "fxprune.compile(..., unknown_ops='block') to keep every channel it touches"
            )
        elif node.op == "call_function":
            fix = (
                f"fxprune.register_function_rule({getattr(node.target, '__module__', '')}."
                f"{getattr(node.target, '__name__', node.target)}, rule), or "
                "fxprune.compile(..., unknown_ops='block')"
            )
        else:
            fix = f"fxprune.register_method_rule({node.target!r}, rule), or fxprune.compile(..., unknown_ops='block')"
        return UnsupportedOpError(node, key, "no channel rule is registered for this op; fxprune never guesses", fix)


#: The global rule table. Rules for built-in ops are registered by :mod:`fxprune.rules`.
RULES = RuleTable()
