"""The structural payoff of connection pruning: ``importance="dead"`` (:class:`DeadUnitImportance`) scores 0
exactly the units that cannot matter — every consuming slice zero, or every producing slice (filters and
biases) zero with no norm in the group and activations exactly 0 — so the compiler removes the units the
masks of :class:`~fxprune.sparsity.magnitude.MagnitudePruner` made dead (``threshold=0.0``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from .. import meta
from ..ir import ChannelGroup, member_units
from ..passes.importance import ImportancePass, slice_values
from ..pipeline import Context, PassResult
from ..rules.base import lookup_tensor

__all__ = ["DeadUnitImportance"]

log = logging.getLogger(__name__)

# -- structural payoff: the compiler removes units that the masks made dead ------------------------
@dataclass(frozen=True)
class DeadUnitImportance(ImportancePass):
    """Score 0 for units that are provably dead, 1 + L1 of their slices otherwise (``importance="dead"``).

    With ``threshold=0.0`` the compiler then removes exactly the dead units, and the result computes the
    same function as the model it was given:

    * every consuming slice (role ``"in"``) of the unit is zero: this is the compiler's masked reference
      itself, so removal is exact by construction;
    * or every producing slice (role ``"out"``: filters/rows *and* biases) is zero, the group has no
      normalisation or other per-channel parameters (a BN would turn 0 into a constant), and the unit's
      activations are exactly 0 on the example inputs. With zero producers and no norm the activations
      cannot depend on the input, so "0 on the example inputs" means 0 everywhere (this also rejects
      activations with f(0) ≠ 0).

    ``importance="l1", threshold=0.0`` is the stricter form: a unit goes only when *all* its slices
    are zero (producer and consumer).
    """

    name: ClassVar[str] = "importance"
    normalize: str | None = None
    consumers: bool = True  # remove units whose input kernels in every consumer are zero
    producers: bool = True  # remove zero-producer, norm-free units whose activations are 0

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis = meta.get(gm, "groups")
        acts = _observe(gm, ctx.example_inputs, {c.node for g in analysis.groups if g.prunable for c in g.channels}) \
            if self.producers else {}
        out: dict[int, np.ndarray] = {}
        dead_total = 0
        for g in analysis.groups:
            if not g.prunable:
                continue
            s = self._scores(gm, g, acts)
            dead_total += int((s == 0).sum())
            out[g.id] = s
        meta.put(gm, "importance", out)
        return PassResult(gm, False, {"scored": len(out), "dead_units": dead_total})

    def _scores(self, gm: fx.GraphModule, g: ChannelGroup, acts: Mapping[str, Any]) -> np.ndarray:
        l1 = np.zeros(g.size)
        zero = {"in": np.ones(g.size, dtype=bool), "out": np.ones(g.size, dtype=bool)}
        has = {"in": np.zeros(g.size, dtype=bool), "out": np.zeros(g.size, dtype=bool)}
        normed = False
        for ps in g.params:
            if ps.role in ("norm", "other"):
                normed = True
            if ps.is_buffer:
                continue
            units, vals = slice_values(lookup_tensor(gm, ps.param)[0], ps)
            v = np.array([float(x.abs().sum()) for x in vals]) if isinstance(vals, list) \
                else vals.abs().double().sum(1).numpy()
            np.add.at(l1, units, v)
            if ps.role in zero:
                zero[ps.role][units] &= v == 0
                has[ps.role][units] = True
        dead = np.zeros(g.size, dtype=bool)
        if self.consumers:
            dead |= zero["in"]
        if self.producers and not normed:
            cand = zero["out"] & has["out"]
            if cand.any():
                dead |= cand & _zero_activations(g, acts)
        return np.where(dead, 0.0, 1.0 + l1)


def _observe(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], names: set[str]) -> dict[str, Any]:
    """Outputs of the nodes named in ``names`` on ``inputs`` (eval mode, no grad)."""
    seen: dict[str, Any] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            r = super().run_node(n)
            if n.name in names:
                seen[n.name] = r
            return r

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _Rec(gm).run(*inputs)
    finally:
        gm.train(was)
    return seen


def _zero_activations(g: ChannelGroup, acts: Mapping[str, Any]) -> np.ndarray:
    """Per unit: True when every activation position of the unit is exactly 0 (False if unobserved)."""
    ok = np.ones(g.size, dtype=bool)
    for c in g.channels:
        a = acts.get(c.node)
        if c.output is not None and isinstance(a, (tuple, list)):
            a = a[c.output]
        if not isinstance(a, torch.Tensor):
            return np.zeros(g.size, dtype=bool)
        flat = (a != 0).movedim(c.dim, 0).reshape(a.shape[c.dim], -1).any(1).numpy()
        units = member_units(c)
        try:
            rows = c.span.indices()
            nz = flat[rows].any(1)
        except ValueError:  # ragged explicit map
            nz = np.array([flat[list(r)].any() for r in c.span.table])  # type: ignore[union-attr]
        bad = np.zeros(g.size, dtype=bool)
        np.logical_or.at(bad, units, nz)
        ok &= ~bad
    return ok
