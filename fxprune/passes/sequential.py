"""Sequential (layer-by-layer) pruning for data-driven criteria.

One group at a time, in graph order: score the group on the network pruned so far (consumer inputs from
the *pruned* network, targets from the *original* one — He et al.'s accumulated-error correction), select
its kept units with the given :class:`~fxprune.passes.select.Select`, rewrite, optionally refit the
group's consumers (``reconstruct="thinet"`` or ``"lstsq"``), then call ``step_callback(module, info)``
(e.g. a short fine-tune, in place) before the next group.

The pass replaces ``importance | select | rewrite`` of the default pipeline. It re-analyses the pruned
graph at every step and finds the next group by its producers' parameter slices (pruning one group never
changes another group's units). The selection it reports (the ``pruned_from`` fact of its result) is
expressed in the groups of the original analysis, so the report and the masked-reference check work as
usual (the check only holds when no step changed weights). Per-group ratios only: ``global_ranking``, ``threshold`` with
cross-group meaning, and ``target_macs`` are not supported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.fx as fx

from .. import meta
from .calib import DataDrivenImportance
from ..errors import ConfigError
from ..ir import ChannelGroup, Selection
from ..pipeline import Context, Pass, PassResult
from ..rules.base import lookup_tensor
from .group import Analysis, analyze_graph
from .importance import ImportancePass
from .calib import consumers
from ..flops import count_cost
from .reconstruct import METHODS, by_layer, consumers_of, input_count, reconstruct_sites, unit_atoms
from .rewrite import Provenance, rewrite_graph
from .select import Select

__all__ = ["SequentialPrune"]

log = logging.getLogger(__name__)


def _signature(g: ChannelGroup) -> frozenset:
    outs = [(p.param, p.dim) for p in g.params if p.role == "out"]
    return frozenset(outs or [(p.param, p.dim, p.role) for p in g.params] or [(c.node, c.dim) for c in g.channels])


@dataclass(frozen=True)
class SequentialPrune(Pass):
    """Prune group by group (see the module docstring). ``criterion``: any importance pass."""

    name: ClassVar[str] = "sequential"
    reads: ClassVar[tuple[str, ...]] = ("groups",)
    writes: ClassVar[tuple[str, ...]] = ("shapes", "cost", "pruned_from", "reconstruction")
    invalidates: ClassVar[tuple[str, ...]] = ("groups", "importance", "selection", "absorbed")

    criterion: ImportancePass
    select: Select
    reconstruct: str | None = None
    step_callback: Callable[[fx.GraphModule, dict[str, Any]], None] | None = None
    ridge: float = 1e-6
    max_positions: int | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.criterion, ImportancePass):
            raise ConfigError(f"sequential criterion must be an ImportancePass, got {type(self.criterion).__name__}")
        if not isinstance(self.select, Select):
            raise ConfigError("sequential select must be a Select pass")
        if self.select.global_ranking or self.select.target_macs is not None:
            raise ConfigError("sequential pruning selects per group: global_ranking and target_macs are not supported")
        if self.reconstruct is not None and self.reconstruct not in METHODS:
            raise ConfigError(f"reconstruct must be None or one of {', '.join(METHODS)}, got {self.reconstruct!r}")
        if self.step_callback is not None and not callable(self.step_callback):
            raise ConfigError("step_callback must be callable(module, info)")

    @property
    def needs_calib(self) -> bool:
        return isinstance(self.criterion, DataDrivenImportance) or self.reconstruct is not None

    def _scores(self, cur: fx.GraphModule, ctx: Context, g: ChannelGroup,
                out_index: Callable[[str], np.ndarray | None]) -> np.ndarray | None:
        if isinstance(self.criterion, DataDrivenImportance):
            s = self.criterion.compute(cur, ctx, [g], target=ctx.original, out_index=out_index).get(g.id)
        else:
            cache: dict[str, torch.Tensor] = {}

            def tensor(name: str) -> torch.Tensor:
                if name not in cache:
                    cache[name] = lookup_tensor(cur, name)[0].detach()
                return cache[name]

            s = self.criterion.scores(g, tensor, ctx)
        if s is None:
            return None
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (g.size,) or not np.isfinite(s).all():
            raise ValueError(f"{self.criterion.name}: bad scores for group {g.id} ({g.root})")
        return s

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        orig: Analysis = meta.get(gm, "groups")
        todo = [g for g in orig.groups if g.prunable]
        cur = gm
        an = orig
        out_idx: dict[str, np.ndarray] = {}
        final: dict[int, tuple[int, ...]] = {}
        errors: dict[str, tuple[float, float]] = {}
        index = consumers(gm, orig.rules)
        for step, g0 in enumerate(todo):
            if cur is not gm:
                an = analyze_graph(cur, orig.rules, "block", allow_lossy=True)
            by_sig = {_signature(g): g for g in an.groups}
            g = by_sig.get(_signature(g0))
            if g is None or g.size != g0.size or g.blocked:
                ctx.shortfall(f"sequential: group {g0.id} ({g0.root}) not found intact after earlier steps; kept")
                continue
            oi = lambda m: out_idx.get(m)  # noqa: E731
            s = self._scores(cur, ctx, g, oi)
            if s is None:
                ctx.shortfall(f"sequential: no score for group {g0.id} ({g0.root}); kept")
                continue
            sel = self.select.select(an, {g.id: s})
            if not sel.keep:
                continue
            new = rewrite_graph(cur, an, sel, ctx.example_inputs)
            keep_of = an.keep_fn(sel)
            for key, calls in index.items():
                k = keep_of(("p", key, calls[0][1].out_dim))
                if k is not None:
                    out_idx[key] = out_idx.get(key, np.arange(len(k)))[k]
            if self.reconstruct is not None:
                keys = consumers_of(new, an, sel, orig.rules)
                atoms = ({k: unit_atoms(cur, an, sel, k, input_count(new, k, orig.rules), orig.rules)
                          for k in keys} if self.reconstruct == "thinet" else None)
                errors.update(reconstruct_sites(new, ctx, keys, self.reconstruct, oi, ctx.original, atoms,
                                                self.ridge, True, self.max_positions, ctx.seed, self.progress,
                                                orig.rules))
            final[g0.id] = sel.as_dict()[g.id]
            log.info("sequential step %d: group %d (%s) keeps %d of %d", step, g0.id, g0.root,
                     len(final[g0.id]), g0.size)
            if self.step_callback is not None:
                self.step_callback(new, {"step": step, "group": g0.id, "root": g0.root,
                                         "kept": len(final[g0.id]), "size": g0.size})
            cur = new
        if cur is gm:
            cur = rewrite_graph(gm, orig, Selection(), ctx.example_inputs)
        selection = Selection.from_dict(final)
        meta.put(cur, "pruned_from", Provenance(gm, orig, selection))
        meta.put(cur, "reconstruction", by_layer(errors))  # empty when no step refitted
        cost = count_cost(cur)
        meta.put(cur, "cost", cost)
        removed = sum(orig.groups[gid].size - len(k) for gid, k in final.items())
        return PassResult(cur, bool(final), {"steps": len(final), "units_removed": removed, "macs": cost.macs})
