#!/usr/bin/env python
"""Write your own passes and compose them into declarative pipelines.

* ``TaylorImportance``: a user importance criterion, a frozen dataclass subclassing
  ``fxprune.ImportancePass``. It scores each unit (channel / neuron) of each group by the first-order
  Taylor estimate of the loss change when the unit is removed, |sum of w * dL/dw over every parameter
  slice the unit owns| (Molchanov et al., 2019), from gradients on a few calibration batches.
* ``group_summary``: a function pass (``@fxprune.graph_pass``) that prints the channel groups.

Both run in pipelines given as a list of pass objects and as a string spec (after
``fxprune.register_pass``); a malformed pipeline is rejected before anything runs.

    python examples/custom_pass.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.passes.importance import slice_values  # (units, values) of a parameter slice

# -------------------------------------------------------------------------------------------------
# a user importance pass
# -------------------------------------------------------------------------------------------------

_GRADS = "taylor.grads"  # our key in ctx.extras (free-form storage shared by the passes of one compile)


@dataclass(frozen=True)
class TaylorImportance(fxprune.ImportancePass):
    """First-order Taylor importance from calibration batches (Molchanov et al., 2019).

    Removing unit u zeroes every parameter slice it owns; to first order the loss changes by
    ``sum over those slices of w * dL/dw``. The score is that sum squared, averaged over batches.

    ``ImportancePass.run`` calls :meth:`scores` once per prunable group; ``run`` is overridden only to
    compute the gradients once, on the graph being pruned, before that loop.
    """

    name: ClassVar[str] = "taylor"  # reads ("groups",) and writes ("importance",): inherited
    batches: tuple = field(default=(), compare=False, repr=False)  # ((x, y), ...) calibration data
    roles: tuple[str, ...] = ("out", "in", "norm")  # which parameter slices of a unit count
    normalize: str | None = None  # per-group normalisation ("mean", ...), e.g. for global ranking

    def run(self, gm, ctx):
        if not self.batches:
            raise fxprune.ConfigError("TaylorImportance needs calibration batches")
        names, params = zip(*[(n, p) for n, p in gm.named_parameters() if p.requires_grad])
        grads = []
        for xb, yb in self.batches:  # gm is the traced copy, in eval mode: BN uses its running stats
            loss = F.cross_entropy(gm(xb), yb)
            # autograd.grad: nothing is written to .grad, the graph module stays clean
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append({n: g for n, g in zip(names, gs) if g is not None})
        ctx.extras[_GRADS] = grads
        try:
            return super().run(gm, ctx)
        finally:
            del ctx.extras[_GRADS]

    def scores(self, group: fxprune.ChannelGroup, tensor, ctx: fxprune.Context):
        total = np.zeros(group.size)
        used = False
        for grads in ctx.extras[_GRADS]:
            s = np.zeros(group.size)
            for ps in group.params:  # every parameter slice that shrinks with this group's units
                if ps.role not in self.roles or ps.is_buffer or ps.param not in grads:
                    continue
                units, vals = slice_values(tensor(ps.param) * grads[ps.param], ps)
                if isinstance(vals, list):  # irregular layouts come back as one flat tensor per unit
                    vals = torch.stack([v.sum() for v in vals])[:, None]
                s[units] += vals.sum(1).double().numpy()
                used = True
            total += s**2
        return total / len(ctx.extras[_GRADS]) if used else None  # None: no opinion, group kept whole


# -------------------------------------------------------------------------------------------------
# a function pass
# -------------------------------------------------------------------------------------------------


@fxprune.graph_pass(name="group_summary", reads=("groups",))
def group_summary(gm, ctx):
    """Print the channel groups found by the ``group`` pass (reads the ``groups`` meta key)."""
    analysis = fxprune.meta.get(gm, "groups")
    print(f"  [group_summary] {len(analysis.groups)} groups, {len(analysis.prunable)} prunable:")
    for g in analysis.groups:
        state = "prunable" if g.prunable else f"kept ({g.blocked or g.pin_reason})"
        print(f"    #{g.id:<2} {g.size:>3} units  root {g.root:<6} {len(g.params):>2} param slices, "
              f"{len(g.channels):>2} activations  -> {state}")
    return fxprune.PassResult(gm, False, {"groups": len(analysis.groups)})  # returning None is fine too


# -------------------------------------------------------------------------------------------------
# a model worth pruning: a small CNN trained on scikit-learn's 8x8 digits (bundled, no download)
# -------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = (X[perm] - 0.3) / 0.4, y[perm]
    return X[:1400], y[:1400], X[1400:], y[1400:]


def train(model: nn.Module, x, y, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def overlap(a: fxprune.Selection, b: fxprune.Selection) -> float:
    ka, kb = a.as_dict(), b.as_dict()
    common = sum(len(set(ka[g]) & set(kb.get(g, ()))) for g in ka)
    return common / max(sum(len(k) for k in ka.values()), 1)


def banner(text: str) -> None:
    print(f"\n{'=' * 90}\n{text}\n{'=' * 90}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="custom passes and pipelines")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer training epochs")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model: one thread is fast and unaffected by other processes on the cores

    x_train, y_train, x_test, y_test = digits(0)
    model = SmallCNN()
    train(model, x_train, y_train, 2 if args.quick else args.epochs)
    print(f"SmallCNN on sklearn digits: test accuracy {accuracy(model, x_test, y_test):.2%}")
    example = x_test[:8]
    calib = tuple((x_train[i : i + 32], y_train[i : i + 32]) for i in range(0, 256, 32))

    # -- 1. a pipeline as a list of pass objects ----------------------------------------------------
    banner("1. pipeline = list of pass objects (with the user's TaylorImportance and group_summary)")
    pipeline = [
        fxprune.GroupChannels(),
        group_summary,
        TaylorImportance(batches=calib),
        fxprune.Select(ratio=args.ratio),
        fxprune.Rewrite(),
        fxprune.Verify(equivalence=True),
    ]
    res_taylor = fxprune.compile(model, example, pipeline=pipeline)
    print(res_taylor.report)
    print("pass log:", ", ".join(f"{name} {dt * 1000:.0f}ms" for name, _, dt in res_taylor.context.log))

    # -- 2. the same kind of pipeline as a string spec (built-in passes) ----------------------------
    spec = f"group | importance(criterion='l1') | select(ratio={args.ratio}) | rewrite | verify(equivalence=True)"
    banner(f'2. pipeline = "{spec}"')
    res_l1 = fxprune.compile(model, example, pipeline=spec)
    print(res_l1.report.table())
    print(f"parsed as: {res_l1.pipeline}")

    # -- 3. user passes in string specs: register them by name -------------------------------------
    fxprune.register_pass("group_summary", lambda: group_summary)
    fxprune.register_pass("taylor", lambda **opts: TaylorImportance(batches=calib, **opts))
    spec = f"group | group_summary | taylor | select(ratio={args.ratio}) | rewrite | verify(equivalence=True)"
    banner(f'3. after fxprune.register_pass: "{spec}"')
    res_taylor2 = fxprune.compile(model, example, pipeline=spec)
    same = res_taylor2.selection == res_taylor.selection
    print(f"same channels kept as the list-of-objects pipeline: {same}")
    assert same

    # how much do the criteria agree? (fraction of the kept units that both keep)
    res_rand = fxprune.compile(model, example, importance="random", ratio=args.ratio)
    print("\nagreement with the Taylor selection (kept units in common), and accuracy without fine-tuning:")
    print(f"  {'original':<20} {'':>9}  accuracy {accuracy(model, x_test, y_test):.2%}")
    for label, res in (("taylor (user pass)", res_taylor), ("l1 (built-in)", res_l1), ("random (built-in)", res_rand)):
        print(f"  {label:<20} {overlap(res_taylor.selection, res.selection):>8.0%}   accuracy "
              f"{accuracy(res.module, x_test, y_test):.2%}")
    # One-shot scores of a converged model are noisy: whichever criterion you pick, fine-tune the result
    # (res.module is an ordinary trainable module; see examples/mnist_demo.py).

    # -- 4. malformed pipelines are rejected before anything runs ----------------------------------
    banner("4. a malformed pipeline: select before importance")
    bad = f"group | group_summary | select(ratio={args.ratio}) | importance(criterion='l1') | rewrite"
    try:
        fxprune.compile(model, example, pipeline=bad)  # group_summary would print if anything ran
    except fxprune.PipelineError as err:
        print(f"fxprune.PipelineError (raised before any pass ran): {err}")
    else:
        raise AssertionError("expected a PipelineError")
    try:
        fxprune.compile(model, example, pipeline="group | importance(criterion='l1') | selct(ratio=0.3)")
    except fxprune.PipelineError as err:
        print(f"fxprune.PipelineError: {err}")
    else:
        raise AssertionError("expected a PipelineError")

    print("\ncustom passes: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
