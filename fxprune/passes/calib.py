"""Calibration engine: streaming per-consumer layer statistics for the data-driven passes, on every front end.

This module owns everything that touches calibration data:

* **batches** — :func:`calibration_batches` validates every batch of ``ctx.calib`` (tensor or tuple of
  tensors; extra tuple items such as labels are ignored; shapes must match ``example_inputs`` apart from
  the batch dim; no NaN/Inf) and shows a progress bar on a TTY. A one-shot iterator (a generator) is
  materialised once (``ctx.calib_cache``) so several passes can re-read it; a tensor is one batch.
* **capture** — :func:`run_graph`, an ``fx.Interpreter`` that hands the values of chosen nodes to hooks,
  checking them for NaN/Inf. The user's model is never run, only the traced copies.
* **consumers** — every call the op families describe as a :class:`~fxprune.rules.calls.Consumer` (a conv
  or linear layer in any spelling: ``nn.Linear``, ``aten.linear``, GPT-2's ``addmm``...), keyed by its
  weight parameter's qualified name, so fx and torch.export graphs of one model have the same sites.
  :func:`consumers` finds them; a group's ``ParamSlice`` with role ``"in"`` on a consumer's input dim is
  a site of the group (:func:`plan_groups`); statistics per site live in :mod:`fxprune.calib_stats`.
* **distribution** — statistics are sums; when ``torch.distributed`` is initialised they are all-reduced.

Invariants: statistics never contain NaN (inputs are checked); a group whose consumers are all unsupported
gets no data-driven score (it is kept, with a note).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from .. import meta
from ..progress import progress as show_progress
from .calib_stats import Site, SiteStats, all_reduce_, build_site, distributed
from ..errors import ConfigError, FxpruneError, InputError, node_location
from ..ir import ChannelGroup, ParamSlice, member_units
from ..pipeline import Context, PassResult
from .importance import ImportancePass, store_scores
from ..rules import RULES, RuleTable
from ..rules.calls import Consumer

__all__ = [
    "calibration_batches",
    "check_batch",
    "Site",
    "SiteStats",
    "GroupPlan",
    "plan_groups",
    "consumers",
    "collect",
    "group_gram",
    "DataDrivenImportance",
    "reconstruction_error",
    "supported_consumer",
    "make_site",
    "activations",
    "run_graph",
    "finite",
    "order_scores",
    "all_reduce_",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------
def _source(ctx: Context) -> Iterable[Any]:
    calib = ctx.calib
    if calib is None:
        raise ConfigError("this pass needs calibration data: pass calib= (an iterable of input batches) to "
                          "fxprune.compile")
    if ctx.calib_cache is not None:
        return ctx.calib_cache
    if isinstance(calib, torch.Tensor):
        return (calib,)  # one batch; iterating a tensor would drop the batch dim
    if isinstance(calib, (str, bytes, Mapping)):
        raise ConfigError(f"calib must be an iterable of batches (tensors or tuples), got {type(calib).__name__}")
    try:
        it = iter(calib)
    except TypeError as exc:
        raise ConfigError(f"calib must be an iterable of batches, got {type(calib).__name__}") from exc
    if it is calib:  # a one-shot iterator: keep it for the next pass that needs the data
        data = list(it)
        ctx.calib_cache = data
        log.info("calib is a one-shot iterator; %d batches kept in memory for re-use", len(data))
        return data
    return calib


def check_batch(batch: Any, example: Sequence[torch.Tensor], index: int) -> tuple[torch.Tensor, ...]:
    """One calibration batch as a tuple of tensors shaped like ``example`` (batch dim free)."""
    if isinstance(batch, torch.Tensor):
        items: tuple[Any, ...] = (batch,)
    elif isinstance(batch, (tuple, list)):
        items = tuple(batch)
    else:
        raise InputError(f"calibration batch {index} is a {type(batch).__name__}; expected a tensor or a tuple "
                         "of tensors")
    if len(items) < len(example):
        raise InputError(f"calibration batch {index} has {len(items)} item(s) but the model takes "
                         f"{len(example)} input(s)")
    items = items[: len(example)]  # extra items (labels) are ignored
    out = []
    for j, (x, ex) in enumerate(zip(items, example, strict=True)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"calibration batch {index}, input {j} is a {type(x).__name__}, not a tensor")
        # token ids and masks may have another length than the example's (the graph checks it accepts them)
        if x.dim() != ex.dim() or x.shape[0] < 1 or (
                x.is_floating_point() and tuple(x.shape[1:]) != tuple(ex.shape[1:])):
            raise InputError(
                f"calibration batch {index}, input {j} has shape {tuple(x.shape)}; expected "
                f"(batch, {', '.join(map(str, ex.shape[1:]))}) like example_inputs[{j}] {tuple(ex.shape)}"
                + ("" if x.is_floating_point() else " (or another length)")
            )
        if x.is_floating_point() != ex.is_floating_point():
            raise InputError(f"calibration batch {index}, input {j} has dtype {x.dtype}; example_inputs[{j}] "
                             f"has {ex.dtype}")
        if x.is_floating_point():
            x = x.to(ex.dtype)
            if not torch.isfinite(x).all():
                raise InputError(f"calibration batch {index}, input {j} contains NaN or Inf")
        out.append(x.to(ex.device))
    return tuple(out)


def calibration_batches(ctx: Context, progress: bool | None = None, desc: str = "calibration"
                        ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Validated batches of ``ctx.calib`` (see the module docstring). Raises on an empty iterable unless
    ``torch.distributed`` is running (a rank may have an empty shard; the global count is checked later)."""
    data = _source(ctx)
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    n = 0
    with show_progress(total, desc, enabled=progress) as bar:
        for batch in data:
            yield check_batch(batch, ctx.example_inputs, n)
            n += 1
            bar.update(1)
    if n == 0 and not distributed():
        raise InputError("the calibration iterable yielded no batches (empty, or an iterator that was already "
                         "consumed: pass a list or a re-iterable DataLoader)")


