"""Reconstruction post-pass: refit the consumers of pruned channels on calibration data.

Runs after the rewrite with the pruned module and the original (``ctx.original``) side by side: the
*inputs* of every consumer come from the pruned network, the *targets* from the original network's same
layer (restricted to the output channels the pruned layer still has), so error accumulated upstream is
corrected too. Consumers are processed in graph order; with ``sequential=True`` (default) the statistics of
each layer are measured after the layers before it were refitted.

Methods:

* ``"thinet"`` — ThiNet's ŵ: one scalar per kept input channel (unit), multiplied into every output
  filter's kernel for that channel: ``ŵ = argmin ‖ŷ − Σ_j w_j x̂_j‖² = G⁻¹c`` in the contribution Gram
  form (bias excluded from the target, so the layer's bias is unchanged).
* ``"lstsq"`` — He et al.'s least-squares refit of the consumer's **full** weight and bias on the kept
  inputs: normal equations ``[W b] = (A + λI)⁻¹ B`` on the bias-augmented patch moments; a grouped conv
  is refitted per group block (its structure is kept).

Rank deficiency (dead or collinear inputs) is handled by a documented ridge: ``λ = ridge · mean(diag)``
(default ``ridge=1e-6``), and inputs that are exactly dead on the calibration data keep their original
weights (ŵ = 1), so they do not change behaviour on data where they are alive. A solve that still yields
a non-finite value raises :class:`~fxprune.errors.InputError`; the output model never gets NaN weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..calib import Site, SiteStats, collect, make_site, module_calls, supported_consumer
from ..errors import ConfigError, InputError, PipelineError
from ..ir import Selection, member_units
from ..pipeline import Context, Pass, PassResult

__all__ = ["Reconstruct", "reconstruct_modules", "consumers_of", "out_index_of", "unit_atoms", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("thinet", "lstsq")


def consumers_of(gm: fx.GraphModule, analysis, selection: Selection) -> list[str]:
    """Supported consumer modules (in ``gm``'s graph order) reading a unit the selection removes."""
    mods: set[str] = set()
    for gid, _kept in selection.keep:
        for ps in analysis.groups[gid].params:
            m = supported_consumer(gm, ps)
            if m is not None:
                mods.add(m)
    order = [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in mods]
    return list(dict.fromkeys(order))


def out_index_of(analysis, selection: Selection) -> Callable[[str], np.ndarray | None]:
    """Original output channels each (pruned) module still has, or None when it kept them all."""
    keep_of = analysis.keep_fn(selection)

    def f(mod: str) -> np.ndarray | None:
        k = keep_of(("p", f"{mod}.weight", 0))
        return None if k is None else np.flatnonzero(k)

    return f


def _input_dim(original: fx.GraphModule, mod: str) -> tuple[fx.Node, int]:
    node = module_calls(original, mod)[0]
    inp = node.args[0]
    m = original.get_submodule(mod)
    tm = inp.meta.get("tensor_meta")
    ndim = len(tm.shape) if tm is not None and hasattr(tm, "shape") else 2
    return inp, (ndim - 1 if isinstance(m, nn.Linear) else 1)


def unit_atoms(original: fx.GraphModule, analysis, selection: Selection, mod: str, cin_new: int) -> list[np.ndarray]:
    """Atoms (input positions of the PRUNED module) for ŵ: one per kept unit of every group the module
    reads, plus one atom with all remaining positions."""
    keep_of = analysis.keep_fn(selection)
    inp, dim = _input_dim(original, mod)
    k = keep_of(("a", inp.name, None, dim))
    newpos = np.cumsum(k) - 1 if k is not None else None
    kept = selection.as_dict()
    atoms: list[np.ndarray] = []
    covered = np.zeros(cin_new, dtype=bool)
    for g in analysis.groups:
        keep_units = set(kept.get(g.id, range(g.size)))
        for ps in g.params:
            if ps.role != "in" or ps.param != f"{mod}.weight":
                continue
            try:
                rows = list(ps.span.indices())
            except ValueError:
                rows = [np.asarray(r, dtype=np.int64) for r in ps.span.table]  # type: ignore[union-attr]
            for u, pos in zip(member_units(ps), rows, strict=True):
                if int(u) not in keep_units:
                    continue
                p = np.asarray(pos, dtype=np.int64)
                if newpos is not None:
                    p = newpos[p]
                if (p < 0).any() or (p >= cin_new).any() or covered[p].any():
                    continue  # not a clean unit after pruning: left to the remainder atom
                covered[p] = True
                atoms.append(p)
    rest = np.flatnonzero(~covered)
    if len(rest):
        atoms.append(rest)
    return atoms


def _solve(A: torch.Tensor, B: torch.Tensor, ridge: float, what: str, free_last: bool = False) -> torch.Tensor:
    """(A + λI)⁻¹B with λ = ridge·mean(diag) (the bias row/col ``free_last`` is not regularised)."""
    n = A.shape[0]
    dw = torch.diagonal(A)[: n - 1 if free_last else n]
    lam = ridge * float(dw.mean()) if dw.numel() and float(dw.mean()) > 0 else ridge
    reg = torch.full((n,), lam, dtype=A.dtype)
    if free_last:
        reg[-1] = lam * 1e-6
    for _ in range(4):
        M = A + torch.diag(reg)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0:
            X = torch.cholesky_solve(B, L)
            if torch.isfinite(X).all():
                return X
        reg = reg * 100 + 1e-12
    X = torch.linalg.pinv(A + torch.diag(reg), hermitian=True) @ B
    if not torch.isfinite(X).all():
        raise InputError(f"reconstruction of '{what}' produced non-finite weights: the calibration statistics are "
                         "degenerate (check the data for extreme values)")
    return X


def _grouped_rows(mod: nn.Module, k: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(dense D-indices, output rows, weight column offset) of each group block of a conv/linear."""
    groups = getattr(mod, "groups", 1)
    W = mod.weight
    O, cg = W.shape[0], W.shape[1]
    og = O // groups
    out = []
    for q in range(groups):
        chans = np.arange(q * cg, (q + 1) * cg)
        d = (chans[:, None] * k + np.arange(k)[None, :]).reshape(-1)
        out.append((d, np.arange(q * og, (q + 1) * og), q))
    return out


def _refit_lstsq(mod: nn.Module, site: Site, st: SiteStats, ridge: float) -> tuple[float, float]:
    A, B, yy, _ = st.moments()
    D = site.D
    W = mod.weight.detach()
    O, cg = W.shape[0], W.shape[1]
    Wflat = W.double().reshape(O, -1)
    bias = mod.bias.detach().double() if mod.bias is not None else None
    new_w = Wflat.clone()
    new_b = bias.clone() if bias is not None else None
    diag = torch.diagonal(A)[:D]
    dead = diag <= 1e-12 * max(float(diag.max()) if D else 0.0, 1e-300)
    err_before = err_after = 0.0
    for d_idx, rows, _q in _grouped_rows(mod, site.k):
        local = np.arange(len(d_idx))
        live = local[~dead[torch.as_tensor(d_idx)].numpy()]
        cols = list(d_idx[live]) + ([D] if bias is not None else [])
        ci = torch.as_tensor(cols, dtype=torch.long)
        Ab = A[ci][:, ci]
        Bb = B[ci][:, torch.as_tensor(rows)]
        # current parameters of this block as the (cols × rows) solution, for the error report
        cur = torch.cat([Wflat[torch.as_tensor(rows)][:, torch.as_tensor(live)].T] +
                        ([bias[torch.as_tensor(rows)][None, :]] if bias is not None else []), 0)
        # dead inputs keep their weights: remove their (≈0) contribution from the target
        dead_l = local[dead[torch.as_tensor(d_idx)].numpy()]
        if len(dead_l):
            Wd = Wflat[torch.as_tensor(rows)][:, torch.as_tensor(dead_l)].T
            Bb = Bb - A[ci][:, torch.as_tensor(d_idx[dead_l])] @ Wd
        X = _solve(Ab, Bb, ridge, site.module, free_last=bias is not None)
        err_before += float((cur * (Ab @ cur)).sum() - 2 * (cur * Bb).sum())
        err_after += float((X * (Ab @ X)).sum() - 2 * (X * Bb).sum())
        ri = torch.as_tensor(rows)
        new_w[ri[:, None], torch.as_tensor(live)[None, :]] = X[: len(live)].T
        if bias is not None:
            new_b[ri] = X[len(live)]
    with torch.no_grad():
        mod.weight.copy_(new_w.reshape(W.shape).to(W.dtype))
        if bias is not None:
            mod.bias.copy_(new_b.to(mod.bias.dtype))
    yy = max(yy, 1e-300)
    return (yy + err_before) / yy, (yy + err_after) / yy


def _scale_inputs(mod: nn.Module, site: Site, w: torch.Tensor) -> None:
    """Multiply every output filter's kernel for the atoms' input positions by ``w`` (one per atom)."""
    W = mod.weight
    with torch.no_grad():
        for a, pos in enumerate(site.atoms):
            s = float(w[a])
            if s == 1.0:
                continue
            for p in np.asarray(pos, dtype=np.int64):
                if isinstance(mod, nn.Linear):
                    W[:, p] *= s
                else:
                    cg = W.shape[1]
                    q, j = divmod(int(p), cg)
                    og = W.shape[0] // mod.groups
                    W[q * og : (q + 1) * og, j] *= s


def _refit_thinet(mod: nn.Module, site: Site, st: SiteStats, ridge: float) -> tuple[float, float]:
    G, c, yy = st.gram()
    na = G.shape[0]
    diag = torch.diagonal(G)
    alive = diag > 1e-12 * max(float(diag.max()) if na else 0.0, 1e-300)
    w = torch.ones(na, dtype=torch.float64)
    if alive.any():
        a = torch.nonzero(alive).flatten()
        d = torch.nonzero(~alive).flatten()
        rhs = c[a] - G[a][:, d] @ w[d]
        w[a] = _solve(G[a][:, a], rhs[:, None], ridge, site.module)[:, 0]
    one = torch.ones(na, dtype=torch.float64)
    yy = max(yy, 1e-300)
    before = (yy - 2 * float(one @ c) + float(one @ G @ one)) / yy
    after = (yy - 2 * float(w @ c) + float(w @ G @ w)) / yy
    _scale_inputs(mod, site, w)
    return before, after


def reconstruct_modules(gm: fx.GraphModule, ctx: Context, modules: Sequence[str], method: str,
                        out_index: Callable[[str], np.ndarray | None],
                        atoms: Mapping[str, list[np.ndarray]] | None = None, ridge: float = 1e-6,
                        sequential: bool = True, max_positions: int | None = None, seed: int = 0,
                        progress: bool | None = None) -> dict[str, tuple[float, float]]:
    """Refit ``modules`` of ``gm`` in place (``method`` ``"thinet"``: needs ``atoms``; ``"lstsq"``).

    Returns ``{module: (relative error before, after)}`` on the calibration data."""
    if method not in METHODS:
        raise ConfigError(f"reconstruct method must be one of {', '.join(METHODS)}, got {method!r}")
    target = ctx.original
    if target is None:
        raise PipelineError("reconstruction needs the original graph (ctx.original)")
    result: dict[str, tuple[float, float]] = {}
    batches = [[m] for m in modules] if sequential else [list(modules)]
    for mods in batches:
        sites = {}
        for m in mods:
            mod = gm.get_submodule(m)
            if method == "thinet":
                at = list((atoms or {}).get(m) or [np.array([p]) for p in range(_cin(mod))])
            else:
                at = []
            sites[m] = make_site(gm, m, at, target, out_index(m))
        stats = collect(ctx, gm, sites, target, "moment" if method == "lstsq" else "auto",
                        max_positions=max_positions, seed=seed, progress=progress, desc=f"reconstruct ({method})")
        for m in mods:
            mod = gm.get_submodule(m)
            fit = _refit_lstsq if method == "lstsq" else _refit_thinet
            result[m] = fit(mod, sites[m], stats[m], ridge)
            if not all(torch.isfinite(p).all() for p in mod.parameters()):
                raise InputError(f"reconstruction of '{m}' produced non-finite parameters")
            log.debug("reconstruct %s %s: rel. error %.4g -> %.4g", method, m, *result[m])
    return result


@dataclass(frozen=True)
class Reconstruct(Pass):
    """Post-pass after the rewrite (needs ``calib=``): ``method`` ``"thinet"`` (ŵ) or ``"lstsq"``.

    Reads the rewrite's analysis and selection from ``ctx.extras`` (set by ``Rewrite``)."""

    name: ClassVar[str] = "reconstruct"
    reads: ClassVar[tuple[str, ...]] = ("shapes",)
    writes: ClassVar[tuple[str, ...]] = ()
    needs_calib: ClassVar[bool] = True

    method: str = "lstsq"
    ridge: float = 1e-6
    sequential: bool = True
    max_positions: int | None = None
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"reconstruct method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.ridge, (int, float)) or not self.ridge >= 0:
            raise ConfigError(f"ridge must be a number >= 0, got {self.ridge!r}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis, sel = ctx.extras.get("analysis"), ctx.extras.get("selection")
        if analysis is None or sel is None:
            raise PipelineError("reconstruct must run after a rewrite (it needs the rewrite's analysis and selection)")
        if ctx.original is None:
            raise PipelineError("reconstruct needs the original graph (ctx.original)")
        mods = consumers_of(gm, analysis, sel)
        atoms = None
        if self.method == "thinet":
            atoms = {m: unit_atoms(ctx.original, analysis, sel, m, _cin(gm.get_submodule(m))) for m in mods}
        res = reconstruct_modules(gm, ctx, mods, self.method, out_index_of(analysis, sel), atoms, self.ridge,
                                  self.sequential, self.max_positions, self.seed, self.progress)
        ctx.extras.setdefault("reconstruct", {}).update(res)
        before = float(np.mean([b for b, _ in res.values()])) if res else 0.0
        after = float(np.mean([a for _, a in res.values()])) if res else 0.0
        return PassResult(gm, bool(res), {"layers": len(res), "rel_err_before": before, "rel_err_after": after})


def _cin(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.in_features
    return mod.in_channels
