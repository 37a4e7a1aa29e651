"""Real CPU speed-up of pruned models, next to the ideal (the MACs reduction).

For every model, the original and each pruned version (ratios × ``round_to`` values) are timed in the
same process, **interleaved** (one forward of each variant per round, rounds repeated), so slow phases
of a noisy machine hit every variant alike. Fixed threads (``torch.set_num_threads(2)``), warm-up runs,
median of ``--repeats`` rounds, ``torch.inference_mode()``, eval mode.

Columns: MACs ratio = MACs(original) / MACs(pruned) (the ideal speed-up); measured speed-up =
median latency(original) / median latency(pruned); efficiency = speed-up / MACs ratio (1.0 = the pruned
model is exactly as much faster as it is smaller).

    python benchmarks/latency.py                       # resnet50, mobilenet_v3_large, vit_b_16, small_cnn
    python benchmarks/latency.py --models small_cnn,resnet18 --ratios 0.5 --round-to 1,8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxprune  # noqa: E402
from benchmarks import common  # noqa: E402

DEFAULT_MODELS = "small_cnn,resnet50,mobilenet_v3_large,vit_b_16"
#: batch per model (vit_b_16 at batch 8 takes too long per round on 2 cores)
BATCH = {"vit_b_16": 2}


class SmallCNN(nn.Module):
    """A VGG-style CNN (conv-BN-ReLU ×6, two max-pools, GAP, linear) at 64×64."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        w = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Conv2d(w[i], w[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(w[i + 1]), nn.ReLU()]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(w[-1], classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def build(name: str, seed: int) -> tuple[nn.Module, int]:
    """(model in eval mode with randomised norms, input side)."""
    if name == "small_cnn":
        torch.manual_seed(seed)
        return common.randomize_norms(SmallCNN().eval(), seed), 64
    return common.build_model(name, seed), common.input_size_for(name, 224)


@torch.inference_mode()
def interleaved(models: Sequence[nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> list[list[float]]:
    """Seconds per forward of each model: ``warmup`` untimed rounds, then ``repeats`` timed rounds; in each
    round every model runs once, in a rotating order."""
    for _ in range(warmup):
        for m in models:
            m(x)
    times: list[list[float]] = [[] for _ in models]
    n = len(models)
    for r in range(repeats):
        for j in range(n):
            i = (j + r) % n
            t0 = time.perf_counter()
            models[i](x)
            times[i].append(time.perf_counter() - t0)
    return times


def fuse_bn(m: nn.Module) -> nn.Module:
    """Conv+BatchNorm folded (torch.fx.experimental.optimization.fuse), as a deployed eval model would be."""
    from torch.fx.experimental.optimization import fuse

    return fuse(m).eval()


def run_model(name: str, ratios: Sequence[float], round_tos: Sequence[int], repeats: int, warmup: int,
              batch: int | None, seed: int, fused: bool = False) -> list[dict[str, Any]]:
    model, side = build(name, seed)
    b = batch or BATCH.get(name, 8)
    x = torch.randn(b, 3, side, side)
    variants: list[tuple[float, int, nn.Module, int, float]] = []
    base = None
    for r in ratios:
        for rt in round_tos:
            t0 = time.perf_counter()
            res = fxprune.compile(model, (x[:1],), ratio=r, round_to=rt, verify="none")
            dt = time.perf_counter() - t0
            base = res.report.macs_before
            variants.append((r, rt, res.module.eval(), res.report.macs_after, dt))
            common.log(f"{name}: ratio {r} round_to {rt}: MACs {res.report.macs_before / max(res.report.macs_after, 1):.2f}x "
                       f"fewer, compiled in {dt:.1f}s")
    timed = [model, *[v[2] for v in variants]]
    if fused:  # both sides alike: BN folded into the preceding conv
        timed = [fuse_bn(m) for m in timed]
    times = interleaved(timed, x, repeats, warmup)
    t_orig = statistics.median(times[0])
    rows = []
    for (r, rt, _, macs, dt), ts in zip(variants, times[1:], strict=True):
        t = statistics.median(ts)
        mr = (base or 0) / max(macs, 1)
        su = t_orig / t
        rows.append({"model": name + (" (BN fused)" if fused else ""), "batch": b, "ratio": r, "round_to": rt, "macs_ratio": mr,
                     "ms_original": t_orig * 1e3, "ms_pruned": t * 1e3, "speedup": su, "efficiency": su / mr,
                     "compile_s": dt, "spread_pruned": (max(ts) - min(ts)) / t})
    return rows


def render(rows: list[dict[str, Any]], info: str, args: argparse.Namespace) -> str:
    table = common.markdown_table(
        ["model", "batch", "ratio", "round_to", "MACs ratio (ideal)", "original ms", "pruned ms",
         "measured speed-up", "efficiency"],
        [[r["model"], r["batch"], r["ratio"], r["round_to"], f"{r['macs_ratio']:.2f}×", f"{r['ms_original']:.1f}",
          f"{r['ms_pruned']:.1f}", f"{r['speedup']:.2f}×", f"{r['efficiency']:.2f}"] for r in rows])
    lines = [f"# Latency: measured speed-up vs MACs reduction ({info})", "",
             f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds after {args.warmup} warm-up "
             "rounds, inference mode; efficiency = measured speed-up / MACs ratio.", "", table, ""]
    # round_to summary: mean efficiency per round_to over the CNN rows
    rts = sorted({r["round_to"] for r in rows})
    if len(rts) > 1:
        lines += ["## Effect of round_to (mean efficiency per model)", ""]
        models = list(dict.fromkeys(r["model"] for r in rows))
        body = []
        for m in models:
            cells = [m]
            for rt in rts:
                es = [r["efficiency"] for r in rows if r["model"] == m and r["round_to"] == rt]
                cells.append(f"{statistics.mean(es):.2f}" if es else "-")
            body.append(cells)
        lines += [common.markdown_table(["model", *[f"round_to={rt}" for rt in rts]], body), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--round-to", default="1,8,16", help="comma-separated round_to values to compare")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="override the batch size (default 8; vit_b_16: 2)")
    p.add_argument("--fuse-bn", action="store_true", help="fold BatchNorm into convs on both sides before timing")
    p.add_argument("--threads", type=int, default=common.NUM_THREADS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="markdown path (default benchmarks/results/latency.md; '-': none)")
    args = p.parse_args(argv)
    common.setup_torch(args.seed)
    torch.set_num_threads(args.threads)
    ratios = [float(v) for v in args.ratios.split(",") if v]
    rts = [int(v) for v in args.round_to.split(",") if v]
    info = common.machine_info().replace(f"torch threads {common.NUM_THREADS}", f"torch threads {torch.get_num_threads()}")
    rows: list[dict[str, Any]] = []
    for name in [m for m in args.models.split(",") if m]:
        new = run_model(name, ratios, rts, args.repeats, args.warmup, args.batch, args.seed, args.fuse_bn)
        rows += new
        print(render(new, info, args).split("\n", 4)[-1], flush=True)
    text = render(rows, info, args)
    print(text)
    common.write_results("latency_fused" if args.fuse_bn else "latency", text, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
