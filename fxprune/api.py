"""``fxprune.compile``: the user's entry point, and the rule registration helpers.

The keyword form is sugar for the default pipeline (:class:`fxprune.options.CompileOptions`)::

    group(unknown_ops, ignore, allow_lossy) | importance | select(ratio|threshold|target_macs) | rewrite | absorb
    | verify | reconstruct

Every option is validated before any work starts; the model's structure is copied before tracing and the
copy's parameters are views of the user's that no pass writes (the rewrite slices fresh tensors), so nothing
fxprune does can change the user's model. Front ends: torch.fx, then torch.export, then the hierarchical front end
(:mod:`fxprune.hierarchical`, which receives this function to compile each region).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import time
import types
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from . import meta
from .clone import set_training
from .errors import (FxpruneError, summary, FxpruneWarning, InputError, ShortfallError, TraceError, UnsupportedOpError,
                     VerificationError)
from .flops import count_cost
from .hierarchical import compile_hierarchical
from .ir import Selection
from .literals import with_literal_retry
from .options import CompileOptions
from .passes.select import Select
from .passes.group import analyze_graph
from .passes.rewrite import provenance, rewrite_graph
from .pipeline import Context
from .prepare import prepare, prepare_with_note
from .restore import rebuild, same_program, verify_rebuilt
from .result import CompileResult, Report, build_report
from .rules import RULES, Rule, RuleTable
from .structured import FlatBatches, flat_view, structured
from .trace import check_model_state, normalize_inputs, trace

log = logging.getLogger(__name__)

__all__ = ["compile", "CompileResult", "CompileOptions", "Report", "prepare", "register_module_rule",
           "register_function_rule", "register_method_rule"]


def register_module_rule(types: type | Iterable[type], rule: Rule, table: RuleTable = RULES) -> Rule:
    """Register ``rule`` for a module type (and its subclasses that do not override ``forward``).

    Registered module types are traced as single nodes (leaves)."""
    return table.register_module(types, rule)


def register_function_rule(fns: Any, rule: Rule, table: RuleTable = RULES) -> Rule:
    return table.register_function(fns, rule)


def register_method_rule(names: str | Iterable[str], rule: Rule, table: RuleTable = RULES) -> Rule:
    return table.register_method(names, rule)


def _fewer_gc_passes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with Python's cyclic garbage collector paused (re-enabled afterwards, as it was).

    Tracing and analysis build large containers (node lists, axis tables) while allocating millions of small
    objects; every young-generation collection re-walks the containers still being built, which makes the
    collector's share grow with depth (measured: 29% of a 8000-block compile, 44 s -> 31 s without it).
    Everything a compile allocates is freed by reference counting or by the next collection after it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return wrapper


@_fewer_gc_passes
def compile(model: nn.Module, example_inputs: Any, *, options: CompileOptions | None = None,
            **kwargs: Any) -> CompileResult:
    """Trace ``model``, group coupled channels, score, select, and return a NEW smaller module.

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> res = fxprune.compile(net, torch.randn(1, 3, 8, 8), ratio=0.5)
    >>> res.module(torch.randn(1, 3, 8, 8)).shape, res.report.params_after < res.report.params_before
    (torch.Size([1, 4, 4, 4]), True)

    ``verify``: ``"shapes"`` (default) checks output shapes; ``"equivalence"`` (or True) also checks the
    result against the masked reference in float64; ``False``/``"none"`` skips verification.
    ``frontend``: ``"auto"`` (default: symbolic tracing, falling back to torch.export when tracing fails,
    and to pruning the capturable submodules when both fail), ``"whole"`` (no submodule fallback), ``"fx"``,
    ``"export"`` or ``"hierarchical"``; see :mod:`fxprune.export` and :mod:`fxprune.hierarchical` for the
    form the result takes on each path. ``example_inputs`` may hold lists, tuples and dicts of tensors (e.g.
    ``([image1, image2],)`` for a detector): they are flattened for capture and the result takes them
    structured.
    ``calib``: an iterable of input batches (a tensor or a tuple per batch) for data-driven passes, in
    ``Context.calib``. ``reconstruct``: a post-pass (name or pass object) run after the rewrite with the
    original and the pruned module side by side.
    ``sequential=True``: prune one group at a time, scoring each on the network pruned so far against the
    original's targets, refitting its consumers when ``reconstruct`` names a method, and calling
    ``step_callback(module, info)`` after each step (see :mod:`fxprune.passes.sequential`).
    The options are those of :class:`~fxprune.options.CompileOptions` (README: "Options of
    fxprune.compile"), as keywords or as one ``options=`` object.
    ``absorb`` (default True): a removed channel whose output is structurally a constant (BatchNorm γ = 0,
    all-zero filter) has that constant folded into its consumers' biases, so removing it is exact
    (see :mod:`fxprune.passes.absorb`); it changes nothing for any other channel.
    When the result does materially less than asked (nothing pruned at ``ratio > 0``, a criterion that could
    not score groups, a refit that did not run, an equivalence check skipped) a :class:`FxpruneWarning` is
    issued and the report's first line says what; ``strict=True`` raises :class:`ShortfallError` instead.
    """
    if options is None:
        options = CompileOptions(**kwargs)
    elif kwargs:
        options = options.replace(**kwargs)
    check_model_state(model)
    return _shortfall(_compile(model, example_inputs, options=options), options)


def _asks_pruning(res: CompileResult, options: CompileOptions) -> bool:
    """Whether the compile was asked for channels to go whatever their scores (a ratio or a MACs target, as
    options or in a pipeline's select pass; a threshold may rightly find nothing under it)."""
    asks = [options] if options.pipeline is None else [p for p in res.pipeline.passes if isinstance(p, Select)]
    return any(bool(x.ratio) or x.target_macs is not None or any(v > 0 for v in dict(x.ratios).values())
               for x in asks)


def _shortfall(res: CompileResult, options: CompileOptions) -> CompileResult:
    """Warn (or raise, ``strict=True``) when ``res`` did materially less than ``options`` asked."""
    r = res.report
    found = list(r.shortfall)
    if _asks_pruning(res, options) and r.groups_pruned == 0:
        pinned = [g for g in res.groups if g.blocked]
        why = f", e.g. the group at {pinned[0].root} ({pinned[0].blocked})" if pinned else ""
        found.insert(0, f"nothing pruned: 0 of {r.groups_total} channel groups, {len(pinned)} of them cannot be "
                        f"pruned{why}")
    elif options.pipeline is None and (options.ratio or 0) >= 0.2 and \
            r.params_after > r.params_before * (1 - 0.1 * options.ratio):
        found.insert(0, f"ratio={options.ratio:g} removed only {1 - r.params_after / max(r.params_before, 1):.1%} "
                        f"of the parameters ({r.groups_pruned} of {r.groups_total} channel groups pruned)")
    if not found:
        return res
    found = list(dict.fromkeys(found))
    if options.strict:
        raise ShortfallError("the compile did less than asked (strict=True):\n  " + "\n  ".join(found))
    warnings.warn("fxprune did less than asked: " + "; ".join(found), FxpruneWarning, stacklevel=4)
    res.report = dataclasses.replace(r, shortfall=tuple(found))
    return res


def _compile(model: nn.Module, example_inputs: Any, *, options: CompileOptions | None = None,
            **kwargs: Any) -> CompileResult:
    t0 = time.perf_counter()
    # -- validate everything before any work --------------------------------------------------------
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    if options is None:
        options = CompileOptions(**kwargs)
    elif kwargs:
        options = options.replace(**kwargs)
    options = options.check_model(model)
    if options.frontend == "hierarchical" or _structured_args(example_inputs):
        return _compile_structured(model, example_inputs, options)
    inputs = normalize_inputs(example_inputs)
    pipe = options.pipeline_for()
    pipe.check()
    options.check_calib(pipe)
    rules = options.rule_table
    # -- work ---------------------------------------------------------------------------------------
    try:
        gm, inputs, capture_note = prepare_with_note(model, inputs, options.leaf_modules, rules, options.frontend,
                                                      share_weights=_reads_only(pipe, options))
        ctx = Context(model=model, example_inputs=inputs, original=gm, calib=options.calib, seed=options.seed,
                      pipeline=pipe)
        if capture_note:
            ctx.notes.append(capture_note)
        before = meta.get(gm, "cost")
        out = pipe.run(gm, ctx, options.callback)
    except TraceError as exc:  # neither front end captures the whole model: prune what can be captured
        if options.frontend != "auto":
            raise
        return _compile_structured(model, example_inputs, options.replace(frontend="hierarchical"), why=exc)
    except (UnsupportedOpError, InputError) as exc:
        fn = _opaque_function(exc)
        if options.frontend not in ("auto", "whole") or fn is None:
            raise
        # a library function symbolic tracing keeps whole (torch.fx.wrap) and no rule covers: torch.export
        # traces through it into ATen ops, which have rules
        log.info("%s on the fx path; capturing with torch.export instead", fn)
        try:
            res = _compile(model, example_inputs, options=options.replace(frontend="export"))
        except FxpruneError as exc2:
            exc.add_note(f"fxprune also tried the torch.export front end (which traces through {fn}): "
                         f"{type(exc2).__name__}: {summary(exc2)}")
            raise exc from None
        why = summary(exc)
        res.report = dataclasses.replace(res.report, notes=res.report.notes + (
            f"captured with torch.export (traced through {fn}) because the fx graph kept it whole: {why}",))
        return res
    if out is gm:  # a pipeline without a rewrite still returns a module distinct from the original
        out = rewrite_graph(gm, meta.get(gm, "groups") or analyze_graph(gm, rules, "block"), Selection(), inputs)
    set_training(out, model.training)
    after = meta.get(out, "cost") or count_cost(out, rules)
    prov = provenance(out)
    analysis = prov.analysis if prov is not None else meta.get(gm, "groups")
    selection = prov.selection if prov is not None else Selection()
    facts = {k: meta.get(g, k) for g in (gm, out) for k in meta.KEYS if meta.has(g, k)}
    for key in meta.KEYS:  # facts of the run stay with the result, not in the module the user ships
        if key not in ("shapes", "cost"):
            meta.drop(out, key)
    report = build_report(gm, out, before, after, analysis, selection, ctx, time.perf_counter() - t0, rules)
    res = CompileResult(out, report, gm, analysis, selection, pipe, ctx, facts=facts)
    traced_fx = not capture_note and options.frontend in ("auto", "whole", "fx")
    return _keep_class(model, res, inputs, options, trace_fn=functools.partial(
        trace, is_rule_leaf=rules.has_module_rule, leaf_modules=options.leaf_modules) if traced_fx else None)


def _reads_only(pipe: Any, options: CompileOptions) -> bool:
    """Whether the traced graph may view the user's weights instead of copying them: every pass is one of
    fxprune's own (they never write the source graph's tensors) and no user callback sees the graph. A user
    pass or callback gets a graph with its own copy of the weights, as before."""
    if options.callback is not None or options.step_callback is not None:
        return False

    def own(p: Any) -> bool:
        inner = [v for v in vars(p).values() if hasattr(v, "run") and hasattr(v, "name")]  # e.g. sequential's
        return type(p).__module__.startswith("fxprune.") and type(p).__name__ != "_FunctionPass" and all(
            own(q) for q in inner)

    return all(own(p) for p in pipe.passes)


def _keep_class(model: nn.Module, res: CompileResult, args: tuple[Any, ...], options: CompileOptions,
                kwargs: dict[str, Any] | None = None,
                trace_fn: Callable[[nn.Module], fx.GraphModule] | None = None) -> CompileResult:
    """``res`` with ``module`` = a verified copy of the user's own class (:mod:`fxprune.restore`), unless
    ``result="graph"``; when the copy cannot be made or does not match the graph result, the graph result
    stays (``result="auto"``, with the reason in the report) or a VerificationError is raised (``"class"``).

    ``trace_fn`` (the fx front end's tracer, when it captured the graph): the copy is first traced and
    compared with the graph result's program (:func:`fxprune.restore.same_program`: no forward runs); when
    it does not trace to the same program, the outputs of both are compared on the example inputs and on
    another batch/sequence size."""
    cls = type(model).__name__
    if options.result == "graph" or res.analysis is None:
        res.report = dataclasses.replace(res.report, form="GraphModule")
        return res
    t0 = time.perf_counter()

    def check(rb: Any) -> tuple[str, str, bool]:
        program = "not traced" if trace_fn is None else same_program(
            rb.module, res.graph_module, trace_fn, res.original.graph if rb.swaps_only else None)
        why, second = ("", True) if not program else verify_rebuilt(rb.module, res.graph_module, args, kwargs)
        return why, program, second

    rb, (why, program, second) = with_literal_retry(
        lambda literals: rebuild(model, res.graph_module, res.analysis, res.selection, res.original,
                                 options.rule_table, literals),
        check, lambda exc: (f"could not be made ({type(exc).__name__}: {summary(exc)})", "", False))
    if why or rb is None:
        msg = f"your {cls} class could not be kept: its copy with the pruned layers {why}"
        if options.result == "class":
            raise VerificationError(msg + " (result='class'; use result='auto' to get the GraphModule instead)")
        log.warning("fxprune: %s; returning the GraphModule", msg)
        res.report = dataclasses.replace(res.report, form="GraphModule",
                                         notes=res.report.notes + (f"result is the GraphModule: {msg}",))
        return res
    res.module = rb.module
    if not program:
        how = ("checked equal to the graph result: its forward traces to the same program (the same ops, "
               "modules and tensors), so the two agree at every input size")
    else:
        how = "checked equal to the graph result on the example inputs" + (
            " and on another batch/sequence size" if second else " (another batch/sequence size could not be "
            "checked: the graph or the model accepts only the example's)")
    notes = [f"result: a copy of your {cls} with the pruned layers, {how} ({time.perf_counter() - t0:.2f}s)"]
    if rb.attributes:
        notes.append("attributes updated: " + ", ".join(rb.attributes[:8])
                     + (f" and {len(rb.attributes) - 8} more" if len(rb.attributes) > 8 else ""))
    if rb.config:
        notes.append("config updated: " + ", ".join(rb.config))
    if rb.config_mismatch:
        notes.append(f"save_pretrained/from_pretrained will not restore this model: {rb.config_mismatch}; "
                     "save it with fxprune.save (or torch.save)")
    res.report = dataclasses.replace(res.report, form=f"class {cls}", notes=res.report.notes + tuple(notes))
    return res


def _opaque_function(exc: Exception) -> str | None:
    """The name of the library/user Python function (kept whole by ``torch.fx.wrap``) at which the fx path
    failed, or None if the failing node is anything else (a torch op, a module, a method)."""
    node = getattr(exc, "node", None)
    if not isinstance(node, fx.Node) or node.op != "call_function" or not isinstance(node.target, types.FunctionType):
        return None
    mod = getattr(node.target, "__module__", "") or ""
    if mod == "torch" or mod.startswith("torch.") or mod.startswith("fxprune"):
        return None
    return f"{mod}.{node.target.__name__}"


def _structured_args(example_inputs: Any) -> bool:
    """Whether the example arguments are keyword arguments (a mapping: ``{"input_ids": ..., "attention_mask":
    ...}``, a tokenizer's ``BatchEncoding``) or hold containers (a list of images, a dict of features...) or
    constants (``None`` for an optional argument)."""
    if isinstance(example_inputs, Mapping):
        return True
    if not isinstance(example_inputs, (tuple, list)):
        return False
    return any(isinstance(x, (tuple, list, dict, Mapping)) or not isinstance(x, torch.Tensor) for x in example_inputs)


#: argument values a captured graph can bake in as constants
_CONSTANT = (type(None), bool, int, float, str)


def _compile_structured(model: nn.Module, example_inputs: Any, options: CompileOptions,
                        why: Exception | None = None) -> CompileResult:
    """Keyword arguments and arguments with containers or constants are flattened for capture (constants baked
    into the graph) and the result takes them structured again; ``frontend="hierarchical"`` (or ``"auto"``
    when whole-model capture fails) prunes capturable regions."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = (tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}
    leaves, spec = pytree.tree_flatten((args, kwargs))
    bad = [type(x).__name__ for x in leaves if not isinstance(x, (torch.Tensor, *_CONSTANT))]
    if bad or not any(isinstance(x, torch.Tensor) for x in leaves):
        raise InputError("example_inputs may hold tensors (and None, numbers, strings and flags, which are baked "
                         "in) in tuples, lists and dicts only; found " + (
                             f"{', '.join(bad)} (not a tensor)" if bad else "no tensor"))
    fixed = {i: x for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)}
    if options.frontend == "hierarchical" or why is not None:
        if kwargs or fixed:
            raise (why if isinstance(why, FxpruneError) else InputError(
                "the hierarchical front end takes positional tensor arguments (and containers of them) only; pass "
                "the example inputs positionally, without None or constants"))
        return compile_hierarchical(model, args, options, _compile, why=why)
    tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
    target = flat_view(model, spec, len(leaves), fixed)
    front = "whole" if options.frontend == "auto" else options.frontend
    calib = None if options.calib is None else FlatBatches(options.calib, spec, fixed, bool(kwargs))
    try:
        res = _compile(target, tensors, options=options.replace(frontend=front, result="graph", calib=calib))
    except TraceError as exc:
        if options.frontend != "auto":
            raise
        return _compile_structured(model, example_inputs, options.replace(frontend="hierarchical"), why=exc)
    res.module = res.graph_module = structured(res.module, spec, "", fixed)
    return _keep_class(model, res, args, options, kwargs)
