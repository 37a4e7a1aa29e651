"""Li et al. (arXiv 1608.08710) extras: per-group sensitivity analysis, ratios chosen from it, and the
projection-shortcut rule.

This module owns :func:`sensitivity` (prune **each** prunable channel group alone at 10 … 90 %, no
retraining, evaluate with *your* metric), the :class:`SensitivityTable` it returns (``to_markdown()``,
``plot(path)`` with the optional ``matplotlib`` extra), :func:`choose_ratios` (the largest ratio per
group — or per stage — whose metric stays within ``max_drop`` of the unpruned model; the result is a
``compile(ratios=...)`` mapping) and :class:`ProjectionShortcutImportance` (``importance=
"l1_projection"``): in a residual group that contains a projection shortcut, the kept set is the one
the shortcut's own filter L1 norms select, as Li et al. do for ResNets.

The analysis never modifies the user's model: it traces a copy once, scores once, and rewrites a new
module per (group, ratio) with :func:`fxprune.passes.rewrite.rewrite_graph`.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> x = torch.randn(4, 1, 8, 8)
>>> ref = net(x).detach()
>>> table = sensitivity(net, x, lambda m: -float((m(x) - ref).pow(2).mean()), ratios=(0.25, 0.5), progress=False)
>>> [(r.root, r.ratio, r.kept) for r in table.rows]
[('0', 0.25, 6), ('0', 0.5, 4)]
>>> choose_ratios(table, max_drop=float("inf"))
{'0': 0.5}
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, FxpruneError, InputError
from ..ir import ChannelGroup, Selection
from .. import meta
from ..flops import count_cost
from ..options import check_names
from ..passes import GroupChannels
from ..passes.importance import (ImportancePass, MagnitudeImportance, register_importance, resolve_importance,
                                 slice_mass)
from ..passes.rewrite import rewrite_graph
from ..passes.select import choose_units, floor_count, validate_ratio
from ..pipeline import Context
from ..prepare import prepare
from ..progress import progress as progress_bar

__all__ = [
    "sensitivity",
    "SensitivityRow",
    "SensitivityTable",
    "choose_ratios",
    "ProjectionShortcutImportance",
    "MissingDependencyError",
]

log = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class MissingDependencyError(FxpruneError, ImportError):
    """An optional dependency (e.g. matplotlib for plots) is not installed."""


@dataclass(frozen=True)
class SensitivityRow:
    group: int
    root: str  # the group's first producer (a module name for conv/linear producers)
    size: int  # units in the group
    ratio: float  # requested fraction removed
    kept: int  # units actually kept (min_keep / constraints can keep more)
    metric: float
    macs: int  # MACs of the pruned module
    params: int


@dataclass(frozen=True)
class SensitivityTable:
    """Rows of (group, ratio, metric) plus the unpruned model's metric (``baseline``)."""

    rows: tuple[SensitivityRow, ...]
    baseline: float
    ratios: tuple[float, ...]
    higher_is_better: bool = True
    seconds: float = 0.0

    def groups(self) -> dict[str, list[SensitivityRow]]:
        """Rows by group root, in ratio order."""
        out: dict[str, list[SensitivityRow]] = {}
        for r in self.rows:
            out.setdefault(r.root, []).append(r)
        return out

    def to_markdown(self, digits: int = 4) -> str:
        head = "| group (root) | units | " + " | ".join(f"{r:.0%}" for r in self.ratios) + " |"
        lines = [f"baseline (unpruned): {self.baseline:.{digits}g}", "", head,
                 "|---|---:|" + "---:|" * len(self.ratios)]
        for root, rows in self.groups().items():
            by = {r.ratio: r.metric for r in rows}
            cells = [f"{by[q]:.{digits}g}" if q in by else "" for q in self.ratios]
            lines.append(f"| {root} | {rows[0].size} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    __str__ = to_markdown

    def plot(self, path: str | None = None, *, title: str = "sensitivity to pruning (each group alone)") -> Any:
        """Metric vs ratio, one line per group (needs matplotlib: ``pip install 'fxprune[plot]'``).

        Saves to ``path`` when given; returns the matplotlib Figure. Uses the object API only, so the
        user's pyplot backend is left alone.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise MissingDependencyError(
                "SensitivityTable.plot needs matplotlib; install it with pip install 'fxprune[plot]' "
                "(or use to_markdown())") from exc
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        for root, rows in self.groups().items():
            ax.plot([100 * r.ratio for r in rows], [r.metric for r in rows], marker="o", ms=3,
                    label=f"{root} ({rows[0].size})")
        ax.axhline(self.baseline, color="k", lw=0.8, ls="--", label="unpruned")
        ax.set_xlabel("filters pruned away (%)")
        ax.set_ylabel("metric")
        ax.set_title(title)
        if len(self.groups()) <= 20:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    if isinstance(ratios, (int, float)):
        ratios = (ratios,)
    out = tuple(sorted({validate_ratio(r, "ratios[i]") for r in ratios}))
    if not out:
        raise ConfigError("ratios must list at least one ratio in [0, 1)")
    return out


def sensitivity(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Callable[[nn.Module], float],
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    importance: Any = "l1",
    groups: Iterable[str] | None = None,
    higher_is_better: bool = True,
    min_keep: int = 1,
    ignore: Iterable[str] = (),
    unknown_ops: str = "error",
    allow_lossy: bool = False,
    leaf_modules: Iterable[Any] = (),
    seed: int = 0,
    progress: bool | None = None,
) -> SensitivityTable:
    """Prune each prunable group alone at each ratio (no retraining) and evaluate it.

    ``evaluate(module) -> float`` is your metric (accuracy, negative loss, …) on your data; it gets a
    new module per (group, ratio), in eval mode. ``groups``: restrict to these group roots (module
    names). ``importance``: as in :func:`fxprune.compile` (default L1, Li et al.). The baseline is the
    metric of the unpruned (traced) copy.
    """
    if not callable(evaluate):
        raise ConfigError("evaluate must be callable as evaluate(module) -> float")
    qs = _check_ratios(ratios)
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ConfigError(f"min_keep must be an integer >= 1, got {min_keep!r}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    ignore = check_names(model, ignore, "ignore")
    imp = resolve_importance(importance, None, "sum", seed)
    t0 = time.perf_counter()
    gm, inputs = prepare(model, example_inputs, leaf_modules)
    ctx = Context(model=model, example_inputs=inputs, original=gm, seed=seed)
    GroupChannels(unknown_ops, ignore, allow_lossy).run(gm, ctx)
    imp.run(gm, ctx)
    analysis, scores = meta.get(gm, "groups"), meta.get(gm, "importance")
    todo = [g for g in analysis.groups if g.prunable and g.id in scores]
    if groups is not None:
        wanted = {groups} if isinstance(groups, str) else set(groups)
        unknown = wanted - {g.root for g in todo}
        if unknown:
            raise ConfigError(f"groups: no prunable group rooted at {', '.join(sorted(map(repr, unknown)))}; "
                              f"prunable roots: {', '.join(g.root for g in todo[:10])}"
                              + (" ..." if len(todo) > 10 else ""))
        todo = [g for g in todo if g.root in wanted]

    def score(mod: nn.Module) -> float:
        mod.eval()
        with torch.no_grad():
            v = evaluate(mod)
        try:
            v = float(v)
        except (TypeError, ValueError) as exc:
            raise InputError(f"evaluate must return a number, got {type(v).__name__}") from exc
        if not math.isfinite(v):
            raise InputError(f"evaluate returned a non-finite metric {v}")
        return v

    base_mod = rewrite_graph(gm, analysis, Selection(), inputs)
    baseline = score(base_mod)
    rows: list[SensitivityRow] = []
    with progress_bar(len(todo) * len(qs), "sensitivity", progress) as bar:
        for g in todo:
            for q in qs:
                kept = choose_units(g, scores[g.id], floor_count(q, g.size), min_keep)
                if len(kept) == g.size:
                    mod, metric = base_mod, baseline
                else:
                    mod = rewrite_graph(gm, analysis, Selection.from_dict({g.id: kept}), inputs)
                    metric = score(mod)
                c = count_cost(mod)
                rows.append(SensitivityRow(g.id, g.root, g.size, q, len(kept), metric, c.macs, c.params))
                bar.update(1)
    return SensitivityTable(tuple(rows), baseline, qs, higher_is_better, time.perf_counter() - t0)


def choose_ratios(
    table: SensitivityTable,
    max_drop: float,
    *,
    stage: Callable[[str], str] | int | None = None,
    relative: bool = False,
) -> dict[str, float]:
    """Per-group (or per-stage) ratios from a sensitivity table, usable as ``compile(ratios=...)``.

    A group gets the largest tested ratio r such that the metric at every tested ratio ≤ r stays within
    ``max_drop`` of the baseline (``relative=True``: a fraction of the baseline); a sensitive group
    (even the smallest ratio drops too much) gets 0.0, i.e. it is skipped. ``stage``: a function
    root → stage name, or an int n (the first n dot-separated parts of the root, e.g. 1 maps
    ``layer2.1.conv1`` to ``layer2``); every group of a stage then gets the stage's smallest ratio
    (Li et al. use one ratio per stage).
    """
    if not isinstance(table, SensitivityTable):
        raise ConfigError(f"table must be a SensitivityTable, got {type(table).__name__}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or math.isnan(max_drop) or max_drop < 0:
        raise ConfigError(f"max_drop must be a number >= 0, got {max_drop!r}")
    tol = max_drop * abs(table.baseline) if relative else max_drop
    tol += 1e-12 * max(1.0, abs(table.baseline))  # a drop of exactly max_drop passes despite rounding
    sign = 1.0 if table.higher_is_better else -1.0
    per: dict[str, float] = {}
    for root, rows in table.groups().items():
        best = 0.0
        for r in sorted(rows, key=lambda r: r.ratio):
            if sign * (table.baseline - r.metric) > tol:
                break
            best = r.ratio
        per[root] = best
    if stage is None:
        return per
    if isinstance(stage, int) and not isinstance(stage, bool):
        if stage < 1:
            raise ConfigError(f"stage as an int must be >= 1 (name parts), got {stage}")
        n = stage
        stage = lambda root: ".".join(root.split(".")[:n])  # noqa: E731
    if not callable(stage):
        raise ConfigError(f"stage must be None, an int or a callable root -> stage, got {stage!r}")
    by_stage: dict[str, float] = {}
    for root, r in per.items():
        s = stage(root)
        by_stage[s] = min(by_stage.get(s, r), r)
    return {root: by_stage[stage(root)] for root in per}


# -- projection-shortcut rule -----------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectionShortcutImportance(ImportancePass):
    """Li et al.'s ResNet rule: a residual group with a projection shortcut is scored by that shortcut.

    A group's *projection shortcut* is a producer (role ``"out"``, a weight of ≥ 2 dims) whose module
    name is listed in ``modules`` or contains one of the ``match`` name parts (torchvision/timm call it
    ``downsample``, many CIFAR ResNets ``shortcut``), in a group with at least two producers (the
    block's residual sum). Such a group is scored by the Lp norm of the shortcut's filters alone, so
    the block output keeps exactly the channels the shortcut's own L1 ranking keeps. Every other group
    is scored by the Lp norm of its filters (``roles=("out",)``: Li's criterion).
    """

    name: ClassVar[str] = "importance"
    p: int = 1
    match: tuple[str, ...] = ("downsample", "shortcut")
    modules: tuple[str, ...] = ()
    normalize: str | None = None

    def __post_init__(self) -> None:
        if self.p not in (1, 2):
            raise ConfigError(f"p must be 1 or 2, got {self.p}")
        if isinstance(self.match, str) or isinstance(self.modules, str):
            raise ConfigError("match and modules must be tuples of names")

    def shortcut_slices(self, group: ChannelGroup, tensor: Callable[[str], torch.Tensor]) -> list:
        producers = [ps for ps in group.params if ps.role == "out" and not ps.is_buffer and tensor(ps.param).dim() >= 2]
        if len({ps.param for ps in producers}) < 2:
            return []

        def is_shortcut(param: str) -> bool:
            mod = param.rpartition(".")[0]
            return mod in self.modules or any(m in mod.split(".") for m in self.match)

        return [ps for ps in producers if is_shortcut(ps.param)]

    def scores(self, group, tensor, ctx):
        sc = self.shortcut_slices(group, tensor)
        if not sc:
            return MagnitudeImportance(p=self.p, roles=("out",)).scores(group, tensor, ctx)
        s = np.zeros(group.size)
        for ps in sc:
            units, v = slice_mass(tensor, ps, self.p)
            np.add.at(s, units, v)
        return s


register_importance("l1_projection", ProjectionShortcutImportance)
