"""Saving and loading pruned models without pickled code.

This module owns the fxprune file format. A file written by :func:`save` is a plain ``torch.save`` of a
dict holding only tensors, strings, numbers, booleans, ``None``, lists and dicts, so it opens with
``torch.load(path, weights_only=True)``: loading a model file never executes code from it.

Contents (``version`` 1)::

    {"format": "fxprune", "version": 1, "torch": "2.x", "fxprune": "0.1.0",
     "inputs": [{"shape": [...], "dtype": "float32"}, ...],   # example inputs the plan was traced with
     "steps": [                                                 # one entry per compile (iterative pruning)
        {"pipeline": "group | importance | ...", "pipeline_spec": [{"pass": ..., options}, ...],
         "analysis": {"unknown_ops", "ignore", "allow_lossy"},  # what the grouping needs to be re-run
         "arch": sha256 of the step's input parameter/buffer names and shapes,
         "graph": sha256 of the traced graph (ops, targets, arguments), "frontend": "fx" or "export",
         "added_params": [[name, shape, requires_grad], ...],     # biases a post-pass created (absorb)
         "groups": [{"id", "size", "root", "keep": [...]}, ...],      # kept units per pruned group
         "params": {qualified name: {dim: [kept indices]}}},          # the same plan, per tensor
     ],
     "arch": fingerprint of the original model, "arch_tensors": [[name, shape], ...], "training": bool, "meta": user data,
     "state_dict": {name: tensor}, "checksum": sha256 over everything above}

A result of the hierarchical front end (:mod:`fxprune.hierarchical`) has ``"regions": [{"path", "spec"
(the call structure, ``torch.utils._pytree.treespec_dumps``, or None for plain tensor calls), "inputs",
"steps"}, ...]`` instead of top-level ``inputs``/``steps``; ``state_dict`` is the whole model's.

:func:`load` traces a fresh instance of the original architecture, re-runs the channel analysis,
rebuilds each step's selection from the plan (by group; if the group ids differ, from the per-tensor
masks), checks that the rebuilt plan removes exactly the saved indices of every tensor, rewrites, and
only then loads the weights (``strict``). Every check happens before a module is handed back, so a
mismatching architecture or a damaged file raises an :class:`~fxprune.errors.FxpruneError` subclass
and never yields a half-loaded model.

Invariant: ``load(path, fresh_model)(x)`` equals the saved module's output exactly (same graph, same
tensors), in any process.

>>> import torch, fxprune, tempfile, os
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
>>> res = fxprune.compile(net, torch.randn(1, 3, 8, 8), ratio=0.5)
>>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
>>> fxprune.save(res, path)
>>> fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
>>> m = fxprune.load(path, fresh)
>>> x = torch.randn(2, 3, 8, 8)
>>> torch.equal(m(x), res.module(x))
True
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree
import torch.fx as fx
from torch import nn

from .errors import ConfigError, FxpruneError, InputError
from .fileformat import (FORMAT, VERSION, ArchitectureMismatchError, FormatError, fingerprint,
                         graph_fingerprint, plain_data, read_file, write_file)
from .ir import Selection, member_units
from .literals import with_literal_retry
from .passes.group import GroupChannels, analyze_graph
from .passes.rewrite import rewrite_graph
from .prepare import prepare
from .restore import rebuild, verify_rebuilt
from .rules import RULES
from .structured import carry_attributes, flat_view, structured
from .trace import copy_model
from .version import __version__

__all__ = ["save", "load", "read_file", "FormatError", "ArchitectureMismatchError", "FORMAT", "VERSION",
           "fingerprint", "graph_fingerprint"]

log = logging.getLogger(__name__)

# -- save -------------------------------------------------------------------------------------------


def _pass_spec(p: Any) -> dict[str, Any]:
    """A pass as ``{"pass": name, option: value}`` with the options that are plain data."""
    spec: dict[str, Any] = {"pass": getattr(p, "name", type(p).__name__), "class": type(p).__name__}
    if dataclasses.is_dataclass(p):
        for f in dataclasses.fields(p):
            try:
                spec[f.name] = plain_data(getattr(p, f.name))
            except ConfigError:
                spec[f.name] = f"<{type(getattr(p, f.name)).__name__}>"
    return spec


def _analysis_options(result: Any) -> dict[str, Any]:
    for p in result.pipeline.passes:
        if isinstance(p, GroupChannels):
            if p.rules is not None:
                log.warning("fxprune.save: the result was compiled with a private rule table; pass the same "
                            "table to fxprune.load(..., rules=)")
            return {"unknown_ops": p.unknown_ops, "ignore": list(p.ignore), "allow_lossy": bool(p.allow_lossy)}
    return {"unknown_ops": "block", "ignore": [], "allow_lossy": False}


def _step(result: Any) -> dict[str, Any]:
    analysis, selection = result.analysis, result.selection
    if analysis is None:
        raise ConfigError("this result has no channel analysis (its pipeline has no 'group' pass): nothing to save "
                          "as a plan; use torch.save(result.module) instead")
    keep_of = analysis.keep_fn(selection)
    params: dict[str, dict[str, list[int]]] = {}
    for name, t in result.original.state_dict().items():
        for d in range(t.dim()):
            k = keep_of(("p", name, d))
            if k is not None:
                params.setdefault(name, {})[str(d)] = [int(i) for i in np.flatnonzero(k)]
    groups = [{"id": gid, "size": analysis.groups[gid].size, "root": analysis.groups[gid].root, "keep": list(kept)}
              for gid, kept in selection.keep]
    return {
        "pipeline": str(result.pipeline),
        "pipeline_spec": [_pass_spec(p) for p in result.pipeline.passes],
        "analysis": _analysis_options(result),
        "arch": fingerprint(result.original),
        "graph": graph_fingerprint(result.original),
        "frontend": _frontend_of(result.original),
        "n_groups": len(analysis.groups),
        "form": _form(result),
        "groups": groups,
        "params": params,
    }


def _form(result: Any) -> str:
    """"class" when the result's module is the user's class rebuilt around the graph result's tensors."""
    g = getattr(result, "graph_module", None)
    return "class" if g is not None and g is not getattr(result, "module", g) else "graph"


