"""AbsorbConstants (pass ``"absorb"``): exact removal of channels whose activation is a constant.

A removed channel is normally treated as contributing nothing (the masked reference zeroes its
consumers' input slices). That is wrong for a channel that outputs a non-zero *constant*: a BatchNorm
channel with γ = 0 outputs β whatever its input (ISTA, Network Slimming), a conv/linear unit whose
weight row is all zero outputs its bias. Dropping such a channel throws ``a_c · Σ_k V[o, c, k]`` away
from every consumer ``o``. This pass puts it back: it is added to the consumer's bias in the NEW module
(a bias is created when the consumer has none), or — when the consumer has no bias and feeds a
BatchNorm directly — subtracted from that BatchNorm's running mean.

Constancy is decided **structurally**, never from example data (a batch of one makes everything look
constant): a unit is *input-independent* at a node when

* the node is an affine norm (BatchNorm/InstanceNorm) whose γ is exactly 0 for the unit, a conv/linear
  whose weight row for the unit is exactly 0, or a ``get_attr`` tensor; or
* the node is channel-local (element-wise ops, pooling, per-channel norms, depthwise convs, reductions
  over other dims, shape ops, concatenation...) and every tensor input it reads at the unit's positions
  is input-independent there, and every other tensor it reads entirely is input-independent.

Only the *value* is read from data: the original graph (``ctx.original``) is run on the example inputs,
the consumer's input is masked to the constant channels and passed through the consumer without bias.
The contribution must be the same at every output position (checked): without zero padding it is, and
the absorption is exact (the pruned model equals the original one). With zero padding the borders
differ; the value at the centre is absorbed when it holds at ≥ ``min_agreement`` of the positions, and
the report says the result is approximate at borders. Consumers other than ``nn.Conv*d`` (not
transposed) / ``nn.Linear`` are left as they were (noted).

The pass records what it did (:class:`Absorbed`) in the ``absorbed`` fact of the graph; the Verify pass and
:func:`fxprune.passes.verify.masked_reference` apply the same records to the masked reference, so
equivalence checks stay exact in every case.

Invariant: this pass only changes consumers of removed channels that are structurally constant; on
any other selection it is a no-op (and costs one cheap scan of the removed units' source slices).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .. import meta
from ..errors import ConfigError, PipelineError
from ..ir import ChannelGroup, ParamSlice, Selection, member_units
from ..pipeline import Context, Pass, PassResult
from ..flops import count_cost
from ..rules import RULES, RuleTable
from ..rules.axes import submodule
from ..rules.base import lookup_tensor
from .importance import unit_mass
from .rewrite import provenance

__all__ = ["AbsorbConstants", "Absorbed", "apply_absorbed", "plan_absorption"]

log = logging.getLogger(__name__)

# secondary tensor arguments that are read for their shape/dtype only
_SHAPE_ONLY = {"type_as", "to", "view_as", "reshape_as", "expand_as"}


@dataclass(frozen=True)
class Absorbed:
    """One absorption: ``delta`` (full, unpruned length) is added to ``module.attr`` (created if missing).

    ``keep_key`` is the axis whose keep mask shrinks ``delta`` to the pruned module's size."""

    module: str
    attr: str  # "bias" or "running_mean"
    delta: torch.Tensor
    keep_key: tuple
    consumer: str
    channels: int  # removed constant units folded in
    exact: bool
    agreement: float  # fraction of output positions where the folded constant is exact


def apply_absorbed(gm: nn.Module, records: Iterable[Absorbed],
                   keep_of: Callable[[tuple], np.ndarray | None] | None = None) -> None:
    """Apply absorption records to ``gm`` in place (``keep_of`` shrinks each delta to the pruned size)."""
    with torch.no_grad():
        for rec in records:
            mod = gm.get_submodule(rec.module)
            delta = rec.delta
            if keep_of is not None:
                k = keep_of(rec.keep_key)
                if k is not None:
                    delta = delta[torch.as_tensor(np.flatnonzero(k), dtype=torch.long)]
            t = getattr(mod, rec.attr, None)
            if t is None:
                if rec.attr != "bias":
                    raise ValueError(f"{rec.module} has no {rec.attr}")
                w = mod.weight
                mod.bias = nn.Parameter(delta.to(dtype=w.dtype, device=w.device).clone(),
                                        requires_grad=w.requires_grad)
            else:
                t.add_(delta.to(dtype=t.dtype, device=t.device))


