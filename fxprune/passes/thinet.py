"""ThiNet channel selection (Luo et al., ICCV 2017 / TPAMI 2018) in Gram form.

A group's units are judged by what their *consumers* need: unit ``j``'s contribution ``x̂_j`` to a
consumer's (bias-free) output, over calibration samples, enters only through the contribution Gram
``G = Σ x̂ x̂ᵀ`` (summed over every consumer of the group) and the cross moment with the target.

* ``thinet_greedy`` — ICCV: grow the removed set ``T`` minimising ``‖Σ_{j∈T} x̂_j‖²``. The objective of
  ``T ∪ {j}`` is ``1ᵀG_TT1 + 2(G·1_T)_j + G_jj``; keeping ``u = G·1_T`` (one column added per pick) makes a
  step O(U) instead of U layer re-runs, with picks identical to the brute force (:func:`thinet_bruteforce`).
* ``thinet_forward`` — TPAMI: forward selection of the *kept* set, each step adding the unit that most
  reduces the least-squares error ``min_w ‖y − Σ_{i∈S} w_i x̂_i‖²`` (orthogonal least squares on the
  Cholesky factor of ``G``, O(U²) per step).

Greedy runs to completion, so the pick order ranks every unit: the scores are the order (first removed =
lowest), and ``Select`` keeping the top ``k`` reproduces the greedy removed set of size ``U − k`` exactly.
Pinned units are never candidates. The ŵ rescale is :mod:`fxprune.passes.reconstruct` (``"thinet"``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch.fx as fx

from .calib import DataDrivenImportance, order_scores
from ..errors import ConfigError
from ..ir import ChannelGroup
from ..pipeline import Context

__all__ = ["thinet_greedy", "thinet_bruteforce", "forward_selection", "ThiNetImportance"]

log = logging.getLogger(__name__)


def thinet_greedy(G: np.ndarray, n_remove: int | None = None, exclude: Sequence[int] = ()) -> list[int]:
    """Units in the order ThiNet's greedy removes them (``n_remove`` picks, default all candidates).

    >>> import numpy as np
    >>> X = np.array([[1.0, -1.0, 0.1], [2.0, -2.0, 0.0]])  # units 0 and 1 cancel each other
    >>> thinet_greedy(X.T @ X)
    [2, 1, 0]
    """
    G = np.asarray(G, dtype=np.float64)
    U = G.shape[0]
    cand = np.ones(U, dtype=bool)
    cand[list(exclude)] = False
    n = int(cand.sum()) if n_remove is None else min(int(n_remove), int(cand.sum()))
    u = np.zeros(U)
    diag = np.diag(G).copy()
    total = 0.0
    order: list[int] = []
    for _ in range(n):
        obj = total + 2.0 * u + diag
        obj[~cand] = np.inf
        j = int(np.argmin(obj))  # ties → lowest index
        order.append(j)
        total = float(obj[j])
        u += G[:, j]
        cand[j] = False
    return order


def thinet_bruteforce(X: np.ndarray, n_remove: int, exclude: Sequence[int] = ()) -> list[int]:
    """Reference: the greedy of the paper evaluated literally, re-summing the contributions ``X`` (rows =
    samples, columns = units) of ``T ∪ {j}`` for every candidate ``j``. O(U²·M) per step."""
    X = np.asarray(X, dtype=np.float64)
    U = X.shape[1]
    removed: list[int] = []
    for _ in range(n_remove):
        best, best_v = -1, np.inf
        for j in range(U):
            if j in removed or j in exclude:
                continue
            v = float((X[:, removed + [j]].sum(1) ** 2).sum())
            if v < best_v:
                best, best_v = j, v
        removed.append(best)
    return removed


def forward_selection(G: np.ndarray, c: np.ndarray, n_keep: int | None = None, force: Sequence[int] = (),
                      eps: float = 1e-12) -> list[int]:
    """TPAMI ThiNet: kept units in order of addition, each minimising ``yy − c_Sᵀ G_SS⁻¹ c_S``.

    ``force`` units are added first (pinned). Units whose residual norm vanishes (dead or collinear) come
    last, by index.
    """
    G = np.asarray(G, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    U = G.shape[0]
    n = U if n_keep is None else min(int(n_keep), U)
    d = np.diag(G).copy()  # residual squared norms
    r = c.copy()  # residual correlations with the target
    Q: list[np.ndarray] = []
    free = np.ones(U, dtype=bool)
    order: list[int] = []
    scale = max(float(np.max(np.abs(np.diag(G)))) if U else 0.0, 1e-300)
    forced = list(dict.fromkeys(int(f) for f in force))
    while len(order) < n:
        if forced:
            j = forced.pop(0)
        else:
            ok = free & (d > eps * scale)
            if not ok.any():
                order += [int(k) for k in np.flatnonzero(free)][: n - len(order)]
                break
            gain = np.where(ok, r * r / np.where(ok, d, 1.0), -np.inf)
            j = int(np.argmax(gain))
        order.append(j)
        free[j] = False
        if d[j] <= eps * scale:
            continue  # adds nothing to the span
        q = G[:, j].copy()
        for qi in Q:
            q -= qi * qi[j]
        q /= np.sqrt(d[j])
        gamma = r[j] / np.sqrt(d[j])
        Q.append(q)
        d = np.maximum(d - q * q, 0.0)
        r = r - q * gamma
    return order


@dataclass(frozen=True)
class ThiNetImportance(DataDrivenImportance):
    """ThiNet scores from calibration data (needs ``calib=``).

    ``method``: ``"greedy"`` (ICCV, removed-set greedy) or ``"forward"`` (TPAMI forward selection).
    ``sampling``: ``"dense"`` (every output filter at every position, optionally ``max_positions`` random
    positions per image; deterministic for a fixed seed) or ``"random"`` (the paper: ``samples_per_image``
    random (position, output filter) pairs per image; the draws depend on the seed and the call order, so
    under torch.distributed only ``"dense"`` gives bit-identical selections to a single process).
    """

    name: ClassVar[str] = "thinet"
    method: str = "greedy"
    sampling: str = "dense"
    samples_per_image: int = 10
    max_positions: int | None = None
    seed: int = 0
    progress: bool | None = None
    normalize: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "forward"):
            raise ConfigError(f"ThiNet method must be 'greedy' or 'forward', got {self.method!r}")
        if self.sampling not in ("dense", "random"):
            raise ConfigError(f"ThiNet sampling must be 'dense' or 'random', got {self.sampling!r}")
        if not isinstance(self.samples_per_image, int) or self.samples_per_image < 1:
            raise ConfigError(f"samples_per_image must be an integer >= 1, got {self.samples_per_image!r}")
        if self.max_positions is not None and (not isinstance(self.max_positions, int) or self.max_positions < 1):
            raise ConfigError(f"max_positions must be None or an integer >= 1, got {self.max_positions!r}")

    def compute(self, gm: fx.GraphModule, ctx: Context, groups: Sequence[ChannelGroup],
                target: fx.GraphModule | None = None,
                out_index: Callable[[str], np.ndarray | None] | None = None) -> dict[int, np.ndarray | None]:
        mode = "sample" if self.sampling == "random" else "auto"
        out: dict[int, np.ndarray | None] = {}
        for g, gg in self.group_grams(gm, ctx, groups, target, out_index, mode, self.samples_per_image,
                                      self.max_positions, self.seed, self.progress):
            if gg is None:
                out[g.id] = None
                continue
            G, c, _, _ = gg
            if self.method == "greedy":
                order = thinet_greedy(G, exclude=g.pinned)
                out[g.id] = order_scores(order + [u for u in g.pinned], g.size, ascending=True)
            else:
                order = forward_selection(G, c, force=g.pinned)
                out[g.id] = order_scores(order, g.size, ascending=False)
        return out
