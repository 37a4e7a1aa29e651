"""The masked-reference oracle, public so users can check their own rules, passes and graph transforms.

``assert_prune_equivalent(model, inputs, selection)`` prunes ``model`` with ``selection`` (a random,
constraint-respecting one by default) and asserts that the result is well formed (``graph.lint()``,
output shapes), equals the masked reference numerically, and left ``model`` untouched.

``assert_transform_equivalent(transform, model, inputs)`` does the same for any
``GraphModule -> GraphModule`` transform that should preserve the function.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..api import prepare
from ..ir import Selection
from ..passes.group import Analysis, analyze_graph
from ..passes.rewrite import rewrite_graph
from ..passes.select import choose_units
from ..passes.verify import compare_outputs, masked_reference, run_outputs
from ..rules import RULES, RuleTable

__all__ = [
    "PruneCheck",
    "random_selection",
    "prune_with",
    "assert_prune_equivalent",
    "assert_transform_equivalent",
    "assert_model_unchanged",
    "snapshot",
]


@dataclass
class PruneCheck:
    """What :func:`assert_prune_equivalent` checked: the pruned module, its reference and the facts."""

    module: fx.GraphModule
    reference: fx.GraphModule
    original: fx.GraphModule
    analysis: Analysis
    selection: Selection


def random_selection(analysis: Analysis, seed: int = 0, max_ratio: float = 0.9,
                     ratio: float | None = None) -> Selection:
    """A random selection that respects pins, blocks and constraints (random scores, random ratio per group)."""
    rng = np.random.default_rng(seed)
    keep: dict[int, tuple[int, ...]] = {}
    for g in analysis.groups:
        if not g.prunable:
            continue
        r = rng.uniform(0, max_ratio) if ratio is None else ratio
        kept = choose_units(g, rng.random(g.size), int(np.floor(r * g.size)))
        if len(kept) < g.size:
            keep[g.id] = kept
    return Selection.from_dict(keep)


class Snapshot(dict):
    """Copies of a model's parameters and buffers, and their version counters (``versions``)."""

    versions: dict[str, int]


def snapshot(model: nn.Module) -> Snapshot:
    """Copies of every parameter and buffer, and their version counters (for :func:`assert_model_unchanged`)."""
    state = model.state_dict(keep_vars=True)
    snap = Snapshot({k: v.detach().clone() for k, v in state.items()})
    snap.versions = {k: v._version for k, v in state.items()}
    return snap


def assert_model_unchanged(model: nn.Module, snap: dict[str, torch.Tensor], training: bool | None = None) -> None:
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(snap), f"model's state keys changed: {set(now) ^ set(snap)}"
    for k, v in snap.items():
        t = now[k].detach()
        assert t.shape == v.shape and t.dtype == v.dtype, f"{k} changed shape/dtype"
        assert torch.equal(t, v), f"{k} changed values"
    for k, version in getattr(snap, "versions", {}).items():  # written in place, even if restored since
        assert now[k]._version == version, f"{k} was written in place (version {version} -> {now[k]._version})"
    if training is not None:
        assert model.training == training, "model's training flag changed"


def prune_with(model: nn.Module, example_inputs: Any, selection: Selection | Callable[[Analysis], Selection] | None = None,
               *, seed: int = 0, unknown_ops: str = "error", allow_lossy: bool = False,
               rules: RuleTable = RULES, leaf_modules: Sequence[Any] = ()) -> PruneCheck:
    """Trace, analyse and rewrite ``model`` with an explicit selection; no assertions."""
    gm, inputs = prepare(model, example_inputs, leaf_modules, rules)
    analysis = analyze_graph(gm, rules, unknown_ops, (), allow_lossy)
    if selection is None:
        sel = random_selection(analysis, seed)
    elif callable(selection):
        sel = selection(analysis)
    else:
        sel = selection
    new = rewrite_graph(gm, analysis, sel, inputs, rules)
    ref = masked_reference(gm, analysis, sel)
    return PruneCheck(new, ref, gm, analysis, sel)


def assert_prune_equivalent(
    model: nn.Module,
    example_inputs: Any,
    selection: Selection | Callable[[Analysis], Selection] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    extra_inputs: Sequence[Any] = (),
    unknown_ops: str = "error",
    allow_lossy: bool = False,
    rules: RuleTable = RULES,
    leaf_modules: Sequence[Any] = (),
) -> PruneCheck:
    """Prune and assert: lint passes, shapes are kept, outputs equal the masked reference, ``model`` unchanged.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 3))
    >>> chk = assert_prune_equivalent(net, torch.randn(2, 3, 8, 8), seed=1)
    >>> chk.module.get_submodule("0").out_channels <= 8
    True
    """
    snap = snapshot(model)
    training = model.training
    chk = prune_with(model, example_inputs, selection, seed=seed, unknown_ops=unknown_ops, allow_lossy=allow_lossy,
                     rules=rules, leaf_modules=leaf_modules)
    chk.module.graph.lint()
    for inputs in [chk_inputs(example_inputs), *[chk_inputs(x) for x in extra_inputs]]:
        got = run_outputs(chk.module, inputs, dtype)
        want = run_outputs(chk.reference, inputs, dtype)
        orig = run_outputs(chk.original, inputs, dtype)
        assert [t.shape for t in got] == [t.shape for t in orig], (
            f"output shapes changed: {[tuple(t.shape) for t in orig]} -> {[tuple(t.shape) for t in got]}"
        )
        msg = compare_outputs(got, want, rtol, atol)
        assert not msg, f"pruned module differs from the masked reference: {msg}\nselection: {chk.selection}"
    assert_model_unchanged(model, snap, training)
    return chk


def chk_inputs(x: Any) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def assert_transform_equivalent(
    transform: Callable[[fx.GraphModule], fx.GraphModule],
    model: nn.Module,
    example_inputs: Any,
    *,
    dtype: torch.dtype | None = torch.float64,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    extra_inputs: Sequence[Any] = (),
) -> fx.GraphModule:
    """Apply a ``GraphModule -> GraphModule`` transform to the traced model and assert it preserves outputs.

    >>> import torch
    >>> def double_then_halve(gm):
    ...     for n in list(gm.graph.nodes):
    ...         if n.op == "output":
    ...             with gm.graph.inserting_before(n):
    ...                 y = gm.graph.call_function(torch.mul, (n.args[0], 1.0))
    ...             n.args = (y,)
    ...     gm.recompile()
    ...     return gm
    >>> _ = assert_transform_equivalent(double_then_halve, torch.nn.Linear(3, 2), torch.randn(4, 3))
    """
    gm, inputs = prepare(model, example_inputs)
    before = copy.deepcopy(gm)
    out = transform(gm)
    out.graph.lint()
    for xs in [inputs, *[chk_inputs(x) for x in extra_inputs]]:
        msg = compare_outputs(run_outputs(out, xs, dtype), run_outputs(before, xs, dtype), rtol, atol)
        assert not msg, f"transform changed the outputs: {msg}"
    return out