# -- structural constancy ---------------------------------------------------------------------------------
class _Constancy:
    """Memoised ``const(node, unit)`` for one group (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, group: ChannelGroup, rules: RuleTable,
                 zero_units: Mapping[str, set[int]]) -> None:
        self.gm = gm
        self.rules = rules
        self.zero_units = zero_units
        self.carried: dict[str, set[int]] = {}
        for ref in group.channels:
            self.carried.setdefault(ref.node, set()).update(member_units(ref).tolist())
        self.memo: dict[str, tuple[set[int], set[int]]] = {}  # node -> (units asked, units constant)
        self.indep_memo: dict[str, bool] = {}

    def independent(self, node: Any) -> bool:
        """No placeholder among the ancestors: the whole value is the same for every input."""
        if not isinstance(node, fx.Node):
            return True
        got = self.indep_memo.get(node.name)
        if got is None:
            stack, order = [node], []
            while stack:  # iterative post-order (deep graphs)
                n = stack.pop()
                if n.name in self.indep_memo:
                    continue
                pending = [a for a in n.all_input_nodes if a.name not in self.indep_memo]
                if pending:
                    stack.append(n)
                    stack.extend(pending)
                    continue
                self.indep_memo[n.name] = n.op != "placeholder" and all(self.indep_memo[a.name]
                                                                       for a in n.all_input_nodes)
                order.append(n)
            got = self.indep_memo[node.name]
        return got

    def const(self, node: fx.Node, units: set[int]) -> set[int]:
        """The units of ``units`` whose channel of ``node``'s value is the same for every input.

        Decided for a whole set of units at once (one walk of the graph per group, not one per unit)."""
        asked, got = self.memo.setdefault(node.name, (set(), set()))
        missing = units - asked
        if missing:
            asked |= missing  # cycles cannot occur in a DAG; guards re-entry
            got |= self._const(node, missing)
        return got & units

    def _tensors(self, x: Any) -> list[fx.Node]:
        out: list[fx.Node] = []
        fx.node.map_arg(x, out.append)
        return out

    def _inputs_ok(self, node: fx.Node, units: set[int], positional: bool) -> set[int]:
        if not units:
            return set()
        first = set(self._tensors(node.args[0] if node.args else next(iter(node.kwargs.values()), None)))
        rest = [n for n in node.all_input_nodes if n not in first]
        shape_only = node.op == "call_method" and node.target in _SHAPE_ONLY
        ok, carriers = set(units), set()
        for x in [*first, *rest]:
            if not ok:
                break
            if meta.tensor_meta(x) is None:  # ints from size() etc.: static in a traced graph
                continue
            carried = self.carried.get(x.name, set()) & ok
            other = ok - carried
            if carried:  # units x carries: constant only where x is
                carriers |= carried
                ok -= carried - self.const(x, carried)
            if not other:
                continue
            if x in first and positional:
                continue  # another piece of a concat: does not feed these units' positions
            if shape_only and x not in first:
                continue
            if not self.independent(x):
                ok -= other
        return ok & carriers

    def _const(self, node: fx.Node, units: set[int]) -> set[int]:
        if node.op == "get_attr":
            return set(units)
        if node.op != "call_module" and node.op != "call_function" and node.op != "call_method":
            return set()
        zero: set[int] = set()
        if node.op == "call_module":
            target = str(node.target)
            mod = self.gm.get_submodule(target)
            zero = units & self.zero_units.get(target, set())
            units = units - zero
            if isinstance(mod, _ConvNd) and not isinstance(mod, _ConvTransposeNd):
                if mod.groups > 1 and mod.groups == mod.in_channels:  # depthwise: channel-local
                    return zero | self._inputs_ok(node, units, positional=False)
                return zero
        if not units:
            return zero
        rule = self.rules.lookup(self.gm, node)
        if rule is None:
            return zero
        where = rule.locality(node)  # the op family's knowledge (fxprune.rules.base.Rule.local)
        if where in ("positional", "channel_local"):
            return zero | self._inputs_ok(node, units, positional=where == "positional")
        return zero


def _unit_rows(ps: ParamSlice, units: Iterable[int]) -> dict[int, np.ndarray]:
    """unit -> positions along ``ps.dim`` (for every requested unit the slice covers)."""
    mu = member_units(ps)
    row_of = {int(u): i for i, u in enumerate(mu)}
    out: dict[int, np.ndarray] = {}
    for u in units:
        r = row_of.get(int(u))
        if r is None:
            continue
        try:
            out[int(u)] = ps.span.indices()[r]
        except ValueError:  # ragged explicit map
            out[int(u)] = np.asarray(ps.span.table[r], dtype=np.int64)  # type: ignore[union-attr]
    return out


def _source_zero_units(gm: fx.GraphModule, group: ChannelGroup, removed: np.ndarray) -> dict[str, set[int]]:
    """module name -> removed units (``removed``: a mask) whose activation it makes constant (γ = 0, zero row).

    When the scoring left the slices' masses (the ``unit_mass`` fact of the magnitude criteria), only the
    units whose mass is 0 are read (a non-zero mass proves a non-zero row); the rest of the weights is not."""
    out: dict[str, set[int]] = {}
    masses = meta.get(gm, "unit_mass") or {}
    for ps in group.params:
        owner, _, attr = ps.param.rpartition(".")
        if attr != "weight" or ps.is_buffer or ps.groups > 1:
            continue
        try:
            mod = submodule(gm, owner)
        except AttributeError:
            continue
        if ps.role == "norm" and isinstance(mod, _NormBase) and mod.affine:
            pass
        elif ps.role == "out" and ps.dim == 0 and (isinstance(mod, nn.Linear) or (
                isinstance(mod, _ConvNd) and not isinstance(mod, _ConvTransposeNd))):
            pass
        else:
            continue
        units = member_units(ps)
        mine = removed[units]
        t = lookup_tensor(gm, ps.param)[0].detach()
        known = next((masses[k] for k in ((ps.param, ps.dim, 1, 1), (ps.param, ps.dim, 1, 2)) if k in masses), None)
        if known is not None and known[0] == t._version:
            mine &= unit_mass(ps, known[1])[1] == 0
        if not mine.any():
            continue
        try:  # only the removed units' rows are read (a full pass over a big weight costs as much as scoring)
            rows = ps.span.indices()[mine]
            vals = t.index_select(ps.dim, torch.as_tensor(rows.reshape(-1))).movedim(ps.dim, 0)
            zero = (vals.reshape(rows.shape[0], -1) == 0).all(dim=1).numpy()
            hits = {int(u) for u, z in zip(units[mine], zero, strict=True) if z}
        except ValueError:  # ragged explicit map
            hits = {u for u, pos in _unit_rows(ps, units[mine]).items()
                    if bool((t.index_select(ps.dim, torch.as_tensor(pos)) == 0).all())}
        if hits:
            out.setdefault(owner, set()).update(hits)
    return out


@dataclass
class _Plan:
    consumer: str  # module name
    slice: ParamSlice
    units: list[int]
    calls: list[fx.Node]


def plan_absorption(gm: fx.GraphModule, analysis: Any, selection: Selection,
                    rules: RuleTable | None = None) -> tuple[list[_Plan], list[str]]:
    """Which (consumer, removed constant units) pairs can be folded — decided from the graph alone."""
    rules = rules or getattr(analysis, "rules", RULES)
    kept = selection.as_dict()
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    plans: list[_Plan] = []
    notes: list[str] = []
    for gid, k in kept.items():
        g = analysis.groups[gid]
        removed = np.ones(g.size, dtype=bool)
        removed[list(k)] = False
        if not removed.any():
            continue
        zero = _source_zero_units(gm, g, removed)
        candidates = set().union(*zero.values()) if zero else set()
        if not candidates:
            continue
        cons = _Constancy(gm, g, rules, zero)
        for ps in g.params:
            if ps.role != "in":
                continue
            owner, _, attr = ps.param.rpartition(".")
            units = sorted(candidates.intersection(member_units(ps).tolist()))
            if not units:
                continue
            mod = submodule(gm, owner)
            supported = attr == "weight" and ps.dim == 1 and (
                isinstance(mod, nn.Linear) or (isinstance(mod, _ConvNd) and not isinstance(mod, _ConvTransposeNd)))
            if not supported or owner not in calls or not all(
                    c.args and isinstance(c.args[0], fx.Node) for c in calls[owner]):
                notes.append(f"absorb: constant channels feeding {ps.param} ({type(mod).__name__}) are dropped "
                             "without folding (consumer type not supported)")
                continue
            alive = set(units)
            for c in calls[owner]:
                alive = cons.const(c.args[0], alive)
            const_units = sorted(alive)
            if const_units:
                plans.append(_Plan(owner, ps, const_units, calls[owner]))
            if len(const_units) < len(units):
                notes.append(f"absorb: {len(units) - len(const_units)} constant channel(s) also reach {owner} "
                             f"({type(mod).__name__}) through values that are not constant there (a per-sample gate, "
                             "a product with another activation): their contribution to it is dropped, not folded")
    return plans, notes


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out.detach() if isinstance(out, torch.Tensor) else out
        return out


def _contribution(mod: nn.Module, x: torch.Tensor, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-free consumer output of ``x`` restricted to the given input positions: (rows, O) + (O,) ref."""
    w = mod.weight.detach()
    if isinstance(mod, nn.Linear):
        mask = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
        mask[torch.as_tensor(positions, dtype=torch.long)] = 1
        y = F.linear(x * mask, w)
        rows = y.reshape(-1, y.shape[-1])
        return rows, rows[0]
    ch = 1 if x.dim() == w.dim() else 0
    shape = [1] * x.dim()
    shape[ch] = x.shape[ch]
    mask = torch.zeros(x.shape[ch], dtype=x.dtype, device=x.device)
    mask[torch.as_tensor(positions, dtype=torch.long)] = 1
    y = mod._conv_forward(x * mask.reshape(shape), w, None)  # type: ignore[operator]
    if ch == 0:
        y = y.unsqueeze(0)
    centre = tuple(s // 2 for s in y.shape[2:])
    ref = y[(0, slice(None), *centre)]
    rows = y.movedim(1, -1).reshape(-1, y.shape[1])
    return rows, ref


def _bn_after(gm: fx.GraphModule, node: fx.Node, calls: Mapping[str, list[fx.Node]]) -> str | None:
    """The BatchNorm module that alone reads ``node`` (and is called once), if any."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].args[0] is not node:
        return None
    target = str(users[0].target)
    bn = gm.get_submodule(target)
    if isinstance(bn, _BatchNorm) and bn.running_mean is not None and len(calls.get(target, ())) == 1:
        return target
    return None


@dataclass(frozen=True)
class AbsorbConstants(Pass):
    """Fold the constant output of removed channels into their consumers (see the module docstring).

    ``into``: ``"auto"`` (default; a consumer without bias that feeds a BatchNorm directly gets the
    constant subtracted from that BatchNorm's running mean, every other consumer gets it added to its bias,
    created when missing) or ``"bias"`` (always the bias). ``min_agreement``: with zero padding the
    contribution differs at the borders; the centre value is folded when it holds at least at this
    fraction of the output positions (else the channel is dropped without folding; noted).
    """

    name: ClassVar[str] = "absorb"
    reads: ClassVar[tuple[str, ...]] = ("pruned_from",)
    writes: ClassVar[tuple[str, ...]] = ("cost", "absorbed")

    into: str = "auto"
    min_agreement: float = 0.5

    def __post_init__(self) -> None:
        if self.into not in ("auto", "bias"):
            raise ConfigError(f"absorb: into must be 'auto' or 'bias', got {self.into!r}")
        if not (isinstance(self.min_agreement, (int, float)) and 0 < self.min_agreement <= 1):
            raise ConfigError(f"absorb: min_agreement must be in (0, 1], got {self.min_agreement!r}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        prov = provenance(gm)
        if prov is None:
            raise PipelineError("absorb must run after rewrite (it needs the rewrite's provenance: the source "
                                "graph, its groups and the selection)")
        analysis, sel, orig = prov.analysis, prov.selection, prov.source
        plans, notes = plan_absorption(orig, analysis, sel)
        ctx.notes.extend(notes)
        partial = any("dropped" in n for n in notes)
        before = tuple(meta.get(gm, "absorbed") or ())
        if not plans:
            meta.put(gm, "absorbed", before)
            return PassResult(gm, False, {"absorbed_channels": 0})
        records = self.compute(orig, plans, ctx.example_inputs, ctx.notes)
        keep_of = analysis.keep_fn(sel)
        apply_absorbed(gm, records, keep_of)
        meta.put(gm, "absorbed", before + tuple(records))
        if records:
            meta.put(gm, "cost", count_cost(gm))
            n = sum(r.channels for r in records)
            approx = [r for r in records if not r.exact]
            msg = (f"absorb: the constant outputs of {n} removed channel slot(s) were folded into "
                   f"{len(records)} consumer(s)")
            if approx:
                worst = min(r.agreement for r in approx)
                msg += (f"; approximate at borders for {', '.join(r.consumer for r in approx[:5])} (zero padding: "
                        f"exact at ≥ {worst:.0%} of the output positions)")
            elif partial:
                msg += " (exact for those consumers; not every consumer of the channels could be folded, see above)"
            else:
                msg += " (exact)"
            ctx.notes.append(msg)
            log.info(msg)
        return PassResult(gm, bool(records), {"absorbed_channels": sum(r.channels for r in records),
                                              "consumers": len(records),
                                              "exact": all(r.exact for r in records)})

    def compute(self, orig: fx.GraphModule, plans: Sequence[_Plan], inputs: Sequence[torch.Tensor],
                notes: list[str]) -> list[Absorbed]:
        """Run the original graph once and turn each plan into an :class:`Absorbed` record."""
        wanted = {c.args[0].name for p in plans for c in p.calls}
        cap = _Capture(orig, wanted)
        was = orig.training
        orig.eval()
        try:
            with torch.no_grad():
                cap.run(*inputs)
        finally:
            orig.train(was)
        calls: dict[str, list[fx.Node]] = {}
        for n in orig.graph.nodes:
            if n.op == "call_module":
                calls.setdefault(str(n.target), []).append(n)
        records: list[Absorbed] = []
        with torch.no_grad():
            for p in plans:
                mod = orig.get_submodule(p.consumer)
                rows = _unit_rows(p.slice, p.units)
                pos = np.sort(np.concatenate([rows[u] for u in p.units]))
                deltas, agree = [], []
                ok = True
                for c in p.calls:
                    x = cap.values.get(c.args[0].name)
                    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                        ok = False
                        break
                    r, ref = _contribution(mod, x, pos)
                    if not torch.isfinite(r).all():
                        ok = False
                        break
                    eps = torch.finfo(r.dtype).eps
                    tol = 1000 * eps * max(float(r.abs().max()), 1e-30)
                    same = ((r - ref).abs() <= tol).all(dim=1)
                    deltas.append(ref)
                    agree.append(float(same.double().mean()))
                if not ok:
                    notes.append(f"absorb: {p.consumer}: the constant channels' values are not finite floats; "
                                 "dropped without folding")
                    continue
                delta = deltas[0]
                if any(not torch.allclose(d, delta, rtol=1e-9, atol=1e-12) for d in deltas[1:]):
                    notes.append(f"absorb: {p.consumer} is shared and its calls see different constants; "
                                 "dropped without folding")
                    continue
                a = min(agree)
                if a < self.min_agreement:
                    notes.append(f"absorb: {p.consumer}: the constant channels' contribution is not spatially "
                                 f"constant (agrees at {a:.0%} of positions); dropped without folding")
                    continue
                if not bool((delta != 0).any()):
                    continue  # a zero constant: removing it is already exact
                attr, target, key, sign = "bias", p.consumer, ("p", f"{p.consumer}.weight", 0), 1.0
                if mod.bias is None and self.into == "auto" and len(p.calls) == 1:
                    bn = _bn_after(orig, p.calls[0], calls)
                    if bn is not None:
                        attr, target, key, sign = "running_mean", bn, ("p", f"{bn}.running_mean", 0), -1.0
                records.append(Absorbed(target, attr, (sign * delta).clone(), key, p.consumer, len(p.units),
                                        a >= 1.0, a))
        return records
