"""Network Slimming (Liu et al. 2017, arXiv 1708.06519): sparse BN scales, one global threshold, multi-pass.

This module owns

* :class:`BNL1` — the sparsity regulariser for *your* training loop: after ``loss.backward()``,
  ``reg.step()`` adds the subgradient λ·sign(γ) of λ·Σ|γ| to every BatchNorm scale's gradient;
* :func:`init_bn_gamma` — the paper's γ initialisation (0.5);
* :class:`SlimmingSelect` (pass ``"slimming_select"``) — the paper's selection rule: ONE global threshold,
  the p-th percentile of the scores (|γ|) of every unit of every prunable group with a BatchNorm; a unit
  is kept iff its score > threshold. Per-layer guards: no group keeps fewer than ``min_keep`` units (the
  guard is logged and reported, or ``on_empty="error"`` raises) and no group loses more than
  ``max_layer_ratio`` of its units in one pass (0.5 in the multi-pass schedule);
* :func:`slimming_prune` — ``fxprune.compile`` with that pipeline (BN-scale importance, slimming
  selection, rewrite, absorption of the removed channels' constants, verification);
* :func:`slimming_schedule` — the multi-pass helper: sparse-train → prune (≤ 50 % per layer) →
  fine-tune, repeated, with the user's own training functions.

A unit's score is the largest |γ| among the BatchNorms in its group (one BN for a plain conv; a residual
stream's unit has one per block), so "keep iff score > threshold" means "keep iff any of its γ exceeds
the threshold" and the percentile is taken over units. Groups without a BatchNorm are not scored and
keep every channel.

Training helpers act on the model you train (that is their purpose); :func:`slimming_prune` and the
compiler never modify it.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> _ = torch.nn.init.uniform_(net[1].weight)   # distinct scales (equal scales all tie at the threshold)
>>> reg = BNL1(net, lam=1e-4)
>>> net(torch.randn(2, 1, 8, 8)).sum().backward(); reg.step()
>>> res = slimming_prune(net.eval(), torch.randn(1, 1, 8, 8), ratio=0.5)
>>> res.module.get_submodule("0").out_channels
4
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import meta
from ..api import compile as fx_compile
from ..errors import ConfigError, InputError
from ..flops import count_cost
from ..passes import BNScaleImportance, GroupChannels, Rewrite, Verify
from ..passes.absorb import AbsorbConstants
from ..passes.select import choose_units
from ..prepare import prepare
from ..ir import Selection
from ..pipeline import Context, Pass, PassResult, register_pass

#: the ``slimming`` fact: the global threshold chosen and the groups guarded or capped
SLIMMING = meta.declare("slimming")

__all__ = ["BNL1", "init_bn_gamma", "bn_modules", "SlimmingSelect", "slimming_prune", "slimming_schedule",
           "SlimmingRound", "SlimmingHistory", "check_penalty"]

log = logging.getLogger(__name__)


def check_penalty(value: Any, what: str, upper: float | None = None) -> float:
    """A finite number ≥ 0 (and < ``upper`` when given), else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    if upper is not None and value >= upper:
        raise ConfigError(f"{what} must be < {upper:g}, got {value!r} (a penalty this large zeroes every scale)")
    return float(value)


def bn_modules(model: nn.Module, modules: Iterable[str] | None = None) -> list[tuple[str, _BatchNorm]]:
    """The affine BatchNorm layers of ``model`` (all, or the named ones); an :class:`InputError` if none."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.affine]
    if modules is not None:
        names = list(modules)
        have = dict(found)
        bad = [n for n in names if n not in have]
        if bad:
            raise ConfigError(f"modules: {', '.join(map(repr, bad))} are not affine BatchNorm layers of the model")
        found = [(n, have[n]) for n in names]
    if not found:
        raise InputError(f"{type(model).__name__} has no affine BatchNorm layer: BN-scale methods (Network Slimming, "
                         "ISTA) need the γ of a BatchNorm after each prunable layer")
    return found


def init_bn_gamma(model: nn.Module, value: float = 0.5, modules: Iterable[str] | None = None) -> int:
    """Set every BatchNorm γ to ``value`` (the paper uses 0.5) in place; returns the number of layers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"value must be a finite number, got {value!r}")
    layers = bn_modules(model, modules)
    with torch.no_grad():
        for _, m in layers:
            m.weight.fill_(value)
    return len(layers)


