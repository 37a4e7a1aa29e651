"""Selection: which units each group keeps.

Modes: a per-group ``ratio`` (fraction removed from every prunable group, with per-module overrides in
``ratios``), ``global_ranking`` (the same total fraction, lowest scores across all groups first),
``threshold`` (remove every unit scoring ≤ threshold) and ``target_macs`` (search the ratio until the
pruned graph's MACs ≤ target; a value ≤ 1 is a fraction of the original MACs).

Guarantees, in this order: pinned units stay; at least ``min_keep`` units stay; ``uniform`` constraints
(grouped conv / GroupNorm blocks) keep the same count in every block; the kept count is rounded *up* to
a multiple of ``round_to`` (counted in units: channels, or heads for head groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import numpy as np
import torch.fx as fx

from .. import meta
from ..errors import ConfigError
from ..ir import ChannelGroup, Selection
from ..flops import count_cost
from ..pipeline import Context, Pass, PassResult
from .rewrite import rewrite_graph

__all__ = ["Select", "choose_units", "validate_ratio", "floor_count"]


def validate_ratio(ratio: float, what: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 <= ratio < 1):
        raise ConfigError(f"{what} must be a number with 0 <= {what} < 1, got {ratio!r}")
    return float(ratio)


def floor_count(ratio: float, size: int) -> int:
    return int(math.floor(ratio * size + 1e-9))


def choose_units(group: ChannelGroup, scores: np.ndarray, n_remove: int, min_keep: int = 1,
                 round_to: int = 1) -> tuple[int, ...]:
    """Units kept when removing (about) ``n_remove`` of the lowest-scoring units of ``group``."""
    size = group.size
    pinned = set(group.pinned)
    keep_n = max(size - max(n_remove, 0), min_keep, len(pinned), 1)
    keep_n = min(keep_n, size)
    # order: pinned first, then by score (high first), ties broken by unit index
    s = np.asarray(scores, dtype=np.float64)[:size]
    if len(s) == size and not np.isnan(s).any():
        free = np.ones(size, dtype=bool)
        free[list(pinned)] = False
        rank = np.lexsort((np.arange(size), -s, free)).tolist()  # the same order, vectorised
    else:
        rank = sorted(range(size), key=lambda u: (u not in pinned, -float(scores[u]), u))
    uniform = [c for c in group.constraints if c.kind == "uniform"]
    if uniform:
        blocks = [b for b in uniform[0].blocks]
        covered = {u for b in blocks for u in b}
        bsize = min(len(b) for b in blocks)
        if bsize == 0 or any(len(b) != bsize for b in blocks):
            return tuple(range(size))
        nb = len(blocks)
        kb = min(bsize, max(1, math.ceil(keep_n * bsize / max(len(covered), 1) if len(covered) < size
                                         else keep_n / nb)))
        while (kb * nb) % round_to and kb < bsize:
            kb += 1
        kb = max([kb] + [sum(1 for u in b if u in pinned) for b in blocks])
        pos = {u: i for i, u in enumerate(rank)}
        kept = set(u for u in range(size) if u not in covered)
        for b in blocks:
            kept |= set(sorted(b, key=lambda u: pos[u])[:kb])
        kept = _swap_for_members(group, kept, blocks, pos, pinned)
        before = len(kept)
        out = _nonempty_members(group, kept, rank)
        return out if len(out) == before else tuple(range(size))  # cannot honour both: keep all
    if round_to > 1:
        keep_n = min(size, int(math.ceil(keep_n / round_to) * round_to))
    return _nonempty_members(group, set(rank[:keep_n]), rank)


def _swap_for_members(group: ChannelGroup, kept: set[int], blocks: list[tuple[int, ...]], pos: dict[int, int],
                      pinned: set[int]) -> set[int]:
    """Uniform blocks (a grouped conv over a concat): a member that would lose every channel (a one-channel
    branch of the concat) gets its best unit back in place of the worst other unit kept in that block, so every
    block still keeps the same count. Unchanged when no swap is possible (the caller then keeps all)."""
    block_of = {u: i for i, b in enumerate(blocks) for u in b}
    kept = set(kept)
    for m in (*group.channels, *group.params):
        if m.units is None or kept.intersection(m.units):
            continue
        best = min(m.units, key=lambda u: pos[u])
        if best not in block_of:
            continue
        needed: set[int] = set()  # the last kept unit of another member stays
        for x in (*group.channels, *group.params):
            left = kept.intersection(x.units) if x.units is not None else set()
            if len(left) == 1:
                needed |= left
        out = [u for u in blocks[block_of[best]] if u in kept and u not in pinned and u not in needed]
        if not out:
            continue
        kept.discard(max(out, key=lambda u: pos[u]))
        kept.add(best)
    return kept


def _nonempty_members(group: ChannelGroup, kept: set[int], rank: list[int]) -> tuple[int, ...]:
    """No tensor may lose every channel: a member covering only some units keeps its best one."""
    pos = {u: i for i, u in enumerate(rank)}
    for m in (*group.channels, *group.params):
        if m.units is not None and not kept.intersection(m.units):
            kept.add(min(m.units, key=lambda u: pos[u]))
    return tuple(sorted(kept))


@dataclass(frozen=True)
class Select(Pass):
    name: ClassVar[str] = "select"
    reads: ClassVar[tuple[str, ...]] = ("groups", "importance")
    writes: ClassVar[tuple[str, ...]] = ("selection",)

    ratio: float | None = None
    threshold: float | None = None
    global_ranking: bool = False
    target_macs: float | None = None
    min_keep: int = 1
    round_to: int = 1
    ratios: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        modes = [x is not None for x in (self.ratio, self.threshold, self.target_macs)]
        if sum(modes) > 1:
            raise ConfigError("give only one of ratio, threshold, target_macs")
        if self.ratio is not None:
            validate_ratio(self.ratio)
        for k, v in dict(self.ratios).items():
            validate_ratio(v, f"ratios[{k!r}]")
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
            or not math.isfinite(self.threshold)
        ):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.target_macs is not None and (
            not isinstance(self.target_macs, (int, float)) or not self.target_macs > 0
        ):
            raise ConfigError(f"target_macs must be > 0 (absolute MACs, or a fraction <= 1), got {self.target_macs!r}")
        if not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise ConfigError(f"min_keep must be an integer >= 1, got {self.min_keep!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be an integer >= 1, got {self.round_to!r}")

    def select(self, analysis, scores: Mapping[int, np.ndarray], ratio: float | None = None) -> Selection:
        ratio = self.ratio if ratio is None else ratio
        groups = [g for g in analysis.groups if g.prunable and g.id in scores]
        keep: dict[int, tuple[int, ...]] = {}
        n_remove: dict[int, int] = {}
        if self.threshold is not None:
            for g in groups:
                s = scores[g.id]
                n_remove[g.id] = int(sum(1 for u in range(g.size) if s[u] <= self.threshold and u not in g.pinned))
        elif self.global_ranking:
            total = sum(g.size for g in groups)
            budget = floor_count(ratio or 0.0, total)
            cand = sorted(
                ((float(scores[g.id][u]), g.id, u) for g in groups for u in range(g.size) if u not in g.pinned)
            )
            cap = {g.id: g.size - max(self.min_keep, len(g.pinned), 1) for g in groups}
            n_remove = {g.id: 0 for g in groups}
            for _, gid, _u in cand:
                if budget <= 0:
                    break
                if n_remove[gid] < cap[gid]:
                    n_remove[gid] += 1
                    budget -= 1
        else:
            for g in groups:
                r = self.ratio_for(g, ratio or 0.0)
                n_remove[g.id] = floor_count(r, g.size)
        for g in groups:
            kept = choose_units(g, scores[g.id], n_remove[g.id], self.min_keep, self.round_to)
            if len(kept) < g.size:
                keep[g.id] = kept
        return Selection.from_dict(keep)

    def ratio_for(self, g: ChannelGroup, default: float) -> float:
        """A per-module ratio applies to the groups whose channels that module *produces*."""
        if self.ratios:
            for p in g.params:
                if p.role == "out":
                    name = p.param.rpartition(".")[0]
                    if name in self.ratios:
                        return self.ratios[name]
        return self.ratios.get(g.root, default)

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis = meta.get(gm, "groups")
        scores = meta.get(gm, "importance")
        if self.target_macs is None:
            sel = self.select(analysis, scores)
            meta.put(gm, "selection", sel)
            return PassResult(gm, False, {"groups_pruned": len(sel.keep)})
        sel, macs, r = self._search(gm, ctx, analysis, scores)
        meta.put(gm, "selection", sel)
        return PassResult(gm, False, {"groups_pruned": len(sel.keep), "macs": macs, "ratio": r})

    def _search(self, gm, ctx, analysis, scores):
        base = count_cost(gm).macs
        target = self.target_macs * base if self.target_macs <= 1 else self.target_macs

        def macs_at(r: float) -> tuple[Selection, int]:
            sel = self.select(analysis, scores, ratio=r)
            new = rewrite_graph(gm, analysis, sel, ctx.example_inputs)
            return sel, count_cost(new).macs

        lo, hi = 0.0, 0.99
        sel_hi, m_hi = macs_at(hi)
        if m_hi > target:
            raise ConfigError(
                f"target_macs {target:.4g} is not reachable: removing 99% of every prunable group still "
                f"leaves {m_hi:.4g} MACs (of {base:.4g})"
            )
        best = (sel_hi, m_hi, hi)
        for _ in range(14):
            mid = (lo + hi) / 2
            sel, m = macs_at(mid)
            if m <= target:
                hi, best = mid, (sel, m, mid)
            else:
                lo = mid
        return best
