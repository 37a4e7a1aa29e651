"""Activation criteria from calibration data: APoZ and mean activation.

* ``apoz`` (Hu et al. 2016, "Network Trimming"): the average percentage of zeros of a unit's activation
  after the rectifier; score = 1 − APoZ (mostly-zero units go first).
* ``activation_mean``: the mean absolute activation of a unit (Molchanov et al. 2017's baseline).

A group lists every activation its units appear in (``ChannelRef``: conv output, BN output, ReLU output,
pooled map…). The criteria never look at op types: statistics are accumulated on every activation of the
group, and the *rectified* ones — activations where any exact zero was seen — are the ones used (all of
them if none is). Per-activation means are normalised by that activation's overall mean before they are
averaged, so a residual stream read at several depths weighs each depth equally. Statistics are sums
over batches (all-reduced under torch.distributed), memory O(channels).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.fx as fx

from .calib import DataDrivenImportance, activations, all_reduce_, calibration_batches, finite, run_graph
from ..errors import ConfigError
from ..ir import ChannelGroup, ChannelRef, member_units
from ..pipeline import Context

__all__ = ["ActivationImportance"]


def _rows(ref: ChannelRef) -> list[np.ndarray]:
    try:
        return list(ref.span.indices())
    except ValueError:
        return [np.asarray(r, dtype=np.int64) for r in ref.span.table]  # type: ignore[union-attr]


@dataclass(frozen=True)
class ActivationImportance(DataDrivenImportance):
    """``stat="apoz"`` (score 1 − fraction of zeros) or ``"mean"`` (mean |activation|); needs ``calib=``."""

    name: ClassVar[str] = "activation"
    stat: str = "apoz"
    progress: bool | None = None
    normalize: str | None = None

    def __post_init__(self) -> None:
        if self.stat not in ("apoz", "mean"):
            raise ConfigError(f"activation stat must be 'apoz' or 'mean', got {self.stat!r}")

    def compute(self, gm: fx.GraphModule, ctx: Context, groups: Sequence[ChannelGroup],
                target: fx.GraphModule | None = None,
                out_index: Callable[[str], np.ndarray | None] | None = None) -> dict[int, np.ndarray | None]:
        # accumulators per (node, output, dim): zeros, |x| sums and counts per position along dim
        acc: dict[tuple[str, int | None, int], list[torch.Tensor]] = {}
        watch: dict[str, list[tuple[int | None, int]]] = {}
        for g in groups:
            for ref in activations(gm, g):
                key = (ref.node, ref.output, ref.dim)
                if key not in acc:
                    acc[key] = []
                    watch.setdefault(ref.node, []).append((ref.output, ref.dim))
        for b, inputs in enumerate(calibration_batches(ctx, self.progress, f"{self.stat} statistics")):
            def hook_for(node: str) -> Callable[[tuple, Any], None]:
                def hook(env: Any, value: Any) -> None:
                    for out, dim in watch[node]:
                        v = value if out is None else value[out]
                        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                            continue
                        v = finite(v, f"activation '{node}'", b).detach().double().movedim(dim, 0)
                        v = v.reshape(v.shape[0], -1)
                        stats = torch.stack([(v == 0).sum(1).double(), v.abs().sum(1),
                                             torch.full((v.shape[0],), float(v.shape[1]), dtype=torch.float64)])
                        a = acc[(node, out, dim)]
                        if a:
                            a[0] += stats
                        else:
                            a.append(stats)
                return hook

            run_graph(gm, inputs, {n: hook_for(n) for n in watch}, b)
        all_reduce_([a[0] for a in acc.values() if a])
        out: dict[int, np.ndarray | None] = {}
        for g in groups:
            per: list[tuple[np.ndarray, np.ndarray, bool]] = []  # (zero fraction, normalised mean, rectified)
            for ref in activations(gm, g):
                a = acc.get((ref.node, ref.output, ref.dim))
                if not a:
                    continue
                zeros, abs_sum, cnt = a[0].numpy()
                units = member_units(ref)
                z = np.full(g.size, np.nan)
                m = np.full(g.size, np.nan)
                for u, pos in zip(units, _rows(ref), strict=True):
                    n = cnt[pos].sum()
                    z[u] = zeros[pos].sum() / n if n else np.nan
                    m[u] = abs_sum[pos].sum() / n if n else np.nan
                overall = np.nanmean(m) if np.isfinite(m).any() else 0.0
                if overall > 0:
                    m = m / overall
                per.append((z, m, bool(zeros.sum() > 0)))
            if not per:
                out[g.id] = None
                continue
            use = [p for p in per if p[2]] or per
            with warnings.catch_warnings():  # units absent from every used activation: NaN -> 0 below
                warnings.simplefilter("ignore", RuntimeWarning)
                if self.stat == "apoz":
                    s = 1.0 - np.nanmean(np.vstack([p[0] for p in use]), axis=0)
                else:
                    s = np.nanmean(np.vstack([p[1] for p in use]), axis=0)
            out[g.id] = np.nan_to_num(s, nan=0.0)
        return out
