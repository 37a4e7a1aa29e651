"""Printable, hashable network descriptions and their deterministic builder.

Owns :data:`BLOCKS` (block name -> constructor), the family sets :data:`ALL_FAMILIES` and
:data:`IMAGE_BODY_FAMILIES`, :class:`BlockSpec`, :class:`NetworkSpec` and :func:`build_network`. Nothing here
needs hypothesis; the strategies that draw these specs live in :mod:`fxprune.testing.strategies.draw`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import (
    ConcatBlock,
    ConvBNAct,
    DepthwiseSeparable,
    FlattenHead,
    GAPHead,
    GroupedConv,
    Pool,
    Residual,
    SEGate,
    SharedConv,
    SplitBlock,
)
from .seeding import init_params_, randomize_, seeded_generator
from .tokens import (
    AttentionBlock,
    ConvToTokens,
    MultiInputNet,
    SelfAttention,
    TokenHead,
)

__all__ = ["ALL_FAMILIES", "BLOCKS", "IMAGE_BODY_FAMILIES", "BlockSpec", "NetworkSpec", "build_network"]

#: Name -> constructor, used by :class:`BlockSpec`.
BLOCKS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (ConvBNAct, GroupedConv, Residual, ConcatBlock, SplitBlock, DepthwiseSeparable, SEGate, Pool,
                SharedConv, GAPHead, FlattenHead, ConvToTokens, SelfAttention, AttentionBlock, TokenHead)
}
BLOCKS["Linear"] = nn.Linear

_NO_DTYPE = {"Pool", "ConvToTokens"}

#: Every family :func:`networks` understands.
ALL_FAMILIES: frozenset[str] = frozenset({
    "conv", "residual", "concat", "split", "depthwise", "grouped", "se", "pool", "shared", "flatten_linear",
    "attention", "multi_io",
})
#: The families that are drawn as body blocks of image networks.
IMAGE_BODY_FAMILIES: frozenset[str] = frozenset({
    "conv", "residual", "concat", "split", "depthwise", "grouped", "se", "pool", "shared",
})


@dataclass(frozen=True)
class BlockSpec:
    """A block's class name (a key of :data:`BLOCKS`) and constructor keyword arguments; hashable, and its
    repr is the constructor call."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, **kwargs: Any) -> BlockSpec:
        return cls(name, tuple(kwargs.items()))

    def build(self, dtype: torch.dtype | None = None) -> nn.Module:
        kwargs = dict(self.kwargs)
        if self.name not in _NO_DTYPE:
            kwargs["dtype"] = dtype
        return BLOCKS[self.name](**kwargs)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


@dataclass(frozen=True)
class NetworkSpec:
    """A complete description of a drawn network; :func:`build_network` turns it into ``(model, inputs)``.

    ``kind`` is ``"image"`` (``nn.Sequential(*layers, head)`` on one ``(N, C, H, W)`` input), ``"tokens"``
    (``nn.Sequential(*layers, head)`` ending in attention blocks and a :class:`TokenHead`; its one input is
    either ``(N, L, E)`` tokens or an image that a conv stem and :class:`ConvToTokens` turn into tokens) or ``"multi_io"`` (:class:`MultiInputNet` with ``stems``, trunk
    ``layers``, ``head`` and ``merge``; returns ``(logits, features)``). ``families`` lists the families that
    actually occur. ``seed`` drives weights, norm statistics and inputs.
    """

    kind: str
    input_shapes: tuple[tuple[int, ...], ...]
    layers: tuple[BlockSpec, ...]
    head: BlockSpec
    num_classes: int
    seed: int
    dtype: torch.dtype = torch.float64
    stems: tuple[BlockSpec, ...] = ()
    merge: str | None = None
    families: frozenset[str] = field(default_factory=frozenset)


def build_network(spec: NetworkSpec) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Build ``spec`` deterministically: ``(model in eval mode, example inputs)``.

    Weights come from :func:`init_params_` and norm statistics from :func:`randomize_`, both seeded from
    ``spec.seed``; inputs are standard normal from another generator seeded from ``spec.seed``. The global torch
    RNG state is left untouched. The spec is attached to the model as ``model.fxprune_spec``.
    """
    dtype = spec.dtype
    with torch.random.fork_rng(devices=[]):  # default module init consumes the global RNG; restore it.
        layers = [b.build(dtype) for b in spec.layers]
        head = spec.head.build(dtype)
        if spec.kind == "multi_io":
            stem_a, stem_b = (s.build(dtype) for s in spec.stems)
            model: nn.Module = MultiInputNet(stem_a, stem_b, nn.Sequential(*layers), head, merge=spec.merge or "cat")
        elif spec.kind in ("image", "tokens"):
            model = nn.Sequential(*layers, head)
        else:
            raise ValueError(f"unknown network kind {spec.kind!r}")
    init_params_(model, spec.seed)
    randomize_(model, spec.seed + 1)
    model.eval()
    g = seeded_generator(spec.seed + 2)
    inputs = tuple(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in spec.input_shapes)
    model.fxprune_spec = spec  # type: ignore[assignment]
    return model, inputs