# ----------------------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------------------
Hook = Callable[[Mapping[fx.Node, Any], Any], None]


class _Done(Exception):
    """Raised after the last watched node: the rest of the graph is not needed."""


class _Recorder(fx.Interpreter):
    """Runs a GraphModule; calls ``hooks[node_name](env, value)`` for the watched nodes (``env``: the values
    of the nodes computed so far, by node) and stops after the last of them (statistics never need the
    rest of the network)."""

    def __init__(self, gm: fx.GraphModule, hooks: Mapping[str, Hook], batch: int) -> None:
        super().__init__(gm)
        self.hooks = hooks
        self.batch = batch
        watched = [n.name for n in gm.graph.nodes if n.name in hooks]
        self.last = watched[-1] if watched else None

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            try:
                value = getattr(self, n.op)(n.target, args, kwargs)
            except FxpruneError:
                raise
            except Exception as exc:
                where = node_location(n)
                raise InputError(
                    f"the model fails on calibration batch {self.batch} at node '{n.name}': "
                    f"{type(exc).__name__}: {exc}" + (f"\n  at {where}" if where else "")
                ) from exc
        hook = self.hooks.get(n.name)
        if hook is not None:
            hook(self.env, value)
            if n.name == self.last:
                raise _Done
        return value


def finite(t: torch.Tensor, what: str, batch: int) -> torch.Tensor:
    """``t``, after checking it holds no NaN/Inf (an :class:`InputError` naming ``what`` and the batch)."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise InputError(f"non-finite values (NaN/Inf) in {what} on calibration batch {batch}; check the model's "
                         "weights and the calibration data")
    return t


def run_graph(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], hooks: Mapping[str, Hook], batch: int) -> Any:
    """Run ``gm`` (eval mode, no grad) on ``inputs`` with ``hooks`` on the named nodes."""
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            return _Recorder(gm, hooks, batch).run(*inputs)
    except _Done:
        return None
    finally:
        gm.train(was)


# ----------------------------------------------------------------------------------------------------
# consumers
# ----------------------------------------------------------------------------------------------------
def consumers(gm: fx.GraphModule, rules: RuleTable = RULES) -> dict[str, list[tuple[fx.Node, Consumer]]]:
    """Weight parameter name -> the calls of ``gm`` that consume channels through it, in graph order."""
    out: dict[str, list[tuple[fx.Node, Consumer]]] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        rule = rules.lookup(gm, n)
        c = rule.consumer(n, gm) if rule is not None else None
        if c is not None:
            out.setdefault(c.weight, []).append((n, c))
    return out


def activations(gm: fx.GraphModule, group: ChannelGroup) -> list[Any]:
    """The group's channel references that are activations (values computed from the inputs): parameters
    read by ``get_attr`` are not, so activation criteria see the same tensors on every front end."""
    attrs = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    return [ref for ref in group.channels if ref.node not in attrs]


def make_site(gm: fx.GraphModule, layer: str | Consumer, atoms: list[np.ndarray], target: fx.GraphModule | None = None,
              out_index: np.ndarray | None = None, rules: RuleTable = RULES) -> Site:
    """The site of a consumer of ``gm``: its record, its weight's name or its layer's name (``"conv1"``)."""
    if isinstance(layer, Consumer):
        return build_site(gm, layer, atoms, target, out_index)
    index = consumers(gm, rules)
    key = layer if layer in index else f"{layer}.weight"
    if key not in index:
        raise ConfigError(f"'{layer}' is not a conv or linear layer the calibration engine models in this graph")
    return build_site(gm, index[key][0][1], atoms, target, out_index)


def supported_consumer(index: Mapping[str, list[tuple[fx.Node, Consumer]]], ps: ParamSlice) -> str | None:
    """The site key (weight name) when ``ps`` is the input dim of a consumer the engine models, else None."""
    if ps.role != "in" or ps.is_buffer:
        return None
    calls = index.get(ps.param)
    if not calls or any(c.in_dim != ps.dim for _, c in calls):
        return None
    return ps.param


# ----------------------------------------------------------------------------------------------------
# groups → sites → statistics
# ----------------------------------------------------------------------------------------------------
@dataclass
class GroupPlan:
    """Where each group's units live among the sites: ``atoms[gid][key] = atom index per unit (-1: absent)``;
    ``unsupported[gid]``: the parameters reading the group that no site models."""

    sites: dict[str, Site]
    atoms: dict[int, dict[str, np.ndarray]]
    unsupported: dict[int, list[str]] = field(default_factory=dict)
    index: dict[str, list[tuple[fx.Node, Consumer]]] = field(default_factory=dict)


def _rows(ps: ParamSlice) -> list[np.ndarray]:
    try:
        return list(ps.span.indices())
    except ValueError:  # ragged explicit map
        return [np.asarray(r, dtype=np.int64) for r in ps.span.table]  # type: ignore[union-attr]


def plan_groups(gm: fx.GraphModule, groups: Sequence[ChannelGroup], target: fx.GraphModule | None = None,
                out_index: Callable[[str], np.ndarray | None] | None = None,
                extra_atoms: Mapping[str, list[np.ndarray]] | None = None, rules: RuleTable = RULES) -> GroupPlan:
    """Sites for the consumers of ``groups`` in ``gm``; one atom per (group, unit) per site.

    Sites are keyed by the consumer's weight name. ``extra_atoms`` adds atoms (key → list of position
    arrays) not owned by any group, and makes a site for a consumer even when no group reads it."""
    index = consumers(gm, rules)
    per_site: dict[str, dict[tuple[int, int], list[np.ndarray]]] = {}
    unsupported: dict[int, list[str]] = {}
    for g in groups:
        for ps in g.params:
            if ps.role != "in" or ps.is_buffer:
                continue
            key = supported_consumer(index, ps)
            if key is None:
                unsupported.setdefault(g.id, []).append(ps.param)
                continue
            slot = per_site.setdefault(key, {})
            for u, pos in zip(member_units(ps), _rows(ps), strict=True):
                slot.setdefault((g.id, int(u)), []).append(np.asarray(pos, dtype=np.int64))
    for key in extra_atoms or {}:
        if key in index:
            per_site.setdefault(key, {})
    sites: dict[str, Site] = {}
    atoms: dict[int, dict[str, np.ndarray]] = {}
    sizes = {g.id: g.size for g in groups}
    for key, slot in per_site.items():
        units = list(slot)
        alist = [np.unique(np.concatenate(slot[k])) for k in units]
        alist += list((extra_atoms or {}).get(key, []))
        sites[key] = build_site(gm, index[key][0][1], alist, target, out_index(key) if out_index else None)
        for a, (gid, u) in enumerate(units):
            arr = atoms.setdefault(gid, {}).setdefault(key, np.full(sizes[gid], -1, dtype=np.int64))
            arr[u] = a
    return GroupPlan(sites, atoms, unsupported, index)


def _site_hooks(gm: fx.GraphModule, keys: Mapping[str, str], index: Mapping[str, list[tuple[fx.Node, Consumer]]],
                xs: dict[str, list[torch.Tensor]] | None, ys: dict[str, list[torch.Tensor]] | None,
                batch: int) -> dict[str, Hook]:
    """Hooks on every call of the sites ``keys`` (name -> weight) in ``gm``: the layer's input into
    ``xs[name]``, its output into ``ys[name]`` (either may be None: not wanted)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    hooks: dict[str, Hook] = {}
    for key, weight in keys.items():
        for node, c in index.get(weight, ()):
            inp = by_name[c.input]

            def hook(env: Mapping[fx.Node, Any], value: Any, key: str = key, inp: fx.Node = inp) -> None:
                if xs is not None:
                    xs[key].append(finite(env[inp], f"the input of '{key}'", batch))
                if ys is not None:
                    ys[key].append(finite(value, f"the output of '{key}'", batch))

            hooks[node.name] = hook
    return hooks