def _frontend_of(gm: fx.GraphModule) -> str:
    """"export" if the graph holds ATen operators (the torch.export front end captured it), else "fx"."""
    return "export" if any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                           for n in gm.graph.nodes) else "fx"


def _input_specs(inputs: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs]


def save(result: Any, path: str | os.PathLike, *, meta: Mapping[str, Any] | None = None,
         key: bytes | str | None = None) -> None:
    """Write a pruned model (the plan and the weights, no code) to ``path``.

    ``result``: a :class:`~fxprune.CompileResult`, or a list of them for iterative pruning (each compiled
    on the previous one's module). ``meta``: extra plain data stored with the model (e.g. how to build the
    architecture). The plan is replayed on the result's own traced original first: a result that
    :func:`load` could not reproduce (a post-pass changed the graph beyond adding a bias) is refused.
    The file is written atomically (a temporary file renamed into place). ``key``: a secret; the file then
    carries an HMAC-SHA256 that ``load(..., key=)`` checks (tamper evidence; the plain checksum only detects
    damage).
    """
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    if not results:
        raise ConfigError("save: nothing to save (empty list of results)")
    if any(getattr(r, "regions", None) for r in results):
        if len(results) > 1:
            raise ConfigError("save: iterative steps over a hierarchical result are not supported; save the last "
                              "result's module with torch.save(result.module)")
        return write_file(path, _hierarchical_body(results[0], meta), key)
    for i, r in enumerate(results):
        if not hasattr(r, "module") or not hasattr(r, "selection") or not hasattr(r, "original"):
            raise ConfigError(f"save: item {i} is a {type(r).__name__}, expected a CompileResult from fxprune.compile")
    for i in range(1, len(results)):
        if fingerprint(results[i].original) != fingerprint(results[i - 1].module):
            raise ConfigError(f"save: step {i} was not compiled on step {i - 1}'s module (its parameters differ); "
                              "pass the results of an iterative run in order")
    last = results[-1].module
    steps = [_step(r) for r in results]
    for step, added in zip(steps, _replay_check(results), strict=True):
        step["added_params"] = added
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__.split("+")[0],
        "fxprune": __version__,
        "inputs": _input_specs(results[0].context.example_inputs),
        "arch": fingerprint(results[0].context.model),
        "arch_tensors": [[k, list(v.shape)] for k, v in results[0].context.model.state_dict().items()],
        "training": bool(last.training),
        "steps": steps,
        "meta": plain_data(dict(meta or {}), "save(meta=)"),
        "state_dict": {k: v.detach().cpu().clone() for k, v in results[-1].graph_module.state_dict().items()},
    }
    write_file(path, body, key)


