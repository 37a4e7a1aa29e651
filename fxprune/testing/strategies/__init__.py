"""Random, torch.fx-traceable networks for property tests of pruning compilers.

This module has three layers:

* :func:`randomize_` (alias :func:`randomize_bn`) and :func:`init_params_`: deterministic, seeded
  re-initialisation of a module's parameters and normalisation statistics, so that every channel of every
  layer is distinguishable (a pruning bug that keeps the wrong channel index changes the output).
* A library of small building blocks (:class:`ConvBNAct`, :class:`Residual`, :class:`ConcatBlock`,
  :class:`SplitBlock`, :class:`DepthwiseSeparable`, :class:`GroupedConv`, :class:`SEGate`, :class:`Pool`,
  :class:`SharedConv`, :class:`GAPHead`, :class:`FlattenHead`, :class:`ConvToTokens`,
  :class:`SelfAttention`, :class:`AttentionBlock`, :class:`TokenHead`, :class:`MultiInputNet`). Each is
  built from explicit integers, accepts ``dtype=``, and is symbolically traceable by ``torch.fx``.
  Image blocks map ``(N, C, H, W) -> (N, C', H', W')``; token blocks map ``(N, L, E) -> (N, L, E')``.
* Hypothesis strategies: :func:`networks` (random compositions of the blocks plus example inputs),
  :func:`network_specs` / :func:`build_network` (the same, split into a printable, hashable description and a
  deterministic builder), :func:`keep_fractions` and :func:`selection_seeds`.

Example (runs as a doctest)::

    >>> import torch
    >>> from hypothesis import given, settings
    >>> from fxprune.testing.strategies import networks
    >>> @settings(max_examples=5, deadline=None)
    ... @given(networks(max_blocks=2, families={"conv", "residual", "split"}))
    ... def check(net_and_inputs):
    ...     model, inputs = net_and_inputs
    ...     gm = torch.fx.symbolic_trace(model)
    ...     with torch.no_grad():
    ...         torch.testing.assert_close(gm(*inputs), model(*inputs))
    >>> check()

Determinism: the weights, normalisation statistics and example inputs of a drawn network depend only on the
drawn data (a seed drawn by hypothesis feeds private ``torch.Generator`` objects); the global torch RNG is
neither used nor advanced.

Layout: :mod:`.seeding` (seeded initialisation), :mod:`.blocks` (image blocks and heads), :mod:`.tokens`
(token blocks and :class:`MultiInputNet`), :mod:`.specs` (specs and :func:`build_network`) and :mod:`.draw`
(the hypothesis strategies); this package re-exports their public names.
"""

from __future__ import annotations

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
    conv_out_size,
)
from .draw import (
    keep_fractions,
    network_specs,
    networks,
    selection_seeds,
)
from .seeding import init_params_, randomize_, randomize_bn
from .specs import (
    ALL_FAMILIES,
    BLOCKS,
    IMAGE_BODY_FAMILIES,
    BlockSpec,
    NetworkSpec,
    build_network,
)
from .tokens import (
    AttentionBlock,
    ConvToTokens,
    MultiInputNet,
    SelfAttention,
    TokenHead,
)

__all__ = [
    # seeded initialisation
    "randomize_",
    "randomize_bn",
    "init_params_",
    # blocks
    "ConvBNAct",
    "Residual",
    "ConcatBlock",
    "SplitBlock",
    "DepthwiseSeparable",
    "GroupedConv",
    "SEGate",
    "Pool",
    "SharedConv",
    "GAPHead",
    "FlattenHead",
    "ConvToTokens",
    "SelfAttention",
    "AttentionBlock",
    "TokenHead",
    "MultiInputNet",
    "BLOCKS",
    "conv_out_size",
    # specs and strategies
    "ALL_FAMILIES",
    "IMAGE_BODY_FAMILIES",
    "BlockSpec",
    "NetworkSpec",
    "build_network",
    "network_specs",
    "networks",
    "keep_fractions",
    "selection_seeds",
]
