"""Calls with structured arguments: a module called with lists, tuples or dicts of tensors (a detector's
list of images, an FPN's feature dict) is captured on the flattened tensor leaves and given its structure
back afterwards.

:func:`flat_view` makes a module callable on the leaves (for capture); :class:`StructuredGraphModule` is a
pruned GraphModule that takes the original structure again (a call with another structure is an
:class:`~fxprune.errors.InputError`); :func:`carry_attributes` keeps plain attributes of a replaced module
(``out_channels``, ``num_classes``) readable on its replacement. Both survive ``copy.deepcopy`` and pickling.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import InputError

__all__ = ["flat_view", "FlatBatches", "StructuredGraphModule", "structured", "carry_attributes", "preserve", "rebuild_structured"]

_PLAIN_SKIP = {"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


def flat_view(module: nn.Module, spec: pytree.TreeSpec, n: int, fixed: dict[int, Any] | None = None) -> nn.Module:
    """A shallow view of ``module`` whose ``forward`` takes the flattened tensor leaves of ``spec`` (``n``
    leaves in all; those in ``fixed`` are constants baked in: ``None`` for an optional argument, a flag).

    It shares the module's children and parameters (so names are unchanged) and is only traced, never run
    by the user."""
    cls = type(module)
    fixed = dict(fixed or {})
    free = [i for i in range(n) if i not in fixed]
    names = [f"leaf{i}" for i in free]
    src = (f"def forward(self, {', '.join(names)}):\n"
           f"    args, kwargs = _unflatten(_fill([{', '.join(names)}]), _spec)\n"
           f"    return _forward(self, *args, **kwargs)\n")

    def fill(values: list[Any]) -> list[Any]:
        out, it = [], iter(values)
        for i in range(n):
            out.append(fixed[i] if i in fixed else next(it))
        return out

    scope: dict[str, Any] = {"_unflatten": pytree.tree_unflatten, "_spec": spec, "_forward": cls.forward, "_fill": fill}
    exec(compile(src, f"<fxprune flattened call of {cls.__name__}>", "exec"), scope)  # noqa: S102
    view_cls = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__})
    view = copy.copy(module)
    view.__class__ = view_cls
    return view


class FlatBatches:
    """Calibration batches given in the example's structure (a dict of ``input_ids`` and ``attention_mask``
    per batch, a tokenizer's ``BatchEncoding``, a tuple with ``None``), yielded as the tuples of tensor leaves
    the captured graph takes. Re-iterable when ``data`` is; a batch of another structure is an InputError."""

    def __init__(self, data: Any, spec: pytree.TreeSpec, fixed: dict[int, Any], keyword: bool) -> None:
        self.data, self.spec, self.fixed, self.keyword = data, spec, fixed, keyword

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Any:
        for i, batch in enumerate(self.data):
            if self.keyword:
                if not isinstance(batch, Mapping):
                    raise InputError(f"calibration batch {i} is a {type(batch).__name__}; the example inputs are "
                                     "keyword arguments, so each batch must be a mapping with the same keys")
                call: Any = ((), dict(batch))
            else:
                call = (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,), {})
            leaves, spec = pytree.tree_flatten(call)
            if spec != self.spec:
                raise InputError(f"calibration batch {i} is structured as {spec}, the example inputs as {self.spec}")
            yield tuple(x for j, x in enumerate(leaves) if j not in self.fixed)


class StructuredGraphModule(fx.GraphModule):
    """A GraphModule over flattened tensor leaves that is called with the original argument structure.

    ``m(features_dict)`` flattens the arguments with the structure recorded at capture time and runs the
    graph on the leaves; a call with another structure is an :class:`~fxprune.errors.InputError`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.fxprune_in_spec:
            raise InputError(f"{self.fxprune_region or 'the model'} was pruned for calls structured as "
                             f"{self.fxprune_in_spec}, got {spec}")
        fixed = getattr(self, "fxprune_fixed", None) or {}
        for i, v in fixed.items():
            if not (leaves[i] is v or (type(leaves[i]) is type(v) and leaves[i] == v)):
                raise InputError(f"{self.fxprune_region or 'the model'}: argument leaf {i} was {v!r} when the graph "
                                 f"was captured (baked in as a constant), got {leaves[i]!r}")
        return super().__call__(*[x for i, x in enumerate(leaves) if i not in fixed])

    def __reduce__(self) -> Any:
        fn, args = super().__reduce__()  # a plain GraphModule holding our attributes; rebuilt as this class
        return (rebuild_structured, (fn, args))


def rebuild_structured(fn: Callable[..., fx.GraphModule], args: tuple) -> StructuredGraphModule:
    gm = fn(*args)
    body = args[0] if args and isinstance(args[0], dict) else {}
    for k, v in dict(body.get("meta", {}).get(PRESERVED, {})).items():  # GraphModule() drops the meta
        preserve(gm, k, v)
    return structured(gm, gm.fxprune_in_spec, gm.fxprune_region)


PRESERVED = "_user_preserved_attributes"  # torch.fx keeps these attributes through deepcopy


def preserve(gm: fx.GraphModule, name: str, value: Any) -> None:
    gm.meta.setdefault(PRESERVED, {})[name] = value
    setattr(gm, name, value)


def structured(gm: fx.GraphModule, spec: pytree.TreeSpec, region: str,
               fixed: dict[int, Any] | None = None) -> StructuredGraphModule:
    new = StructuredGraphModule(gm, gm.graph, type(gm).__name__)
    new.meta.update(gm.meta)
    for k, v in dict(gm.meta.get(PRESERVED, {})).items():
        preserve(new, k, v)
    preserve(new, "fxprune_in_spec", spec)
    preserve(new, "fxprune_region", region)
    if fixed is not None or not hasattr(new, "fxprune_fixed"):
        preserve(new, "fxprune_fixed", dict(fixed or {}))
    new.train(gm.training)
    return new


def carry_attributes(src: nn.Module, dst: nn.Module) -> None:
    """Plain attributes of the replaced module (``out_channels``, ``num_classes``...) stay readable."""
    for k, v in vars(src).items():
        if k in _PLAIN_SKIP or k.startswith("_") or hasattr(dst, k):
            continue
        if isinstance(v, (int, float, str, bool, tuple, type(None))):
            if isinstance(dst, fx.GraphModule):
                preserve(dst, k, v)
            else:
                setattr(dst, k, v)
