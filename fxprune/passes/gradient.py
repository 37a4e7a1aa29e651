"""Gradient-based importance: first-order Taylor (activation or weight) and OBD with an empirical Fisher.

This module owns the data-driven criteria that need a backward pass over calibration data:

* :class:`TaylorImportance` ``mode="activation"`` (Molchanov et al. 2016, arXiv 1611.06440): the
  first-order change of the loss when a channel's activation is zeroed, ``ΔL ≈ -Σ_m a_m·∂L/∂a_m``.
  ``granularity="sample"`` (default, the paper's form) sums ``a·g`` over the unit's positions for each
  sample (dim 0 of the activation) and adds the absolute values over samples and batches;
  ``granularity="element"`` adds ``|a·g|`` element by element. A group lists every activation its units
  appear in (conv output, BN output, ReLU output, residual sums, flatten blocks…); the scores of these
  activations are combined with ``reduction`` (sum / mean / max), exactly like the magnitude criteria
  combine parameter slices.
* :class:`TaylorImportance` ``mode="weight"`` (Molchanov et al. 2019, arXiv 1906.10771, first-order term):
  ``Σ |w ⊙ G|`` over the group's parameter slices, with ``G`` the gradient of the total calibration loss
  (the sum of the batch losses' gradients).
* :class:`HessianImportance` (Optimal Brain Damage, LeCun et al. 1989): saliency ``½·h_ii·w_i²`` summed
  over the group's parameter slices. The diagonal Hessian is **approximated by the empirical Fisher**
  ``h_ii ≈ F_ii = (1/N) Σ_n (∂ℓ_n/∂w_i)²`` (mean over samples of the squared per-sample gradient). This is
  exact for the Gauss–Newton part of a log-likelihood loss at a well-fitted model and ignores the
  second-derivative-of-the-network term; it is positive, so the saliency is ≥ 0. ``per_sample=False``
  squares batch gradients instead (cheaper: one backward per batch; averages fewer, noisier terms).

Criteria never dispatch on op type: they address the group's slices with
:func:`~fxprune.passes.importance.slice_values` and its activations through the group's
:class:`~fxprune.ir.ChannelRef` spans.

Calibration data (``Context.calib``, i.e. ``compile(..., calib=...)``) is an iterable of batches; a batch
is a tensor or a tuple of tensors. Without a loss function every element is a model input and the loss is
``0.5·‖output‖²`` (summed over every floating tensor of the output). With ``loss_fn`` the **last element
of each batch is the target**: a batch is ``(inputs..., target)`` and the loss is ``loss_fn(output,
target)`` (``labels=False`` passes ``target=None`` and keeps every element as an input). ``loss_fn`` may be
a callable or the name of a loss in ``torch.nn.functional`` (``"cross_entropy"``, ``"mse_loss"``, …), so
pipeline strings can name it. Dim 0 of every input is the batch dim; the other dims must match the
example inputs (the graph was specialised to them).

Invariants: gradients are computed on a private deep copy of the graph being scored, in eval mode (BN uses
its running statistics), with ``torch.autograd.grad`` (no ``.grad`` is written anywhere); the user's model,
``ctx.original`` and the calibration tensors are never modified. ``float64=True`` runs the copy in double
precision (tests).
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import meta
from ..progress import progress as show_progress
from .calib import activations
from ..errors import ConfigError, InputError
from ..ir import ChannelGroup, ChannelRef, member_units
from ..pipeline import Context, PassResult
from ..rules.base import lookup_tensor
from .importance import ImportancePass, normalize_scores, reduce_slices, register_importance, slice_values, store_scores

__all__ = ["TaylorImportance", "HessianImportance", "calib_batches", "LOSSES"]

log = logging.getLogger(__name__)

#: Loss names accepted by ``loss_fn="..."`` (functions of ``torch.nn.functional``).
LOSSES: tuple[str, ...] = (
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
)

Batch = tuple[tuple[torch.Tensor, ...], "torch.Tensor | None"]


def _resolve_loss(loss_fn: Any) -> Callable[[Any, Any], torch.Tensor] | None:
    if loss_fn is None or callable(loss_fn):
        return loss_fn
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise ConfigError(f"loss_fn: unknown loss {loss_fn!r}; known names: {', '.join(LOSSES)} (or a callable)")
        return getattr(F, loss_fn)
    raise ConfigError(f"loss_fn must be a callable(output, target), a loss name or None, got {type(loss_fn).__name__}")


def calib_batches(calib: Any, example_inputs: tuple[torch.Tensor, ...], *, labels: bool, limit: int | None = None,
                  owner: str = "gradient importance", dtype: torch.dtype | None = None) -> Iterator[Batch]:
    """Validate and yield ``(inputs, target)`` from ``calib`` (see the module docstring for the layout).

    Floating inputs (and floating targets) are cast to ``dtype`` when given, else to the dtype of the
    matching example input. Raises :class:`ConfigError` when ``calib`` is missing and :class:`InputError`
    for an empty iterable, a non-tensor element, a wrong number of inputs or a shape that differs from the
    example inputs' beyond dim 0.

    >>> x = torch.zeros(4, 3)
    >>> [tuple(tuple(t.shape) for t in b[0]) for b in calib_batches([x, x[:2]], (torch.zeros(1, 3),), labels=False)]
    [((4, 3),), ((2, 3),)]
    """
    tail = ", each batch a tuple (inputs..., target)" if labels else " (a tensor or a tuple of input tensors each)"
    if calib is None:
        raise ConfigError(f"{owner} needs calibration data: pass compile(..., calib=batches), an iterable of "
                          f"batches{tail}")
    if isinstance(calib, torch.Tensor):
        calib = (calib,)  # a bare tensor is one batch
    try:
        it = iter(calib)
    except TypeError as exc:
        raise ConfigError(f"{owner}: calib must be an iterable of batches{tail}, got {type(calib).__name__}") from exc
    n_in = len(example_inputs)
    seen = 0
    for k, batch in enumerate(it):
        if limit is not None and k >= limit:
            break
        if isinstance(batch, torch.Tensor):
            items: tuple[Any, ...] = (batch,)
        elif isinstance(batch, (tuple, list)):
            items = tuple(batch)
        else:
            raise InputError(f"{owner}: calibration batch {k} is a {type(batch).__name__}; expected a tensor or a "
                             f"tuple of tensors{tail}")
        bad = [type(t).__name__ for t in items if not isinstance(t, torch.Tensor)]
        if bad:
            raise InputError(f"{owner}: calibration batch {k} holds non-tensors ({', '.join(bad)})")
        if labels:
            if len(items) < 2:
                raise InputError(f"{owner}: calibration batch {k} has {len(items)} element(s) but a loss_fn was "
                                 f"given, so each batch must be (inputs..., target)")
            inputs, target = items[:-1], items[-1]
        else:
            inputs, target = items, None
        if len(inputs) != n_in:
            raise InputError(f"{owner}: calibration batch {k} has {len(inputs)} input tensor(s), the model takes "
                             f"{n_in} (like example_inputs)" + ("; the last element is taken as the target" if labels else
                                                   "; if the last element is a target, pass a loss_fn" if len(inputs) == n_in + 1
                                                   else ""))
        cast = []
        for j, (x, ex) in enumerate(zip(inputs, example_inputs, strict=True)):
            if x.dim() != ex.dim() or tuple(x.shape[1:]) != tuple(ex.shape[1:]) or x.shape[0] < 1:
                raise InputError(f"{owner}: calibration batch {k}, input {j} has shape {tuple(x.shape)}; expected "
                                 f"(N, {', '.join(map(str, ex.shape[1:]))}) like example input {j}")
            if x.is_floating_point():
                x = x.detach().to(dtype or ex.dtype)
            cast.append(x.detach())
        sizes = {int(x.shape[0]) for x in cast}
        if target is not None:
            if target.dim() >= 1:
                sizes.add(int(target.shape[0]))
            if target.is_floating_point() and dtype is not None:
                target = target.to(dtype)
            target = target.detach()
        if len(sizes) > 1:
            raise InputError(f"{owner}: calibration batch {k} mixes batch sizes {sorted(sizes)} along dim 0")
        seen += 1
        yield tuple(cast), target
    if seen == 0:
        raise InputError(f"{owner}: calib is empty (no batch to compute gradients on)")


def _floats(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict):
        return [t for v in x.values() for t in _floats(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _floats(v)]
    return []


def _counted(it: Iterable[Batch], desc: str, total: int | None, enabled: bool | None) -> Iterator[Batch]:
    """``it`` with a progress bar (a terminal) or progress lines (a log)."""
    with show_progress(total, desc, enabled=enabled) as bar:
        for b in it:
            yield b
            bar.update(1)


class _Probe(fx.Interpreter):
    """Runs a graph and adds a zero tensor ``eps`` (requires grad) to every wanted node output, so that
    ``∂L/∂eps`` is the gradient at that activation; the activation's value is copied before later ops
    (possibly in place) touch it."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[str, set[int | None]]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.taps: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}

    def _tap(self, key: tuple[str, int | None], t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        eps = torch.zeros_like(t, requires_grad=True)
        self.taps[key] = (t.detach().clone(), eps)
        return t + eps

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        idxs = self.wanted.get(n.name)
        if not idxs:
            return out
        if None in idxs:
            out = self._tap((n.name, None), out)
        multi = sorted(i for i in idxs if i is not None)
        if multi and isinstance(out, (tuple, list)):
            items = list(out)
            for i in multi:
                items[i] = self._tap((n.name, i), items[i])
            out = type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
        return out


def _unit_rows(span: Any, values: torch.Tensor) -> torch.Tensor:
    """Sum ``values[..., positions]`` over each span row's positions: (..., P) -> (..., rows)."""
    try:
        idx = torch.as_tensor(span.indices())
        return values[..., idx].sum(-1)
    except ValueError:  # ragged explicit map
        return torch.stack([values[..., list(r)].sum(-1) for r in span.table], -1)


@dataclass(frozen=True)
class _GradientImportance(ImportancePass):
    """Shared machinery: calibration batches, the private copy, the loss, storing scores."""

    name: ClassVar[str] = "gradient"
    needs_calib: ClassVar[bool] = True
    loss_fn: Any = None
    labels: bool | None = None
    batches: int | None = None
    reduction: str = "sum"
    roles: tuple[str, ...] = ("out", "in", "norm", "other")
    normalize: str | None = None
    float64: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        _resolve_loss(self.loss_fn)
        if self.reduction not in ("sum", "mean", "max"):
            raise ConfigError(f"reduction must be 'sum', 'mean' or 'max', got {self.reduction!r}")
        if self.batches is not None and (not isinstance(self.batches, int) or self.batches < 1):
            raise ConfigError(f"batches must be a positive int or None (all), got {self.batches!r}")
        if self.labels and self.loss_fn is None:
            raise ConfigError("labels=True needs a loss_fn(output, target)")
        bad = set(self.roles) - {"out", "in", "norm", "other"}
        if bad:
            raise ConfigError(f"roles must be among 'out', 'in', 'norm', 'other', got {sorted(bad)}")
        normalize_scores(np.ones(1), self.normalize)  # validates the name

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def _labelled(self) -> bool:
        return self.loss_fn is not None if self.labels is None else bool(self.labels)

    def _work(self, gm: fx.GraphModule) -> fx.GraphModule:
        # graph-level meta (groups, importance…) is not needed on the copy: the memo maps it to an empty dict
        work = copy.deepcopy(gm, {id(gm.meta): {}})
        work.eval()
        if self.float64:
            work.double()
        work.requires_grad_(False)
        return work

    def _batches(self, ctx: Context) -> Iterator[Batch]:
        dtype = torch.float64 if self.float64 else None
        it = calib_batches(ctx.calib, tuple(ctx.example_inputs), labels=self._labelled, limit=self.batches,
                           owner=type(self).__name__, dtype=dtype)
        return _counted(it, type(self).__name__, self.batches, self.progress)

    def _loss(self, out: Any, target: Any, k: int) -> torch.Tensor:
        fn = _resolve_loss(self.loss_fn)
        if fn is None:
            ts = _floats(out)
            if not ts:
                raise InputError(f"{type(self).__name__}: the model's output has no floating tensor to take "
                                 f"0.5·‖output‖² of; pass a loss_fn")
            loss = 0.5 * sum((t * t).sum() for t in ts)
        else:
            loss = fn(out, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InputError(f"{type(self).__name__}: loss_fn must return a scalar tensor, got {shape}")
        if not torch.isfinite(loss).all():
            raise InputError(f"{type(self).__name__}: non-finite loss ({float(loss.detach())}) on calibration batch {k}; "
                             f"check the data for NaN/Inf")
        return loss.reshape(())

    def _forward(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], k: int) -> Any:
        try:
            return fn(*inputs)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"{type(self).__name__}: the model fails on calibration batch {k} "
                             f"(input shapes {[tuple(x.shape) for x in inputs]}): {exc}") from exc

    def _check_grad(self, g: torch.Tensor, what: str, k: int) -> None:
        if not torch.isfinite(g).all():
            raise InputError(f"{type(self).__name__}: non-finite gradient at {what} on calibration batch {k}; "
                             f"check the data and the loss for NaN/Inf")

    def _param_names(self, groups: list[ChannelGroup]) -> list[str]:
        names: dict[str, None] = {}
        for g in groups:
            for ps in g.params:
                if ps.role in self.roles and not ps.is_buffer:
                    names.setdefault(ps.param, None)
        return list(names)

    def _slice_scores(self, groups: list[ChannelGroup], tensor: Callable[[str], torch.Tensor]) -> dict[int, np.ndarray | None]:
        """Per group: ``reduction`` over slices of (sum over each unit's elements of ``tensor(param)``)."""
        out: dict[int, np.ndarray | None] = {}
        for g in groups:
            per = []
            for ps in g.params:
                if ps.role not in self.roles or ps.is_buffer:
                    continue
                units, vals = slice_values(tensor(ps.param), ps)
                v = (np.array([float(x.double().sum()) for x in vals]) if isinstance(vals, list)
                     else vals.double().sum(1).numpy())
                full = np.full(g.size, np.nan)
                full[units] = v
                per.append(full)
            out[g.id] = reduce_slices(per, self.reduction)
        return out

    def _compute(self, gm: fx.GraphModule, groups: list[ChannelGroup], ctx: Context) -> tuple[dict[int, np.ndarray | None], dict[str, Any]]:
        raise NotImplementedError

    # -- the pass ---------------------------------------------------------------------------------
    def scores(self, group, tensor, ctx):  # pragma: no cover - run() computes all groups at once
        raise NotImplementedError(f"{type(self).__name__} scores every group in run()")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis = meta.get(gm, "groups")
        groups = [g for g in analysis.groups if g.prunable]
        # validate the options about data before any work, even when nothing is prunable
        if ctx.calib is None:
            next(calib_batches(None, (), labels=self._labelled, owner=type(self).__name__))
        raw, stats = self._compute(gm, groups, ctx) if groups else ({}, {"batches": 0, "samples": 0})
        out, skipped = store_scores(gm, ctx, self.name, ((g, raw.get(g.id)) for g in groups), self.normalize,
                                    nonfinite=InputError)
        log.debug("%s: %d groups scored over %s", self.name, len(out), stats)
        return PassResult(gm, False, {"scored": len(out), "skipped": skipped, **stats})


