"""Importance passes: one score per unit of every prunable group (higher = more important).

Criteria never dispatch on op type: a group lists its parameter slices, so a criterion is a reduction
over tensors. ``MagnitudeImportance`` takes the Lp norm of every slice a unit owns (``roles`` picks which:
producers' output filters, consumers' input kernels, norm affine parameters), reduces over slices
(``reduction``: sum / mean / max), optionally normalising each slice's scores first
(``layer_normalize``) and each group's scores after (``normalize``, useful for global ranking).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
import torch.fx as fx

from .. import meta
from ..errors import ConfigError
from ..ir import ChannelGroup, ParamSlice, Span, member_units
from ..pipeline import Context, Pass, PassResult
from ..rules.base import lookup_tensor

__all__ = [
    "ImportancePass",
    "MagnitudeImportance",
    "BNScaleImportance",
    "RandomImportance",
    "slice_values",
    "slice_mass",
    "position_mass",
    "unit_mass",
    "TensorCache",
    "lp_norm",
    "reduce_slices",
    "normalize_scores",
    "store_scores",
    "IMPORTANCE",
    "named_importance",
    "resolve_importance",
    "register_importance",
]


def slice_values(t: torch.Tensor, ps: ParamSlice) -> tuple[np.ndarray, "torch.Tensor | list[torch.Tensor]"]:
    """(group units, values): a (units, n) tensor, or one flat tensor per unit for ragged maps."""
    t = t.detach()
    if ps.groups > 1:  # grouped conv input dim: address (group block, row, col) as full in-channel index
        g = ps.groups
        t = t.reshape(g, t.shape[0] // g, t.shape[1], -1).permute(0, 2, 1, 3).reshape(g * t.shape[1], -1)
    else:
        t = t.movedim(ps.dim, 0).reshape(t.shape[ps.dim], -1)
    units = member_units(ps)
    sp = ps.span
    if isinstance(sp, Span) and sp.start == 0 and sp.repeat == 1 and sp.stride == sp.block and sp.size * sp.block == t.shape[0]:
        return units, t.reshape(sp.size, -1)  # the whole dim, contiguous blocks: no gather needed
    try:
        idx = torch.as_tensor(ps.span.indices())
        return units, t[idx].reshape(idx.shape[0], -1)
    except ValueError:  # ragged explicit map
        rows = [torch.as_tensor(r, dtype=torch.long) for r in ps.span.table]  # type: ignore[union-attr]
        return units, [t[r].reshape(-1) for r in rows]


class TensorCache:
    """``cache(name)``: the graph's tensor ``name`` (detached), looked up once; :meth:`mass`: the Lp mass per
    position of one of its dims, computed with one reduction per tensor (see :func:`position_mass`)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._tensors: dict[str, torch.Tensor] = {}
        self._core: dict[tuple[str, int], torch.Tensor] = {}
        #: ``(param, dim, groups, p) -> per-position mass``: what :meth:`mass` computed (the ``unit_mass`` fact)
        self.masses: dict[tuple[str, int, int, int], np.ndarray] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            self._tensors[name] = lookup_tensor(self.gm, name)[0].detach()
        return self._tensors[name]

    def mass(self, name: str, dim: int, groups: int, p: int) -> np.ndarray:
        key = (name, dim, groups, p)
        if key not in self.masses:
            t = self(name)
            small = t.numel() <= _SMALL and t.device.type == "cpu" and not t.is_complex()
            if t.dim() >= 2 and dim in (0, 1) and (small or groups > 1 or t[0, 0].numel() >= 4):
                # one (dim 0, dim 1) matrix per tensor, shared by both dims: a conv's window dims reduced in one
                # pass (a 4x+ smaller matrix); a small tensor squared in numpy (torch's per-op cost dominates there)
                if (name, p) not in self._core:
                    self._core[(name, p)] = _small_core(t, p) if small else _window_mass(t, p).double().numpy()
                self.masses[key] = _fold(self._core[(name, p)], dim, groups)
            elif small and t.dim() == 1:
                a = _as_float64(t)
                self.masses[key] = np.abs(a) if p == 1 else a * a
            else:
                self.masses[key] = position_mass(t, dim, groups, p)
        return self.masses[key]


#: tensors of up to this many elements are reduced in numpy: for them torch's fixed cost per op (several µs,
#: several ops per tensor) is most of the time (measured: 1x1 convs of 256-16k elements 2.5-6x faster; beyond
#: that, and for 3x3 windows, torch's reductions win)
_SMALL = 1 << 14


