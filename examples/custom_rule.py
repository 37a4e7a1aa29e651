#!/usr/bin/env python
"""Teach fxprune about your own ops: a module rule and a function rule.

fxprune never guesses how an op it does not know ties channels. This script walks through what a user
sees with a model containing two custom ops, and how one short rule per op fixes it:

* ``ChannelScale(C)``: a learned per-channel scale (like LayerScale), ``x * weight.view(1, -1, 1, 1)``,
  whose ``forward`` validates its input with Python control flow (so torch.fx cannot trace *into* it);
* ``soft_clip(x, limit)``: a plain function wrapped with ``torch.fx.wrap`` (think "custom kernel"),
  so it stays one opaque ``call_function`` node in the graph.

Steps:
  1. plain compile: tracing fails inside ChannelScale, and the error says how to fix it;
  2. ``leaf_modules=[ChannelScale]``: the module is one node, but there is no rule for it ->
     ``fxprune.UnsupportedOpError`` naming the node, the source line and the fix;
  3. ``unknown_ops="block"``: compile anyway; every group touching an unknown op is kept whole, and the
     report says which and why;
  4. register ``ChannelScaleRule`` and ``SoftClipRule``: everything prunes, the module's size attribute
     is updated, and ``fxprune.testing.assert_prune_equivalent`` checks the rules against the masked
     reference.

    python examples/custom_rule.py
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.testing import assert_prune_equivalent

# -------------------------------------------------------------------------------------------------
# the user's custom ops
# -------------------------------------------------------------------------------------------------


class ChannelScale(nn.Module):
    """Learned per-channel scale: ``y[:, c] = x[:, c] * weight[c]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels  # a size attribute: must follow the weight when channels are removed
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        # Input validation is Python control flow on the input: torch.fx cannot trace through it.
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ChannelScale({self.channels}) got input of shape {tuple(x.shape)}")
        return x * self.weight.view(1, -1, 1, 1)


@torch.fx.wrap  # keep calls to this function as single graph nodes (e.g. it calls a custom kernel)
def soft_clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Smoothly clip activations to (-limit, limit), element by element."""
    return limit * torch.tanh(x / limit)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.scale1 = ChannelScale(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.scale2 = ChannelScale(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.scale1(F.relu(self.bn1(self.conv1(x))))
        x = soft_clip(self.scale2(self.conv2(x)), 3.0)
        x = F.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


# -------------------------------------------------------------------------------------------------
# the rules
# -------------------------------------------------------------------------------------------------


class ChannelScaleRule(fxprune.Rule):
    """``y = x * weight.view(1, -1, 1, 1)``: channel c of x, of y and weight[c] are one unit."""

    name = "channel_scale"

    def analyze(self, node, rc: fxprune.RuleContext) -> None:
        x = rc.arg(0, "x")  # the fx node feeding the module (positional arg 0, or keyword "x")
        # the channel dim: input dim 1 == output dim 1 == the parameter's dim 0. Role "norm" marks a
        # per-channel affine parameter (magnitude criteria count it, it is sliced with the channels).
        channels = rc.act(x, 1)
        rc.tie(channels, rc.out(1))
        rc.tie(channels, rc.param(f"{rc.module_name}.weight", 0, "norm"))
        # batch and spatial dims pass straight through (any dim a rule leaves unmentioned is pinned:
        # forgetting one makes pruning more conservative, never wrong)
        for d in (0, 2, 3):
            rc.tie(rc.act(x, d), rc.out(d))

    def fix_attributes(self, module: ChannelScale) -> None:
        # the default rewrite_module already sliced every parameter along its tied dims; sizes stored as
        # plain attributes are the rule's job (here forward() checks them!)
        module.channels = module.weight.shape[0]


class SoftClipRule(fxprune.Rule):
    """An element-wise function: every output dim is the same-position input dim."""

    name = "soft_clip"

    def analyze(self, node, rc: fxprune.RuleContext) -> None:
        rc.tie_same_shape(rc.arg(0, "x"))  # ``limit`` is a Python float: nothing to tie


# -------------------------------------------------------------------------------------------------


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="custom rules for fxprune")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="accepted for uniformity with the other examples")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 16, 16)

    banner("1. no rule, symbolic tracing only: ChannelScale.forward has Python control flow on the input")
    try:  # frontend="fx": the default "auto" would fall back to torch.export and capture it as ATen ops
        fxprune.compile(net, x, ratio=args.ratio, frontend="fx")
    except fxprune.TraceError as err:
        print(f"fxprune.TraceError: {err}")
    else:
        raise AssertionError("expected a TraceError")

    banner("2. leaf_modules=[ChannelScale], still no rule: fxprune refuses to guess")
    try:
        fxprune.compile(net, x, ratio=args.ratio, leaf_modules=[ChannelScale])
    except fxprune.UnsupportedOpError as err:
        print(f"fxprune.UnsupportedOpError: {err}")
        print(f"\n  err.node = {err.node.name!r}, err.op_key = {err.op_key!r}")
        assert err.node.name == "scale1" and "register_module_rule" in err.fix
    else:
        raise AssertionError("expected an UnsupportedOpError")

    banner("3. unknown_ops='block': unknown ops keep every channel they touch, and the report says why")
    res = fxprune.compile(net, x, ratio=args.ratio, leaf_modules=[ChannelScale], unknown_ops="block")
    print(res.report)  # "groups kept whole" lists each blocked group with its first reason
    # every op that caused a block is also listed in the notes (conv2's group is blocked by both scale2
    # and soft_clip; the report shows one reason per group)
    assert any("ChannelScale" in why for _, why in res.report.blocked)
    assert any("soft_clip" in note for note in res.report.notes)
    print(f"\nstill pruned: {[r.name for r in res.report.layers if r.before != r.after]}")

    banner("4. register the rules: ChannelScale becomes a leaf automatically, soft_clip gets a rule")
    # Registered globally, in fxprune.RULES (the normal way for a library that defines custom ops: do it
    # at import time, next to the op). fxprune.compile(..., rules=table) also accepts a private
    # fxprune.RuleTable, but in this version a private table is only consulted for tracing and grouping,
    # not by the Rewrite pass (which always uses the global table), so a module whose rule lives only in a
    # private table is not shrunk; hence the global registration here.
    fxprune.register_module_rule(ChannelScale, ChannelScaleRule())
    fxprune.register_function_rule(soft_clip, SoftClipRule())

    res = fxprune.compile(net, x, ratio=args.ratio, verify="equivalence")
    print(res.report)
    assert not res.report.blocked or all("network output" in why for _, why in res.report.blocked)
    pruned = res.module
    for name in ("scale1", "scale2"):
        before, after = net.get_submodule(name), pruned.get_submodule(name)
        print(f"{name}: ChannelScale({before.channels}) -> ChannelScale({after.channels}), "
              f"weight {tuple(before.weight.shape)} -> {tuple(after.weight.shape)}")
        assert after.channels == after.weight.shape[0] < before.channels
    y = pruned(torch.randn(5, 3, 16, 16))  # forward() validates the input against .channels
    print(f"pruned module runs: output {tuple(y.shape)}")

    # The oracle: prune with random (constraint-respecting) selections and compare, in float64, against
    # the original with the removed channels' consumer weights zeroed. A wrong tie fails here.
    for seed in range(3 if args.quick else 10):
        assert_prune_equivalent(net, x, seed=seed)
    print(f"assert_prune_equivalent: OK on {3 if args.quick else 10} random selections")
    print("\ncustom rules: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