@dataclass(frozen=True)
class TaylorImportance(_GradientImportance):
    """First-order Taylor importance from calibration data (``compile(..., calib=batches)``).

    ``mode="activation"``: Σ over samples and batches of |Σ_positions a·∂L/∂a| per unit
    (``granularity="sample"``) or Σ|a·∂L/∂a| (``"element"``), combined over the group's activations with
    ``reduction``. ``mode="weight"``: Σ|w·G| over the group's parameter slices (``roles``), ``G`` the
    gradient of the summed batch losses. See the module docstring for the data layout and the loss.
    """

    name: ClassVar[str] = "taylor"
    mode: str = "activation"
    granularity: str = "sample"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("activation", "weight"):
            raise ConfigError(f"TaylorImportance mode must be 'activation' or 'weight', got {self.mode!r}")
        if self.granularity not in ("sample", "element"):
            raise ConfigError(f"granularity must be 'sample' or 'element', got {self.granularity!r}")

    def _compute(self, gm, groups, ctx):
        return self._weight(gm, groups, ctx) if self.mode == "weight" else self._activation(gm, groups, ctx)

    def _weight(self, gm, groups, ctx):
        work = self._work(gm)
        names = self._param_names(groups)
        params = [lookup_tensor(work, n)[0] for n in names]
        for p in params:
            p.requires_grad_(True)
        acc = [torch.zeros_like(p) for p in params]
        nb = ns = 0
        for k, (xs, y) in enumerate(self._batches(ctx)):
            loss = self._loss(self._forward(work, xs, k), y, k)
            grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
            for name, a, g in zip(names, acc, grads, strict=True):
                if g is not None:
                    self._check_grad(g, f"parameter {name}", k)
                    a += g
            nb, ns = nb + 1, ns + int(xs[0].shape[0])
        wg = {n: (p.detach() * a).abs() for n, p, a in zip(names, params, acc, strict=True)}
        return self._slice_scores(groups, wg.__getitem__), {"batches": nb, "samples": ns}

    def _activation(self, gm, groups, ctx):
        work = self._work(gm)
        wanted: dict[str, set[int | None]] = {}
        refs: list[tuple[int, int, ChannelRef]] = []
        acts = {g.id: activations(gm, g) for g in groups}
        for g in groups:
            for i, ref in enumerate(acts[g.id]):
                wanted.setdefault(ref.node, set()).add(ref.output)
                refs.append((g.id, i, ref))
        acc: dict[tuple[int, int], np.ndarray] = {}
        nb = ns = 0
        for k, (xs, y) in enumerate(self._batches(ctx)):
            probe = _Probe(work, wanted)
            out = self._forward(lambda *a: probe.run(*a, enable_io_processing=True), xs, k)
            loss = self._loss(out, y, k)
            keys = list(probe.taps)
            grads = torch.autograd.grad(loss, [probe.taps[t][1] for t in keys], allow_unused=True)
            prods: dict[tuple[str, int | None], torch.Tensor] = {}
            for key, g in zip(keys, grads, strict=True):
                val = probe.taps[key][0]
                if g is None:
                    g = torch.zeros_like(val)
                self._check_grad(g, f"activation {key[0]}" + (f"[{key[1]}]" if key[1] is not None else ""), k)
                prods[key] = val.double() * g.double()
            for gid, i, ref in refs:
                prod = prods.get((ref.node, ref.output))
                if prod is None:  # not a floating tensor: no gradient flows there
                    continue
                acc_key = (gid, i)
                acc[acc_key] = acc.get(acc_key, 0.0) + self._ref_scores(prod, ref)
            nb, ns = nb + 1, ns + int(xs[0].shape[0])
        out_scores: dict[int, np.ndarray | None] = {}
        for g in groups:
            per = []
            for i, ref in enumerate(acts[g.id]):
                if (g.id, i) in acc:
                    full = np.full(g.size, np.nan)
                    full[member_units(ref)] = acc[(g.id, i)]
                    per.append(full)
            out_scores[g.id] = reduce_slices(per, self.reduction)
        return out_scores, {"batches": nb, "samples": ns}

    def _ref_scores(self, prod: torch.Tensor, ref: ChannelRef) -> np.ndarray:
        """One batch's score of each span row of ``ref`` from the elementwise product a·g."""
        d = ref.dim
        size = prod.shape[d]
        if self.granularity == "element":
            v = prod.abs().movedim(d, 0).reshape(size, -1).sum(1)[None]
        elif d == 0:  # the unit dim is dim 0: there is no per-sample axis, the batch counts as one sample
            v = prod.reshape(size, -1).sum(1)[None]
        else:
            v = prod.movedim(d, 1).reshape(prod.shape[0], size, -1).sum(-1)  # (samples, positions)
        return _unit_rows(ref.span, v).abs().sum(0).numpy()


