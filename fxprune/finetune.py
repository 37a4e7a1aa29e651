"""A small fine-tuning utility and the iterative prune → fine-tune scheduler.

This module owns :func:`finetune` (a plain supervised loop: your loader, loss and optional optimiser),
:class:`IterativePruner` (one structural pruning step at a time toward a MACs or parameter target, so
*your* training loop stays yours) and :func:`iterative_prune` (the same loop with a ``train_fn`` you
supply). Neither hides the training loop: ``train_fn(module, step)`` is any callable — your own loop,
or ``lambda m, i: fxprune.finetune(m, loader)``.

Every pruning step is ``fxprune.compile``'s machinery (group → importance → select → rewrite) applied
to the current module; the per-group ratio of a step is found by bisection so that the step removes
``step_ratio`` of the remaining cost (never overshooting the final target). The user's model is only
ever read (it is copied by the first step); the modules returned by the steps are new GraphModules
that the scheduler owns and ``train_fn`` may modify in place.

>>> import torch, fxprune
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
>>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
>>> res = fxprune.iterative_prune(net, x[:1], lambda m, i: fxprune.finetune(m, [(x, y)], progress=False).loss,
...                               target_params=0.5, step_ratio=0.3, progress=False)
>>> res.history[-1].params <= 0.5 * res.history[0].params_before
True
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import meta
from .errors import ConfigError, InputError
from .flops import count_cost
from .options import CompileOptions
from .passes import GroupChannels, Select
from .passes.rewrite import rewrite_graph
from .pipeline import Context
from .prepare import prepare
from .progress import progress as progress_bar

__all__ = ["finetune", "FinetuneStats", "IterativePruner", "IterStep", "IterativeResult", "iterative_prune"]

log = logging.getLogger(__name__)


# -- fine-tuning ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneStats:
    """What :func:`finetune` did: steps, samples, mean loss per epoch, wall time."""

    epochs: int
    steps: int
    samples: int
    epoch_losses: tuple[float, ...]
    seconds: float

    @property
    def loss(self) -> float:
        """Mean training loss of the last epoch."""
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def _split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    if isinstance(batch, dict):
        if "target" not in batch and "y" not in batch:
            raise InputError("a dict batch needs a 'target' (or 'y') entry")
        tgt = batch.get("target", batch.get("y"))
        ins = batch.get("input", batch.get("x"))
        if ins is None:
            raise InputError("a dict batch needs an 'input' (or 'x') entry")
        return (ins if isinstance(ins, tuple) else (ins,)), tgt
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1]), batch[-1]
    raise InputError(f"each batch must be (inputs..., target) or a dict; got {type(batch).__name__}"
                     + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def finetune(
    module: nn.Module,
    loader: Iterable[Any],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
    optimizer: torch.optim.Optimizer | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    callback: Callable[[int, float], Any] | None = None,
) -> FinetuneStats:
    """Train ``module`` in place on ``loader`` (batches ``(inputs..., target)``) and return statistics.

    ``optimizer``: yours (any ``torch.optim`` optimiser over ``module``'s parameters); by default SGD
    with ``lr``, ``momentum`` and ``weight_decay``. ``callback(step, loss)`` runs after every step;
    returning ``False`` stops. The module's train/eval mode is restored at the end. A non-finite loss
    raises :class:`~fxprune.errors.InputError` (lower the learning rate).
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
    if epochs > 1 and iter(loader) is loader:
        raise ConfigError("loader is a one-shot iterator but epochs > 1; pass a list or a DataLoader")
    if optimizer is None:
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"lr must be a positive number, got {lr!r}")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise InputError("module has no trainable parameters")
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if device is not None:
        module.to(device)
    was = module.training
    module.train()
    t0 = time.perf_counter()
    steps = samples = 0
    losses: list[float] = []
    total = None
    with contextlib.suppress(TypeError):
        total = epochs * len(loader)  # type: ignore[arg-type]
    if max_steps is not None and total is not None:
        total = min(total, max_steps)
    stop = False
    try:
        with progress_bar(total, "fine-tune", progress) as bar:
            for _ in range(epochs):
                tot, n = 0.0, 0
                for batch in loader:
                    ins, tgt = _split_batch(batch)
                    if device is not None:
                        ins = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in ins)
                        tgt = tgt.to(device) if isinstance(tgt, torch.Tensor) else tgt
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(module(*ins), tgt)
                    if not torch.isfinite(loss):
                        raise InputError(f"non-finite loss {loss.item()} at step {steps}; lower the learning rate")
                    loss.backward()
                    optimizer.step()
                    b = int(tgt.shape[0]) if isinstance(tgt, torch.Tensor) and tgt.dim() else 1
                    lv = float(loss.detach())
                    tot += lv * b
                    n += b
                    steps += 1
                    samples += b
                    bar.update(1)
                    bar.set_postfix(loss=f"{lv:.4f}")
                    if (callback is not None and callback(steps, lv) is False) or \
                            (max_steps is not None and steps >= max_steps):
                        stop = True
                        break
                if n:
                    losses.append(tot / n)
                if stop:
                    break
    finally:
        module.train(was)
    if steps == 0:
        raise InputError("loader yielded no batches")
    return FinetuneStats(len(losses), steps, samples, tuple(losses), time.perf_counter() - t0)


