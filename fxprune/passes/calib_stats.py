"""Sites and their streaming statistics: what calibration measures at one consumer layer.

A *site* is a layer that consumes pruned channels through a weight parameter — a convolution (plain or
grouped, zero padding, 1-D/2-D) or a linear layer in any spelling (``nn.Linear``, ``F.linear``,
``aten.linear``, ``addmm``/``mm``/``x @ W`` with the weight stored ``(in, out)`` such as GPT-2's ``Conv1D``).
It is described by the op family's :class:`~fxprune.rules.calls.Consumer` record and keyed by its weight
parameter's qualified name, which is the same on every front end. An *atom* is the set of the site's input
positions that one unit occupies (one channel of a conv, a C·H·W block of a flatten→linear).

:class:`SiteStats` accumulates, in float64, either the input patch second moment ``A = Σ P Pᵀ`` and cross
moment ``B = Σ P Yᵀ`` (``"moment"``; ``D = C·k²`` sized, from which the atom contribution Gram
``G = Mᵀ (A ⊙ VᵀV) M`` follows exactly), or the atom contribution Gram directly (``"contrib"`` for large D,
``"sample"`` for ThiNet's random (image, filter, position) triples). Nothing of size N×(C·k²) is ever
kept: memory is bounded by the statistics plus one chunk of patches. Targets ``Y`` are the consumer's
output in the *target* graph (the original network) minus its bias, restricted to the output channels the
pruned consumer still has (``out_index``). Statistics are sums: under ``torch.distributed`` they are
all-reduced (SUM) across ranks, so N processes calibrating shards give the statistics of the whole data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..rules.base import lookup_tensor
from ..rules.calls import Consumer

__all__ = ["Site", "SiteStats", "build_site", "dense_weight", "write_dense_weight", "all_reduce_", "distributed",
           "MOMENT_MAX_D"]

_CHUNK = 1 << 21  # elements per patch chunk (16 MB in float64)
MOMENT_MAX_D = 4096  # above this input dimension the patch second moment is not formed


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum ``tensors`` in place across the ranks of the default process group (no-op without one)."""
    if not distributed():
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


@dataclass
class Site:
    """A consumer layer: dense float64 weight ``(O, D)`` (``D = C·k²`` or features), atoms, target map.

    ``key`` is the weight parameter's qualified name; ``consumer`` the op family's record."""

    key: str
    consumer: Consumer
    weight: torch.Tensor  # (O, D), grouped convs made dense (zeros across group blocks)
    k: int  # D entries per input position
    cin: int
    atoms: list[np.ndarray]  # input positions of each atom
    out_index: np.ndarray | None = None  # target channels (original output channels kept)
    target_bias: torch.Tensor | None = None  # original bias at out_index (subtracted from targets)

    @property
    def kind(self) -> str:
        return self.consumer.kind

    @property
    def conv(self) -> tuple | None:
        return self.consumer.conv

    @property
    def groups(self) -> int:
        return self.consumer.groups

    @property
    def name(self) -> str:
        """The layer's name (the weight's owner) for messages."""
        return self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key

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


def dense_weight(t: torch.Tensor, c: Consumer) -> torch.Tensor:
    """A consumer's weight tensor ``t`` as a dense float64 ``(O, D)`` matrix (grouped convs block-diagonal)."""
    w = t.detach().double()
    if c.kind == "linear":
        return (w if (c.out_dim, c.in_dim) == (0, 1) else w.T).clone()
    g = c.groups
    if g > 1:
        o, cg = w.shape[0], w.shape[1]
        og = o // g
        dense = torch.zeros((o, cg * g, *w.shape[2:]), dtype=w.dtype)
        for q in range(g):
            dense[q * og : (q + 1) * og, q * cg : (q + 1) * cg] = w[q * og : (q + 1) * og]
        w = dense
    return w.reshape(w.shape[0], -1)


def write_dense_weight(t: torch.Tensor, c: Consumer, W: torch.Tensor) -> None:
    """Write a dense ``(O, D)`` matrix back into the consumer's weight tensor ``t`` in place (its own
    layout; for grouped convs only the block-diagonal entries exist)."""
    with torch.no_grad():
        if c.kind == "linear":
            t.copy_((W if (c.out_dim, c.in_dim) == (0, 1) else W.T).to(t.dtype))
            return
        g = c.groups
        o, cg = t.shape[0], t.shape[1]
        full = W.reshape(o, cg * g, *t.shape[2:])
        og = o // g
        for q in range(g):
            t[q * og : (q + 1) * og].copy_(full[q * og : (q + 1) * og, q * cg : (q + 1) * cg].to(t.dtype))


def build_site(gm: fx.GraphModule, consumer: Consumer, atoms: list[np.ndarray], target: fx.GraphModule | None = None,
              out_index: np.ndarray | None = None) -> Site:
    """The site of ``consumer`` (a record of ``gm``'s graph); the target bias is read from ``target``."""
    w = dense_weight(lookup_tensor(gm, consumer.weight)[0], consumer)
    tb = None
    if consumer.bias is not None:
        tb = lookup_tensor(target or gm, consumer.bias)[0].detach().double()
        if out_index is not None:
            tb = tb[torch.as_tensor(out_index)]
    t = lookup_tensor(gm, consumer.weight)[0]
    if consumer.kind == "linear":
        return Site(consumer.weight, consumer, w, 1, t.shape[consumer.in_dim], atoms, out_index, tb)
    k = int(np.prod(t.shape[2:]))
    return Site(consumer.weight, consumer, w, k, t.shape[1] * consumer.groups, atoms, out_index, tb)


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
            raise InputError(f"'{site.name}': input patches {tuple(P.shape)} do not match targets {tuple(Y.shape)}")
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
            raise ConfigError(f"'{self.site.name}': a least-squares refit needs the patch second moment, but the "
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