class BNL1:
    """L1 sparsity on BatchNorm scales for any training loop (subgradient of λ·Σ|γ|).

    ``loss.backward(); reg.step(); optimizer.step()`` — ``step`` adds ``lam * sign(γ)`` to every γ's
    gradient (creating it when the loss did not reach a γ). ``penalty()`` is the value λ·Σ|γ| for logging.
    """

    def __init__(self, model: nn.Module, lam: float = 1e-4, modules: Iterable[str] | None = None) -> None:
        self.lam = check_penalty(lam, "lam", upper=1.0)
        self.layers = bn_modules(model, modules)

    @property
    def gammas(self) -> list[nn.Parameter]:
        return [m.weight for _, m in self.layers]

    def step(self) -> None:
        if self.lam == 0:
            return
        with torch.no_grad():
            for g in self.gammas:
                sub = torch.sign(g.detach()) * self.lam
                if g.grad is None:
                    g.grad = sub.clone()
                else:
                    g.grad.add_(sub)

    def penalty(self) -> float:
        return self.lam * float(sum(g.detach().abs().sum() for g in self.gammas))

    def scales(self) -> torch.Tensor:
        """All |γ| as one flat tensor (for histograms)."""
        return torch.cat([g.detach().abs().flatten() for g in self.gammas])


