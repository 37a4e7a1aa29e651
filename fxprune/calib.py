"""Calibration engine: streaming per-consumer layer statistics for the data-driven passes.

This module owns everything that touches calibration data:

* **batches** — :func:`calibration_batches` validates every batch of ``ctx.calib`` (tensor or tuple of
  tensors; extra tuple items such as labels are ignored; shapes must match ``example_inputs`` apart from
  the batch dim; no NaN/Inf) and shows a progress bar on a TTY. A one-shot iterator (a generator) is
  materialised once into ``ctx.extras`` so several passes can re-read it; a tensor is one batch.
* **capture** — :class:`_Recorder`, an ``fx.Interpreter`` that hands the inputs/outputs of chosen nodes to
  the accumulators, checking them for NaN/Inf. The user's model is never run, only the traced copies.
* **sites and atoms** — a *site* is a consumer layer (``nn.Conv1d``/``nn.Conv2d`` incl. grouped, or
  ``nn.Linear``) that reads pruned channels: a group's ``ParamSlice`` with role ``"in"`` on its weight. An
  *atom* is the set of the site's input positions that one unit occupies (one channel of a conv, a C·H·W
  block of a flatten→linear). Group statistics are assembled from atom statistics over all the group's
  consumers (the objective sums over consumers).
* **statistics** — :class:`SiteStats` accumulates, in float64, either the input patch second moment
  ``A = Σ P Pᵀ`` and cross moment ``B = Σ P Yᵀ`` (``"moment"``; ``D = C·k²`` sized, from which the atom
  contribution Gram ``G = Mᵀ (A ⊙ VᵀV) M`` follows exactly), or the atom contribution Gram directly
  (``"contrib"`` for large D, ``"sample"`` for ThiNet's random (image, filter, position) triples).
  Nothing of size N×(C·k²) is ever kept: memory is bounded by the statistics plus one chunk of patches.
  Targets ``Y`` are a consumer's output in the *target* graph (the original network) minus its bias,
  restricted to the output channels the pruned consumer still has (``out_index``).
* **distribution** — statistics are sums; when ``torch.distributed`` is initialised they are all-reduced
  (SUM) across ranks, so N processes each calibrating a shard give the statistics of the whole data.

Invariants: statistics never contain NaN (inputs are checked); sites are conv/linear modules with zero
padding; a group whose consumers are all unsupported gets no data-driven score (it is kept, with a note).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import meta
from .errors import ConfigError, FxpruneError, InputError, node_location
from .ir import ChannelGroup, ParamSlice, member_units
from .pipeline import Context, PassResult
from .passes.importance import ImportancePass, store_scores

__all__ = [
    "calibration_batches",
    "Site",
    "SiteStats",
    "GroupPlan",
    "plan_groups",
    "collect",
    "group_gram",
    "DataDrivenImportance",
    "reconstruction_error",
    "supported_consumer",
    "module_calls",
    "all_reduce_",
]

log = logging.getLogger(__name__)

_CACHE_KEY = "fxprune.calib_batches"
_CHUNK = 1 << 21  # elements per patch chunk (16 MB in float64)
MOMENT_MAX_D = 4096  # above this input dimension the patch second moment is not formed


# ----------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------
def _source(ctx: Context) -> Iterable[Any]:
    calib = ctx.calib
    if calib is None:
        raise ConfigError("this pass needs calibration data: pass calib= (an iterable of input batches) to "
                          "fxprune.compile")
    if _CACHE_KEY in ctx.extras:
        return ctx.extras[_CACHE_KEY]
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
        ctx.extras[_CACHE_KEY] = data
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
        if x.dim() != ex.dim() or tuple(x.shape[1:]) != tuple(ex.shape[1:]) or x.shape[0] < 1:
            raise InputError(
                f"calibration batch {index}, input {j} has shape {tuple(x.shape)}; expected "
                f"(batch, {', '.join(map(str, ex.shape[1:]))}) like example_inputs[{j}] {tuple(ex.shape)}"
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


def _bar_disabled(progress: bool | None) -> bool:
    if progress is None:
        return not sys.stderr.isatty()
    return not progress


def calibration_batches(ctx: Context, progress: bool | None = None, desc: str = "calibration"
                        ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Validated batches of ``ctx.calib`` (see the module docstring). Raises on an empty iterable unless
    ``torch.distributed`` is running (a rank may have an empty shard; the global count is checked later)."""
    data = _source(ctx)
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    from tqdm.auto import tqdm

    n = 0
    with tqdm(total=total, desc=desc, disable=_bar_disabled(progress), leave=False) as bar:
        for batch in data:
            yield check_batch(batch, ctx.example_inputs, n)
            n += 1
            bar.update(1)
    if n == 0 and not _distributed():
        raise InputError("the calibration iterable yielded no batches (empty, or an iterator that was already "
                         "consumed: pass a list or a re-iterable DataLoader)")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum ``tensors`` in place across the ranks of the default process group (no-op without one)."""
    if not _distributed():
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


# ----------------------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------------------
class _Done(Exception):
    """Raised after the last watched node: the rest of the graph is not needed."""


class _Recorder(fx.Interpreter):
    """Runs a GraphModule; calls ``hooks[node_name](args, value)`` for the watched nodes and stops after the
    last of them (statistics never need the rest of the network)."""

    def __init__(self, gm: fx.GraphModule, hooks: Mapping[str, Callable[[tuple, Any], None]], batch: int) -> None:
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
            hook(args, value)
            if n.name == self.last:
                raise _Done
        return value


def _finite(t: torch.Tensor, what: str, batch: int) -> torch.Tensor:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise InputError(f"non-finite values (NaN/Inf) in {what} on calibration batch {batch}; check the model's "
                         "weights and the calibration data")
    return t


def run_graph(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], hooks: Mapping[str, Callable[[tuple, Any], None]],
              batch: int) -> Any:
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
# sites
# ----------------------------------------------------------------------------------------------------
def supported_consumer(gm: fx.GraphModule, ps: ParamSlice) -> str | None:
    """Module name when ``ps`` is the input dim of a conv/linear weight the engine can model, else None."""
    if ps.role != "in" or ps.is_buffer or not ps.param.endswith(".weight") or ps.dim != 1:
        return None
    name = ps.param[: -len(".weight")]
    try:
        mod = gm.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.padding_mode == "zeros":
        return name
    if isinstance(mod, nn.Linear):
        return name
    return None


def module_calls(gm: fx.GraphModule, module: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == module]


@dataclass
class Site:
    """A consumer layer: dense float64 weight ``(O, D)`` (``D = C·k²`` or features), atoms, target map."""

    module: str
    kind: str  # "conv" | "linear"
    weight: torch.Tensor  # (O, D), grouped convs made dense (zeros across group blocks)
    k: int  # D entries per input position
    cin: int
    conv: tuple | None  # (kernel, dilation, padding, stride), 2-D normalised
    groups: int
    atoms: list[np.ndarray]  # input positions of each atom
    out_index: np.ndarray | None = None  # target channels (original output channels kept)
    target_bias: torch.Tensor | None = None  # original bias at out_index (subtracted from targets)

    @property
    def D(self) -> int:
        return self.weight.shape[1]

    @property
    def O(self) -> int:
        return self.weight.shape[0]

    def atom_owner(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(D-indices covered by atoms, atom id of each)."""
        idx, own = [], []
        for a, pos in enumerate(self.atoms):
            pos = np.asarray(pos, dtype=np.int64)
            d = (pos[:, None] * self.k + np.arange(self.k)[None, :]).reshape(-1)
            idx.append(d)
            own.append(np.full(len(d), a, dtype=np.int64))
        if not idx:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.as_tensor(np.concatenate(idx)), torch.as_tensor(np.concatenate(own))


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The weight of a conv (grouped → dense with zero blocks) or linear as ``(O, D)`` float64."""
    w = mod.weight.detach().double()
    if isinstance(mod, nn.Linear):
        return w.clone()
    g = mod.groups
    if g > 1:
        o, cg = w.shape[0], w.shape[1]
        og = o // g
        dense = torch.zeros((o, cg * g, *w.shape[2:]), dtype=w.dtype)
        for q in range(g):
            dense[q * og : (q + 1) * og, q * cg : (q + 1) * cg] = w[q * og : (q + 1) * og]
        w = dense
    return w.reshape(w.shape[0], -1)


def _pair(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def make_site(gm: fx.GraphModule, module: str, atoms: list[np.ndarray], target: fx.GraphModule | None = None,
              out_index: np.ndarray | None = None) -> Site:
    mod = gm.get_submodule(module)
    w = dense_weight(mod)
    tmod = (target or gm).get_submodule(module)
    tb = tmod.bias.detach().double() if getattr(tmod, "bias", None) is not None else None
    if tb is not None and out_index is not None:
        tb = tb[torch.as_tensor(out_index)]
    if isinstance(mod, nn.Linear):
        return Site(module, "linear", w, 1, mod.in_features, None, 1, atoms, out_index, tb)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            pad: tuple[int, ...] = (0,) * (mod.weight.dim() - 2)
        else:  # 'same' with stride 1: symmetric when the receptive field is odd
            rf = [d * (k - 1) for d, k in zip(_pair(mod.dilation, 1), mod.kernel_size, strict=True)]
            if any(r % 2 for r in rf):
                raise ConfigError(f"'{module}': padding='same' with an even receptive field is not supported "
                                  "by the calibration engine")
            pad = tuple(r // 2 for r in rf)
    else:
        pad = tuple(mod.padding)
    if isinstance(mod, nn.Conv1d):
        conv = ((1, mod.kernel_size[0]), (1, mod.dilation[0]), (0, pad[0]), (1, mod.stride[0]))
    else:
        conv = (tuple(mod.kernel_size), tuple(mod.dilation), pad, tuple(mod.stride))
    k = int(np.prod(mod.kernel_size))
    return Site(module, "conv", w, k, mod.in_channels, conv, mod.groups, atoms, out_index, tb)


def _patches(site: Site, x: torch.Tensor) -> torch.Tensor:
    """(N, L, D) input patches (rows of features for linear)."""
    if site.kind == "linear":
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if x.dim() == 3:
        x = x.unsqueeze(2)
    kernel, dil, pad, stride = site.conv  # type: ignore[misc]
    return F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride).transpose(1, 2)


def _targets(site: Site, y: torch.Tensor) -> torch.Tensor:
    """(N, L, O) bias-free targets at the kept output channels."""
    if site.kind == "linear":
        if site.out_index is not None:
            y = y[..., torch.as_tensor(site.out_index)]
        y = y.reshape(y.shape[0], -1, y.shape[-1])
    else:
        if site.out_index is not None:
            y = y[:, torch.as_tensor(site.out_index)]
        y = y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2)
    if site.target_bias is not None:
        y = y - site.target_bias
    return y


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------
class SiteStats:
    """Streaming statistics of one site (see the module docstring for the modes)."""

    def __init__(self, site: Site, mode: str = "auto", samples_per_image: int = 10, max_positions: int | None = None,
                 seed: int = 0) -> None:
        if mode == "auto":
            mode = "moment" if site.D <= MOMENT_MAX_D else "contrib"
        if mode not in ("moment", "contrib", "sample"):
            raise ConfigError(f"statistics mode must be 'auto', 'moment', 'contrib' or 'sample', got {mode!r}")
        self.site, self.mode = site, mode
        self.samples_per_image = int(samples_per_image)
        self.max_positions = max_positions
        self.seed = seed
        self.calls = 0
        D, O, na = site.D, site.O, len(site.atoms)
        z = lambda *s: torch.zeros(s, dtype=torch.float64)  # noqa: E731
        self.n = z(1)  # number of (sample, position) rows
        self.yy = z(1)
        if mode == "moment":
            self.A, self.B, self.s, self.ysum = z(D, D), z(D, O), z(D), z(O)
        else:
            self.G, self.c = z(na, na), z(na)
        self._owner = site.atom_owner()

    def tensors(self) -> list[torch.Tensor]:
        if self.mode == "moment":
            return [self.n, self.yy, self.A, self.B, self.s, self.ysum]
        return [self.n, self.yy, self.G, self.c]

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one call: ``x`` the consumer's input, ``y`` the target module's output (with bias)."""
        site = self.site
        x, y = x.detach().double(), y.detach().double()
        P, Y = _patches(site, x), _targets(site, y)
        if P.shape[:2] != Y.shape[:2] or P.shape[2] != site.D or Y.shape[2] != site.O:
            raise InputError(f"'{site.module}': input patches {tuple(P.shape)} do not match targets {tuple(Y.shape)}")
        gen = torch.Generator().manual_seed(hash((self.seed, self.calls)) & 0x7FFFFFFF)
        self.calls += 1
        N, L = P.shape[0], P.shape[1]
        if self.mode == "sample":
            m = self.samples_per_image
            pos = torch.randint(L, (N, m), generator=gen)
            outs = torch.randint(site.O, (N, m), generator=gen)
            rows = torch.arange(N)[:, None].expand(N, m)
            Ps, Ys = P[rows, pos].reshape(N * m, -1), Y[rows, pos, outs].reshape(-1)
            Z = self._contrib_sampled(Ps, outs.reshape(-1))
            self.G += Z.T @ Z
            self.c += Z.T @ Ys
            self.yy += (Ys * Ys).sum()
            self.n += N * m
            return
        if self.max_positions is not None and L > self.max_positions:
            pos = torch.argsort(torch.rand(N, L, generator=gen), dim=1)[:, : self.max_positions]
            rows = torch.arange(N)[:, None]
            P, Y = P[rows, pos], Y[rows, pos]
            L = self.max_positions
        P, Y = P.reshape(N * L, -1), Y.reshape(N * L, -1)
        step = max(1, _CHUNK // max(1, site.D + (site.O * len(site.atoms) if self.mode == "contrib" else 0)))
        for i in range(0, P.shape[0], step):
            p, t = P[i : i + step], Y[i : i + step]
            self.yy += (t * t).sum()
            self.n += p.shape[0]
            if self.mode == "moment":
                self.A += p.T @ p
                self.B += p.T @ t
                self.s += p.sum(0)
                self.ysum += t.sum(0)
            else:
                Z = self._contrib_dense(p)  # (M, O, atoms)
                Zf = Z.reshape(-1, Z.shape[2])
                self.G += Zf.T @ Zf
                self.c += Zf.T @ t.reshape(-1)

    def _contrib_sampled(self, p: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
        idx, own = self._owner
        pv = p[:, idx] * self.site.weight[outs][:, idx]
        return torch.zeros(p.shape[0], len(self.site.atoms), dtype=torch.float64).index_add_(1, own, pv)

    def _contrib_dense(self, p: torch.Tensor) -> torch.Tensor:
        W = self.site.weight
        Z = torch.zeros(p.shape[0], W.shape[0], len(self.site.atoms), dtype=torch.float64)
        for a, pos in enumerate(self.site.atoms):
            d = torch.as_tensor((np.asarray(pos)[:, None] * self.site.k + np.arange(self.site.k)).reshape(-1))
            Z[:, :, a] = p[:, d] @ W[:, d].T
        return Z

    def reduce(self) -> None:
        all_reduce_(self.tensors())

    # -- derived ---------------------------------------------------------------------------------------
    def gram(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(G, c, yy): atom contribution Gram, cross moment with the target, target energy."""
        if self.mode != "moment":
            return self.G, self.c, float(self.yy)
        W = self.site.weight
        idx, own = self._owner
        na = len(self.site.atoms)
        K = W[:, idx].T @ W[:, idx]
        H = self.A[idx][:, idx] * K
        G = torch.zeros(na, len(idx), dtype=torch.float64).index_add_(0, own, H)
        G = torch.zeros(na, na, dtype=torch.float64).index_add_(1, own, G)
        cd = (self.B[idx] * W[:, idx].T).sum(1)
        c = torch.zeros(na, dtype=torch.float64).index_add_(0, own, cd)
        return G, c, float(self.yy)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """Bias-augmented ``(A, B, yy, n)`` for a least-squares refit: rows/cols ``D`` is the constant 1;
        ``B`` and ``yy`` are against the target *with* its bias."""
        if self.mode != "moment":
            raise ConfigError(f"'{self.site.module}': a least-squares refit needs the patch second moment, but the "
                              f"input has D = {self.site.D} > {MOMENT_MAX_D} entries")
        D, n = self.site.D, float(self.n)
        A = torch.zeros(D + 1, D + 1, dtype=torch.float64)
        A[:D, :D], A[:D, D], A[D, :D], A[D, D] = self.A, self.s, self.s, n
        b = self.site.target_bias if self.site.target_bias is not None else torch.zeros(self.site.O, dtype=torch.float64)
        B = torch.zeros(D + 1, self.site.O, dtype=torch.float64)
        B[:D] = self.B + self.s[:, None] * b[None, :]
        B[D] = self.ysum + n * b
        yy = float(self.yy) + 2 * float(self.ysum @ b) + n * float(b @ b)
        return A, B, yy, int(n)


# ----------------------------------------------------------------------------------------------------
# groups → sites → statistics
# ----------------------------------------------------------------------------------------------------
@dataclass
class GroupPlan:
    """Where each group's units live among the sites: ``atoms[gid][module] = atom index per unit (-1: absent)``."""

    sites: dict[str, Site]
    atoms: dict[int, dict[str, np.ndarray]]
    unsupported: dict[int, list[str]] = field(default_factory=dict)


def _rows(ps: ParamSlice) -> list[np.ndarray]:
    try:
        return list(ps.span.indices())
    except ValueError:  # ragged explicit map
        return [np.asarray(r, dtype=np.int64) for r in ps.span.table]  # type: ignore[union-attr]


def plan_groups(gm: fx.GraphModule, groups: Sequence[ChannelGroup], target: fx.GraphModule | None = None,
                out_index: Callable[[str], np.ndarray | None] | None = None,
                extra_atoms: Mapping[str, list[np.ndarray]] | None = None) -> GroupPlan:
    """Sites for the consumers of ``groups`` in ``gm``; one atom per (group, unit) per site.

    ``extra_atoms`` adds atoms (module → list of position arrays) not owned by any group, and makes a site
    for a module even when no group consumes it."""
    per_mod: dict[str, dict[tuple[int, int], list[np.ndarray]]] = {}
    unsupported: dict[int, list[str]] = {}
    for g in groups:
        for ps in g.params:
            if ps.role != "in" or ps.is_buffer:
                continue
            mod = supported_consumer(gm, ps)
            if mod is None:
                unsupported.setdefault(g.id, []).append(ps.param)
                continue
            if not module_calls(gm, mod):
                continue
            slot = per_mod.setdefault(mod, {})
            for u, pos in zip(member_units(ps), _rows(ps), strict=True):
                slot.setdefault((g.id, int(u)), []).append(np.asarray(pos, dtype=np.int64))
    for mod in extra_atoms or {}:
        per_mod.setdefault(mod, {})
    sites: dict[str, Site] = {}
    atoms: dict[int, dict[str, np.ndarray]] = {}
    sizes = {g.id: g.size for g in groups}
    for mod, slot in per_mod.items():
        keys = list(slot)
        alist = [np.unique(np.concatenate(slot[k])) for k in keys]
        alist += list((extra_atoms or {}).get(mod, []))
        sites[mod] = make_site(gm, mod, alist, target, out_index(mod) if out_index else None)
        for a, (gid, u) in enumerate(keys):
            arr = atoms.setdefault(gid, {}).setdefault(mod, np.full(sizes[gid], -1, dtype=np.int64))
            arr[u] = a
    return GroupPlan(sites, atoms, unsupported)


def collect(ctx: Context, gm: fx.GraphModule, sites: Mapping[str, Site], target: fx.GraphModule | None = None,
            mode: str = "auto", samples_per_image: int = 10, max_positions: int | None = None, seed: int = 0,
            progress: bool | None = None, desc: str = "calibration") -> dict[str, SiteStats]:
    """One pass over the calibration data: inputs of every site from ``gm``, targets from ``target``
    (default ``gm``). Returns reduced (all-reduced when distributed) statistics per site."""
    stats = {m: SiteStats(s, mode, samples_per_image, max_positions, seed) for m, s in sites.items()}
    if not stats:
        return stats
    target = gm if target is None else target
    for b, inputs in enumerate(calibration_batches(ctx, progress, desc)):
        xs: dict[str, list[torch.Tensor]] = {m: [] for m in sites}
        ys: dict[str, list[torch.Tensor]] = {m: [] for m in sites}

        def hook_for(mod: str, want_x: bool, want_y: bool) -> Callable[[tuple, Any], None]:
            def hook(args: tuple, value: Any) -> None:
                if want_x:
                    xs[mod].append(_finite(args[0], f"the input of '{mod}'", b))
                if want_y:
                    ys[mod].append(_finite(value, f"the output of '{mod}'", b))
            return hook

        same = target is gm
        hooks = {n.name: hook_for(m, True, same) for m in sites for n in module_calls(gm, m)}
        run_graph(gm, inputs, hooks, b)
        if not same:
            thooks = {n.name: hook_for(m, False, True) for m in sites for n in module_calls(target, m)}
            run_graph(target, inputs, thooks, b)
        for m, st in stats.items():
            if len(xs[m]) != len(ys[m]):
                raise InputError(f"'{m}' is called {len(xs[m])} time(s) in the pruned graph but {len(ys[m])} in the "
                                 "original")
            for x, y in zip(xs[m], ys[m], strict=True):
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
    for mod, aidx in where.items():
        if mod not in grams:
            grams[mod] = stats[mod].gram()
        Gm, cm, yym = grams[mod]
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
    are measured, the target graph (the original network in sequential mode) and the map from consumer
    module to the original output channels it still has.
    """

    needs_calib: ClassVar[bool] = True

    def compute(self, gm: fx.GraphModule, ctx: Context, groups: Sequence[ChannelGroup],
                target: fx.GraphModule | None = None,
                out_index: Callable[[str], np.ndarray | None] | None = None) -> dict[int, np.ndarray | None]:
        raise NotImplementedError

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
                         modules: Sequence[str], out_index: Callable[[str], np.ndarray | None] | None = None,
                         example_inputs: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
    """Relative error ``‖y_pruned − y_orig‖² / ‖y_orig − mean‖²`` of each module's output on ``batches``
    (the original output restricted to the channels the pruned module still has)."""
    num = {m: 0.0 for m in modules}
    s1 = {m: 0.0 for m in modules}
    s2 = {m: 0.0 for m in modules}
    cnt = {m: 0 for m in modules}
    for b, batch in enumerate(batches):
        inputs = check_batch(batch, example_inputs, b) if example_inputs is not None else (
            (batch,) if isinstance(batch, torch.Tensor) else tuple(batch))
        outs_p: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
        outs_o: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
        run_graph(pruned, inputs, {n.name: (lambda a, v, m=m: outs_p[m].append(v)) for m in modules
                                   for n in module_calls(pruned, m)}, b)
        run_graph(original, inputs, {n.name: (lambda a, v, m=m: outs_o[m].append(v)) for m in modules
                                     for n in module_calls(original, m)}, b)
        for m in modules:
            idx = out_index(m) if out_index else None
            for yp, yo in zip(outs_p[m], outs_o[m], strict=True):
                yo = yo.double()
                if idx is not None:
                    dim = -1 if isinstance(original.get_submodule(m), nn.Linear) else 1
                    yo = yo.index_select(dim, torch.as_tensor(idx))
                num[m] += float(((yp.double() - yo) ** 2).sum())
                s1[m] += float(yo.sum())
                s2[m] += float((yo * yo).sum())
                cnt[m] += yo.numel()
    out = {}
    for m in modules:
        var = s2[m] - s1[m] ** 2 / max(cnt[m], 1)
        out[m] = num[m] / var if var > 0 else (0.0 if num[m] == 0 else math.inf)
    return out