def _accum(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _as_float64(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of the CPU tensor ``t``."""
    return _accum(t.detach()).resolve_conj().resolve_neg().numpy().astype(np.float64)


def _small_core(t: torch.Tensor, p: int) -> np.ndarray:
    """Σ|x|^p over every dim after the first two of a small CPU tensor: its (dim 0, dim 1) matrix, float64."""
    a = _as_float64(t)
    a = np.abs(a, out=a) if p == 1 else np.square(a, out=a)
    return a.reshape(a.shape[0], a.shape[1], -1).sum(2)


def _window_mass(t: torch.Tensor, p: int) -> torch.Tensor:
    """Σ|x|^p over the window dims of a (out, in, *window) weight: an (out, in) matrix. The window sums are a
    matrix-vector product with ones (a BLAS call, ~2x faster than a reduction over a short inner dim), a block
    of rows at a time so the |x|^p temporary stays small."""
    x = _accum(t.detach())
    rows = x.reshape(-1, x[0, 0].numel())
    ones = torch.ones(rows.shape[1], dtype=x.dtype)
    parts = [(b.abs() if p == 1 else b.square()) @ ones for b in rows.split(max(1, (1 << 21) // rows.shape[1]))]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(x.shape[0], x.shape[1])


def _fold(m: np.ndarray, dim: int, groups: int) -> np.ndarray:
    """Per-position mass of ``dim`` (0 or 1) from the float64 (dim 0, dim 1) matrix ``m`` of a conv."""
    if groups > 1 and dim == 1:  # grouped conv input: position q * cg + j sums block q's rows of column j
        return m.reshape(groups, m.shape[0] // groups, m.shape[1]).sum(1).reshape(-1)
    return m.sum(1 - dim)


def position_mass(t: torch.Tensor, dim: int, groups: int = 1, p: int = 2) -> np.ndarray:
    """Σ|x|^p (float64) over everything but position ``i`` of ``dim``, for every ``i``: the magnitude of the
    slice ``t.select(dim, i)``, in one reduction. ``groups > 1``: ``dim`` 1 of a grouped conv, addressed as the
    full input-channel index (``groups * t.shape[1]`` positions)."""
    x = _accum(t.detach())
    if x.dim() == 1:
        m = x.abs().double() ** p if p == 1 else x.double() ** p
    elif groups > 1:
        return _fold(_window_mass(x, p).double().numpy(), 1, groups)
    elif dim % x.dim() == 0:
        m = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), ord=p, dim=1).double() ** p
    else:  # the inner dims first (contiguous), then the outer ones row block by row block
        d = dim % x.dim()
        m3 = x.reshape(-1, x.shape[d], int(np.prod(x.shape[d + 1:], dtype=np.int64)))
        if m3.shape[2] > 1:
            m = _row_sums(torch.linalg.vector_norm(m3, ord=p, dim=2) ** p, p, powered=True)
        else:
            m = _row_sums(m3.reshape(m3.shape[0], m3.shape[1]), p, powered=False)
    return m.numpy()


def _row_sums(m: torch.Tensor, p: int, powered: bool) -> torch.Tensor:
    """Σ over the rows of ``m`` (|m|^p unless ``powered``) in float64, a cache-sized block of rows at a time:
    ``vector_norm(dim=0)`` of a row-major matrix is a strided reduction ~10x slower, and a full-size |m|^p
    temporary costs as much in fresh pages."""
    out = torch.zeros(m.shape[1], dtype=torch.float64)
    for b in m.split(max(1, (1 << 17) // max(1, m.shape[1]))):
        out += (b if powered else b.abs() if p == 1 else b.square()).sum(0).double()
    return out


def unit_mass(ps: ParamSlice, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(units, mass per unit) of slice ``ps`` from the per-position mass ``pos`` of its dim: each unit sums its
    positions (the Lp^p norm of the unit's whole slice)."""
    units = member_units(ps)
    sp = ps.span
    if isinstance(sp, Span) and sp.start == 0 and sp.repeat == 1 and sp.stride == sp.block and \
            sp.size * sp.block == len(pos):
        return units, pos.reshape(sp.size, sp.block).sum(1)
    try:
        return units, pos[ps.span.indices()].sum(1)
    except ValueError:  # ragged explicit map
        return units, np.array([pos[np.asarray(r, dtype=np.int64)].sum() for r in ps.span.table])  # type: ignore


def lp_norm(x: torch.Tensor, p: int, dim: int | None = None):
    """Sum of |x| (p=1) or of x² (p=2), in float64; over ``dim`` (array) or all (float)."""
    if dim is None:
        return float(torch.linalg.vector_norm(x.float(), ord=p)) ** p
    return torch.linalg.vector_norm(x.float(), ord=p, dim=dim).double().numpy() ** p


def slice_mass(tensor: Callable[[str], torch.Tensor], ps: ParamSlice, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(units, Σ|x|^p of each unit's slice): through ``tensor.mass`` when ``tensor`` is a :class:`TensorCache`
    (one reduction per tensor, shared by its slices), else by gathering the slice."""
    mass = getattr(tensor, "mass", None)
    if mass is not None:
        return unit_mass(ps, mass(ps.param, ps.dim, ps.groups, p))
    return unit_mass(ps, position_mass(tensor(ps.param), ps.dim, ps.groups, p))


def reduce_slices(per: list[np.ndarray], how: str) -> np.ndarray | None:
    """One score per unit from per-slice scores (rows; NaN where a slice does not cover the unit), reduced by
    ``how`` (``"sum"``, ``"mean"`` or ``"max"``); None when there is no slice."""
    if not per:
        return None
    m = np.vstack(per)
    if how == "sum":  # nansum: 0 for a unit no slice covers (no "empty slice" warning to catch)
        with np.errstate(all="ignore"):
            s = np.nansum(m, axis=0)
        return s if np.isfinite(s).all() else np.nan_to_num(s, nan=0.0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a unit no slice covers: NaN, then 0
        s = {"sum": np.nansum, "mean": np.nanmean, "max": np.nanmax}[how](m, axis=0)
    return np.nan_to_num(s, nan=0.0)


def normalize_scores(s: np.ndarray, how: str | None) -> np.ndarray:
    if how is None or how == "none":
        return s
    if how == "mean":
        d = s.mean()
    elif how == "max":
        d = s.max()
    elif how == "sum":
        d = s.sum()
    elif how == "standard":
        return (s - s.mean()) / (s.std() + 1e-12)
    else:
        raise ConfigError(f"normalize must be None, 'mean', 'max', 'sum' or 'standard', got {how!r}")
    return s / d if d > 0 else s


def store_scores(gm: fx.GraphModule, ctx: Context, name: str,
                 scored: Iterable[tuple[ChannelGroup, Any]], normalize: str | None,
                 nonfinite: type[Exception] = ValueError) -> tuple[dict[int, np.ndarray], int]:
    """Check, normalise and write ``importance`` for ``(group, scores or None)`` pairs; note the unscored.

    Returns (scores per group id, number of groups without a score). ``nonfinite`` is the error type
    raised for NaN/Inf scores (data-driven criteria report them as bad input)."""
    out: dict[int, np.ndarray] = {}
    skipped = 0
    for g, s in scored:
        if s is None:
            skipped += 1
            continue
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (g.size,):
            raise ValueError(f"{name}: scores for group {g.id} have shape {s.shape}, expected ({g.size},)")
        if not np.isfinite(s).all():
            raise nonfinite(f"{name}: non-finite importance in group {g.id} ({g.root})")
        out[g.id] = normalize_scores(s, normalize)
    meta.put(gm, "importance", out)
    if skipped:
        ctx.shortfall(f"{name}: {skipped} prunable groups have no score and are kept")
    return out, skipped


class ImportancePass(Pass):
    """Base: subclasses implement :meth:`scores` for one group (None = no opinion → group kept)."""

    name: ClassVar[str] = "importance"
    reads: ClassVar[tuple[str, ...]] = ("groups",)
    writes: ClassVar[tuple[str, ...]] = ("importance",)
    normalize: str | None = None

    def scores(self, group: ChannelGroup, tensor: Callable[[str], torch.Tensor], ctx: Context) -> np.ndarray | None:
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis = meta.get(gm, "groups")
        tensor = TensorCache(gm)
        groups = [g for g in analysis.groups if g.prunable]
        out, skipped = store_scores(gm, ctx, self.name, ((g, self.scores(g, tensor, ctx)) for g in groups),
                                    self.normalize)
        if tensor.masses and "unit_mass" in self.writes:
            meta.put(gm, "unit_mass", {k: (tensor(k[0])._version, v) for k, v in tensor.masses.items()})
        return PassResult(gm, False, {"scored": len(out), "skipped": skipped})


@dataclass(frozen=True)
class MagnitudeImportance(ImportancePass):
    """Lp magnitude (``p=1``: L1 as in Li et al.; ``p=2``: L2) of the slices each unit owns."""

    name: ClassVar[str] = "importance"
    writes: ClassVar[tuple[str, ...]] = ("importance", "unit_mass")
    p: int = 2
    roles: tuple[str, ...] = ("out", "in", "norm", "other")
    reduction: str = "sum"
    layer_normalize: bool = False
    normalize: str | None = None

    def __post_init__(self) -> None:
        if self.p not in (1, 2):
            raise ConfigError(f"p must be 1 or 2, got {self.p}")
        if self.reduction not in ("sum", "mean", "max"):
            raise ConfigError(f"reduction must be 'sum', 'mean' or 'max', got {self.reduction!r}")

    def scores(self, group, tensor, ctx):
        per: list[np.ndarray] = []
        for ps in group.params:
            if ps.role not in self.roles or ps.is_buffer:
                continue
            units, v = slice_mass(tensor, ps, self.p)
            if self.layer_normalize and v.mean() > 0:
                v = v / v.mean()
            full = np.full(group.size, np.nan)
            full[units] = v
            per.append(full)
        if not per:
            return None
        return reduce_slices(per, self.reduction)


@dataclass(frozen=True)
class BNScaleImportance(ImportancePass):
    """|γ| of the normalisation scales in the group (Network Slimming). Groups without one are kept."""

    name: ClassVar[str] = "importance"
    reduction: str = "sum"
    normalize: str | None = None

    def scores(self, group, tensor, ctx):
        per = []
        for ps in group.params:
            if ps.role == "norm" and ps.param.endswith(".weight") and not ps.is_buffer:
                units, v = slice_mass(tensor, ps, 1)
                full = np.zeros(group.size)
                full[units] = v
                per.append(full)
        if not per:
            return None
        m = np.vstack(per)
        return {"sum": m.sum(0), "mean": m.mean(0), "max": m.max(0)}[self.reduction]


@dataclass(frozen=True)
class RandomImportance(ImportancePass):
    """Uniform random scores (a baseline), reproducible from ``seed``."""

    name: ClassVar[str] = "importance"
    seed: int = 0
    normalize: str | None = None

    def scores(self, group, tensor, ctx):
        return np.random.default_rng([self.seed, group.id]).random(group.size)


def resolve_importance(importance: Any, normalize: str | None = None, reduction: str = "sum",
                       seed: int = 0) -> "ImportancePass":
    """An importance pass from a name (:data:`IMPORTANCE`) or a pass object (returned as is)."""
    from_pass = getattr(importance, "run", None)
    if from_pass is not None and hasattr(importance, "name"):
        return importance
    if isinstance(importance, str):
        if importance not in IMPORTANCE:
            raise ConfigError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCE)}, or pass an "
                              "ImportancePass object")
        return named_importance(importance, normalize=normalize, reduction=reduction, seed=seed)
    raise ConfigError(f"importance must be a name ({', '.join(IMPORTANCE)}) or a Pass, got {type(importance).__name__}")


def _filtered(factory: Callable[..., ImportancePass], kw: dict) -> dict:
    """The options of ``kw`` that ``factory`` accepts (compile passes every option to every criterion)."""
    names = _accepted(factory)
    return dict(kw) if names is None else {k: v for k, v in kw.items() if k in names}


def _accepted(factory: Callable[..., ImportancePass]) -> frozenset[str] | None:
    """The keyword names ``factory`` accepts (None: any); ``inspect.signature`` costs ~0.3 ms, so a hashable
    factory's answer is kept."""
    try:
        return _accepted_names(factory)
    except TypeError:  # unhashable factory: not cached
        return _accepted_names.__wrapped__(factory)


@functools.lru_cache(maxsize=256)
def _accepted_names(factory: Callable[..., ImportancePass]) -> frozenset[str] | None:
    try:
        params = inspect.signature(factory).parameters  # a partial's signature omits its bound names
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def register_importance(name: str, factory: Callable[..., ImportancePass]) -> None:
    """Make ``fxprune.compile(importance=name)`` build ``factory(**options)``.

    ``factory`` receives the compile options it names among ``reduction``, ``normalize``, ``seed``,
    ``roles`` and ``layer_normalize``.
    """
    IMPORTANCE[name] = factory


def named_importance(name: str, **kw) -> ImportancePass:
    """The registered criterion ``name`` built with the options of ``kw`` it accepts."""
    if name not in IMPORTANCE:
        raise ConfigError(f"unknown importance {name!r}; known: {', '.join(IMPORTANCE)} or an ImportancePass object")
    factory = IMPORTANCE[name]
    return factory(**_filtered(factory, kw))


#: Names accepted by ``fxprune.compile(importance=...)`` → factories (extend with :func:`register_importance`).
IMPORTANCE: dict[str, Callable[..., ImportancePass]] = {
    "l1": functools.partial(MagnitudeImportance, p=1),
    "l2": functools.partial(MagnitudeImportance, p=2),
    "bn_scale": BNScaleImportance,
    "random": RandomImportance,
}
