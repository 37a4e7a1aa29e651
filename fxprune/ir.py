"""The data fxprune's passes exchange: spans, channel references, parameter slices, groups, selections.

Everything here is a frozen (hashable) dataclass. A *group* is a set of prunable *units* (channels,
neurons, heads) that must be removed together across every tensor they appear in. Each member of a
group (an activation dim or a parameter dim) maps the group's unit ``u`` (``0 <= u < group.size``) to
the positions it occupies along that dim through a :class:`Span` (or, for irregular layouts, an
:class:`Explicit` index table).

Span algebra: unit ``i`` of ``Span(start, size, stride, block, repeat, period)`` occupies positions
``start + r*period + i*stride + b`` for ``r < repeat`` and ``b < block``. It covers

* plain channels ``Span(0, C)``; a concat piece at offset ``o``: ``Span(o, C)``;
* flatten's C·H·W blocks: ``Span(0, C, stride=H*W, block=H*W)``; attention heads of width ``d``:
  ``Span(0, H, stride=d, block=d)``;
* a channel that is the inner factor of a flatten (``(L, C) -> L*C``): ``Span(0, C, repeat=L, period=C)``.

Invariant: a member's spans of distinct units never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

__all__ = [
    "Span",
    "Explicit",
    "IndexMap",
    "fit_index_map",
    "member_units",
    "merge_uniform",
    "ChannelRef",
    "ParamSlice",
    "Constraint",
    "ChannelGroup",
    "Selection",
]


@dataclass(frozen=True)
class Span:
    """Affine map from a group's units to positions along one dim (see the module docstring)."""

    start: int
    size: int
    stride: int = 1
    block: int = 1
    repeat: int = 1
    period: int = 0

    def __post_init__(self) -> None:
        if self.size < 0 or self.block < 1 or self.repeat < 1 or self.start < 0:
            raise ValueError(f"invalid span {self}")

    def indices(self) -> np.ndarray:
        """Positions as an int64 array of shape (size, repeat * block); row ``i`` belongs to unit ``i``."""
        i = np.arange(self.size, dtype=np.int64)[:, None, None] * self.stride
        r = np.arange(self.repeat, dtype=np.int64)[None, :, None] * self.period
        b = np.arange(self.block, dtype=np.int64)[None, None, :]
        return (self.start + i + r + b).reshape(self.size, self.repeat * self.block)

    @property
    def width(self) -> int:
        """Positions per unit."""
        return self.repeat * self.block

    def shifted(self, offset: int) -> "Span":
        return Span(self.start + offset, self.size, self.stride, self.block, self.repeat, self.period)

    def positions(self, units: np.ndarray | list[int] | None = None) -> np.ndarray:
        """Sorted positions of the given units (all units when None)."""
        idx = self.indices()
        if units is not None:
            idx = idx[np.asarray(units, dtype=np.int64)]
        return np.sort(idx.reshape(-1))

    def __str__(self) -> str:
        s = f"{self.start}+{self.size}"
        if self.stride != 1 or self.block != 1:
            s += f"x{self.stride}/{self.block}"
        if self.repeat != 1:
            s += f"r{self.repeat}@{self.period}"
        return s


@dataclass(frozen=True)
class Explicit:
    """Irregular unit→positions table (row ``u`` lists unit ``u``'s positions)."""

    table: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return len(self.table)

    @property
    def width(self) -> int:
        return len(self.table[0]) if self.table else 0

    def indices(self) -> np.ndarray:
        """(units, width) table; raises ValueError for ragged tables (use :meth:`positions`)."""
        if len({len(r) for r in self.table}) > 1:
            raise ValueError("ragged explicit index map has no rectangular table")
        return np.asarray(self.table, dtype=np.int64).reshape(len(self.table), -1)

    def positions(self, units: np.ndarray | list[int] | None = None) -> np.ndarray:
        rows = self.table if units is None else [self.table[int(u)] for u in units]
        flat = [v for row in rows for v in row]
        return np.sort(np.asarray(flat, dtype=np.int64))

    def __str__(self) -> str:
        return f"explicit[{self.size}x{self.width}]"


IndexMap = Union[Span, Explicit]


def member_units(member: "ChannelRef | ParamSlice") -> np.ndarray:
    """Group unit index of each row of ``member.span``."""
    if member.units is not None:
        return np.asarray(member.units, dtype=np.int64)
    return np.arange(member.span.size, dtype=np.int64)


def fit_index_map(table: np.ndarray) -> IndexMap:
    """Compress a (units, positions-per-unit) table into a :class:`Span` when one matches exactly.

    Rows are sorted first, so the order of positions within a unit does not matter.
    """
    t = np.sort(np.asarray(table, dtype=np.int64).reshape(table.shape[0], -1), axis=1)
    n, w = t.shape
    if n == 0 or w == 0:
        return Explicit(tuple(tuple(int(v) for v in row) for row in t))
    start = int(t[0, 0])
    stride = int(t[1, 0] - t[0, 0]) if n > 1 else 1
    row = t[0] - start
    # Within a unit: repeat blocks of consecutive positions, separated by `period`.
    block = 1
    while block < w and row[block] == block:
        block += 1
    candidates = []
    if w % block == 0:
        repeat = w // block
        period = int(row[block]) if repeat > 1 else 0
        candidates.append((block, repeat, period))
    for block, repeat, period in candidates:
        if start < 0 or (n > 1 and stride <= 0):
            continue
        try:
            span = Span(start, n, stride if n > 1 else 1, block, repeat, period)
        except ValueError:
            continue
        if np.array_equal(np.sort(span.indices(), axis=1), t):
            return span
    return Explicit(tuple(tuple(int(v) for v in row) for row in t))


