"""Coverage of fxprune over every torchvision classification model.

For each model of ``torchvision.models.list_models(module=torchvision.models)``: random weights, eval
mode, randomised norm layers (``common.randomize_norms``), then

    fxprune.compile(model, (x,), importance="l2", ratio=0.5, verify="equivalence")

and record ok/error (with the reason), groups total/pruned, MACs and params before/after (fxprune's own
counter, ``res.report``), the compile time and the verification time. A row is "ok" only if compile()
succeeded (which includes fxprune's float64 masked-reference equivalence check), the pruned module's
output shape equals the original's (checked here again, in float32), and MACs decreased.

Compile time = ``res.report.seconds`` (wall clock of the whole ``compile()`` call, including the deep copy,
tracing, shape propagation and cost counting) minus the wall time of the ``verify`` pass taken from
``res.context.log``. So it is the wall time of one compile without verification, measured inside the same
call (no second compile is run). Each model runs in a forked child process by default (``--no-isolate``
to run in-process), after a warm-up compile of a tiny network in that child.

    python benchmarks/coverage_torchvision.py                      # all models (~20-40 min on 2 cores)
    python benchmarks/coverage_torchvision.py --models resnet18,vit_b_16 --size 128
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common  # type: ignore[no-redef]
else:
    from . import common

import torch

NAME = "coverage_torchvision"
RATIO = 0.5
IMPORTANCE = "l2"


def run_one(name: str, size: int, seed: int = 0, timeout: float | None = None) -> dict[str, Any]:
    """Build, prune and check one model; never raises (errors go into the row)."""
    import fxprune

    common.setup_torch(seed)
    row: dict[str, Any] = {"model": name, "size": size, "status": "error", "error": None, "error_kind": None}
    try:
        with common.time_limit(timeout):
            # warm-up: lazy initialisation (dispatcher, fx codegen caches) is not charged to the first model
            fxprune.compile(common.tiny_net(), (torch.randn(1, 3, 8, 8),), importance=IMPORTANCE, ratio=RATIO,
                            verify="none")
            t0 = time.perf_counter()
            model = common.build_model(name, seed)
            row["build_s"] = time.perf_counter() - t0
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(1, 3, size, size, generator=gen)
            with torch.no_grad():
                y = model(x)
            res = fxprune.compile(model, (x,), importance=IMPORTANCE, ratio=RATIO, verify="equivalence")
            rep = res.report
            verify_s = sum(dt for pname, _, dt in res.context.log if pname == "verify")
            vstats = next((st for pname, st, _ in res.context.log if pname == "verify"), {})
            row.update(
                groups_total=rep.groups_total, groups_pruned=rep.groups_pruned, groups_blocked=len(rep.blocked),
                macs_before=rep.macs_before, macs_after=rep.macs_after,
                params_before=rep.params_before, params_after=rep.params_after,
                compile_s=rep.seconds - verify_s, verify_s=verify_s, total_s=rep.seconds,
                equivalence=vstats.get("equivalence", "–"),
                passes={pname: round(dt, 4) for pname, _, dt in res.context.log},
                notes=list(rep.notes),
            )
            with torch.no_grad():
                y2 = res.module(x)
            shape_ok = isinstance(y2, torch.Tensor) and tuple(y2.shape) == tuple(y.shape)
            row["shape_ok"] = shape_ok
            row["macs_decreased"] = rep.macs_after < rep.macs_before
            problems = []
            if not shape_ok:
                problems.append(f"output shape {tuple(y.shape)} -> "
                                f"{tuple(y2.shape) if isinstance(y2, torch.Tensor) else type(y2).__name__}")
            if not row["macs_decreased"]:
                problems.append(f"MACs did not decrease ({rep.macs_before} -> {rep.macs_after})")
            if problems:
                row["status"] = "check failed"
                row["error"] = "; ".join(problems)
                row["error_kind"] = "check"
            else:
                row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        row["error"] = common.error_text(exc)
        row["error_kind"] = ("timeout" if isinstance(exc, common.Timeout)
                             else "fxprune" if common.is_fxprune_error(exc) else "unexpected")
        row["traceback"] = common.full_traceback(exc)
    return row


def _render(rows: list[dict[str, Any]], args, elapsed: float) -> str:
    import fxprune

    headers = ["model", "input", "status", "groups pruned/total", "MACs before", "MACs after", "MACs after/before",
               "params before", "params after", "compile s (excl. verify)", "verify s", "equivalence", "error"]
    body = []
    for r in rows:
        ok_numbers = "macs_before" in r
        body.append([
            r["model"], r["size"], r["status"],
            f"{r['groups_pruned']}/{r['groups_total']}" if ok_numbers else None,
            common.fmt_count(r.get("macs_before")), common.fmt_count(r.get("macs_after")),
            f"{r['macs_after'] / max(r['macs_before'], 1):.1%}" if ok_numbers else None,
            common.fmt_count(r.get("params_before")), common.fmt_count(r.get("params_after")),
            common.fmt_s(r.get("compile_s")), common.fmt_s(r.get("verify_s")), r.get("equivalence"),
            r.get("error") or "",
        ])
    n_ok = sum(r["status"] == "ok" for r in rows)
    failed = [r for r in rows if r["status"] != "ok"]
    ok_rows = [r for r in rows if r["status"] == "ok"]
    lines = [
        "# fxprune coverage over torchvision classification models",
        "",
        f"`fxprune.compile(model, (x,), importance={IMPORTANCE!r}, ratio={RATIO}, verify=\"equivalence\")`, "
        f"random weights, eval mode, randomised norm layers, batch 1, input {args.size}x{args.size} "
        "(vit/swin/maxvit 224, inception_v3 299). fxprune " + fxprune.__version__ + "; " + common.machine_info()
        + ".",
        "",
        "Compile s = wall time of `compile()` (`res.report.seconds`, incl. copy/trace/shape propagation) minus "
        "the `verify` pass time from `res.context.log`. MACs/params: fxprune's counter (`res.report`). "
        "`ok` = compile succeeded incl. float64 equivalence check against the masked reference, output shape "
        "unchanged, MACs decreased.",
        "",
        common.markdown_table(headers, body),
        "",
        f"**Summary: {n_ok} ok / {len(rows)} total**"
        + (f"; compile time (excl. verify) over ok models: total {sum(r['compile_s'] for r in ok_rows):.1f}s, "
           f"median {common.median([r['compile_s'] for r in ok_rows]):.2f}s" if ok_rows else "")
        + f"; benchmark wall time {elapsed / 60:.1f} min.",
    ]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r['model']}` ({r.get('error_kind')}): {r.get('error')}" for r in failed]
    lossy = [r["model"] for r in ok_rows if str(r.get("equivalence", "")).startswith("skipped")]
    if lossy:
        lines += ["", f"Equivalence check skipped (lossy groups pruned): {', '.join(lossy)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    models = common.select_models(args.models, args.exclude)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for i, name in enumerate(models):
        size = common.input_size_for(name, args.size)
        common.log(f"[{i + 1}/{len(models)}] {name} @ {size} ...")
        t0 = time.perf_counter()
        if args.isolate:
            status, out, _ = common.run_isolated(run_one, (name, size, args.seed, args.timeout),
                                                 timeout=args.timeout + 60, max_rss_gb=args.max_rss_gb)
            row = out if status == "ok" else {"model": name, "size": size, "status": "error",
                                              "error": out.splitlines()[0], "error_kind": "worker killed",
                                              "traceback": out}
        else:
            row = run_one(name, size, args.seed, args.timeout)
        common.log(f"    {row['status']} in {time.perf_counter() - t0:.1f}s"
                   + (f": {row['error']}" if row.get("error") else ""))
        rows.append(row)
    text = _render(rows, args, time.perf_counter() - t_start)
    print(text)
    common.write_results(NAME, text, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