# -- iterative structural pruning -------------------------------------------------------------------
@dataclass(frozen=True)
class IterStep:
    """One row of the history: the cost after pruning step ``step`` and the metric ``train_fn`` returned."""

    step: int
    ratio: float  # fraction removed from every prunable group in this step (the bisected ratio)
    params_before: int
    params: int
    macs_before: int
    macs: int
    metric: Any = None
    seconds: float = 0.0


@dataclass
class IterativeResult:
    """The final module and the history (``to_markdown()`` renders it)."""

    module: nn.Module
    history: list[IterStep] = field(default_factory=list)
    reached: bool = True

    def to_markdown(self) -> str:
        lines = ["| step | ratio | params | MACs | metric | seconds |", "|---:|---:|---:|---:|---:|---:|"]
        for r in self.history:
            m = f"{r.metric:.4g}" if isinstance(r.metric, (int, float)) else ("" if r.metric is None else str(r.metric))
            lines.append(f"| {r.step} | {r.ratio:.3f} | {r.params} | {r.macs} | {m} | {r.seconds:.2f} |")
        return "\n".join(lines)

    __str__ = to_markdown


class IterativePruner:
    """Prune a model step by step toward ``target_macs`` or ``target_params``; you train between steps.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> pruner = IterativePruner(net, torch.randn(1, 8), target_params=0.6, step_ratio=0.25, progress=False)
    >>> while not pruner.done:
    ...     module = pruner.step()
    ...     # ... your own training loop on `module` here ...
    ...     _ = pruner.record(metric=None)
    >>> pruner.history[-1].params <= 0.6 * pruner.params0
    True

    Targets: a number ≤ 1 is a fraction of the original cost, larger numbers are absolute (MACs are
    counted for one forward pass over ``example_inputs``). ``step_ratio`` is the fraction of the
    *remaining* cost each step removes (the last step stops at the target). Pruning options
    (``importance``, ``ignore``, ``min_keep``, ``round_to``, ``global_ranking``, ``unknown_ops``,
    ``allow_lossy``, ``leaf_modules``) mean what they mean in :func:`fxprune.compile`.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, target_macs: float | None = None,
                 target_params: float | None = None, step_ratio: float = 0.2, importance: Any = "l1",
                 max_steps: int = 50, ignore: Iterable[str] = (), min_keep: int = 1, round_to: int = 1,
                 global_ranking: bool = False, unknown_ops: str = "error", allow_lossy: bool = False,
                 leaf_modules: Iterable[Any] = (), seed: int = 0, progress: bool | None = None) -> None:
        if (target_macs is None) == (target_params is None):
            raise ConfigError("give exactly one of target_macs= or target_params=")
        target = target_macs if target_macs is not None else target_params
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0 or not math.isfinite(target):
            raise ConfigError(f"the target must be > 0 (absolute, or a fraction <= 1 of the original), got {target!r}")
        if isinstance(step_ratio, bool) or not isinstance(step_ratio, (int, float)) or not 0 < step_ratio < 1:
            raise ConfigError(f"step_ratio must be a number with 0 < step_ratio < 1, got {step_ratio!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        self.kind = "macs" if target_macs is not None else "params"
        self.step_ratio = float(step_ratio)
        self.max_steps = max_steps
        self.progress = progress
        # the pruning options, validated as fxprune.compile validates them
        self.options = CompileOptions(importance=importance, ratio=0.0, ignore=tuple(ignore or ()), min_keep=min_keep,
                                      round_to=round_to, global_ranking=global_ranking, unknown_ops=unknown_ops,
                                      allow_lossy=allow_lossy, leaf_modules=tuple(leaf_modules), seed=seed,
                                      ).check_model(model)
        self.ignore = self.options.ignore
        self.leaf_modules = self.options.leaf_modules
        self._group = GroupChannels(unknown_ops, self.ignore, allow_lossy)
        self._importance = self.options.criterion()
        self._select = dict(global_ranking=global_ranking, min_keep=min_keep, round_to=round_to)
        gm, self.inputs = prepare(model, example_inputs, self.leaf_modules)
        cost = meta.get(gm, "cost")
        self.params0, self.macs0 = cost.params, cost.macs
        base = self.macs0 if self.kind == "macs" else self.params0
        self.target = int(target * base) if target <= 1 else int(target)
        self.module: nn.Module = model
        self.history: list[IterStep] = []
        self.reached = base <= self.target
        self._stuck = False
        self._pending: IterStep | None = None
        self._bar_cm = None
        # The smallest reachable cost, to fail up front rather than after hours of fine-tuning.
        floor = self._prune_to(model, -1)[2]
        if floor > self.target:
            raise ConfigError(
                f"target_{self.kind} {self.target} is not reachable: pruning every prunable group down to its "
                f"minimum still leaves {floor} {self.kind.upper() if self.kind == 'macs' else self.kind} (of {base}); "
                "layers never lose all their channels")

    @property
    def done(self) -> bool:
        return self.reached or self._stuck or len(self.history) >= self.max_steps

    def _cost(self, params: int, macs: int) -> int:
        return macs if self.kind == "macs" else params

    def _prune_to(self, module: nn.Module, goal: int) -> tuple[fx.GraphModule, float, int, int, int]:
        """Smallest per-group ratio whose result costs ≤ ``goal`` (or the max ratio when unreachable).

        Returns (new module, ratio, cost, params, macs)."""
        gm, inputs = prepare(module, self.inputs, self.leaf_modules)
        ctx = Context(model=module, example_inputs=inputs, original=gm)
        self._group.run(gm, ctx)
        self._importance.run(gm, ctx)
        analysis, scores = meta.get(gm, "groups"), meta.get(gm, "importance")
        cache: dict[float, tuple[fx.GraphModule, int, int]] = {}

        def at(r: float) -> tuple[fx.GraphModule, int, int]:
            if r not in cache:
                sel = Select(ratio=r, **self._select).select(analysis, scores)
                new = rewrite_graph(gm, analysis, sel, inputs)
                c = count_cost(new)
                cache[r] = (new, c.params, c.macs)
            return cache[r]

        hi = 0.999
        new, p, m = at(hi)
        if self._cost(p, m) > goal:
            return new, hi, self._cost(p, m), p, m
        lo = 0.0
        for _ in range(16):
            mid = (lo + hi) / 2
            if self._cost(*at(mid)[1:]) <= goal:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-3:
                break
        new, p, m = at(hi)
        return new, hi, self._cost(p, m), p, m

    def step(self) -> fx.GraphModule:
        """Prune the current module once and return the new module (train it, then call :meth:`record`)."""
        if self.done:
            raise ConfigError("the pruner is done (target reached, max_steps, or no further progress)")
        if self._pending is not None:
            self.record()
        t0 = time.perf_counter()
        cur = self.history[-1] if self.history else None
        p0, m0 = (cur.params, cur.macs) if cur else (self.params0, self.macs0)
        c0 = self._cost(p0, m0)
        goal = max(self.target, int(c0 * (1 - self.step_ratio)))
        new, r, c, p, m = self._prune_to(self.module, goal)
        if c >= c0:
            self._stuck = True
            log.warning("iterative pruning: no further progress at %d %s (target %d)", c, self.kind, self.target)
        new.train(self.module.training)
        self.module = new
        self.reached = c <= self.target
        self._pending = IterStep(len(self.history), r, p0, p, m0, m, None, time.perf_counter() - t0)
        return new

    def record(self, metric: Any = None) -> IterStep:
        """Close the current step with the metric of your fine-tuning (e.g. validation accuracy)."""
        if self._pending is None:
            raise ConfigError("record() without a step(): call step() first")
        row = IterStep(**{**self._pending.__dict__, "metric": metric})
        self.history.append(row)
        self._pending = None
        return row

    def run(self, train_fn: Callable[[nn.Module, int], Any],
            callback: Callable[[IterStep, nn.Module], Any] | None = None) -> IterativeResult:
        """Loop step → ``train_fn(module, step)`` → record until done; ``callback`` returning False stops."""
        if not callable(train_fn):
            raise ConfigError("train_fn must be callable as train_fn(module, step)")
        with progress_bar(None, f"prune to {self.kind} ≤ {self.target}", self.progress) as bar:
            while not self.done:
                t0 = time.perf_counter()
                module = self.step()
                metric = train_fn(module, len(self.history))
                row = self.record(metric)
                row = IterStep(**{**row.__dict__, "seconds": row.seconds + time.perf_counter() - t0})
                self.history[-1] = row
                bar.update(1)
                bar.set_postfix({self.kind: self._cost(row.params, row.macs), "metric": metric})
                if callback is not None and callback(row, module) is False:
                    break
        return IterativeResult(self.module, list(self.history), self.reached)


def iterative_prune(model: nn.Module, example_inputs: Any, train_fn: Callable[[nn.Module, int], Any], *,
                    target_macs: float | None = None, target_params: float | None = None,
                    step_ratio: float = 0.2, importance: Any = "l1",
                    callback: Callable[[IterStep, nn.Module], Any] | None = None, progress: bool | None = None,
                    **options: Any) -> IterativeResult:
    """prune → ``train_fn(module, step)`` → repeat until the target; returns the module and the history.

    ``options`` are :class:`IterativePruner`'s (``max_steps``, ``ignore``, ``min_keep``, ...).
    """
    pruner = IterativePruner(model, example_inputs, target_macs=target_macs, target_params=target_params,
                             step_ratio=step_ratio, importance=importance, progress=progress, **options)
    return pruner.run(train_fn, callback)
