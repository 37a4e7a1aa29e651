"""Fuzz fxprune with an oracle that takes nothing from its analysis; print counts per family and front end.

Two sources of models, both compiled with the defaults at a drawn ratio and checked by
:func:`fxprune.testing.independent.assert_pruned_like_original` (kept channels read off the pruned weights'
values, the dropped inputs zeroed in a copy of the original):

* the adversarial families of :mod:`fxprune.testing.strategies.adversarial` (root hooks must be refused,
  tied tensors must stay one tensor), each on the fx and the export front end;
* random compositions of the building blocks (:func:`fxprune.testing.strategies.network_specs`), fx.

Outcome per example: ``ok`` (oracle holds, something pruned), ``ok-unpruned`` (oracle holds, nothing
pruned), ``refused`` (an expected refusal), or a failure: ``FAIL:oracle``, ``FAIL:not-refused``,
``FAIL:untied``, ``FAIL:<exception>``. Exit status 1 when any example failed.

    python benchmarks/fuzz.py --examples 10000          # ~10k examples; counts per family
    python benchmarks/fuzz.py --examples 400 --seed 7   # a quick slice
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

import fxprune
from fxprune.testing.independent import assert_pruned_like_original
from fxprune.testing.strategies import ALL_FAMILIES, build_network
from fxprune.testing.strategies.adversarial import ADVERSARIAL_FAMILIES, adversarial_case

RATIOS = (0.25, 0.5, 0.75)


def _tied_ok(model: torch.nn.Module, pruned: torch.nn.Module) -> bool:
    """No more distinct parameter tensors than the original had (tied weights were not untied)."""
    return len({id(p) for p in pruned.parameters()}) <= len({id(p) for p in model.parameters()})


def _outcome(out: str) -> str:
    """The counted outcome: ``ok``/``refused``/... as is, a failure as ``FAIL:<kind>`` without its detail."""
    return ":".join(out.split(":")[:2]) if out.startswith("FAIL") else out


def check_adversarial(family: str, seed: int, frontend: str) -> str:
    model, xs, expect = adversarial_case(family, seed)
    ratio = RATIOS[seed % len(RATIOS)]
    importance = "bn_scale" if family == "gated_constant" else ("l1", "l2")[seed % 2]
    try:
        res = fxprune.compile(model, xs, ratio=ratio, frontend=frontend, result="graph", importance=importance)
    except fxprune.InputError as exc:
        return "refused" if expect == "refuse" else f"FAIL:InputError: {str(exc)[:120]}"
    except Exception as exc:  # noqa: BLE001 - every other outcome is a finding
        return f"FAIL:{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    if expect == "refuse":
        return "FAIL:not-refused"
    if family == "tied" and not _tied_ok(model, res.module):
        return "FAIL:untied"
    return _oracle(model, res, xs)


def _oracle(model: torch.nn.Module, res: Any, xs: Any) -> str:
    try:
        assert_pruned_like_original(model, res.module, xs)
    except AssertionError as exc:
        return f"FAIL:oracle: {str(exc)[:160]}"
    return "ok" if res.report.groups_pruned else "ok-unpruned"


def run_random(n: int, seed: int, counts: collections.Counter, verbose: bool = False) -> None:
    """``n`` random compositions of the building blocks (hypothesis draws them; outcomes are recorded, never
    raised, so nothing is shrunk or retried)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    from fxprune.testing.strategies import network_specs

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(network_specs(max_blocks=3, families=ALL_FAMILIES))
    def one(spec):
        model, inputs = build_network(spec)
        ratio = RATIOS[len(counts) % len(RATIOS)]
        try:
            res = fxprune.compile(model, tuple(inputs), ratio=ratio, result="graph")
            out = _oracle(model, res, tuple(inputs))
        except Exception as exc:  # noqa: BLE001
            out = f"FAIL:{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        counts[("random_blocks", "fx", _outcome(out))] += 1
        if verbose and out.startswith("FAIL"):
            print(f"  random_blocks {spec}: {out}", flush=True)

    one()


def run(n_examples: int, seed: int = 0, families: Iterable[str] = ADVERSARIAL_FAMILIES,
        random_share: float = 0.25, verbose: bool = False) -> collections.Counter:
    """Counts of ``(family, front end, outcome)`` over ``n_examples`` examples."""
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    families = tuple(families)
    counts: collections.Counter = collections.Counter()
    n_random = int(n_examples * random_share)
    n_adv = n_examples - n_random
    per = max(1, -(-n_adv // (2 * len(families))))  # at least n_examples in all
    for fam in families:
        for i in range(per):
            for fe in ("fx", "export"):
                out = check_adversarial(fam, seed * 1_000_003 + i, fe)
                counts[(fam, fe, _outcome(out))] += 1
                if verbose and out.startswith("FAIL"):
                    print(f"  {fam} seed={seed * 1_000_003 + i} {fe}: {out}", flush=True)
    if n_random:
        run_random(n_random, seed, counts, verbose)
    return counts


def table(counts: collections.Counter) -> str:
    rows: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for (fam, fe, out), n in counts.items():
        rows[(fam, fe)][out] += n
    lines = ["| family | front end | examples | ok | ok, nothing pruned | refused | failures |", "|---|---|---|---|---|---|---|"]
    for (fam, fe), c in sorted(rows.items()):
        fails = {k: v for k, v in c.items() if k.startswith("FAIL")}
        lines.append(f"| {fam} | {fe} | {sum(c.values())} | {c['ok']} | {c['ok-unpruned']} | {c['refused']} | "
                     + (", ".join(f"{k} {v}" for k, v in fails.items()) or "0") + " |")
    total = sum(counts.values())
    failed = sum(n for (_, _, o), n in counts.items() if o.startswith("FAIL"))
    lines.append(f"| **all** | | {total} | | | | {failed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-share", type=float, default=0.25, help="share of random block compositions")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzz.md"), help="markdown ('-': none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    counts = run(args.examples, args.seed, random_share=args.random_share, verbose=args.verbose)
    text = (f"# fuzz: adversarial families + random blocks, independent oracle\n\n"
            f"`python benchmarks/fuzz.py --examples {args.examples} --seed {args.seed}`\n\n{table(counts)}\n\n"
            f"{sum(counts.values())} examples in {time.perf_counter() - t0:.0f} s (torch {torch.__version__}, "
            f"numpy {np.__version__}, 1 thread)\n")
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
    return int(any(o.startswith("FAIL") for (_, _, o) in counts))


if __name__ == "__main__":
    sys.exit(main())
