"""Hypothesis strategies for random networks: :func:`networks`, :func:`network_specs`,
:func:`keep_fractions` and :func:`selection_seeds`, with the private drawing helpers behind them.

``hypothesis`` is optional: without it this module still imports, and the strategies raise ``ImportError``
when called.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import conv_out_size
from .specs import (
    ALL_FAMILIES,
    IMAGE_BODY_FAMILIES,
    BlockSpec,
    NetworkSpec,
    build_network,
)

try:  # hypothesis is only needed for the strategies, not for the blocks or randomize_.
    from hypothesis import strategies as st
    from hypothesis.strategies import SearchStrategy
except ImportError:  # pragma: no cover - exercised only without the test extra
    st = None  # type: ignore[assignment]
    SearchStrategy = Any  # type: ignore[assignment,misc]

__all__ = ["keep_fractions", "network_specs", "networks", "selection_seeds"]

_MIN_W, _MAX_W = 2, 12


def _require_hypothesis() -> None:
    if st is None:  # pragma: no cover
        raise ImportError("fxprune.testing.strategies needs hypothesis (pip install 'fxprune[test]')")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _widths() -> SearchStrategy[int]:
    return st.integers(_MIN_W, _MAX_W)


def _draw_stride(draw: Any, h: int, w: int) -> int:
    return draw(st.sampled_from([1, 2])) if min(h, w) >= 4 else 1


def _draw_composition(draw: Any, total: int, parts: int) -> list[int]:
    """``parts`` positive ints summing to ``total``."""
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


def _draw_image_block(draw: Any, fam: str, c: int, h: int, w: int) -> tuple[BlockSpec, int, int, int]:
    """Draw one body block of family ``fam`` for input ``(c, h, w)``; return it and the output ``(c, h, w)``."""
    if fam == "conv":
        out = draw(_widths())
        k = draw(st.sampled_from([3, 1]))
        stride = _draw_stride(draw, h, w)
        dilation = draw(st.sampled_from([1, 2])) if k == 3 else 1
        spec = BlockSpec.of("ConvBNAct", in_channels=c, out_channels=out, kernel_size=k, stride=stride,
                            dilation=dilation, bias=draw(st.booleans()),
                            norm=draw(st.sampled_from(["bn", "none"])),
                            act=draw(st.sampled_from(["relu", "silu", "none"])))
        return spec, out, -(-h // stride), -(-w // stride)
    if fam == "residual":
        stride = _draw_stride(draw, h, w)
        out = c if draw(st.booleans()) else draw(_widths())
        mid = draw(st.one_of(st.none(), _widths()))
        spec = BlockSpec.of("Residual", in_channels=c, out_channels=out, stride=stride, mid_channels=mid)
        return spec, out, -(-h // stride), -(-w // stride)
    if fam == "concat":
        a = draw(_widths())
        b = draw(st.integers(_MIN_W, _MAX_W - 1))
        b = b + 1 if b >= a else b  # two branches of different widths
        out = draw(_widths())
        spec = BlockSpec.of("ConcatBlock", in_channels=c, branch_channels=(a, b), out_channels=out,
                            include_input=draw(st.booleans()))
        return spec, out, h, w
    if fam == "split":
        chunk_options = [k for k in (2, 3, 4) if c % k == 0]
        use_chunk = bool(chunk_options) and draw(st.booleans())
        merge = draw(st.sampled_from(["cat", "add"]))
        if use_chunk:
            chunks = draw(st.sampled_from(chunk_options))
            n, kw = chunks, {"chunks": chunks}
        else:
            n = draw(st.integers(2, min(3, c)))
            kw = {"split_sizes": tuple(_draw_composition(draw, c, n))}
        if merge == "add":
            branch = (draw(_widths()),) * n
        else:
            branch = tuple(draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)))
        spec = BlockSpec.of("SplitBlock", in_channels=c, branch_channels=branch, **kw, merge=merge,
                            kernel_size=draw(st.sampled_from([3, 1])))
        out = sum(branch) if merge == "cat" else branch[0]
        return spec, out, h, w
    if fam == "depthwise":
        stride = _draw_stride(draw, h, w)
        out = draw(_widths())
        spec = BlockSpec.of("DepthwiseSeparable", in_channels=c, out_channels=out, stride=stride,
                            depth_multiplier=draw(st.sampled_from([1, 2])), kernel_size=draw(st.sampled_from([3, 5])))
        return spec, out, -(-h // stride), -(-w // stride)
    if fam == "grouped":
        g = draw(st.sampled_from([d for d in _divisors(c) if d > 1]))
        out = g * draw(st.integers(1, max(1, _MAX_W // g)))
        stride = _draw_stride(draw, h, w)
        spec = BlockSpec.of("GroupedConv", in_channels=c, out_channels=out, groups=g,
                            kernel_size=draw(st.sampled_from([3, 1])), stride=stride)
        return spec, out, -(-h // stride), -(-w // stride)
    if fam == "se":
        spec = BlockSpec.of("SEGate", channels=c, reduced_channels=draw(st.integers(1, max(1, c))),
                            style=draw(st.sampled_from(["conv", "linear"])))
        return spec, c, h, w
    if fam == "pool":
        options = ["adaptive_avg"] + (["max", "avg"] if min(h, w) >= 2 else [])
        kind = draw(st.sampled_from(options))
        functional = draw(st.booleans())
        if kind == "adaptive_avg":
            oh = draw(st.integers(max(1, h // 2), h))
            ow = draw(st.integers(max(1, w // 2), w))
            spec = BlockSpec.of("Pool", kind=kind, output_size=(oh, ow), functional=functional)
            return spec, c, oh, ow
        k, s, p = draw(st.sampled_from([(2, 2, 0), (3, 2, 1), (3, 1, 1)]))
        spec = BlockSpec.of("Pool", kind=kind, kernel_size=k, stride=s, padding=p, functional=functional)
        return spec, c, conv_out_size(h, k, s, p), conv_out_size(w, k, s, p)
    if fam == "shared":
        spec = BlockSpec.of("SharedConv", channels=c, kernel_size=draw(st.sampled_from([3, 1])),
                            repeats=draw(st.integers(2, 3)), norm=draw(st.sampled_from(["bn", "none"])))
        return spec, c, h, w
    raise ValueError(f"not an image body family: {fam!r}")


def _draw_attention_block(draw: Any, e: int, seq_len: int) -> BlockSpec:
    kind = draw(st.sampled_from(["mha", "sdpa"]))
    mlp_hidden = draw(st.one_of(st.none(), st.integers(2, 16)))
    norm_first = draw(st.booleans())
    if kind == "mha":
        heads = draw(st.sampled_from(_divisors(e)))
        return BlockSpec.of("AttentionBlock", embed_dim=e, num_heads=heads, attention="mha",
                            mlp_hidden=mlp_hidden, norm_first=norm_first)
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 4))
    literal_len = draw(st.booleans())
    return BlockSpec.of("AttentionBlock", embed_dim=e, num_heads=heads, head_dim=head_dim, attention="sdpa",
                        mlp_hidden=mlp_hidden, norm_first=norm_first, seq_len=seq_len if literal_len else None)


def _draw_image_head(draw: Any, families: frozenset[str], c: int, h: int, w: int, num_classes: int,
                     used: set[str]) -> BlockSpec:
    flatten_only = not (families & IMAGE_BODY_FAMILIES) and "multi_io" not in families
    if "flatten_linear" in families and (flatten_only or draw(st.booleans())):
        used.add("flatten_linear")
        return BlockSpec.of("FlattenHead", in_channels=c, height=h, width=w,
                            hidden_features=draw(st.integers(2, 12)), num_classes=num_classes)
    return BlockSpec.of("GAPHead", in_channels=c, num_classes=num_classes)


if st is not None:

    @st.composite
    def _network_specs(draw: Any, max_blocks: int, families: frozenset[str], dtype: torch.dtype,
                       batch_size: int) -> NetworkSpec:
        body_fams = sorted(families & IMAGE_BODY_FAMILIES)
        kinds = []
        if body_fams or "flatten_linear" in families:
            kinds.append("image")
        if "multi_io" in families:
            kinds.append("multi_io")
        if "attention" in families:
            kinds += ["tokens", "image_tokens"]
        kind = draw(st.sampled_from(kinds))
        seed = draw(st.integers(0, 2**32 - 1))
        num_classes = draw(st.integers(2, 6))
        used: set[str] = set()
        layers: list[BlockSpec] = []

        if kind == "tokens":
            seq_len = draw(st.integers(4, 8))
            e_in = draw(_widths())
            shapes: tuple[tuple[int, ...], ...] = ((batch_size, seq_len, e_in),)
            e = e_in
            if draw(st.booleans()):
                e = draw(_widths())
                layers.append(BlockSpec.of("Linear", in_features=e_in, out_features=e))
            for _ in range(draw(st.integers(1, max_blocks))):
                layers.append(_draw_attention_block(draw, e, seq_len))
            used.add("attention")
            head = BlockSpec.of("TokenHead", embed_dim=e, num_classes=num_classes)
            return NetworkSpec("tokens", shapes, tuple(layers), head, num_classes, seed, dtype,
                               families=frozenset(used))

        h = draw(st.integers(8, 16))
        w = draw(st.integers(8, 16))
        stems: tuple[BlockSpec, ...] = ()
        merge = None
        if kind == "multi_io":
            ca, cb = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            merge = draw(st.sampled_from(["cat", "add"]))
            wa = draw(_widths())
            wb = wa if merge == "add" else draw(_widths())
            stems = (BlockSpec.of("ConvBNAct", in_channels=ca, out_channels=wa),
                     BlockSpec.of("ConvBNAct", in_channels=cb, out_channels=wb))
            shapes = ((batch_size, ca, h, w), (batch_size, cb, h, w))
            c = wa + wb if merge == "cat" else wa
            used.add("multi_io")
        else:
            c_in = draw(st.integers(1, 4))
            c = draw(_widths())
            shapes = ((batch_size, c_in, h, w),)
            layers.append(BlockSpec.of("ConvBNAct", in_channels=c_in, out_channels=c))

        n_body = 0
        if body_fams:
            if kind == "image_tokens":
                n_body = draw(st.integers(0, max_blocks - 1))
            else:
                n_body = draw(st.integers(1, max_blocks))
            for _ in range(n_body):
                fam = draw(st.sampled_from(body_fams))
                spec, c, h, w = _draw_image_block(draw, fam, c, h, w)
                layers.append(spec)
                used.add(fam)

        if kind == "image_tokens":
            layers.append(BlockSpec.of("ConvToTokens"))
            seq_len, e = h * w, c
            if draw(st.booleans()):
                e = draw(_widths())
                layers.append(BlockSpec.of("Linear", in_features=c, out_features=e))
            n_att = draw(st.integers(1, max(1, max_blocks - n_body)))
            for _ in range(n_att):
                layers.append(_draw_attention_block(draw, e, seq_len))
            used.add("attention")
            head = BlockSpec.of("TokenHead", embed_dim=e, num_classes=num_classes)
            return NetworkSpec("tokens", shapes, tuple(layers), head, num_classes, seed, dtype,
                               families=frozenset(used))

        head = _draw_image_head(draw, families, c, h, w, num_classes, used)
        return NetworkSpec("multi_io" if kind == "multi_io" else "image", shapes, tuple(layers), head,
                           num_classes, seed, dtype, stems=stems, merge=merge, families=frozenset(used))


def _check_args(max_blocks: int, families: Iterable[str], batch_size: int) -> frozenset[str]:
    if isinstance(families, str):
        families = {families}
    fams = frozenset(families)
    unknown = fams - ALL_FAMILIES
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {sorted(ALL_FAMILIES)}")
    if not fams:
        raise ValueError("families must not be empty")
    if not isinstance(max_blocks, int) or max_blocks < 1:
        raise ValueError(f"max_blocks must be a positive int, got {max_blocks!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return fams


def network_specs(
    max_blocks: int = 4,
    families: Iterable[str] = ALL_FAMILIES,
    dtype: torch.dtype = torch.float64,
    *,
    batch_size: int = 2,
) -> SearchStrategy[NetworkSpec]:
    """Strategy for :class:`NetworkSpec` descriptions (see :func:`networks`, which builds them).

    Specs are hashable and print as constructor calls, which makes failing examples easy to read and to
    rebuild with :func:`build_network`.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, deadline=None)
    ... @given(network_specs(max_blocks=2, families={"attention"}))
    ... def check(spec):
    ...     model, inputs = build_network(spec)
    ...     assert model(*inputs).shape == (2, spec.num_classes)
    >>> check()
    """
    _require_hypothesis()
    fams = _check_args(max_blocks, families, batch_size)
    return _network_specs(max_blocks, fams, dtype, batch_size)


def networks(
    max_blocks: int = 4,
    families: Iterable[str] = ALL_FAMILIES,
    dtype: torch.dtype = torch.float64,
    *,
    batch_size: int = 2,
) -> SearchStrategy[tuple[nn.Module, tuple[Tensor, ...]]]:
    """Strategy for ``(model, example_inputs)``: a random, ``torch.fx.symbolic_trace``-able network.

    The network is a sequential composition of up to ``max_blocks`` body blocks whose families are drawn from
    ``families`` (a subset of :data:`ALL_FAMILIES`):

    * image body blocks: ``"conv"`` (:class:`ConvBNAct`: 1x1/3x3, stride 1/2, dilation, bias, BN or none),
      ``"residual"`` (:class:`Residual`, identity or projection shortcut), ``"concat"`` (:class:`ConcatBlock`),
      ``"split"`` (:class:`SplitBlock`: ``torch.split`` with literal sizes or ``chunk``; cat or add),
      ``"depthwise"`` (:class:`DepthwiseSeparable`), ``"grouped"`` (:class:`GroupedConv`), ``"se"``
      (:class:`SEGate`), ``"pool"`` (:class:`Pool`), ``"shared"`` (:class:`SharedConv`);
    * heads and topologies: ``"flatten_linear"`` (:class:`FlattenHead`, literal ``C*H*W``; otherwise
      :class:`GAPHead`), ``"attention"`` (token networks with :class:`AttentionBlock` s on an ``(N, L, E)``
      input with ``L`` in 4..8, or after a conv stem + :class:`ConvToTokens`), ``"multi_io"``
      (:class:`MultiInputNet`: two image inputs, returns ``(logits, features)``).

    Image networks always start with a :class:`ConvBNAct` stem (1..4 input channels) and end with a head;
    widths are drawn from 2..12 (respecting divisibility for grouped / depthwise / chunk); inputs are
    ``(batch_size, C, H, W)`` with ``H, W`` in 8..16. The model is in eval mode, in ``dtype``, with seeded
    weights (:func:`init_params_`) and norm statistics (:func:`randomize_`); its weights and the inputs depend
    only on the drawn data. ``model.fxprune_spec`` holds the :class:`NetworkSpec` it was built from.

    >>> import torch
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None)
    ... @given(networks(max_blocks=3, families={"grouped", "depthwise", "se", "flatten_linear"}))
    ... def check(net_and_inputs):
    ...     model, inputs = net_and_inputs
    ...     gm = torch.fx.symbolic_trace(model)
    ...     with torch.no_grad():
    ...         out = gm(*inputs)
    ...     assert torch.isfinite(out).all()
    >>> check()
    """
    return network_specs(max_blocks, families, dtype, batch_size=batch_size).map(build_network)


def keep_fractions(min_value: float = 0.0, max_value: float = 1.0) -> SearchStrategy[float]:
    """Strategy for a pruning ratio: a finite float in ``[min_value, max_value)`` (default ``[0, 1)``).

    >>> from hypothesis import given
    >>> @given(keep_fractions())
    ... def check(r):
    ...     assert 0.0 <= r < 1.0
    >>> check()
    """
    _require_hypothesis()
    if not 0.0 <= min_value < max_value <= 1.0:
        raise ValueError("need 0 <= min_value < max_value <= 1")
    return st.floats(min_value, max_value, exclude_max=True, allow_nan=False, allow_infinity=False)


def selection_seeds() -> SearchStrategy[int]:
    """Strategy for integer seeds (``0 .. 2**32 - 1``) for random channel selections.

    >>> from hypothesis import given
    >>> @given(selection_seeds())
    ... def check(s):
    ...     assert 0 <= s < 2**32
    >>> check()
    """
    _require_hypothesis()
    return st.integers(0, 2**32 - 1)
