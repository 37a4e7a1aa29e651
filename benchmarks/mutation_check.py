"""Mutation check: inject known bugs into fxprune's rules and rewrite, one at a time, and show the fuzz suite
(benchmarks/fuzz.py: the adversarial families on both front ends plus random block compositions, checked by
the independent oracle) catches every one.

A mutant is *caught* when at least one example fails (the oracle sees a different function, a refusal is
missing, tied tensors come apart, or the compile raises); the unmutated baseline must have no failure.

    python benchmarks/mutation_check.py                 # every mutant, 160 examples each
    python benchmarks/mutation_check.py --examples 400 --only off_by_one_slice,wrong_weight_dim
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import torch

import fxprune.passes.rewrite as rewrite_mod
import fxprune.rules.axes as axes_mod
import fxprune.rules.base as base_mod
import fxprune.rules.conv as conv_mod
import fxprune.rules.linear as linear_mod
import fxprune.api as api_mod

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import fuzz  # noqa: E402 (the suite under test, next to this script)

_slice = base_mod.slice_param


def _off_by_one_slice(t: torch.Tensor, qualname: str, rw: Any) -> torch.Tensor:
    """An off-by-one span: a parameter keeps the positions one after the selected ones."""
    class Shifted:
        def keep(self, key):
            k = rw.keep(key)
            return None if k is None else np.roll(k, 1)

        def param_groups(self, *a):
            return rw.param_groups(*a)

    return _slice(t, qualname, Shifted())


def _dropped_bias_slice(t: torch.Tensor, qualname: str, rw: Any) -> torch.Tensor:
    """A dropped parameter slice: 1-D parameters (biases, norm scales) are not sliced."""
    return t.detach().clone() if t.dim() == 1 else _slice(t, qualname, rw)


def _wrong_weight_dim(self: Any, call: Any, node: Any, rc: Any) -> None:
    """A wrong dim: the linear rule ties the input to the weight's output dim when the weight is square."""
    wi, wo = self._dims(call)
    shp = rc.shape(call.input) if rc.is_tensor(call.input) else None
    if shp is not None and rc.out_shape() is not None and shp[-1] == rc.out_shape()[-1]:
        self._dims = lambda c: (wo, wi)  # type: ignore[method-assign]
    try:
        _linear_analyze(self, call, node, rc)
    finally:
        self.__dict__.pop("_dims", None)


_linear_analyze = linear_mod.LinearFamily.analyze
_conv_fix = conv_mod.ConvFamily.fix_module


def _wrong_group_count(self: Any, call: Any, new: Any, old: Any, qualname: str, rw: Any) -> None:
    """A wrong group count: a pruned grouped/depthwise conv keeps its original ``groups``."""
    _conv_fix(self, call, new, old, qualname, rw)
    if old.groups > 1:
        new.groups = old.groups


_tie_slice = axes_mod.RuleContext.tie_slice


def _off_by_one_concat(self: Any, big: Any, offset: int, small: Any) -> None:
    """An off-by-one span in concat/split: every slice after the first lands one position later."""
    _tie_slice(self, big, offset + 1 if 0 < offset < big.size - small.size else offset, small)


MUTANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "off_by_one_slice": lambda: mock.patch.object(rewrite_mod, "slice_param", _off_by_one_slice),
    "off_by_one_slice_modules": lambda: mock.patch.object(base_mod, "slice_param", _off_by_one_slice),
    "dropped_bias_slice": lambda: mock.patch.object(base_mod, "slice_param", _dropped_bias_slice),
    "wrong_weight_dim": lambda: mock.patch.object(linear_mod.LinearFamily, "analyze", _wrong_weight_dim),
    "wrong_group_count": lambda: mock.patch.object(conv_mod.ConvFamily, "fix_module", _wrong_group_count),
    "off_by_one_concat": lambda: mock.patch.object(axes_mod.RuleContext, "tie_slice", _off_by_one_concat),
    "size_values_not_kept": lambda: mock.patch.object(rewrite_mod, "keep_size_values", lambda *a: 0),
    "tied_aliases_ignored": lambda: mock.patch.object(axes_mod.AxisTable, "aliases", lambda self, gm, q: ()),
    "hooks_not_refused": lambda: mock.patch.object(api_mod, "check_model_state", lambda m: None),
}


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=160, help="fuzz examples per mutant")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--out", default=__file__.rsplit("/", 1)[0] + "/results/mutation_check.md", help="markdown ('-': none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in args.only.split(",") if n] or list(MUTANTS)
    rows = []
    base = fuzz.run(args.examples, seed=1)
    base_fail = sum(n for (_, _, o), n in base.items() if o.startswith("FAIL"))
    rows.append(("(none: baseline)", sum(base.values()), base_fail, "-"))
    for name in names:
        t0 = time.perf_counter()
        with MUTANTS[name]():
            counts = fuzz.run(args.examples, seed=1)
        fails = {k: n for k, n in counts.items() if k[2].startswith("FAIL")}
        by = sorted({k[0] for k in fails})
        rows.append((name, sum(counts.values()), sum(fails.values()),
                     ", ".join(by[:4]) + (" …" if len(by) > 4 else "") if fails else "NOT CAUGHT"))
        print(f"{name}: {sum(fails.values())} failing examples ({time.perf_counter() - t0:.0f} s)", flush=True)
    caught = sum(1 for r in rows[1:] if r[2] > 0)
    lines = ["# mutation check", "", f"`python benchmarks/mutation_check.py --examples {args.examples}`", "",
             "| mutant | examples | failing examples | caught by families |", "|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    lines += ["", f"mutants caught: {caught} / {len(rows) - 1}; baseline failures: {base_fail}"]
    print("\n".join(lines))
    if args.out != "-":
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return int(caught < len(rows) - 1 or base_fail > 0)


if __name__ == "__main__":
    sys.exit(main())
