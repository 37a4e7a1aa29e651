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
from typing import Any, Callable

import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import InputError

__all__ = ["flat_view", "StructuredGraphModule", "structured", "carry_attributes", "preserve", "rebuild_structured"]

_PLAIN_SKIP = {"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


def flat_view(module: nn.Module, spec: pytree.TreeSpec, n: int) -> nn.Module:
    """A shallow view of ``module`` whose ``forward`` takes the ``n`` flattened tensor leaves of ``spec``.

    It shares the module's children and parameters (so names are unchanged) and is only traced, never run
    by the user."""
    cls = type(module)
    names = [f"leaf{i}" for i in range(n)]
    src = (f"def forward(self, {', '.join(names)}):\n"
           f"    args, kwargs = _unflatten([{', '.join(names)}], _spec)\n"
           f"    return _forward(self, *args, **kwargs)\n")
    scope: dict[str, Any] = {"_unflatten": pytree.tree_unflatten, "_spec": spec, "_forward": cls.forward}
    exec(compile(src, f"<fxprune flattened call of {cls.__name__}>", "exec"), scope)  # noqa: S102
    view_cls = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__})
    view = copy.copy(module)
    view.__class__ = view_cls
    return view


class StructuredGraphModule(fx.GraphModule):
    """A GraphModule over flattened tensor leaves that is called with the original argument structure.

    ``m(features_dict)`` flattens the arguments with the structure recorded at capture time and runs the
    graph on the leaves; a call with another structure is an :class:`~fxprune.errors.InputError`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.fxprune_in_spec:
            raise InputError(f"{self.fxprune_region or 'region'} was pruned for calls structured as "
                             f"{self.fxprune_in_spec}, got {spec}")
        return super().__call__(*leaves)

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


def structured(gm: fx.GraphModule, spec: pytree.TreeSpec, region: str) -> StructuredGraphModule:
    new = StructuredGraphModule(gm, gm.graph, type(gm).__name__)
    new.meta.update(gm.meta)
    for k, v in dict(gm.meta.get(PRESERVED, {})).items():
        preserve(new, k, v)
    preserve(new, "fxprune_in_spec", spec)
    preserve(new, "fxprune_region", region)
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
