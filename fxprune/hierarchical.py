"""The hierarchical front end: prune the parts of a model that can be captured when the whole cannot.

Some models can be captured by neither symbolic tracing nor torch.export as one graph: a torchvision
detector resizes a *list* of images of different sizes, keeps a variable number of boxes per image after
non-maximum suppression and branches on ``self.training``. Their parameters nevertheless sit in a few
submodules that capture well (the backbone with its FPN, the RPN head, the box and mask heads). This
module finds them and prunes each as its own **region**:

1. the example inputs are run once through a private copy of the model with hooks recording, for every
   submodule with parameters, the arguments it was called with (its first call) and how often it ran;
2. from the root down, a module is a region if :func:`fxprune.compile` can capture it on its recorded
   arguments (torch.fx, else torch.export). Arguments that are lists, tuples or dicts of tensors (an FPN's
   feature dict, a head's list of levels) are flattened for capture, and the pruned region accepts the
   original structure again. A module that cannot be captured (or is called with anything but tensors,
   e.g. an ``ImageList`` or image sizes) is not a region: its children are tried instead;
3. each region is compiled with the caller's options. Its inputs and outputs are the region's
   **interface and are never pruned**, so everything the uncaptured code between regions relies on (the
   channel count the RPN head expects from the FPN, the number of classes and box coordinates a head emits,
   ``backbone.out_channels``) stays intact: head output contracts hold by construction;
4. the result is a deep copy of the user's model (its own class, its own ``forward``) with each region
   replaced by its pruned module (a GraphModule; plain attributes of the replaced module such as
   ``out_channels`` are carried over). Parameter names are unchanged.

What is lost against whole-model capture: channels coupled *across* a region boundary are kept (e.g. the
FPN's 256 output channels that feed the RPN and box heads), and selection (``global_ranking``,
``target_macs``) is made per region. Each region is verified on its own (``verify="equivalence"`` checks
each against its masked reference in float64); the assembled model is checked to return outputs of the
same structure, dtypes and trailing dims as the original on the example inputs (leading dims may differ
where the model's output size depends on data, e.g. the number of detections).

Use it with ``compile(..., frontend="hierarchical")`` or let ``frontend="auto"`` fall back to it when
both whole-model front ends fail. Data-driven criteria work per region: the ``calib=`` batches are run
through the model once and each region is calibrated on the arguments they give it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConfigError, InputError, TraceError, VerificationError, summary
from .ir import Selection
from .options import CompileOptions
from .pipeline import Context, Pipeline
from .result import CompileResult, merge_reports
from .structured import StructuredGraphModule, carry_attributes, flat_view, structured
from .trace import copy_model, eval_mode

__all__ = ["Region", "find_calls", "compile_hierarchical", "StructuredGraphModule"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """How a submodule was called on the example inputs: flattened tensor leaves, their structure, count."""

    leaves: tuple[Any, ...]
    spec: pytree.TreeSpec
    count: int
    same_structure: bool  # every call had the structure of the first

    @property
    def plain(self) -> bool:
        """Called as ``m(t1, t2, ...)`` with tensors only (no containers, no keywords)."""
        args_spec, kwargs_spec = self.spec.child(0), self.spec.child(1)
        return kwargs_spec.num_children == 0 and all(args_spec.child(i).is_leaf() for i in range(args_spec.num_children))

    @property
    def tensors_only(self) -> bool:
        return len(self.leaves) > 0 and all(isinstance(x, torch.Tensor) for x in self.leaves)


@dataclass
class Region:
    """One captured submodule: where it is, how it was called, and its compile result."""

    path: str
    call: Call
    result: CompileResult


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def record_calib(model: nn.Module, calib: Any, paths: list[str]) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """Run the calibration batches through ``model`` and keep, per region path, the flattened arguments of
    every call (a module called once per FPN level contributes one batch per level)."""
    got: dict[str, list[tuple[torch.Tensor, ...]]] = {p: [] for p in paths}
    handles = []
    for p in paths:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, p: str = p) -> None:
            leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
            got[p].append(tuple(x.detach() for x in leaves))
        handles.append(model.get_submodule(p).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for i, batch in enumerate(calib):
                args = batch if isinstance(batch, (tuple, list)) else (batch,)
                try:
                    model(*args)
                except Exception as exc:
                    raise InputError(f"calib batch {i} fails to run through the model: {type(exc).__name__}: "
                                     f"{exc}") from exc
    finally:
        for h in handles:
            h.remove()
    empty = [p for p, v in got.items() if not v]
    if empty:
        raise InputError(f"the calibration data never reached {', '.join(empty)}")
    return got


def find_calls(model: nn.Module, inputs: tuple[torch.Tensor, ...],
               candidate: Callable[[nn.Module], bool] = lambda m: True) -> tuple[dict[str, Call], Any]:
    """Run ``model`` (a private copy) once, recording the first call of each parameterised submodule that is
    a ``candidate`` region; returns the calls and the model's output."""
    first: dict[str, tuple[list[Any], pytree.TreeSpec]] = {}
    counts: dict[str, int] = {}
    same: dict[str, bool] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
            counts[name] = counts.get(name, 0) + 1
            if name not in first:
                first[name] = ([x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec)
                same[name] = True
            elif spec != first[name][1]:
                same[name] = False

        return hook

    for name, m in model.named_modules():
        if name and _has_params(m) and candidate(m):
            handles.append(m.register_forward_pre_hook(hook_for(name), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:
        raise InputError(f"the model fails to run on the example inputs: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return {n: Call(tuple(lv), spec, counts[n], same[n]) for n, (lv, spec) in first.items()}, out


def _relative(names: Any, prefix: str) -> Any:
    p = prefix + "."
    return tuple(n[len(p):] for n in names if n.startswith(p))


def _trailing(x: Any) -> tuple[Any, ...]:
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.dim(), tuple(x.shape[1:]))
    return (type(x).__name__,)


def check_contract(expected: Any, pruned: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """The assembled model returns outputs of the original's (``expected``) structure, dtypes and trailing dims."""
    with torch.no_grad():
        a, b = expected, pruned(*inputs)
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        raise VerificationError(f"the pruned model's output structure changed: {sa} -> {sb}")
    bad = [(i, _trailing(x), _trailing(y)) for i, (x, y) in enumerate(zip(la, lb)) if _trailing(x) != _trailing(y)]
    if bad:
        i, x, y = bad[0]
        raise VerificationError(f"the pruned model's output {i} changed its dtype, rank or trailing dims: {x} -> {y}")


def compile_hierarchical(model: nn.Module, inputs: tuple[torch.Tensor, ...], options: CompileOptions,
                         compile_fn: Callable[..., CompileResult], why: TraceError | None = None) -> CompileResult:
    """Compile each capturable region of ``model`` with ``options``, through ``compile_fn`` (the caller's
    ``fxprune.compile``: this module sits below it and never imports it)."""
    t0 = time.perf_counter()
    target = options.target_macs
    if target is not None and target > 1:
        raise ConfigError(f"target_macs={target} is an absolute MACs count, but the hierarchical front end (used "
                          "because the whole model cannot be captured as one graph) counts MACs per region: give a "
                          "fraction (e.g. target_macs=0.5: the regions keep half of their MACs)"
                          + (f"\nwhole-model capture failed: {summary(why)}" if why else ""))
    work = copy_model(model, share_weights=True).eval()  # read only: its forward is observed, never written
    rules = options.rule_table
    # a single layer with a rule is never a region: its input and output are the interface, nothing inside
    calls, expected = find_calls(work, inputs, lambda m: bool(m._modules) or not rules.has_module_rule(m))
    calib: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    if options.calib is not None:  # every region gets the inputs the calibration data gives it
        calib = record_calib(work, options.calib, [n for n, c in calls.items()
                                                      if c.tensors_only and c.same_structure])
    skipped: list[str] = []
    captured: dict[str, Any] = {}  # path -> compile result
    search: dict[str, Any] = {}
    if target is not None:  # a uniform ratio over the regions is searched below; first find them at 0.5
        search = {"target_macs": None, "ratio": 0.5, "verify": "none"}

    def compile_region(path: str, overrides: dict[str, Any]) -> Any:
        call = calls[path]
        mod = work.get_submodule(path)
        ratios = {k[len(path) + 1:]: v for k, v in options.ratios.items() if k.startswith(path + ".")}
        changes: dict[str, Any] = {"ignore": _relative(options.ignore, path), "ratios": ratios, "frontend": "whole",
                                   "result": "graph"}  # (the whole model is the user's class already)
        if calib:
            changes["calib"] = calib.get(path)
        if not (options.ratio is not None or options.threshold is not None or options.target_macs is not None
                or ratios or options.pipeline is not None):
            changes["ratio"] = 0.0  # only other regions have per-layer ratios: keep this one whole
        changes.update(overrides)
        target_mod = mod if call.plain else flat_view(mod, call.spec, len(call.leaves))
        target_mod.fxprune_dynamic_shapes = True  # (export path) heads see feature maps of every size
        return compile_fn(target_mod, call.leaves, options=options.replace(**changes))

    def visit(path: str, mod: nn.Module) -> None:
        if not _has_params(mod):
            return
        children = list(mod.named_children())
        if not children and rules.has_module_rule(mod):
            return  # a single layer: its input and output are the interface, nothing inside to prune
        call = calls.get(path)
        if call is None:
            skipped.append(f"{path}: never called on the example inputs")
            return
        reason = ""
        if not call.tensors_only:
            kinds = sorted({type(x).__name__ for x in call.leaves if not isinstance(x, torch.Tensor)})
            reason = f"called with non-tensor arguments ({', '.join(kinds) or 'none'})"
        elif not call.same_structure:
            reason = "called with differently structured arguments"
        if not reason:
            try:
                captured[path] = compile_region(path, search)
                log.info("region %s: %s", path, str(captured[path].report).splitlines()[0])
                return
            except TraceError as exc:
                reason = summary(exc)
        log.info("%s is not a region (%s); trying its children", path, reason)
        if not any(_has_params(c) for _, c in children):
            skipped.append(f"{path}: {reason}")
        for name, child in children:
            visit(f"{path}.{name}", child)

    for name, child in work.named_children():
        visit(name, child)
    if not captured:
        raise TraceError(
            (str(why) + "\n  3. " if why else "")
            + f"no submodule of {type(model).__name__} could be captured and pruned on its own either"
            + (": " + "; ".join(skipped[:5]) if skipped else "")
        )
    notes: list[str] = []
    if target is not None:
        ratio = _search_ratio(lambda r: {p: compile_region(p, dict(search, ratio=r)) for p in captured}, target)
        captured = {p: compile_region(p, {"target_macs": None, "ratio": ratio}) for p in captured}
        notes.append(f"target_macs={target}: ratio {ratio:.3f} in every region (MACs counted over the regions)")
    regions = [Region(p, calls[p], r) for p, r in captured.items() if r.report.groups_pruned > 0]
    swap: dict[int, nn.Module] = {}
    for reg in regions:  # the pruned regions go straight into the copy (the user's regions are never copied)
        new = reg.result.module
        if not reg.call.plain:
            new = structured(new, reg.call.spec, reg.path)
        old = model.get_submodule(reg.path)
        carry_attributes(old, new)
        swap[id(old)] = new
    pruned = copy_model(model, memo=swap)
    pruned.train(model.training)
    with eval_mode(pruned):
        check_contract(expected, pruned, inputs)
    ctx = Context(model=model, example_inputs=inputs, original=None, calib=None, seed=options.seed)
    ctx.notes += notes
    unchanged = [p for p in captured if p not in {r.path for r in regions}]
    ctx.notes.append(
        f"hierarchical front end: {len(regions)} region(s) pruned separately ("
        + ", ".join(r.path for r in regions) + "); their inputs and outputs are kept"
        + (f"; captured but nothing to prune (kept as they are): {', '.join(unchanged)}" if unchanged else "")
        + (f"; whole-model capture failed: {summary(why)}" if why else "")
    )
    ctx.notes += [f"not pruned: {s}" for s in skipped]
    report = merge_reports(model, pruned, [(r.path, r.result.report) for r in regions], ctx,
                           time.perf_counter() - t0)
    pipe = regions[0].result.pipeline if regions else Pipeline(())  # (the same for every region)
    return CompileResult(pruned, report, None, None, Selection(), pipe, ctx,
                         regions={r.path: r.result for r in regions})


def _search_ratio(run: Callable[[float], dict[str, Any]], target: float, steps: int = 7) -> float:
    """The smallest uniform ratio (to 2**-steps) whose pruned regions keep at most ``target`` of their MACs."""
    def kept(r: float) -> float:
        reps = [x.report for x in run(r).values()]
        return sum(x.macs_after for x in reps) / max(sum(x.macs_before for x in reps), 1)

    lo, hi = 0.0, 0.95
    at_hi = kept(hi)
    if at_hi > target:
        raise ConfigError(f"target_macs={target} is not reachable per region: removing {hi:.0%} of every prunable "
                          f"group keeps {at_hi:.1%} of the regions' MACs")
    for _ in range(steps):
        mid = (lo + hi) / 2
        if kept(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