@dataclass(frozen=True)
class SlimmingSelect(Pass):
    """The Network Slimming selection rule (see the module docstring).

    ``ratio``: the global percentile p (0 ≤ p < 1): the threshold is the k-th smallest score, k = ⌊p·N⌋
    over the N scored units, and every unit scoring ≤ threshold is removed (ties included). Or an absolute
    ``threshold``. ``max_layer_ratio``: a group loses at most this fraction of its units in this pass.
    ``min_keep``: units every group keeps; when the threshold would remove more, the guard keeps the
    best-scoring ones, logs it and lists the group in the report, or raises if ``on_empty="error"``.
    """

    name: ClassVar[str] = "slimming_select"
    reads: ClassVar[tuple[str, ...]] = ("groups", "importance")
    writes: ClassVar[tuple[str, ...]] = ("selection", SLIMMING)

    ratio: float | None = None
    threshold: float | None = None
    max_layer_ratio: float = 1.0
    min_keep: int = 1
    on_empty: str = "guard"

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.threshold is None):
            raise ConfigError("slimming_select: give exactly one of ratio= (global percentile) or threshold=")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0 <= self.ratio < 1):
            raise ConfigError(f"slimming_select: ratio must be a number with 0 <= ratio < 1, got {self.ratio!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                                           or not math.isfinite(self.threshold)):
            raise ConfigError(f"slimming_select: threshold must be a finite number, got {self.threshold!r}")
        if isinstance(self.max_layer_ratio, bool) or not isinstance(self.max_layer_ratio, (int, float)) or not (
                0 < self.max_layer_ratio <= 1):
            raise ConfigError(f"slimming_select: max_layer_ratio must be in (0, 1], got {self.max_layer_ratio!r}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise ConfigError(f"slimming_select: min_keep must be an integer >= 1, got {self.min_keep!r}")
        if self.on_empty not in ("guard", "error"):
            raise ConfigError(f"slimming_select: on_empty must be 'guard' or 'error', got {self.on_empty!r}")

    def global_threshold(self, scores: np.ndarray) -> float:
        """The score at or below which units are removed."""
        if self.threshold is not None:
            return float(self.threshold)
        k = int(math.floor(self.ratio * len(scores) + 1e-9))  # type: ignore[operator]
        if k == 0 or len(scores) == 0:
            return -math.inf
        return float(np.sort(scores)[k - 1])

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis = meta.get(gm, "groups")
        scores = meta.get(gm, "importance")
        groups = [g for g in analysis.groups if g.prunable and g.id in scores]
        if not groups:
            raise InputError("slimming_select: no prunable channel group has a score (a BatchNorm scale); "
                             "Network Slimming needs BatchNorm layers after the prunable convs/linears")
        allsc = np.concatenate([np.asarray(scores[g.id], dtype=np.float64) for g in groups])
        thr = self.global_threshold(allsc)
        keep: dict[int, tuple[int, ...]] = {}
        guarded: list[str] = []
        capped: list[str] = []
        for g in groups:
            s = np.asarray(scores[g.id], dtype=np.float64)
            pinned = set(g.pinned)
            below = [u for u in range(g.size) if s[u] <= thr and u not in pinned]
            n = len(below)
            floor_keep = max(self.min_keep, len(pinned), 1)
            if g.size - n < floor_keep:
                msg = (f"slimming: the threshold {thr:.4g} would leave {g.size - n} of {g.size} channels in "
                       f"'{g.root}'; the guard keeps its {min(floor_keep, g.size)} largest")
                if self.on_empty == "error":
                    raise ConfigError(msg.replace("; the guard keeps", " (on_empty='error'); min_keep is") +
                                      " — lower ratio/threshold or use on_empty='guard'")
                log.warning(msg)
                ctx.notes.append(msg)
                guarded.append(g.root)
                n = g.size - min(floor_keep, g.size)
            cap = int(math.floor(self.max_layer_ratio * g.size + 1e-9))
            if n > cap:
                capped.append(g.root)
                n = cap
            kept = choose_units(g, s, n, self.min_keep)
            if len(kept) < g.size:
                keep[g.id] = kept
        if capped:
            ctx.notes.append(f"slimming: {len(capped)} group(s) capped at max_layer_ratio={self.max_layer_ratio:g} "
                             f"this pass ({', '.join(capped[:5])}{'…' if len(capped) > 5 else ''})")
        sel = Selection.from_dict(keep)
        meta.put(gm, "selection", sel)
        info = {"threshold": thr, "guarded": tuple(guarded), "capped": tuple(capped),
                "units_removed": int(sum(analysis.groups[gid].size - len(k) for gid, k in keep.items())),
                "units_scored": int(len(allsc))}
        meta.put(gm, "slimming", info)
        return PassResult(gm, False, dict(info))


register_pass("slimming_select", SlimmingSelect)


def slimming_prune(model: nn.Module, example_inputs: Any, *, ratio: float | None = None,
                   threshold: float | None = None, max_layer_ratio: float = 1.0, min_keep: int = 1,
                   on_empty: str = "guard", absorb: bool = True, verify: str = "shapes",
                   ignore: Iterable[str] = (), unknown_ops: str = "error", **compile_kw: Any):
    """Prune ``model`` with the Network Slimming rule; returns a :class:`fxprune.CompileResult`.

    The pipeline: ``group | importance(bn_scale, max over a unit's BNs) | slimming_select | rewrite |
    absorb | verify``. ``model`` is not modified. Raises :class:`InputError` for a model without BatchNorm.
    """
    bn_modules(model)  # a clear error before tracing when there is no BN at all
    if verify is True:
        verify = "equivalence"
    if verify not in ("shapes", "equivalence", "none", False):
        raise ConfigError(f"verify must be 'shapes', 'equivalence' or 'none', got {verify!r}")
    sel = SlimmingSelect(ratio=ratio, threshold=threshold, max_layer_ratio=max_layer_ratio, min_keep=min_keep,
                         on_empty=on_empty)
    ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    passes: list[Pass] = [GroupChannels(unknown_ops, ignore), BNScaleImportance(reduction="max"), sel, Rewrite()]
    if absorb:
        passes.append(AbsorbConstants())
    if verify not in ("none", False):
        passes.append(Verify(equivalence=(verify == "equivalence")))
    return fx_compile(model, example_inputs, pipeline=passes, ignore=ignore, **compile_kw)


@dataclass
class SlimmingRound:
    """One pass of :func:`slimming_schedule`."""

    index: int
    threshold: float
    params: int
    macs: int
    units_removed: int
    guarded: tuple[str, ...]
    capped: tuple[str, ...]
    metric: Any = None
    result: Any = field(default=None, repr=False)


@dataclass
class SlimmingHistory:
    """What :func:`slimming_schedule` returns: the final model and one record per pass."""

    model: nn.Module
    rounds: list[SlimmingRound]
    params_before: int
    macs_before: int

    def table(self) -> str:
        lines = ["| pass | threshold | units removed | params | MACs | guard fired | metric |",
                 "|---:|---:|---:|---:|---:|---|---|"]
        lines.append(f"| 0 | – | – | {self.params_before} | {self.macs_before} | – | – |")
        for r in self.rounds:
            lines.append(f"| {r.index} | {r.threshold:.4g} | {r.units_removed} | {r.params} | {r.macs} | "
                         f"{', '.join(r.guarded) or '–'} | {r.metric if r.metric is not None else '–'} |")
        return "\n".join(lines)


def slimming_schedule(model: nn.Module, example_inputs: Any, *,
                      sparse_train: Callable[[nn.Module, BNL1], Any],
                      finetune: Callable[[nn.Module], Any] | None = None,
                      evaluate: Callable[[nn.Module], Any] | None = None,
                      rounds: int = 2, ratio: float = 0.3, lam: float = 1e-4,
                      max_layer_ratio: float = 0.5, min_keep: int = 1, init_gamma: float | None = None,
                      **prune_kw: Any) -> SlimmingHistory:
    """Multi-pass Network Slimming with your own training functions.

    Each pass: ``sparse_train(model, reg)`` (your loop; call ``reg.step()`` after ``loss.backward()``) →
    :func:`slimming_prune` at global percentile ``ratio`` with at most ``max_layer_ratio`` of any layer
    removed → ``finetune(model)`` (your loop, no regulariser; may return a new module) → ``evaluate(model)``
    (optional, recorded). Both training functions receive the model in train mode. The first pass trains
    ``model`` itself (your training function's choice);
    every later pass works on the pruned module of the previous one. ``init_gamma`` (e.g. 0.5) sets γ
    before the first pass.
    """
    if not callable(sparse_train):
        raise ConfigError("sparse_train must be a function (model, regulariser) -> None")
    if finetune is not None and not callable(finetune):
        raise ConfigError("finetune must be a function (model) -> None or a model")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
    check_penalty(lam, "lam", upper=1.0)
    bn_modules(model)
    if init_gamma is not None:
        init_bn_gamma(model, init_gamma)
    gm0, _ = prepare(model, example_inputs)
    c0 = meta.get(gm0, "cost") or count_cost(gm0)
    history = SlimmingHistory(model, [], c0.params, c0.macs)
    cur: nn.Module = model
    for i in range(1, rounds + 1):
        reg = BNL1(cur, lam)
        cur.train()
        sparse_train(cur, reg)
        res = slimming_prune(cur, example_inputs, ratio=ratio, max_layer_ratio=max_layer_ratio, min_keep=min_keep,
                             **prune_kw)
        cur = res.module
        if finetune is not None:
            cur.train()
            out = finetune(cur)
            if isinstance(out, nn.Module):
                cur = out
        info = res.facts.get("slimming", {})
        metric = evaluate(cur) if evaluate is not None else None
        rec = SlimmingRound(i, info.get("threshold", float("nan")), res.report.params_after, res.report.macs_after,
                            info.get("units_removed", 0), info.get("guarded", ()), info.get("capped", ()), metric, res)
        history.rounds.append(rec)
        log.info("slimming pass %d: threshold %.4g, %d units removed, params %d, MACs %d", i, rec.threshold,
                 rec.units_removed, rec.params, rec.macs)
    history.model = cur
    return history