def collect(ctx: Context, gm: fx.GraphModule, sites: Mapping[str, Site], target: fx.GraphModule | None = None,
            mode: str = "auto", samples_per_image: int = 10, max_positions: int | None = None, seed: int = 0,
            progress: bool | None = None, desc: str = "calibration", rules: RuleTable = RULES
            ) -> dict[str, SiteStats]:
    """One pass over the calibration data: inputs of every site from ``gm``, targets from ``target``
    (default ``gm``; its calls of the same weights). Returns reduced (all-reduced when distributed)
    statistics per site."""
    stats = {k: SiteStats(s, mode, samples_per_image, max_positions, seed) for k, s in sites.items()}
    if not stats:
        return stats
    target = gm if target is None else target
    same = target is gm
    index = consumers(gm, rules)
    tindex = index if same else consumers(target, rules)
    for b, inputs in enumerate(calibration_batches(ctx, progress, desc)):
        xs: dict[str, list[torch.Tensor]] = {k: [] for k in sites}
        ys: dict[str, list[torch.Tensor]] = {k: [] for k in sites}
        weights = {k: s.key for k, s in sites.items()}
        run_graph(gm, inputs, _site_hooks(gm, weights, index, xs, ys if same else None, b), b)
        if not same:
            run_graph(target, inputs, _site_hooks(target, weights, tindex, None, ys, b), b)
        for k, st in stats.items():
            if len(xs[k]) != len(ys[k]):
                raise InputError(f"'{k}' is used {len(xs[k])} time(s) in the pruned graph but {len(ys[k])} in the "
                                 "original")
            for x, y in zip(xs[k], ys[k], strict=True):
                st.update(x, y)
    for st in stats.values():
        st.reduce()
    if stats and float(next(iter(stats.values())).n) == 0:
        raise InputError("the calibration iterable yielded no batches on any rank")
    return stats