def _hierarchical_body(result: Any, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """A hierarchical result (:mod:`fxprune.hierarchical`): one single-step plan per region, by path."""
    regions = []
    for region_path, r in result.regions.items():
        step = _step(r)
        step["added_params"] = _replay_check([r])[0]
        spec = getattr(result.module.get_submodule(region_path), "fxprune_in_spec", None)
        regions.append({"path": region_path, "spec": None if spec is None else pytree.treespec_dumps(spec),
                        "inputs": _input_specs(r.context.example_inputs), "steps": [step]})
    model = result.context.model
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__.split("+")[0],
        "fxprune": __version__,
        "arch": fingerprint(model),
        "arch_tensors": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        "training": bool(result.module.training),
        "regions": regions,
        "meta": plain_data(dict(meta or {}), "save(meta=)"),
        "state_dict": {k: v.detach().cpu().clone() for k, v in result.module.state_dict().items()},
    }


def _added_params(r: Any, new: fx.GraphModule) -> list[list[Any]]:
    """Parameters the result has but its plan's rewrite does not (a post-pass gave a bias-free conv a bias,
    e.g. :mod:`fxprune.passes.absorb`): ``[name, shape, requires_grad]`` for each; anything else is a ConfigError."""
    have = r.graph_module.state_dict()
    rebuilt = new.state_dict()
    added = []
    for name in sorted(set(have) - set(rebuilt)):
        owner, _, attr = name.rpartition(".")
        try:
            mod = new.get_submodule(owner) if owner else new
        except AttributeError:
            mod = None
        if mod is None or attr not in mod._parameters or mod._parameters[attr] is not None:
            continue  # reported by the structure check below
        g = r.graph_module
        p = g.get_submodule(owner).get_parameter(attr) if owner else g.get_parameter(attr)
        added.append([name, list(p.shape), bool(p.requires_grad)])
    return added


