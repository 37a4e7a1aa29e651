"""Reconstruction post-pass: refit the consumers of pruned channels on calibration data.

Runs after the rewrite with the pruned module and the graph it was rewritten from (its ``pruned_from``
fact) side by side: the *inputs* of every consumer come from the pruned network, the *targets* from the
original network's same layer (restricted to the output channels the pruned layer still has), so error accumulated upstream is
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

Consumers are the op families' :class:`~fxprune.rules.calls.Consumer` records (``nn.Linear``/``nn.Conv*``,
``aten.linear``/``aten.conv2d``, GPT-2's ``addmm`` with an ``(in, out)`` weight...), keyed by their weight's
name, and the refit writes the weight back in its own layout: reconstruction works on graphs of every front
end. A refit that cannot run (no supported consumer reads a removed channel) is said in the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from .. import meta
from .calib import consumers, collect
from .calib_stats import Site, SiteStats, build_site, dense_weight, write_dense_weight
from ..errors import ConfigError, InputError, PipelineError
from ..ir import Selection, member_units
from ..pipeline import Context, Pass, PassResult
from ..rules import RULES, RuleTable
from ..rules.base import lookup_tensor
from ..rules.calls import Consumer
from .rewrite import provenance

__all__ = ["Reconstruct", "reconstruct_sites", "consumers_of", "out_index_of", "unit_atoms", "input_count", "by_layer",
           "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("thinet", "lstsq")


def consumers_of(gm: fx.GraphModule, analysis, selection: Selection, rules: RuleTable = RULES) -> list[str]:
    """Sites (weight names, in ``gm``'s graph order) of the supported consumers reading a removed unit."""
    index = consumers(gm, rules)
    wanted: set[str] = set()
    for gid, _kept in selection.keep:
        for ps in analysis.groups[gid].params:
            if ps.role == "in" and not ps.is_buffer and ps.param in index \
                    and all(c.in_dim == ps.dim for _, c in index[ps.param]):
                wanted.add(ps.param)
    return [k for k in index if k in wanted]


def out_index_of(analysis, selection: Selection, original: fx.GraphModule,
                 rules: RuleTable = RULES) -> Callable[[str], np.ndarray | None]:
    """Original output channels each (pruned) site still has, or None when it kept them all."""
    keep_of = analysis.keep_fn(selection)
    index = consumers(original, rules)

    def f(key: str) -> np.ndarray | None:
        calls = index.get(key)
        if not calls:
            return None
        k = keep_of(("p", key, calls[0][1].out_dim))
        return None if k is None else np.flatnonzero(k)

    return f


def by_layer(errors: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Site errors keyed by layer (the weight's owner: ``"layer1.0.conv1"``) for the report."""
    return {(k[: -len(".weight")] if k.endswith(".weight") else k): v for k, v in errors.items()}


def _cin(gm: fx.GraphModule, c: Consumer) -> int:
    t = lookup_tensor(gm, c.weight)[0]
    return t.shape[c.in_dim] * (c.groups if c.kind == "conv" else 1)


def input_count(gm: fx.GraphModule, key: str, rules: RuleTable = RULES) -> int:
    """Input channels (features) of site ``key`` in ``gm``."""
    return _cin(gm, consumers(gm, rules)[key][0][1])


def unit_atoms(original: fx.GraphModule, analysis, selection: Selection, key: str, cin_new: int,
               rules: RuleTable = RULES) -> list[np.ndarray]:
    """Atoms (input positions of the PRUNED site ``key``) for ŵ: one per kept unit of every group the site
    reads, plus one atom with all remaining positions."""
    keep_of = analysis.keep_fn(selection)
    node, c = consumers(original, rules)[key][0]
    inp = next(n for n in original.graph.nodes if n.name == c.input)
    k = keep_of(("a", inp.name, None, c.input_dim % len(meta.shape_of(inp))))
    newpos = np.cumsum(k) - 1 if k is not None else None
    kept = selection.as_dict()
    atoms: list[np.ndarray] = []
    covered = np.zeros(cin_new, dtype=bool)
    for g in analysis.groups:
        keep_units = set(kept.get(g.id, range(g.size)))
        for ps in g.params:
            if ps.role != "in" or ps.param != key:
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


def _group_blocks(site: Site) -> list[tuple[np.ndarray, np.ndarray]]:
    """(dense D-indices, output rows) of each group block of a site (one block unless a grouped conv)."""
    g = site.groups if site.kind == "conv" else 1
    cg = site.cin // g
    og = site.O // g
    out = []
    for q in range(g):
        chans = np.arange(q * cg, (q + 1) * cg)
        d = (chans[:, None] * site.k + np.arange(site.k)[None, :]).reshape(-1)
        out.append((d, np.arange(q * og, (q + 1) * og)))
    return out


def _refit_lstsq(gm: fx.GraphModule, site: Site, st: SiteStats, ridge: float) -> tuple[float, float]:
    A, B, yy, _ = st.moments()
    D = site.D
    c = site.consumer
    wt = lookup_tensor(gm, c.weight)[0]
    bt = lookup_tensor(gm, c.bias)[0] if c.bias is not None else None
    Wflat = dense_weight(wt, c)
    bias = bt.detach().double() if bt is not None else None
    new_w = Wflat.clone()
    new_b = bias.clone() if bias is not None else None
    diag = torch.diagonal(A)[:D]
    dead = diag <= 1e-12 * max(float(diag.max()) if D else 0.0, 1e-300)
    err_before = err_after = 0.0
    for d_idx, rows in _group_blocks(site):
        local = np.arange(len(d_idx))
        live = local[~dead[torch.as_tensor(d_idx)].numpy()]
        cols = list(d_idx[live]) + ([D] if bias is not None else [])
        ci = torch.as_tensor(cols, dtype=torch.long)
        ri = torch.as_tensor(rows)
        Ab = A[ci][:, ci]
        Bb = B[ci][:, ri]
        # current parameters of this block as the (cols × rows) solution, for the error report
        cur = torch.cat([Wflat[ri][:, torch.as_tensor(d_idx[live])].T] + ([bias[ri][None, :]] if bias is not None else []), 0)
        # dead inputs keep their weights: remove their (≈0) contribution from the target
        dead_l = local[dead[torch.as_tensor(d_idx)].numpy()]
        if len(dead_l):
            Wd = Wflat[ri][:, torch.as_tensor(d_idx[dead_l])].T
            Bb = Bb - A[ci][:, torch.as_tensor(d_idx[dead_l])] @ Wd
        X = _solve(Ab, Bb, ridge, site.name, free_last=bias is not None)
        err_before += float((cur * (Ab @ cur)).sum() - 2 * (cur * Bb).sum())
        err_after += float((X * (Ab @ X)).sum() - 2 * (X * Bb).sum())
        new_w[ri[:, None], torch.as_tensor(d_idx[live])[None, :]] = X[: len(live)].T
        if bias is not None:
            new_b[ri] = X[len(live)]
    write_dense_weight(wt, c, new_w)
    if bt is not None:
        with torch.no_grad():
            bt.copy_(new_b.to(bt.dtype))
    yy = max(yy, 1e-300)
    return (yy + err_before) / yy, (yy + err_after) / yy


def _refit_thinet(gm: fx.GraphModule, site: Site, st: SiteStats, ridge: float) -> tuple[float, float]:
    G, c, yy = st.gram()
    na = G.shape[0]
    diag = torch.diagonal(G)
    alive = diag > 1e-12 * max(float(diag.max()) if na else 0.0, 1e-300)
    w = torch.ones(na, dtype=torch.float64)
    if alive.any():
        a = torch.nonzero(alive).flatten()
        d = torch.nonzero(~alive).flatten()
        rhs = c[a] - G[a][:, d] @ w[d]
        w[a] = _solve(G[a][:, a], rhs[:, None], ridge, site.name)[:, 0]
    one = torch.ones(na, dtype=torch.float64)
    yy = max(yy, 1e-300)
    before = (yy - 2 * float(one @ c) + float(one @ G @ one)) / yy
    after = (yy - 2 * float(w @ c) + float(w @ G @ w)) / yy
    # every output filter's kernel for an atom's input positions is multiplied by the atom's scalar
    wt = lookup_tensor(gm, site.consumer.weight)[0]
    W = dense_weight(wt, site.consumer)
    for a_i, pos in enumerate(site.atoms):
        s = float(w[a_i])
        if s != 1.0:
            d = (np.asarray(pos, dtype=np.int64)[:, None] * site.k + np.arange(site.k)).reshape(-1)
            W[:, torch.as_tensor(d)] *= s
    write_dense_weight(wt, site.consumer, W)
    return before, after


def reconstruct_sites(gm: fx.GraphModule, ctx: Context, keys: Sequence[str], method: str,
                      out_index: Callable[[str], np.ndarray | None], target: fx.GraphModule,
                      atoms: Mapping[str, list[np.ndarray]] | None = None, ridge: float = 1e-6,
                      sequential: bool = True, max_positions: int | None = None, seed: int = 0,
                      progress: bool | None = None, rules: RuleTable = RULES) -> dict[str, tuple[float, float]]:
    """Refit the sites ``keys`` (weight names) of ``gm`` in place against ``target``'s same layers
    (``method`` ``"thinet"``: needs ``atoms``; ``"lstsq"``).

    Returns ``{site: (relative error before, after)}`` on the calibration data."""
    if method not in METHODS:
        raise ConfigError(f"reconstruct method must be one of {', '.join(METHODS)}, got {method!r}")
    result: dict[str, tuple[float, float]] = {}
    index = consumers(gm, rules)
    batches = [[k] for k in keys] if sequential else [list(keys)]
    for ks in batches:
        sites = {}
        for k in ks:
            c = index[k][0][1]
            at = list((atoms or {}).get(k) or [np.array([p]) for p in range(_cin(gm, c))]) if method == "thinet" else []
            sites[k] = build_site(gm, c, at, target, out_index(k))
        stats = collect(ctx, gm, sites, target, "moment" if method == "lstsq" else "auto",
                        max_positions=max_positions, seed=seed, progress=progress, desc=f"reconstruct ({method})",
                        rules=rules)
        for k in ks:
            fit = _refit_lstsq if method == "lstsq" else _refit_thinet
            result[k] = fit(gm, sites[k], stats[k], ridge)
            c = sites[k].consumer
            tensors = [lookup_tensor(gm, c.weight)[0]] + ([lookup_tensor(gm, c.bias)[0]] if c.bias else [])
            if not all(torch.isfinite(t).all() for t in tensors):
                raise InputError(f"reconstruction of '{sites[k].name}' produced non-finite parameters")
            log.debug("reconstruct %s %s: rel. error %.4g -> %.4g", method, k, *result[k])
    return result


@dataclass(frozen=True)
class Reconstruct(Pass):
    """Post-pass after the rewrite (needs ``calib=``): ``method`` ``"thinet"`` (ŵ) or ``"lstsq"``.

    Reads the rewrite's provenance (``pruned_from``: the source graph, its groups and the selection) and
    writes ``reconstruction`` (per site: relative error before and after)."""

    name: ClassVar[str] = "reconstruct"
    reads: ClassVar[tuple[str, ...]] = ("shapes", "pruned_from")
    writes: ClassVar[tuple[str, ...]] = ("reconstruction",)
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
        prov = provenance(gm)
        if prov is None:
            raise PipelineError("reconstruct must run after a rewrite (it needs the rewrite's provenance)")
        analysis, sel, source = prov.analysis, prov.selection, prov.source
        rules = getattr(analysis, "rules", RULES)
        keys = consumers_of(gm, analysis, sel, rules)
        atoms = None
        if self.method == "thinet":
            index = consumers(gm, rules)
            atoms = {k: unit_atoms(source, analysis, sel, k, _cin(gm, index[k][0][1]), rules) for k in keys}
        res = reconstruct_sites(gm, ctx, keys, self.method, out_index_of(analysis, sel, source, rules), source, atoms,
                                self.ridge, self.sequential, self.max_positions, self.seed, self.progress, rules)
        done = dict(meta.get(gm, "reconstruction") or {})
        done.update(by_layer(res))
        meta.put(gm, "reconstruction", done)
        if sel.keep and not res:
            ctx.shortfall(f"reconstruct ({self.method}): no refit ran — no layer reading a removed channel is a "
                             "conv or linear layer the refit models")
        before = float(np.mean([b for b, _ in res.values()])) if res else 0.0
        after = float(np.mean([a for _, a in res.values()])) if res else 0.0
        return PassResult(gm, bool(res), {"layers": len(res), "rel_err_before": before, "rel_err_after": after})
