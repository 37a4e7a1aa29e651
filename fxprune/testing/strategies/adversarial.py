"""Seeded generators for the model patterns an adversarial review found fxprune getting wrong, one family
per defect class, plus a free-form chain of the rule table's ops. Each :func:`adversarial_case` returns a
model (random, distinct weights), example inputs, and what a correct compile must do with it:

* ``"oracle"``: compile, then the pruned module must equal the original with the dropped inputs zeroed
  (:func:`fxprune.testing.independent.assert_pruned_like_original`, nothing taken from fxprune's analysis);
* ``"refuse"``: compile must raise :class:`~fxprune.errors.InputError` (what a graph cannot carry).

Compile with the defaults (``absorb=True``): random weights have no constant channels, except in
``gated_constant``, whose constant channels reach their only consumer through a per-sample gate, so nothing
may be folded there either and the oracle holds.

Families: ``root_hook``, ``size_arithmetic``, ``tied``, ``gated_constant``, ``grouped_transposed``,
``grouped_concat``, ``input_reshape``, ``op_chain``. :func:`adversarial_cases` is the hypothesis strategy.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .seeding import init_params_

__all__ = ["ADVERSARIAL_FAMILIES", "GroupedConcat", "adversarial_case", "adversarial_cases"]


class _SizeArithmetic(nn.Module):
    def __init__(self, c: int, mode: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 4, 1)
        self.mode = mode

    def forward(self, x):
        y = torch.relu(self.a(x))
        n = y.shape[1] if self.mode == 0 else y.size(1)
        return self.b(y * n ** -0.5 + y / (n + 1))


class _Tied(nn.Module):
    """An embedding that is also the output head; without the residual, the embedding's width and the head's
    input width are different groups, tied only through the shared tensor."""

    def __init__(self, v: int, e: int, h: int, residual: bool):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(v, e), nn.Linear(e, h), nn.Linear(h, e)
        self.out = nn.Linear(e, v, bias=False)
        self.out.weight = self.emb.weight
        self.residual = residual

    def forward(self, t):
        x = self.emb(t)
        y = self.head(torch.relu(self.mid(x)))
        return self.out(x + y if self.residual else y)


class _GatedConstant(nn.Module):
    """Channels with BN gamma = 0 (constant) scaled by a per-sample gate, then a conv."""

    def __init__(self, c: int, zero: int):
        super().__init__()
        self.c1, self.bn, self.fc, self.c2 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(3, c, 1), \
            nn.Conv2d(c, 4, 3, padding=1)
        self.zero = zero

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        return self.c2(y * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True))))


class GroupedConcat(nn.Module):
    """A grouped conv over the concat of two branches (its conv blocks may straddle the boundary)."""

    def __init__(self, ca: int, cb: int, g: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, ca, 1), nn.Conv2d(3, cb, 1)
        self.g, self.head = nn.Conv2d(ca + cb, 2 * g, 3, padding=1, groups=g), nn.Conv2d(2 * g, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.g(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))))


class _InputReshape(nn.Module):
    """Hand-written attention that reads ``n, l, e`` off its input and reshapes back to it."""

    def __init__(self, e: int, h: int):
        super().__init__()
        self.h, self.qkv, self.o = h, nn.Linear(e, 3 * e), nn.Linear(e, e)

    def forward(self, x):
        n, l, e = x.shape
        q, k, v = self.qkv(x).reshape(n, l, 3, self.h, e // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(n, l, e))


_CHAIN_OPS: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("relu", torch.relu), ("gelu", F.gelu), ("tanh", torch.tanh), ("neg", torch.neg), ("square", lambda y: y * y),
    ("scale", lambda y: y * 0.5 + 1.0), ("sigmoid_gate", lambda y: y * torch.sigmoid(y)),
    ("softmax_hw", lambda y: y.flatten(2).softmax(-1).view_as(y)), ("avgpool", lambda y: F.avg_pool2d(y, 1)),
    ("maxpool", lambda y: F.max_pool2d(y, 3, 1, 1)), ("clamp", lambda y: y.clamp(-1, 1)),
    ("transpose2", lambda y: y.transpose(2, 3).transpose(2, 3)), ("abs", torch.abs),
]


class _OpChain(nn.Module):
    """conv, a chain of element-wise/pooling/permuting ops (optionally a depthwise conv in it), conv, an
    optional residual, conv."""

    def __init__(self, c: int, ops: list[int], residual: bool, depthwise: bool):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.Conv2d(c, 4, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c) if depthwise else nn.Identity()
        self.ops, self.residual = ops, residual

    def forward(self, x):
        y = self.a(x)
        for k, i in enumerate(self.ops):
            y = _CHAIN_OPS[i][1](y)
            if k == 0:
                y = self.dw(y)
        z = self.b(y)
        return self.c(z + y if self.residual else z)


def _hooked(g: torch.Generator) -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    where = [model, model[0], model[2]][int(torch.randint(3, (1,), generator=g))]
    if int(torch.randint(2, (1,), generator=g)):
        where.register_forward_hook(lambda m, i, o: o * 2)
    else:
        where.register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    return model


def adversarial_case(family: str, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """``(model, example inputs, expectation)`` for ``family`` (see the module docstring), deterministic in
    ``seed``; the global RNG is not used."""
    g = torch.Generator().manual_seed(seed)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    img = torch.randn(2, 3, 6, 6, generator=g)
    if family == "root_hook":
        return _hooked(g), (torch.randn(3, 8, generator=g),), "refuse"
    if family == "size_arithmetic":
        model, xs, expect = _SizeArithmetic(2 * r(2, 6), r(0, 1)), (img,), "oracle"
    elif family == "tied":
        v, e = r(6, 12), 2 * r(2, 5)
        model, xs, expect = _Tied(v, e, 2 * r(2, 6), bool(seed % 2)), (torch.randint(0, v, (2, r(2, 6)), generator=g),), "oracle"
    elif family == "gated_constant":
        c = 2 * r(2, 5)
        model, xs, expect = _GatedConstant(c, r(1, c - 1)), (img,), "oracle"
    elif family == "grouped_transposed":
        grp = r(2, 3)
        cin, cout = grp * r(2, 4), grp * r(2, 4)
        model = nn.Sequential(nn.Conv2d(3, cin, 3), nn.ReLU(), nn.ConvTranspose2d(cin, cout, 3, groups=grp),
                              nn.ReLU(), nn.Conv2d(cout, 4, 1))
        xs, expect = (img,), "oracle"
    elif family == "grouped_concat":
        grp = r(2, 4)
        total = grp * r(2, 4)
        ca = r(1, total - 1)
        model, xs, expect = GroupedConcat(ca, total - ca, grp), (img,), "oracle"
    elif family == "input_reshape":
        h = r(2, 4)
        model, xs, expect = _InputReshape(h * 2 * r(1, 3), h), None, "oracle"
        xs = (torch.randn(2, r(2, 5), model.qkv.in_features, generator=g),)
    elif family == "op_chain":
        ops = [r(0, len(_CHAIN_OPS) - 1) for _ in range(r(1, 4))]
        model, xs, expect = _OpChain(2 * r(2, 6), ops, bool(r(0, 1)), bool(seed % 2)), (img,), "oracle"
    else:
        raise KeyError(f"unknown adversarial family {family!r}; known: {', '.join(ADVERSARIAL_FAMILIES)}")
    init_params_(model, seed)
    if family == "gated_constant":
        with torch.no_grad():
            model.bn.weight[: model.zero] = 0  # constant channels: relu(beta)
            model.bn.bias.abs_()
    return model.eval(), xs, expect


ADVERSARIAL_FAMILIES = ("root_hook", "size_arithmetic", "tied", "gated_constant", "grouped_transposed",
                        "grouped_concat", "input_reshape", "op_chain")


def adversarial_cases(families: tuple[str, ...] = ADVERSARIAL_FAMILIES) -> Any:
    """Hypothesis strategy of ``(family, seed)`` pairs; :func:`adversarial_case` builds the case (so a
    failure prints the two values that reproduce it)."""
    from hypothesis import strategies as st

    return st.tuples(st.sampled_from(families), st.integers(0, 2**31 - 1))
