"""Compile time vs network depth: N residual blocks, fxprune and torch-pruning side by side.

Network: stem ``Conv2d(3, C, 3) - BN - ReLU``, then N blocks ``x + BN(Conv(ReLU(BN(Conv(x)))))`` followed by
ReLU (C = 16 channels, 3x3 convs, 8x8 input), then global average pooling and ``Linear(C, 10)``. Every block
has one prunable inner group (the first conv's filters); the residual stream is one group spanning all
blocks. Norm layers are randomised.

Timed (median of ``--repeats``, default 3; ``--quick`` 1), in this process, after a warm-up of both tools:

* fxprune: the whole ``fxprune.compile(net, (x,), importance="l2", ratio=0.5)`` call (defaults otherwise);
* torch-pruning: ``MetaPruner(copy, x, MagnitudeImportance(p=2), pruning_ratio=0.5,
  ignored_layers=[final Linear])`` construction + ``.step()`` on a deepcopy (the copy is not timed).

The table reports time per block and that number normalised to the smallest N (1.0 = exactly linear; values
below 1 mean a fixed per-call overhead is being amortised, values growing with N mean super-linear cost),
and the log-log slope between consecutive sizes (1.0 = linear, 2.0 = quadratic).

    python benchmarks/scaling.py --threads 1       # N = 10, 100, 1000, 10000 (one run at 10000)
    python benchmarks/scaling.py --sizes 10,100 --quick

torch-pruning is timed up to ``--tp-max-blocks`` (default 1000): its time grows ~N^1.7 (50 s at 1000 blocks
here), so 10000 blocks would take hours.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common  # type: ignore[no-redef]
else:
    from . import common

import torch
from torch import nn

NAME = "scaling"


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class ResStack(nn.Module):
    def __init__(self, n_blocks: int, c: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(c) for _ in range(n_blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def make_net(n_blocks: int, channels: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return common.randomize_norms(ResStack(n_blocks, channels).eval(), seed)


def _tp_prune(net: nn.Module, x: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(net, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  global_pruning=False, ignored_layers=[net.fc])
    pruner.step()
    return net


def _slopes(ns: list[int], ts: list[float | None]) -> list[str]:
    out = ["–"]
    for i in range(1, len(ns)):
        a, b = ts[i - 1], ts[i]
        out.append(f"{math.log(b / a) / math.log(ns[i] / ns[i - 1]):.2f}" if a and b and ns[i] != ns[i - 1] else "–")
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10,100,1000,10000", help="comma-separated block counts N")
    p.add_argument("--tp-max-blocks", type=int, default=1000, help="time torch-pruning up to this N")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=8, help="input side (default 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one repeat")
    p.add_argument("--tp", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch-pruning (default on; skipped if not installed)")
    p.add_argument("--timeout", type=float, default=900.0, help="per-call time limit (s)")
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/results/scaling.md; '-' none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    common.apply_threads(args)
    repeats = 1 if args.quick else args.repeats
    ns = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    common.setup_torch(args.seed)
    warnings.filterwarnings("ignore")
    import fxprune

    have_tp = False
    if args.tp:
        try:
            import torch_pruning  # noqa: F401
            have_tp = True
        except ImportError:
            common.log("torch_pruning not importable: timing fxprune only")

    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    # warm-up
    fxprune.compile(make_net(2, args.channels), (x,), importance="l2", ratio=0.5)
    if have_tp:
        _tp_prune(make_net(2, args.channels), x)

    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for n in ns:
        net = make_net(n, args.channels, args.seed)
        row: dict[str, Any] = {"n": n, "fx_s": None, "tp_s": None, "fx_error": None, "tp_error": None}
        common.log(f"N={n} ...")
        reps = 1 if n >= 10000 else repeats
        try:
            with common.time_limit(args.timeout * reps):
                t, res = common.median_time(lambda: fxprune.compile(net, (x,), importance="l2", ratio=0.5), reps)
            row.update(fx_s=t, nodes=len(res.original.graph.nodes), groups=res.report.groups_total,
                       groups_pruned=res.report.groups_pruned, macs_before=res.report.macs_before,
                       fx_macs_after=res.report.macs_after,
                       fx_passes={name: round(dt, 4) for name, _, dt in res.context.log})
            with torch.no_grad():
                assert res.module(x).shape == net(x).shape
        except Exception as exc:  # noqa: BLE001
            row["fx_error"] = common.error_text(exc)
        if have_tp and n > args.tp_max_blocks:
            row["tp_error"] = f"not run (N > --tp-max-blocks={args.tp_max_blocks})"
        elif have_tp:
            try:
                times = []
                work = None
                for _ in range(repeats):
                    work = copy.deepcopy(net)
                    with common.time_limit(args.timeout):
                        t0 = time.perf_counter()
                        _tp_prune(work, x)
                        times.append(time.perf_counter() - t0)
                row["tp_s"] = common.median(times)
                try:
                    gm, _ = fxprune.prepare(work, (x,))
                    row["tp_macs_after"] = fxprune.count_cost(gm).macs
                except Exception as exc:  # noqa: BLE001
                    row["tp_count_error"] = common.error_text(exc)
            except Exception as exc:  # noqa: BLE001
                row["tp_error"] = common.error_text(exc)
        common.log(f"    fx {common.fmt_s(row['fx_s'])}s, tp {common.fmt_s(row['tp_s'])}s"
                   + (f"; fx: {row['fx_error']}" if row["fx_error"] else "")
                   + (f"; tp: {row['tp_error']}" if row["tp_error"] else ""))
        rows.append(row)

    def per_block(key: str) -> list[float | None]:
        return [r[key] / r["n"] if r.get(key) else None for r in rows]

    fx_pb, tp_pb = per_block("fx_s"), per_block("tp_s")
    fx_base = next((v for v in fx_pb if v), None)
    tp_base = next((v for v in tp_pb if v), None)
    fx_slope = _slopes(ns, [r["fx_s"] for r in rows])
    tp_slope = _slopes(ns, [r["tp_s"] for r in rows])
    headers = ["N blocks", "graph nodes", "groups pruned/total", "t_fx s", "t_fx/N ms", "fx per-block (norm.)",
               "fx slope", "t_tp s", "t_tp/N ms", "tp per-block (norm.)", "tp slope", "t_fx / t_tp",
               "MACs after fx", "MACs after tp", "error(s)"]
    body = []
    for i, r in enumerate(rows):
        errs = "; ".join(f"{k}: {r[k + '_error']}" for k in ("fx", "tp") if r.get(k + "_error"))
        body.append([
            r["n"], r.get("nodes"),
            f"{r['groups_pruned']}/{r['groups']}" if r.get("groups") is not None else None,
            common.fmt_s(r["fx_s"], 3), f"{1e3 * fx_pb[i]:.2f}" if fx_pb[i] else None,
            f"{fx_pb[i] / fx_base:.2f}" if fx_pb[i] and fx_base else None, fx_slope[i],
            common.fmt_s(r["tp_s"], 3), f"{1e3 * tp_pb[i]:.2f}" if tp_pb[i] else None,
            f"{tp_pb[i] / tp_base:.2f}" if tp_pb[i] and tp_base else None, tp_slope[i],
            f"{r['fx_s'] / r['tp_s']:.2f}" if r["tp_s"] and r["fx_s"] else None,
            common.fmt_count(r.get("fx_macs_after")), common.fmt_count(r.get("tp_macs_after")), errs,
        ])
    text = "\n".join([
        "# Compile time vs depth (N residual blocks)",
        "",
        f"{args.channels} channels, {args.size}x{args.size} input, ratio 0.5, L2; median of {repeats} run(s) "
        f"(one at N >= 10000) after a warm-up. fxprune {fxprune.__version__}; {common.machine_info()}.",
        "",
        "t_fx = whole `fxprune.compile(net, (x,), importance=\"l2\", ratio=0.5)` call at its defaults; t_tp = torch-pruning `MetaPruner` construction "
        "(DependencyGraph) + `step()`, deepcopy excluded. `per-block (norm.)` = (t/N) / (t/N at the smallest N): "
        "1.0 is exactly linear, <1 means a fixed overhead is amortised. `slope` = log-log slope between "
        "consecutive N (1.0 linear, 2.0 quadratic). MACs: fxprune's counter for both results.",
        "",
        common.markdown_table(headers, body),
        "",
        f"Benchmark wall time {(time.perf_counter() - t_start) / 60:.1f} min.",
    ])
    print(text)
    common.write_results(NAME, text, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