def _add_params(gm: fx.GraphModule, added: Sequence[Sequence[Any]]) -> None:
    """Re-create recorded post-pass parameters (zeros; the saved weights fill them)."""
    for name, shape, requires_grad in added:
        owner, _, attr = str(name).rpartition(".")
        try:
            mod = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            mod = None
        if mod is None or attr not in mod._parameters or mod._parameters[attr] is not None:
            raise ArchitectureMismatchError(f"load: cannot re-create parameter '{name}' on the rebuilt module")
        ref = next(iter(mod.parameters()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        setattr(mod, attr, nn.Parameter(torch.zeros([int(v) for v in shape], dtype=dtype),
                                        requires_grad=bool(requires_grad)))


def _replay_check(results: Sequence[Any]) -> list[list[list[Any]]]:
    """Replay every step's plan on its traced original; return the parameters post-passes added per step."""
    out = []
    for i, r in enumerate(results):
        new = rewrite_graph(r.original, r.analysis, r.selection)
        added = _added_params(r, new)
        _add_params(new, added)
        want = {k: tuple(v.shape) for k, v in r.graph_module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in new.state_dict().items()}
        if want != got:
            diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got.get(k))
            raise ConfigError(
                f"save: step {i}'s module is not what its pruning plan produces (a pass after the rewrite changed "
                f"the structure: {', '.join(diff[:5])}); fxprune.save stores plans, use torch.save(result.module) "
                "for such modules"
            )
        out.append(added)
    return out


# -- load -------------------------------------------------------------------------------------------


def _example_inputs(specs: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, ...]:
    out = []
    for s in specs:
        dtype = getattr(torch, str(s["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise FormatError(f"unknown input dtype {s['dtype']!r} in the file")
        out.append(torch.zeros([int(v) for v in s["shape"]], dtype=dtype))
    return tuple(out)


def _selection_for(step: Mapping[str, Any], analysis: Any, state: Mapping[str, torch.Tensor], i: int):
    """Rebuild the step's Selection: by group ids if the groups match, else from the per-tensor masks."""
    groups = analysis.groups
    same = step.get("n_groups") == len(groups) and all(
        0 <= g["id"] < len(groups) and groups[g["id"]].size == g["size"] and groups[g["id"]].root == g["root"]
        for g in step["groups"])
    if same:
        return Selection.from_dict({g["id"]: g["keep"] for g in step["groups"]})
    log.info("fxprune.load: step %d: group structure differs from the saved one, rebuilding from tensor masks", i)
    masks = step["params"]
    keep: dict[int, list[int]] = {}
    for g in groups:
        for ps in g.params:  # the first tensor slice of the group whose saved mask is known decides
            kept_idx = masks.get(ps.param, {}).get(str(ps.dim))
            if kept_idx is None or ps.groups > 1 or ps.param not in state:
                continue
            kept = np.zeros(state[ps.param].shape[ps.dim], dtype=bool)
            kept[kept_idx] = True
            units = member_units(ps)
            ok = [int(u) for r, u in enumerate(units) if kept[ps.span.positions([r])].all()]
            if len(ok) < g.size:
                keep[g.id] = ok
            break
    return Selection.from_dict(keep)


def _check_masks(step: Mapping[str, Any], analysis: Any, selection: Any, state: Mapping[str, torch.Tensor],
                 i: int) -> None:
    try:
        keep_of = analysis.keep_fn(selection)
    except ConfigError as exc:
        raise ArchitectureMismatchError(f"step {i}: the saved plan does not fit this model's channel groups: {exc}") from exc
    want = step["params"]
    for name, t in state.items():
        for d in range(t.dim()):
            k = keep_of(("p", name, d))
            got = None if k is None else [int(j) for j in np.flatnonzero(k)]
            exp = want.get(name, {}).get(str(d))
            if got != exp:
                raise ArchitectureMismatchError(
                    f"step {i}: re-applying the plan to this model keeps different indices of '{name}' dim {d} than "
                    "the saved model (the architecture or fxprune's rules differ from the ones it was saved with)")
    unknown = sorted(set(want) - set(state))
    if unknown:
        raise ArchitectureMismatchError(f"step {i}: the plan prunes tensors this model does not have: {unknown[:5]}")


def _arch_diff(model: nn.Module, saved: Sequence[Sequence[Any]]) -> str:
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {str(k): list(v) for k, v in saved}
    extra, missing = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    shape = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}" + (" …" if len(missing) > 3 else ""))
    if extra:
        parts.append(f"unexpected {', '.join(extra[:3])}" + (" …" if len(extra) > 3 else ""))
    parts += [f"{k} has shape {mine[k]}, saved {theirs[k]}" for k in shape[:3]]
    return "; ".join(parts) or "tensor names/shapes differ"


def load(path: str | os.PathLike, model: nn.Module, *, rules: Any = None,
         leaf_modules: Iterable[Any] = (), check_graph: bool = True, key: bytes | str | None = None) -> nn.Module:
    """Re-apply the pruning plan in ``path`` to ``model`` (a fresh instance of the original architecture)
    and load the saved weights; returns a new GraphModule (for a result of the hierarchical front end: a copy
    of ``model`` with its pruned regions rebuilt). ``model`` itself is not modified.

    ``rules`` / ``leaf_modules``: the same private rule table and extra leaf modules the model was compiled
    with, if any. ``check_graph`` (default True): the traced forward must be the saved one op for op (a model
    with the same tensors but different wiring is rejected); set False to load across torch/torchvision
    versions whose tracing differs, the per-tensor plan check still applies. Raises :class:`FormatError` for a damaged file and :class:`ArchitectureMismatchError` if
    ``model`` is not the saved architecture; nothing is returned in either case. ``key``: the secret the file
    was saved with; the file's HMAC must match (a file without one, or edited since, is a FormatError).
    Every saved tensor must have the shape and dtype the replayed plan gives it (a model cast as a whole,
    e.g. to bfloat16 before saving, is cast alike).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"load: model must be an nn.Module (a fresh instance of the original architecture), "
                         f"got {type(model).__name__}")
    body = read_file(path, key)
    rules = rules or RULES
    if fingerprint(model) != body["arch"]:
        raise ArchitectureMismatchError(f"load: {type(model).__name__} is not the architecture {path} was saved "
                                        f"from: {_arch_diff(model, body.get('arch_tensors', []))}; build the same "
                                        "architecture (same constructor arguments) and retry")
    if "regions" in body:
        out: nn.Module = _load_regions(body, model, rules, leaf_modules, check_graph)
        last = None
    else:
        out, last = _replay(body["steps"], model, _example_inputs(body["inputs"]), rules, leaf_modules, check_graph)
    sd = body["state_dict"]
    have = out.state_dict()
    bad = sorted(set(have) ^ set(sd)) + sorted(k for k in set(have) & set(sd) if have[k].shape != sd[k].shape)
    if bad:
        raise ArchitectureMismatchError(f"load: the rebuilt module's tensors do not match the saved weights: {bad[:5]}")
    _check_dtypes(out, have, sd, path)
    try:
        out.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArchitectureMismatchError(f"load: cannot load the saved weights: {exc}") from exc
    out.train(bool(body["training"]))
    if last is not None and body["steps"][-1].get("form") == "class":
        out = _as_class(last, out, _example_inputs(body["inputs"]))
    return out


def _check_dtypes(out: nn.Module, have: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], path: Any) -> None:
    """Saved dtypes must be the replayed module's, or one float dtype for every float tensor (the model was
    cast as a whole before saving: ``out`` is cast alike); anything else is a damaged or edited file."""
    floats = {sd[k].dtype for k in sd if sd[k].is_floating_point()}
    if len(floats) == 1 and all(have[k].is_floating_point() == sd[k].is_floating_point() for k in sd):
        (dt,) = floats
        if any(have[k].is_floating_point() and have[k].dtype != dt for k in sd):
            out.to(dt)
            have = out.state_dict()
    wrong = [f"{k} ({sd[k].dtype}, expected {have[k].dtype})" for k in sorted(sd) if sd[k].dtype != have[k].dtype]
    if wrong:
        raise FormatError(f"load: {path}: saved tensors have dtypes the plan does not give them: {', '.join(wrong[:5])}")


def _as_class(step: tuple[nn.Module, Any, Any, fx.GraphModule], out: fx.GraphModule,
              inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """The saved result was the user's class: rebuild it around ``out``'s tensors (verified; if it does not
    match, the graph is returned with a warning)."""
    model, analysis, selection, traced = step
    rb, (why, _) = with_literal_retry(
        lambda literals: rebuild(model, out, analysis, selection, traced, literals=literals),
        lambda cand: verify_rebuilt(cand.module, out, inputs),
        lambda exc: (f"could not be made ({type(exc).__name__}: {exc})", False))  # the graph result is still right
    if why or rb is None:
        log.warning("fxprune.load: the saved model was a %s, but its copy with the pruned layers %s; returning "
                    "the GraphModule", type(model).__name__, why)
        return out
    rb.module.train(out.training)
    return rb.module


def _replay(steps: Sequence[Mapping[str, Any]], model: nn.Module, inputs: tuple[torch.Tensor, ...], rules: Any,
            leaf_modules: Iterable[Any], check_graph: bool
            ) -> tuple[fx.GraphModule, tuple[nn.Module, Any, Any, fx.GraphModule]]:
    """Capture ``model`` and re-apply each saved step's plan (weights are loaded by the caller). Returns the
    last step's graph result and what rebuilding the user's class from it needs (the step's input module,
    analysis, selection and traced graph); a step that was compiled on the user's class (a previous step's
    result in class form) is replayed on the class rebuilt from the previous step."""
    current: nn.Module = model
    out: fx.GraphModule | None = None
    last: Any = None
    for i, step in enumerate(steps):
        if out is not None and steps[i - 1].get("form") == "class":
            current = _as_class(last, out, inputs)
        try:
            gm, _ = prepare(current, inputs, leaf_modules, rules, frontend=step.get("frontend", "fx"))
        except FxpruneError as exc:
            exc.add_note(f"fxprune.load: while tracing step {i} with the saved example input shapes")
            raise
        if fingerprint(gm) != step["arch"]:
            raise ArchitectureMismatchError(f"load: step {i}: the traced model's tensors differ from the saved plan's")
        if check_graph and graph_fingerprint(gm) != step["graph"]:
            raise ArchitectureMismatchError(
                f"load: step {i}: the model's forward traces to a different graph than the saved model's (same "
                "tensors, different computation); if only the torch version differs, pass check_graph=False")
        opts = step["analysis"]
        analysis = analyze_graph(gm, rules, opts["unknown_ops"], tuple(opts["ignore"]), bool(opts["allow_lossy"]))
        state = gm.state_dict()
        sel = _selection_for(step, analysis, state, i)
        _check_masks(step, analysis, sel, state, i)
        out = rewrite_graph(gm, analysis, sel, inputs, rules)
        _add_params(out, step.get("added_params", []))
        last = (current, analysis, sel, gm)
    assert out is not None
    return out, last


def _load_regions(body: Mapping[str, Any], model: nn.Module, rules: Any, leaf_modules: Iterable[Any],
                  check_graph: bool) -> nn.Module:
    """Rebuild a hierarchical result: a copy of ``model`` with each saved region re-pruned in place."""
    out = copy_model(model)
    for region in body["regions"]:
        path = str(region["path"])
        try:
            mod = out.get_submodule(path)
        except AttributeError as exc:
            raise ArchitectureMismatchError(f"load: the model has no submodule {path!r} (a saved region)") from exc
        inputs = _example_inputs(region["inputs"])
        spec = pytree.treespec_loads(region["spec"]) if region["spec"] is not None else None
        target = mod if spec is None else flat_view(mod, spec, len(inputs))
        try:
            new: nn.Module = _replay(region["steps"], target, inputs, rules, leaf_modules, check_graph)[0]
        except FxpruneError as exc:
            exc.add_note(f"fxprune.load: in region {path!r}")
            raise
        if spec is not None:
            new = structured(new, spec, path)
        carry_attributes(mod, new)
        parent, _, attr = path.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, new)
    return out
