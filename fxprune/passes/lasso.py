"""LASSO channel selection (He et al., ICCV 2017, arXiv 1707.06168) in Gram form.

Per group: ``min_β (1/2N)‖Y − Σ_i β_i Z_i‖² + λ‖β‖₁`` where ``Z_i`` is unit ``i``'s contribution to its
consumers' outputs and ``Y`` the target (the original network's bias-free consumer outputs), summed over
every consumer of the group. Only the Gram ``G = ZᵀZ/N`` and ``c = ZᵀY/N`` from the calibration engine
are needed: coordinate descent works on them directly (maintaining ``Gβ``, one column per change, with
an active-set loop), so the cost per sweep is O(U·changes), independent of the data size.

λ search: double λ until at most ``c′`` units are non-zero, then bisect until exactly ``c′`` (as the paper;
``c′`` comes from the ``ratio`` option or the pipeline's ``Select``). Scores put the exact-count set on
top, so ``Select`` reproduces it. The least-squares refit of each consumer's full weight (+bias) on the
kept channels is the post-pass ``reconstruct="lstsq"`` (:mod:`fxprune.passes.reconstruct`).

Pinned units are unpenalised (always kept). When the count is unknown (threshold or MACs-target
selection) units are ranked along the λ path instead (largest λ at which a unit is non-zero first).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch.fx as fx

from .calib import DataDrivenImportance, order_scores
from ..errors import ConfigError
from ..ir import ChannelGroup
from ..pipeline import Context
from .select import Select, floor_count

__all__ = ["lasso_cd", "lasso_select", "LassoImportance", "target_keep"]

log = logging.getLogger(__name__)


def lasso_cd(G: np.ndarray, c: np.ndarray, lam: float | np.ndarray, beta: np.ndarray | None = None,
             max_sweeps: int = 500, tol: float = 1e-9) -> np.ndarray:
    """Coordinate descent for ``min ½βᵀGβ − cᵀβ + Σ λ_j|β_j|`` (``lam`` scalar or per unit).

    >>> import numpy as np
    >>> lasso_cd(np.eye(2), np.array([3.0, 0.5]), 1.0)
    array([2., 0.])
    """
    G = np.asarray(G, dtype=np.float64)
    U = G.shape[0]
    lam_v = np.broadcast_to(np.asarray(lam, dtype=np.float64), (U,)).tolist()
    diag = np.diag(G).tolist()
    cl = np.asarray(c, dtype=np.float64).tolist()
    b = np.zeros(U) if beta is None else np.array(beta, dtype=np.float64)
    q = G @ b
    bl = b.tolist()
    scale = max(max(diag) if diag else 0.0, 1e-300)

    def sweep(coords) -> float:
        nonlocal q
        big = 0.0
        for j in coords:
            gjj = diag[j]
            if gjj <= 1e-14 * scale:
                if bl[j] != 0.0:
                    q = q - bl[j] * G[:, j]
                    bl[j] = 0.0
                continue
            bj = bl[j]
            rho = cl[j] - q[j] + gjj * bj
            lj = lam_v[j]
            new = (rho - lj) / gjj if rho > lj else ((rho + lj) / gjj if rho < -lj else 0.0)
            d = new - bj
            if d != 0.0:
                q = q + d * G[:, j]
                bl[j] = new
                ad = abs(d) * math.sqrt(gjj)
                if ad > big:
                    big = ad
        return big

    ref = math.sqrt(max(float(np.dot(cl, cl)), 1e-300) / scale)
    for _ in range(max_sweeps):
        big = sweep(range(U))
        if big <= tol * ref:
            break
        for _ in range(max_sweeps):  # converge on the active set first
            act = [j for j in range(U) if bl[j] != 0.0]
            if sweep(act) <= tol * ref:
                break
    return np.asarray(bl)


def _count(beta: np.ndarray, pinned: np.ndarray) -> int:
    return int(((beta != 0) | pinned).sum())


def lasso_select(G: np.ndarray, c: np.ndarray, n_keep: int, pinned: Sequence[int] = (), max_steps: int = 60,
                 scale_columns: bool = False) -> tuple[list[int], np.ndarray]:
    """Exactly ``n_keep`` units by LASSO with the λ search; returns (ranked units, β at the chosen λ).

    The ranking lists the kept set first (by |β|), then the others (by |β| at the next smaller λ)."""
    G = np.asarray(G, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    U = G.shape[0]
    pin = np.zeros(U, dtype=bool)
    pin[list(pinned)] = True
    if scale_columns:
        s = np.sqrt(np.maximum(np.diag(G), 0.0))
        s[s == 0] = 1.0
        G, c = G / s[:, None] / s[None, :], c / s
    lam_w = np.where(pin, 0.0, 1.0)
    lam_max = float(np.max(np.abs(c))) if U else 0.0
    if n_keep >= U or lam_max <= 0:
        beta = lasso_cd(G, c, 0.0)
        order = sorted(range(U), key=lambda j: (not pin[j], -abs(beta[j]), j))
        return order, beta
    lo_lam, lo_beta = 0.0, lasso_cd(G, c, 0.0)
    hi_lam, hi_beta = None, None
    lam = lam_max * 1e-3
    beta = lo_beta
    for _ in range(max_steps):  # raise λ until at most n_keep are non-zero
        beta = lasso_cd(G, c, lam * lam_w, beta)
        if _count(beta, pin) <= n_keep:
            hi_lam, hi_beta = lam, beta
            break
        lo_lam, lo_beta = lam, beta
        lam *= 2.0
    if hi_beta is None:
        hi_lam, hi_beta = lam, beta
    for _ in range(max_steps):  # bisect to the exact count
        if _count(hi_beta, pin) == n_keep:
            break
        mid = 0.5 * (lo_lam + hi_lam)
        if mid <= lo_lam or mid >= hi_lam:
            break
        b = lasso_cd(G, c, mid * lam_w, hi_beta)
        if _count(b, pin) <= n_keep:
            hi_lam, hi_beta = mid, b
        else:
            lo_lam, lo_beta = mid, b
    kept = [j for j in range(U) if hi_beta[j] != 0 or pin[j]]
    kept.sort(key=lambda j: (not pin[j], -abs(hi_beta[j]), j))
    rest = [j for j in range(U) if j not in set(kept)]
    rest.sort(key=lambda j: (-abs(lo_beta[j]), -abs(c[j]), j))  # fill from the denser solution
    return kept + rest, hi_beta


def lasso_path_order(G: np.ndarray, c: np.ndarray, pinned: Sequence[int] = (), steps: int = 24) -> list[int]:
    """Rank units by the largest λ (geometric grid) at which they are non-zero."""
    U = G.shape[0]
    pin = np.zeros(U, dtype=bool)
    pin[list(pinned)] = True
    lam_max = float(np.max(np.abs(c))) if U else 0.0
    enter = np.full(U, -1.0)
    beta = np.zeros(U)
    for i, lam in enumerate(lam_max * np.geomspace(1.0, 1e-4, steps)):
        beta = lasso_cd(G, c, lam * np.where(pin, 0.0, 1.0), beta)
        new = (beta != 0) & (enter < 0)
        enter[new] = steps - i
    return sorted(range(U), key=lambda j: (not pin[j], -enter[j], -abs(beta[j]), j))


def downstream_select(ctx: Context) -> Select | None:
    """The :class:`Select` of the pipeline being run (a sequential step's own, when inside one)."""
    for p in getattr(ctx.pipeline, "passes", ()):
        if isinstance(p, Select):
            return p
        inner = getattr(p, "select", None)
        if isinstance(inner, Select):
            return inner
    return None


def target_keep(group: ChannelGroup, ctx: Context, ratio: float | None = None) -> int | None:
    """How many units the downstream :class:`Select` keeps in ``group`` (None when not a per-group ratio)."""
    sel = downstream_select(ctx)
    min_keep = 1
    if ratio is None:
        if sel is None or sel.threshold is not None or sel.target_macs is not None or sel.global_ranking:
            return None
        ratio = sel.ratio_for(group, sel.ratio or 0.0)
        min_keep = sel.min_keep
    keep = max(group.size - floor_count(ratio, group.size), min_keep, len(group.pinned), 1)
    return min(keep, group.size)


@dataclass(frozen=True)
class LassoImportance(DataDrivenImportance):
    """He et al. LASSO channel selection (needs ``calib=``; pair with ``reconstruct="lstsq"``).

    ``ratio``: the fraction removed per group, normally taken from the pipeline's ``Select``.
    ``max_positions``: random positions per image used for the statistics (None = all).
    """

    name: ClassVar[str] = "lasso"
    ratio: float | None = None
    scale_columns: bool = False
    max_positions: int | None = None
    seed: int = 0
    progress: bool | None = None
    normalize: str | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1):
            raise ConfigError(f"lasso ratio must be None or 0 <= ratio < 1, got {self.ratio!r}")

    def compute(self, gm: fx.GraphModule, ctx: Context, groups: Sequence[ChannelGroup],
                target: fx.GraphModule | None = None,
                out_index: Callable[[str], np.ndarray | None] | None = None) -> dict[int, np.ndarray | None]:
        out: dict[int, np.ndarray | None] = {}
        path_used = False
        for g, gg in self.group_grams(gm, ctx, groups, target, out_index, max_positions=self.max_positions,
                                      seed=self.seed, progress=self.progress):
            if gg is None:
                out[g.id] = None
                continue
            G, c, _, n = gg
            G, c = G / n, c / n
            k = target_keep(g, ctx, self.ratio)
            if k is None:
                order = lasso_path_order(G, c, g.pinned)
                path_used = True
            else:
                order, _ = lasso_select(G, c, k, g.pinned, scale_columns=self.scale_columns)
            out[g.id] = order_scores(order, g.size, ascending=False)
        if path_used:
            ctx.notes.append("lasso: no per-group ratio known; units ranked along the λ path")
        return out