def group_gram(gid: int, size: int, plan: GroupPlan, stats: Mapping[str, SiteStats],
               grams: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None
               ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Sum over the group's consumers of the unit contribution Gram ``G``, cross moment ``c`` and target
    energy ``yy`` (numpy float64); None when the group has no supported consumer."""
    where = plan.atoms.get(gid)
    if not where:
        return None
    G = np.zeros((size, size))
    c = np.zeros(size)
    yy = 0.0
    grams = {} if grams is None else grams
    for key, aidx in where.items():
        if key not in grams:
            grams[key] = stats[key].gram()
        Gm, cm, yym = grams[key]
        present = np.flatnonzero(aidx >= 0)
        a = torch.as_tensor(aidx[present])
        G[np.ix_(present, present)] += Gm[a][:, a].numpy()
        c[present] += cm[a].numpy()
        yy += yym
    return G, c, yy


# ----------------------------------------------------------------------------------------------------
# importance passes driven by data
# ----------------------------------------------------------------------------------------------------
class DataDrivenImportance(ImportancePass):
    """Base of importance criteria computed from calibration data.

    Subclasses implement :meth:`compute` (scores of several groups from one calibration pass); ``run``
    stores the scores exactly as :meth:`ImportancePass.run` does. ``compute`` takes the graph whose inputs
    are measured, the target graph (the original network in sequential mode) and the map from a consumer's
    weight name to the original output channels it still has.
    """

    needs_calib: ClassVar[bool] = True

    def compute(self, gm: fx.GraphModule, ctx: Context, groups: Sequence[ChannelGroup],
                target: fx.GraphModule | None = None,
                out_index: Callable[[str], np.ndarray | None] | None = None) -> dict[int, np.ndarray | None]:
        raise NotImplementedError

    def group_grams(self, gm: fx.GraphModule, ctx: Context, groups: Sequence[ChannelGroup],
                    target: fx.GraphModule | None, out_index: Callable[[str], np.ndarray | None] | None,
                    mode: str = "auto", samples_per_image: int = 10, max_positions: int | None = None,
                    seed: int = 0, progress: bool | None = None
                    ) -> Iterator[tuple[ChannelGroup, tuple[np.ndarray, np.ndarray, float, float] | None]]:
        """One calibration pass, then per group ``(G, c, yy, n)`` summed over its consumers (``n`` rows per
        site), or None for a group no modelled consumer reads; groups also read by consumers the objective
        does not model get a note."""
        plan = plan_groups(gm, groups, target, out_index)
        for gid, params in plan.unsupported.items():
            ctx.notes.append(f"{self.name}: group {gid} is also read by {', '.join(sorted(set(params)))}, which the "
                             "objective does not model")
        stats = collect(ctx, gm, plan.sites, target, mode, samples_per_image, max_positions, seed, progress,
                        desc=self.name)
        n = max(float(next(iter(stats.values())).n), 1.0) if stats else 1.0
        grams: dict = {}
        for g in groups:
            gg = group_gram(g.id, g.size, plan, stats, grams)
            yield g, (None if gg is None else (*gg, n))

    def scores(self, group, tensor, ctx):  # pragma: no cover - data-driven criteria score in compute()
        raise NotImplementedError(f"{self.name} scores groups from calibration data (compute), not one by one")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis = meta.get(gm, "groups")
        groups = [g for g in analysis.groups if g.prunable]
        raw = self.compute(gm, ctx, groups) if groups else {}
        out, skipped = store_scores(gm, ctx, self.name, ((g, raw.get(g.id)) for g in groups),
                                    getattr(self, "normalize", None))
        return PassResult(gm, False, {"scored": len(out), "skipped": skipped})


def order_scores(order: Sequence[int], size: int, ascending: bool) -> np.ndarray:
    """Scores from a pick order: ``ascending`` (first picked = least important) or the reverse."""
    s = np.zeros(size)
    n = len(order)
    for i, u in enumerate(order):
        s[u] = (i + 1) if ascending else (n - i)
    return s


# ----------------------------------------------------------------------------------------------------
# evaluation helper
# ----------------------------------------------------------------------------------------------------
def reconstruction_error(pruned: fx.GraphModule, original: fx.GraphModule, batches: Iterable[Any],
                         sites: Sequence[str], out_index: Callable[[str], np.ndarray | None] | None = None,
                         example_inputs: Sequence[torch.Tensor] | None = None,
                         rules: RuleTable = RULES) -> dict[str, float]:
    """Relative error ``‖y_pruned − y_orig‖² / ‖y_orig − mean‖²`` of each site's output on ``batches`` (sites
    by weight name; the original output restricted to the channels the pruned layer still has)."""
    num = {m: 0.0 for m in sites}
    s1 = {m: 0.0 for m in sites}
    s2 = {m: 0.0 for m in sites}
    cnt = {m: 0 for m in sites}
    pindex, oindex = consumers(pruned, rules), consumers(original, rules)
    for b, batch in enumerate(batches):
        inputs = check_batch(batch, example_inputs, b) if example_inputs is not None else (
            (batch,) if isinstance(batch, torch.Tensor) else tuple(batch))
        outs_p: dict[str, list[torch.Tensor]] = {m: [] for m in sites}
        outs_o: dict[str, list[torch.Tensor]] = {m: [] for m in sites}
        run_graph(pruned, inputs, _site_hooks(pruned, {m: m for m in sites}, pindex, None, outs_p, b), b)
        run_graph(original, inputs, _site_hooks(original, {m: m for m in sites}, oindex, None, outs_o, b), b)
        for m in sites:
            idx = out_index(m) if out_index else None
            dim = -1 if oindex[m][0][1].kind == "linear" else 1
            for yp, yo in zip(outs_p[m], outs_o[m], strict=True):
                yo = yo.double()
                if idx is not None:
                    yo = yo.index_select(dim, torch.as_tensor(idx))
                num[m] += float(((yp.double() - yo) ** 2).sum())
                s1[m] += float(yo.sum())
                s2[m] += float((yo * yo).sum())
                cnt[m] += yo.numel()
    out = {}
    for m in sites:
        var = s2[m] - s1[m] ** 2 / max(cnt[m], 1)
        out[m] = num[m] / var if var > 0 else (0.0 if num[m] == 0 else math.inf)
    return out