@dataclass(frozen=True)
class ChannelRef:
    """Where a group's units live in one activation: ``node``'s output (``output`` index for tuple
    outputs, else None), dimension ``dim``, positions ``span``."""

    node: str
    dim: int
    span: IndexMap
    output: int | None = None
    units: tuple[int, ...] | None = None  # group units of span's rows; None = 0 .. span.size-1

    def __str__(self) -> str:
        out = f"[{self.output}]" if self.output is not None else ""
        return f"{self.node}{out}:d{self.dim}[{self.span}]"


@dataclass(frozen=True)
class ParamSlice:
    """A parameter or buffer dim that shrinks with a group.

    ``role`` is one of ``"out"`` (the producer's output channels: conv/linear weight dim 0, bias),
    ``"in"`` (a consumer's input channels: conv/linear weight dim 1), ``"norm"`` (per-channel affine
    parameters and running statistics of a normalisation), ``"other"`` (any other parameter, e.g. a
    learned positional embedding or a layer scale). ``groups > 1`` marks the input dim of a grouped
    convolution: the weight's dim 0 splits into ``groups`` blocks and unit ``u`` of group block ``q``
    lives at ``weight[q-th block rows, span position]``.
    """

    param: str
    dim: int
    span: IndexMap
    role: str
    groups: int = 1
    is_buffer: bool = False
    units: tuple[int, ...] | None = None  # group units of span's rows; None = 0 .. span.size-1

    def __str__(self) -> str:
        g = f" g{self.groups}" if self.groups > 1 else ""
        return f"{self.param}:d{self.dim}[{self.span}] ({self.role}{g})"


@dataclass(frozen=True)
class Constraint:
    """A rule the kept set of a group must satisfy.

    ``kind == "uniform"``: the units split into ``blocks`` equal contiguous blocks (grouped conv groups,
    GroupNorm groups) and every block keeps the same number of units. ``kind == "multiple"``: the kept
    count is a multiple of ``value`` (round_to, hardware widths).
    """

    kind: str
    value: int
    origin: str = ""
    blocks: tuple[tuple[int, ...], ...] = ()  # "uniform": the group's units in each block


@dataclass(frozen=True)
class ChannelGroup:
    """Units that are removed together, with every activation and parameter slice they appear in."""

    id: int
    size: int
    channels: tuple[ChannelRef, ...]
    params: tuple[ParamSlice, ...]
    constraints: tuple[Constraint, ...] = ()
    blocked: str = ""  # non-empty: why the group cannot be pruned
    lossy: str = ""  # non-empty: why pruning it is not exactly lossless
    root: str = ""  # human-readable name of the first producer (e.g. 'layer1.0.conv1')
    pinned: tuple[int, ...] = ()  # units that must stay (network outputs, constant indices...)
    pin_reason: str = ""

    @property
    def prunable(self) -> bool:
        return not self.blocked and self.size - len(self.pinned) > 0 and self.size > 1

    def modules(self) -> tuple[str, ...]:
        """Owner module names of the parameters in the group, in order of first appearance."""
        seen: dict[str, None] = {}
        for p in self.params:
            seen.setdefault(p.param.rpartition(".")[0], None)
        return tuple(seen)

    def describe(self) -> str:
        """Stable multi-line text (used for golden snapshots and ``fxprune inspect``)."""
        head = f"group {self.id}: {self.size} units, root {self.root or '-'}"
        if self.blocked:
            head += f", BLOCKED ({self.blocked})"
        if self.lossy:
            head += f", lossy ({self.lossy})"
        if self.pinned and not self.blocked:
            head += f", {len(self.pinned)} pinned ({self.pin_reason})"
        lines = [head]
        lines += [f"  constraint {c.kind}={c.value} {c.origin}".rstrip() for c in self.constraints]
        lines += [f"  param {p}" for p in self.params]
        lines += [f"  act   {c}" for c in self.channels]
        return "\n".join(lines)


@dataclass(frozen=True)
class Selection:
    """The units each group keeps: ``keep[group_id]`` is a sorted tuple of unit indices."""

    keep: tuple[tuple[int, tuple[int, ...]], ...] = field(default=())

    @staticmethod
    def from_dict(keep: dict[int, list[int] | tuple[int, ...] | np.ndarray]) -> "Selection":
        return Selection(tuple(sorted((int(g), tuple(sorted(int(u) for u in k))) for g, k in keep.items())))

    def as_dict(self) -> dict[int, tuple[int, ...]]:
        return dict(self.keep)

    def kept(self, group: ChannelGroup) -> tuple[int, ...]:
        return self.as_dict().get(group.id, tuple(range(group.size)))


def merge_uniform(cs: list[Constraint]) -> tuple[Constraint, ...] | str:
    """Keep the finest uniform partition if every other one is a coarsening of it."""
    uni = [c for c in cs if c.kind == "uniform"]
    rest = tuple(c for c in cs if c.kind != "uniform")
    if len(uni) <= 1:
        return tuple(uni) + rest
    uni.sort(key=lambda c: -c.value)
    fine = uni[0]
    owner = {u: i for i, b in enumerate(fine.blocks) for u in b}
    for c in uni[1:]:
        for b in c.blocks:
            fine_blocks = {owner.get(u) for u in b}
            sizes = {len(fine.blocks[i]) for i in fine_blocks if i is not None}
            covered = sum(len(fine.blocks[i]) for i in fine_blocks if i is not None)
            if None in fine_blocks or covered != len(b) or len(sizes) > 1:
                return f"incompatible group constraints {fine.origin} / {c.origin}"
    return (fine,) + rest