@dataclass(frozen=True)
class HessianImportance(_GradientImportance):
    """OBD saliency ½·F_ii·w_i² summed over the group's parameter slices (``roles``), with the diagonal
    Hessian approximated by the empirical Fisher F_ii = mean over samples of (∂ℓ_n/∂w_i)².

    ``per_sample=True`` (default) differentiates each sample's loss separately (one backward per sample;
    the loss of a sample is ``loss_fn`` on a batch of one, or 0.5·‖output‖²); ``per_sample=False``
    averages squared batch gradients (one backward per batch).
    """

    name: ClassVar[str] = "hessian"
    per_sample: bool = True

    def fisher(self, gm: fx.GraphModule, names: list[str], ctx: Context) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Empirical Fisher diagonal of the named parameters of ``gm`` (and the number of terms)."""
        work = self._work(gm)
        params = [lookup_tensor(work, n)[0] for n in names]
        for p in params:
            p.requires_grad_(True)
        acc = [torch.zeros_like(p) for p in params]
        terms = nb = ns = 0
        for k, (xs, y) in enumerate(self._batches(ctx)):
            n = int(xs[0].shape[0])
            pieces = ([(tuple(x[i : i + 1] for x in xs), None if y is None else (y[i : i + 1] if y.dim() else y))
                       for i in range(n)] if self.per_sample else [(xs, y)])
            for pxs, py in pieces:
                loss = self._loss(self._forward(work, pxs, k), py, k)
                grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
                for name, a, g in zip(names, acc, grads, strict=True):
                    if g is not None:
                        self._check_grad(g, f"parameter {name}", k)
                        a += g * g
                terms += 1
            nb, ns = nb + 1, ns + n
        fisher = {nm: a / terms for nm, a in zip(names, acc, strict=True)}
        return fisher, {"batches": nb, "samples": ns, "terms": terms, "params": params}

    def _compute(self, gm, groups, ctx):
        names = self._param_names(groups)
        fisher, stats = self.fisher(gm, names, ctx)
        params = stats.pop("params")
        sal = {n: 0.5 * fisher[n] * p.detach() ** 2 for n, p in zip(names, params, strict=True)}
        return self._slice_scores(groups, sal.__getitem__), stats


register_importance("taylor", functools.partial(TaylorImportance, mode="activation"))
register_importance("taylor_weight", functools.partial(TaylorImportance, mode="weight"))
register_importance("hessian", HessianImportance)
