"""Verification: shapes, and numerical equivalence against the masked reference.

The *masked reference* of a selection is the original model in which every consuming parameter slice
(role ``"in"``: the input kernels of the convs/linears/attention projections that read a removed unit)
is zeroed. A removed unit then contributes nothing anywhere, so the pruned model must compute exactly
the same function. Both are compared in eval mode, in float64 by default, on the example inputs (plus
optional extra inputs).

Running a model in float64 takes more than ``module.to(torch.float64)`` when its graph names a float dtype:
``x.float()``, ``torch.zeros(..., dtype=torch.float32)``, a float32 coordinate grid built at run time (RAFT),
the dtype asserts and casts of a torch.export graph. :func:`promote_float_dtype` rewrites such literals in a
private copy (float dtypes → the check's dtype, ``.float()``/``.half()`` → ``.double()``, plain tensor
attributes converted), and creation ops without a dtype run under that default dtype. The pruned module and
the reference get the same treatment, so the check still compares two computations of one function, only
at a higher precision; the modules returned to the user are never touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .. import meta
from ..errors import InputError, VerificationError
from ..ir import Selection, member_units
from ..pipeline import Context, Pass, PassResult
from ..rules.base import lookup_tensor
from .absorb import apply_absorbed
from .rewrite import provenance

__all__ = ["Verify", "masked_reference", "compare_outputs", "flatten_outputs", "output_shapes", "promote_float_dtype", "run_outputs"]


def masked_reference(gm: fx.GraphModule, analysis, selection: Selection, absorbed: Sequence[Any] = ()) -> fx.GraphModule:
    """Deep copy of ``gm`` with the consuming slices of every removed unit zeroed.

    ``absorbed``: records of :class:`fxprune.passes.absorb.Absorbed` (the constants the absorb pass folded
    into consumers' biases); they are applied to the reference too, so it stays exact."""
    ref = copy.deepcopy(gm)
    ref.meta.clear()
    kept = selection.as_dict()
    with torch.no_grad():
        for g in analysis.groups:
            if g.id not in kept:
                continue
            removed = np.setdiff1d(np.arange(g.size), np.asarray(kept[g.id], dtype=np.int64))
            if len(removed) == 0:
                continue
            for ps in g.params:
                if ps.role != "in":
                    continue
                t, _ = lookup_tensor(ref, ps.param)
                units = member_units(ps)
                rows = np.flatnonzero(np.isin(units, removed))
                if len(rows) == 0:
                    continue
                try:
                    pos = ps.span.indices()[rows].reshape(-1)
                except ValueError:  # ragged explicit map
                    pos = np.concatenate([np.asarray(ps.span.table[r]) for r in rows])  # type: ignore
                if ps.groups > 1:
                    og, cg = t.shape[0] // ps.groups, t.shape[1]
                    for c in pos:
                        q, j = divmod(int(c), cg)
                        t[q * og : (q + 1) * og, j] = 0
                else:
                    idx = torch.as_tensor(pos, device=t.device)
                    t.index_fill_(ps.dim, idx, 0)
    if absorbed:
        apply_absorbed(ref, absorbed)
    return ref


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


def output_shapes(gm: fx.GraphModule) -> list[tuple[int, ...]] | None:
    """The shapes of ``gm``'s flattened outputs (in :func:`flatten_outputs` order) from its shape metadata
    (the ``shapes`` fact), or None when some output has none."""
    if not meta.has(gm, "shapes"):
        return None
    out: list[tuple[int, ...]] = []

    def walk(a: Any) -> bool:
        if isinstance(a, fx.Node):
            tm = meta.tensor_meta(a)
            if tm is None:
                return meta.concrete_value(a) is not None  # a number or flag: not a tensor output
            for t in (tm if meta.is_multi(tm) else (tm,)):
                if t is None:
                    return False
                out.append(tuple(t.shape))
            return True
        if isinstance(a, dict):
            return all(walk(a[k]) for k in sorted(a))
        if isinstance(a, (list, tuple)):
            return all(walk(x) for x in a)
        return not isinstance(a, torch.Tensor)

    node = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    return out if node is not None and walk(node.args[0]) else None


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CAST_METHODS = {torch.float16: "half", torch.bfloat16: "bfloat16", torch.float32: "float", torch.float64: "double"}


def promote_float_dtype(m: nn.Module, dtype: torch.dtype) -> int:
    """Rewrite, in place, every floating dtype named in the graphs of ``m`` (and of its GraphModule
    submodules, e.g. higher-order-op bodies) to ``dtype``; convert floating tensor attributes that are not
    parameters or buffers. Call it on a private copy. Returns the number of nodes changed.

    >>> import torch.fx as fx
    >>> class M(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x + torch.ones(3, dtype=torch.float32, device=x.device).float()
    >>> gm = fx.symbolic_trace(M())
    >>> promote_float_dtype(gm, torch.float64)
    2
    >>> gm(torch.zeros(3, dtype=torch.float64)).dtype
    torch.float64
    """
    if dtype not in _FLOATS:
        raise ValueError(f"promote_float_dtype needs a floating dtype, got {dtype}")

    def swap(v: Any) -> Any:
        return dtype if isinstance(v, torch.dtype) and v in _FLOATS else v

    changed = 0
    for mod in m.modules():
        for name, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_floating_point():
                setattr(mod, name, v.to(dtype))
        if not isinstance(mod, fx.GraphModule):
            continue
        before = changed
        for node in mod.graph.nodes:
            args = fx.node.map_aggregate(node.args, swap)
            kwargs = fx.node.map_aggregate(node.kwargs, swap)
            target = node.target
            if node.op == "call_method" and target in _CAST_METHODS.values():
                target = _CAST_METHODS[dtype]
            if args != node.args or kwargs != node.kwargs or target != node.target:
                node.args, node.kwargs, node.target = args, kwargs, target
                changed += 1
        if changed > before:
            mod.recompile()
    return changed


def run_outputs(m: nn.Module, inputs: Sequence[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    """``m``'s flattened outputs in eval mode without grad; with ``dtype``, on a private copy whose parameters,
    inputs and float literals (:func:`promote_float_dtype`) are in that dtype."""
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            if dtype is None:
                return flatten_outputs(m(*inputs))
            m = copy.deepcopy(m).to(dtype)
            promote_float_dtype(m, dtype)
            inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # creation ops without a dtype (torch.zeros(n), arange(0.0, ...))
            try:
                return flatten_outputs(m(*inputs))
            finally:
                torch.set_default_dtype(default)
    finally:
        m.train(was)


def compare_outputs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], rtol: float, atol: float) -> str:
    """'' when equal within tolerance, else a description of the first mismatch."""
    if len(a) != len(b):
        return f"{len(a)} outputs vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            return f"output {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.is_floating_point():
            if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
                err = (x - y).abs().max().item()
                return f"output {i}: max abs difference {err:.3g} (rtol={rtol}, atol={atol})"
        elif not torch.equal(x, y):
            return f"output {i}: values differ"
    return ""


def _check_not_vacuous(inputs: Sequence[Any]) -> None:
    """An equivalence check on an empty batch or on NaN/Inf inputs compares nothing (NaN == NaN passes):
    refuse it rather than report a proof."""
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            continue
        if x.numel() == 0:
            raise InputError(f"verify='equivalence': example input {i} is empty (shape {tuple(x.shape)}); a "
                             "check on no data proves nothing — pass at least one sample")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise InputError(f"verify='equivalence': example input {i} holds NaN or Inf values; outputs computed "
                             "from them compare equal whatever the model — pass finite inputs")


def _check_outputs_finite(outs: Sequence[torch.Tensor]) -> None:
    for i, y in enumerate(outs):
        if y.is_floating_point() and y.numel() and not torch.isfinite(y).any():
            raise VerificationError(f"verify='equivalence': output {i} of the original model is NaN/Inf everywhere "
                                    "on the example inputs; comparing it proves nothing")


@dataclass(frozen=True)
class Verify(Pass):
    """Check the pruned module against the original (``ctx.original``).

    ``equivalence=True`` also compares with the masked reference, built from the rewrite's provenance (the
    ``pruned_from`` fact: source graph, groups, selection) and the ``absorbed`` constants. Lossy groups make
    the comparison meaningless; it is skipped with a note when any was pruned.
    """

    name: ClassVar[str] = "verify"
    reads: ClassVar[tuple[str, ...]] = ("shapes",)
    optional_reads: ClassVar[tuple[str, ...]] = ("pruned_from", "absorbed")
    writes: ClassVar[tuple[str, ...]] = ()

    equivalence: bool = False
    dtype: str | None = "float64"
    rtol: float = 1e-6
    atol: float = 1e-8

    def requires(self) -> tuple[str, ...]:
        return ("shapes", "pruned_from") if self.equivalence else ("shapes",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        prov = provenance(gm)
        orig = prov.source if prov is not None else ctx.original
        if orig is None:
            raise VerificationError("verify needs the original graph (ctx.original)")
        dt = getattr(torch, self.dtype) if self.dtype else None
        if self.equivalence:
            _check_not_vacuous(ctx.example_inputs)
        # shapes: from the meta-device shape propagation both graphs carry (no arithmetic), else a real run
        new_shapes, old_shapes = output_shapes(gm), output_shapes(orig)
        if new_shapes is None or old_shapes is None:
            new_shapes = [tuple(x.shape) for x in run_outputs(gm, ctx.example_inputs, None)]
            old_shapes = [tuple(x.shape) for x in run_outputs(orig, ctx.example_inputs, None)]
        if new_shapes != old_shapes:
            raise VerificationError(f"pruned module changes the output shapes: {old_shapes} -> {new_shapes}")
        stats: dict[str, Any] = {"shapes": "ok"}
        if self.equivalence:
            if prov is None:
                raise VerificationError("equivalence check needs the provenance of the rewrite (pruned_from)")
            analysis, sel = prov.analysis, prov.selection
            if any(analysis.groups[gid].lossy for gid, _ in sel.keep):
                ctx.shortfall("verify: lossy groups were pruned; equivalence check skipped")
                stats["equivalence"] = "skipped (lossy)"
            else:
                ref = masked_reference(orig, analysis, sel, meta.get(gm, "absorbed") or ())
                want = run_outputs(ref, ctx.example_inputs, dt)
                _check_outputs_finite(want)
                msg = compare_outputs(run_outputs(gm, ctx.example_inputs, dt), want, self.rtol, self.atol)
                if msg:
                    raise VerificationError(f"pruned module differs from the masked reference: {msg}")
                stats["equivalence"] = "ok"
        return PassResult(gm, False, stats)
