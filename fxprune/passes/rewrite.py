"""Rewrite: build a NEW, smaller GraphModule from a selection.

Modules called by the graph are rebuilt by their rule (``rewrite_module``: sliced parameters, updated
size attributes); parameters read with ``get_attr`` are sliced generically; literal sizes in node
arguments are patched by the node's rule (``rewrite_node``). Every tensor of the result is a fresh
copy, so the original model's parameters are never shared or modified. The new graph's shapes are
propagated again (the ``shapes`` fact then describes the new module; the run also checks the graph's structure,
which fx's lint does when there are no example inputs).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.fx as fx
from torch import nn

from .. import meta
from ..clone import set_training
from ..errors import InputError, RewriteError, node_location
from ..ir import Selection
from ..pipeline import Context, Pass, PassResult
from ..rules import RULES, RuleTable
from ..rules.axes import submodule
from ..rules.base import RewriteContext, lookup_tensor, slice_param
from ..flops import count_cost
from ..shapes import propagate_shapes
from ..trace import LazyGraphModule
from .size_values import keep_size_values

__all__ = ["Rewrite", "rewrite_graph", "Provenance", "provenance"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provenance:
    """The ``pruned_from`` fact of a rewritten graph: the ``source`` graph, its groups (``analysis``) and the
    ``selection`` the rewrite applied. Post-passes (absorb, verify, reconstruct) and the report read it."""

    source: fx.GraphModule
    analysis: Any
    selection: Selection


def provenance(gm: fx.GraphModule) -> Provenance | None:
    """The ``pruned_from`` fact of ``gm`` (None when it is not a rewrite)."""
    return meta.get(gm, "pruned_from")


def rewrite_graph(
    gm: fx.GraphModule,
    analysis,
    selection: Selection,
    example_inputs: Sequence[torch.Tensor] | None = None,
    rules: RuleTable | None = None,
) -> fx.GraphModule:
    """Return a new GraphModule with the units outside ``selection`` removed.

    ``rules`` defaults to the table the analysis was built with."""
    rules = rules or getattr(analysis, "rules", RULES)
    keep_of = analysis.keep_fn(selection)
    root: dict[str, object] = {}
    new_graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = new_graph.graph_copy(gm.graph, val_map)
    new_graph.output(out)
    rw = RewriteContext(gm, None, keep_of, analysis.table.groups_of)

    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    for target, nodes in calls.items():
        mod = submodule(gm, target)
        rule = rules.module_rule(mod)
        try:
            new = rule.rewrite_module(mod, target, rw, nodes) if rule is not None else copy.deepcopy(mod)
        except Exception as exc:
            exc.add_note(f"fxprune: while rebuilding module '{target}' ({type(mod).__name__})")
            raise
        root[target] = new
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t, is_buffer = lookup_tensor(gm, str(node.target))
            if isinstance(t, torch.Tensor):
                data = slice_param(t, str(node.target), rw)
                root[str(node.target)] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
            else:
                root[str(node.target)] = copy.deepcopy(t)
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            rule = rules.lookup(gm, node)
            if rule is not None:
                try:
                    rule.rewrite_node(val_map[node], node, rw)
                except Exception as exc:
                    where = node_location(node)
                    exc.add_note(f"fxprune: while patching node '{node.name}'" + (f" at {where}" if where else ""))
                    raise
    keep_size_values(gm, new_graph, val_map, rw, rules)
    # its Python code is generated when it is first run or printed (by default the result is the class copy)
    new_gm = LazyGraphModule(root, new_graph, gm.__class__.__name__)
    _retie(new_gm, analysis.table.tied(gm))
    meta.copy_source_finder(gm, new_gm)
    set_training(new_gm, gm.training)
    # the graph's structure is checked by the shape run when there are inputs (every value defined before its
    # use, every target present; a failure there is a RewriteError), else by fx's lint
    if example_inputs is None:
        new_gm.graph.lint()
    else:
        try:
            propagate_shapes(new_gm, example_inputs)
        except InputError as exc:  # the original ran on these inputs: the rewrite is inconsistent
            node = getattr(exc, "node", None)
            err = RewriteError(
                f"fxprune built an inconsistent pruned graph (the model itself runs on these inputs); no model is "
                f"returned. {str(exc).replace('the model fails to run on the example inputs', 'the pruned graph fails', 1)}"
                "\n  This is an fxprune bug or a size computation no rule models: please report it; "
                "ignore= the layers involved to prune the rest")
            err.node = node
            raise err from exc
    return new_gm


def _retie(new_gm: fx.GraphModule, tied: list[tuple[str, ...]]) -> None:
    """Tensors that were one under several names (``tied``: tied embeddings) are one again in the result; the
    analysis ties their dims, so each name was sliced alike."""
    for names in tied:
        try:
            first = new_gm.get_parameter(names[0])
        except AttributeError:
            continue
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            try:
                mod, t = new_gm.get_submodule(owner), new_gm.get_parameter(name)
            except AttributeError:
                continue
            if t is not first and t.shape == first.shape and torch.equal(t, first):
                setattr(mod, attr, first)


@dataclass(frozen=True)
class Rewrite(Pass):
    """Rewrite pass: reads ``groups`` + ``selection`` of the current graph, returns a new module."""

    name: ClassVar[str] = "rewrite"
    reads: ClassVar[tuple[str, ...]] = ("groups", "selection")
    writes: ClassVar[tuple[str, ...]] = ("shapes", "cost", "pruned_from")
    invalidates: ClassVar[tuple[str, ...]] = ("groups", "importance", "selection", "absorbed", "reconstruction")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        analysis = meta.get(gm, "groups")
        sel = meta.get(gm, "selection")
        new = rewrite_graph(gm, analysis, sel, ctx.example_inputs)
        # what this rewrite removed, for the verification and reconstruction post-passes
        meta.put(new, "pruned_from", Provenance(gm, analysis, sel))
        cost = count_cost(new)
        meta.put(new, "cost", cost)
        removed = sum(analysis.groups[gid].size - len(k) for gid, k in sel.keep)
        lossy = [analysis.groups[gid] for gid, _ in sel.keep if analysis.groups[gid].lossy]
        if lossy:  # allow_lossy=True: say so in the report, whatever the verification level
            ctx.notes.append(
                f"lossy: {len(lossy)} group(s) pruned through normalisation statistics (e.g. "
                f"{lossy[0].lossy}); the result is NOT exactly equivalent to the original (fine-tune it)")
        return PassResult(new, bool(sel.keep), {"units_removed": removed, "macs": cost.macs, "params": cost.params})
