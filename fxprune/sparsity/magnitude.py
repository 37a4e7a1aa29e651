"""Magnitude connection pruning (Han et al. 2015, arXiv 1506.02626): a *training-time* tool.

This module owns the per-weight masks of :class:`MagnitudePruner`, the iterative prune → retrain
schedule (:func:`iterative_magnitude_prune`), Han's dropout adjustment, the sparsity report
(:func:`sparsity_report`), the compressed export of sparse weights (:func:`export_sparse` /
:func:`load_sparse`) and the criterion that lets the compiler remove the units that became dead
(``importance="dead"``, :class:`DeadUnitImportance`).

**It modifies the model you give it, on purpose.** Unlike :func:`fxprune.compile` (which never touches
the user's model), a mask must live in the model being trained: ``MagnitudePruner(model)`` registers
gradient hooks on the chosen weights at construction, and ``prune()`` / ``apply()`` multiply them by
their masks in place. Give it your *training* copy, never a model you passed to ``compile``.

Invariants:

* a mask only ever loses entries (a pruned connection never comes back), and ``prune()`` leaves every
  masked weight exactly 0;
* gradient hooks multiply every gradient by the mask, so plain SGD, SGD with momentum/weight decay and
  Adam keep masked weights at 0 (their optimiser state for those entries stays 0). For an optimiser
  that already holds state from before the mask, call :meth:`MagnitudePruner.attach` (re-applies the
  masks after every ``step()``);
* a layer never loses every weight: when a threshold would remove them all, the ``min_keep`` largest
  stay (the guard is logged and listed in :attr:`MagnitudePruner.guarded`), or ``on_empty="error"``
  raises :class:`~fxprune.errors.ConfigError`.

Threshold of layer l: ``t_l = q_l · σ_l``; ``sigma="dense"`` uses the std of the weights when the pruner
was created (so a growing ``q`` schedule gives growing sparsity), ``sigma="current"`` the std of the
weights still alive at this ``prune()`` (so a fixed ``q`` already prunes more at every round).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
>>> pruner = MagnitudePruner(net, q=0.5)
>>> stats = pruner.prune()
>>> 0.2 < pruner.sparsity() < 0.4   # |w| <= 0.5 sigma: 29 % of a uniform tensor (default init)
True
>>> bool((net[0].weight[~pruner.masks["0"]] == 0).all())
True
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..progress import progress as progress_bar

__all__ = ["MagnitudePruner", "PruneStep", "iterative_magnitude_prune", "SparsityReport", "sparsity_report",
           "select_layers"]

log = logging.getLogger(__name__)

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d)


def _check_q(q: Any, what: str = "q") -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 0:
        raise ConfigError(f"{what} must be a finite number >= 0 (threshold = q * sigma of the layer), got {q!r}")
    return float(q)


def select_layers(model: nn.Module, layers: Any) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    if layers is None:
        out = {n: m for n, m in mods.items() if isinstance(m, _WEIGHTED)}
    elif isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        out = {n: m for n, m in mods.items() if isinstance(m, layers)}
    else:
        if isinstance(layers, str):
            layers = (layers,)
        layers = list(layers)
        bad = [n for n in layers if n not in mods]
        if bad:
            raise ConfigError(f"layers: no module named {', '.join(map(repr, bad))} in the model")
        out = {n: mods[n] for n in layers}
    for n, m in out.items():
        if not isinstance(getattr(m, "weight", None), nn.Parameter):
            raise ConfigError(f"layers: module {n!r} ({type(m).__name__}) has no weight parameter to prune")
    if not out:
        raise ConfigError("layers: the model has no Linear/Conv layer to prune (pass layers= explicitly)")
    return out


@dataclass(frozen=True)
class PruneStep:
    """What one :meth:`MagnitudePruner.prune` did: per-layer threshold and the new overall sparsity."""

    thresholds: Mapping[str, float]
    removed: int
    sparsity: float
    guarded: tuple[str, ...] = ()


class MagnitudePruner:
    """Per-layer magnitude masks with masked gradients (Han et al.). Modifies ``model`` in place.

    ``q``: a number for every layer, or ``{layer name: q}`` (layers missing from the dict use
    ``default_q``). ``layers``: module names, a module type / tuple of types, or None for every
    Linear/Conv layer. ``sigma``: ``"dense"`` or ``"current"`` (module docstring). ``min_keep``: the
    guard, weights a layer always keeps; ``on_empty="error"`` raises instead of applying the guard.
    Existing zero weights start masked (``mask_zeros=True``), so a pruner re-created on a pruned model
    keeps its connections removed.

    Call :meth:`remove` to drop the hooks (the weights stay as they are).
    """

    def __init__(self, model: nn.Module, q: float | Mapping[str, float] = 1.0, *, sigma: str = "dense",
                 layers: Any = None, default_q: float = 1.0, min_keep: int = 1, on_empty: str = "guard",
                 mask_zeros: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        if sigma not in ("dense", "current"):
            raise ConfigError(f"sigma must be 'dense' or 'current', got {sigma!r}")
        if on_empty not in ("guard", "error"):
            raise ConfigError(f"on_empty must be 'guard' or 'error', got {on_empty!r}")
        if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
            raise ConfigError(f"min_keep must be an integer >= 1, got {min_keep!r}")
        self.model = model
        self.sigma = sigma
        self.min_keep = min_keep
        self.on_empty = on_empty
        self.default_q = _check_q(default_q, "default_q")
        self.layers = select_layers(model, layers)
        self.q = self._check_qs(q)
        self.masks: dict[str, torch.Tensor] = {}
        self.dense_std: dict[str, float] = {}
        self.dense_count: dict[str, int] = {}
        self.guarded: list[str] = []
        self._hooks: list[Any] = []
        self._dropout_p0: dict[str, float] = {}
        for name, m in self.layers.items():
            w = m.weight
            self.masks[name] = (w.detach() != 0) if mask_zeros else torch.ones_like(w, dtype=torch.bool)
            self.dense_std[name] = float(w.detach().double().std()) if w.numel() > 1 else 0.0
            self.dense_count[name] = int(self.masks[name].sum())
            self._hooks.append(w.register_hook(self._grad_hook(name)))
        self._dropout_p0 = {n: float(m.p) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)}

    # -- configuration ------------------------------------------------------------------------------
    def _check_qs(self, q: float | Mapping[str, float]) -> dict[str, float]:
        if isinstance(q, Mapping):
            bad = [k for k in q if k not in self.layers]
            if bad:
                raise ConfigError(f"q: {', '.join(map(repr, bad))} are not pruned layers "
                                  f"(layers: {', '.join(list(self.layers)[:8])}{', ...' if len(self.layers) > 8 else ''})")
            return {n: _check_q(q.get(n, self.default_q), f"q[{n!r}]") for n in self.layers}
        q = _check_q(q)
        return {n: q for n in self.layers}

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.masks[name].to(grad.dtype)

        return hook

    # -- masking ------------------------------------------------------------------------------------
    def threshold(self, name: str, q: float | None = None) -> float:
        """t = q · σ of layer ``name`` (σ per the ``sigma`` option)."""
        q = self.q[name] if q is None else q
        if self.sigma == "dense":
            s = self.dense_std[name]
        else:
            alive = self.layers[name].weight.detach()[self.masks[name]]
            s = float(alive.double().std()) if alive.numel() > 1 else 0.0
        return q * s

    @torch.no_grad()
    def prune(self, q: float | Mapping[str, float] | None = None) -> PruneStep:
        """Mask every weight with |w| <= q·σ (masks only shrink) and zero the masked weights in place."""
        qs = self.q if q is None else self._check_qs(q)
        thresholds: dict[str, float] = {}
        removed = 0
        guarded: list[str] = []
        for name, m in self.layers.items():
            w = m.weight
            t = self.threshold(name, qs[name])
            thresholds[name] = t
            before = int(self.masks[name].sum())
            new = self.masks[name] & (w.detach().abs() > t)
            need = min(self.min_keep, before)
            if int(new.sum()) < need:
                if self.on_empty == "error":
                    raise ConfigError(
                        f"q={qs[name]:g} (threshold {t:.4g}) would remove every weight of layer {name!r}; lower "
                        f"q for it or use on_empty='guard'")
                mag = torch.where(self.masks[name], w.detach().abs(), torch.full_like(w, -1.0))
                top = torch.topk(mag.reshape(-1), need).indices
                new = new.reshape(-1).clone()
                new[top] = True
                new = new.reshape(w.shape)
                guarded.append(name)
                log.warning("magnitude pruning: threshold %.4g would empty layer %r; kept its %d largest weights",
                            t, name, need)
            self.masks[name] = new
            removed += before - int(new.sum())
            w.mul_(new.to(w.dtype))
        self.guarded.extend(g for g in guarded if g not in self.guarded)
        return PruneStep(thresholds, removed, self.sparsity(), tuple(guarded))

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> PruneStep:
        """Prune to an overall ``sparsity`` (fraction of the masked layers' weights removed).

        Keeps the per-layer ``q`` proportions and scales them by one factor found by bisection (the
        sensitivity-derived q_l of Han et al. stay relative to each other). Masks only shrink, so a
        target below the current sparsity changes nothing.
        """
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ConfigError(f"sparsity must be a number with 0 <= sparsity < 1, got {sparsity!r}")
        base = {n: (q if q > 0 else 1.0) for n, q in self.q.items()} if any(self.q.values()) \
            else {n: 1.0 for n in self.q}
        total = sum(m.numel() for m in self.masks.values())
        sig = {n: self.threshold(n, 1.0) for n in self.layers}
        mags = {n: m.weight.detach().abs()[self.masks[n]] for n, m in self.layers.items()}

        def kept(c: float) -> int:
            return sum(int((mags[n] > c * base[n] * sig[n]).sum()) for n in self.layers)

        goal = (1 - sparsity) * total
        lo, hi = 0.0, 1.0
        while kept(hi) > goal and hi < 1e6:
            lo, hi = hi, hi * 2
        for _ in range(50):
            mid = (lo + hi) / 2
            if kept(mid) > goal:
                lo = mid
            else:
                hi = mid
        return self.prune({n: hi * base[n] for n in self.layers})

    @torch.no_grad()
    def apply(self) -> None:
        """Re-apply the masks (W ← W ⊙ M), e.g. after an optimiser that had state from before the mask."""
        for name, m in self.layers.items():
            m.weight.mul_(self.masks[name].to(m.weight.dtype))

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Re-apply the masks after every ``optimizer.step()``; returns the removable hook handle."""
        h = optimizer.register_step_post_hook(lambda *_: self.apply())
        self._hooks.append(h)
        return h

    def remove(self) -> None:
        """Remove the gradient (and optimiser) hooks; the weights are left as they are."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- statistics ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, tuple[int, int]]:
        """(weights, kept) per layer."""
        return {n: (int(m.numel()), int(m.sum())) for n, m in self.masks.items()}

    def sparsity(self) -> float:
        """Fraction of the masked layers' weights that are pruned."""
        tot = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / max(tot, 1)

    def report(self) -> "SparsityReport":
        return sparsity_report(self.model, layers=list(self.layers))

    # -- dropout ------------------------------------------------------------------------------------
    def adjust_dropout(self, mapping: Mapping[str, str] | None = None) -> dict[str, float]:
        """Han's dropout adjustment D_r = D_o·√(C_ir/C_io) for every dropout module, in place.

        ``C_i`` counts the kept connections of the layer the dropout feeds (``o``: when the pruner was
        created, ``r``: now). ``mapping`` {dropout name: layer name}; by default each dropout feeds the
        next pruned layer in module registration order (true for ``nn.Sequential`` models). Returns
        {dropout name: new p}.
        """
        mods = dict(self.model.named_modules())
        order = [n for n in mods if n in self.layers or n in self._dropout_p0]
        if mapping is None:
            mapping = {}
            for i, n in enumerate(order):
                if n in self._dropout_p0:
                    nxt = next((m for m in order[i + 1:] if m in self.layers), None)
                    if nxt is not None:
                        mapping[n] = nxt
        out: dict[str, float] = {}
        for d, layer in mapping.items():
            if d not in self._dropout_p0 or layer not in self.layers:
                raise ConfigError(f"adjust_dropout: {d!r} is not a dropout module or {layer!r} not a pruned layer")
            c_o = max(self.dense_count[layer], 1)
            c_r = int(self.masks[layer].sum())
            p = self._dropout_p0[d] * math.sqrt(c_r / c_o)
            mods[d].p = p
            out[d] = p
        return out


def iterative_magnitude_prune(
    pruner: MagnitudePruner,
    train_fn: Callable[[nn.Module, int], Any],
    qs: Sequence[float | Mapping[str, float]],
    *,
    adjust_dropout: bool = True,
    progress: bool | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Han's schedule: for each ``q`` in ``qs``: prune → (dropout adjustment) → ``train_fn(model, round)``.

    ``train_fn`` is your own retraining loop (Han: learning rate 1/10 of the original; survivors are
    never re-initialised); its return value (e.g. a validation accuracy) is recorded as ``metric``.
    Returns the history, one dict per round (round, q, sparsity, removed, metric, guarded).
    """
    if not callable(train_fn):
        raise ConfigError("train_fn must be callable as train_fn(model, round)")
    if not len(qs):
        raise ConfigError("qs must list at least one q")
    history: list[dict[str, Any]] = []
    with progress_bar(total=len(qs), desc="magnitude prune", enabled=progress) as bar:
        for i, q in enumerate(qs):
            step = pruner.prune(q)
            if adjust_dropout:
                pruner.adjust_dropout()
            metric = train_fn(pruner.model, i)
            pruner.apply()
            row = {"round": i, "q": q, "sparsity": step.sparsity, "removed": step.removed, "metric": metric,
                   "guarded": step.guarded}
            history.append(row)
            bar.update(1)
            bar.set_postfix(sparsity=f"{step.sparsity:.3f}", metric=metric)
            if callback is not None and callback(row) is False:
                break
    return history


# -- report -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparsityReport:
    """Per layer: weights, nonzero, density (%); ``str()`` / :meth:`to_markdown` render a table."""

    rows: tuple[tuple[str, int, int], ...]

    @property
    def total(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def nonzero(self) -> int:
        return sum(r[2] for r in self.rows)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / max(self.total, 1)

    @property
    def compression(self) -> float:
        """Dense weights / nonzero weights (Han's "×" figure)."""
        return self.total / max(self.nonzero, 1)

    def to_markdown(self) -> str:
        lines = ["| layer | weights | nonzero | kept % |", "|---|---:|---:|---:|"]
        for n, tot, nz in self.rows:
            lines.append(f"| {n} | {tot} | {nz} | {100 * nz / max(tot, 1):.1f} |")
        lines.append(f"| **total** | {self.total} | {self.nonzero} | {100 * self.nonzero / max(self.total, 1):.1f} |")
        return "\n".join(lines)

    __str__ = to_markdown


def sparsity_report(model: nn.Module, layers: Any = None) -> SparsityReport:
    """Count the exact zeros of the weights of ``layers`` (default: every Linear/Conv layer)."""
    rows = []
    for n, m in select_layers(model, layers).items():
        w = m.weight.detach()
        rows.append((n, int(w.numel()), int((w != 0).sum())))
    return SparsityReport(tuple(rows))
