"""Pruning time: torch-pruning vs fxprune on torchvision classification models.

For each model (random weights, eval mode, randomised norms), in the same process, with the same input:

(a) torch-pruning: ``tp.pruner.MetaPruner`` (an alias of ``tp.pruner.BasePruner`` in torch-pruning 1.6)
    with ``tp.importance.MagnitudeImportance(p=2)``, ``pruning_ratio=0.5``, local (per-group) pruning, the
    final classifier ignored (every ``nn.Linear``/``nn.Conv2d`` producing ``num_classes`` outputs), the
    DependencyGraph built from the example input. Timed: pruner construction (= DependencyGraph build)
    + ``.step()``, on a fresh ``copy.deepcopy`` of the model; the deepcopy itself is NOT timed (it is
    reported separately).
    Model-specific settings, following torch-pruning's own torchvision example: for VisionTransformer,
    ``num_heads={MultiheadAttention: num_heads}`` and ``model.hidden_dim`` is updated after ``step()``
    (untimed); for Swin and MaxViT, ``num_heads`` is given for the qkv projection. Nothing else.
(b) ``fxprune.compile(model, (x,), importance="l2", ratio=0.5)``, every other option at its default
    (shape verification, the user's class kept and checked, constant absorption). Timed: the whole call,
    which includes fxprune's own copy of the model's structure, tracing and cost counting.

Each side is timed ``--repeats`` times (default 3, ``--quick`` 1), interleaved (tp, fx, tp, fx, ...), after
a warm-up of both tools on a tiny network; the median is reported. A side is "ok" if it raised nothing and
the pruned model's output shape (float32 forward, untimed) equals the original's.

MACs after pruning are counted for BOTH results with fxprune's counter (``fxprune.prepare`` on the pruned
module: a fresh trace + shape propagation + ``fxprune.count_cost``), so the two columns are comparable. If
fxprune cannot trace a model, the MACs of both sides are counted with ``tp.utils.count_ops_and_params``
instead and marked with ``†``.

    python benchmarks/vs_torch_pruning.py                    # all models
    python benchmarks/vs_torch_pruning.py --models resnet18,vit_b_16 --quick
    python benchmarks/vs_torch_pruning.py --threads 1 --repeats 5 --models issue   # the 7 models of issue 14
    python benchmarks/vs_torch_pruning.py --threads 1 --repeats 5 --models timm \
        --out benchmarks/results/vs_torch_pruning_timm.md                           # 14 timm models
"""

from __future__ import annotations

import copy
import gc
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

NAME = "vs_torch_pruning"
RATIO = 0.5
#: the issue's seven torchvision models (``--models issue``)
ISSUE = ["resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_800mf",
         "vit_b_16"]
#: timm models both tools handle (``--models timm``; 128 px), from the coverage table
TIMM = ["resnet18", "resnet50d", "seresnext26d_32x4d", "efficientnet_b0", "tf_efficientnetv2_b0",
        "mobilenetv3_small_100", "mobilenetv4_conv_small", "ghostnet_100", "regnety_002", "convnext_atto",
        "darknet53", "dla34", "repvgg_a0", "hrnet_w18_small"]


# ------------------------------------------------------------------------------------------------------
# torch-pruning side


def _num_classes(model: nn.Module, y: torch.Tensor) -> int:
    return int(y.shape[-1])


def tp_prune(model: nn.Module, x: torch.Tensor, num_classes: int) -> nn.Module:
    """Prune ``model`` IN PLACE with torch-pruning (pruner construction + step) and return it."""
    import torch_pruning as tp

    ignored = [m for m in model.modules()
               if (isinstance(m, nn.Linear) and m.out_features == num_classes)
               or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    num_heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            num_heads[m] = m.num_heads
        elif hasattr(m, "qkv") and isinstance(getattr(m, "qkv"), nn.Linear) and hasattr(m, "num_heads"):
            num_heads[m.qkv] = int(m.num_heads)  # swin ShiftedWindowAttention(V2)
        elif hasattr(m, "to_qkv") and isinstance(getattr(m, "to_qkv"), nn.Linear) and hasattr(m, "n_heads"):
            num_heads[m.to_qkv] = int(m.n_heads)  # maxvit RelativePositionalMultiHeadAttention
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=RATIO,
        global_pruning=False,
        ignored_layers=ignored,
        num_heads=num_heads,
    )
    pruner.step()
    return model


def tp_fixup(model: nn.Module) -> None:
    """Untimed attribute fix-ups torch-pruning's torchvision example applies after step()."""
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels


# ------------------------------------------------------------------------------------------------------


def _fx_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    import fxprune

    gm, _ = fxprune.prepare(model, (x,))
    c = fxprune.count_cost(gm)
    return c.macs, c.params


def _tp_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, x)
    return int(macs), int(params)


def _out_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...] | str:
    with torch.no_grad():
        y = model(x)
    return tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__


def _warmup(x_tiny: torch.Tensor) -> None:
    import fxprune

    fxprune.compile(common.tiny_net(), (x_tiny,), importance="l2", ratio=RATIO)
    try:
        tp_prune(common.tiny_net(), x_tiny, 10)
    except Exception:  # noqa: BLE001 - a broken tp shows up in the real rows
        pass


def run_one(name: str, size: int, seed: int = 0, repeats: int = 3, timeout: float | None = None,
            sides: tuple[str, ...] = ("tp", "fx")) -> dict[str, Any]:
    """Time both tools (or only ``sides``) on one model; never raises."""
    import fxprune

    common.setup_torch(seed)
    warnings.filterwarnings("ignore")
    row: dict[str, Any] = {"model": name, "size": size, "tp_status": "not run", "fx_status": "not run",
                           "tp_error": None, "fx_error": None}
    try:
        import torch_pruning  # noqa: F401
        have_tp = True
    except ImportError as exc:
        have_tp = False
        row["tp_status"], row["tp_error"] = "error", common.error_text(exc)
    try:
        _warmup(torch.randn(1, 3, 8, 8))
        model = common.build_model(name, seed)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = model(x)
        ref_shape = tuple(y.shape)
        ncls = _num_classes(model, y)
    except Exception as exc:  # noqa: BLE001
        row["tp_status"] = row["fx_status"] = "error"
        row["tp_error"] = row["fx_error"] = "model build/forward failed: " + common.error_text(exc)
        return row

    tp_times: list[float] = []
    copy_times: list[float] = []
    fx_times: list[float] = []
    tp_model = None
    fx_res = None
    tp_ok = have_tp and "tp" in sides
    fx_ok = "fx" in sides
    for _ in range(max(1, repeats)):
        if tp_ok:
            common.progress("tp")
            tp_model = None  # only the last pruned copy is kept
            gc.collect()
            try:
                t0 = time.perf_counter()
                work = copy.deepcopy(model)
                copy_times.append(time.perf_counter() - t0)
                with common.time_limit(timeout):
                    t0 = time.perf_counter()
                    tp_prune(work, x, ncls)
                    tp_times.append(time.perf_counter() - t0)
                tp_model = work
            except Exception as exc:  # noqa: BLE001
                tp_ok = False
                row["tp_status"], row["tp_error"] = "error", common.error_text(exc)
                row["tp_traceback"] = common.full_traceback(exc)
                row["tp_error_kind"] = "timeout" if isinstance(exc, common.Timeout) else "error"
        if fx_ok:
            common.progress("fx")
            fx_res = None  # free the previous result (it holds a full-size traced copy) before the next run
            gc.collect()  # fx graphs are reference cycles
            try:
                with common.time_limit(timeout):
                    t0 = time.perf_counter()
                    fx_res = fxprune.compile(model, (x,), importance="l2", ratio=RATIO)
                    fx_times.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                fx_ok = False
                row["fx_status"], row["fx_error"] = "error", common.error_text(exc)
                row["fx_traceback"] = common.full_traceback(exc)
                row["fx_error_kind"] = ("timeout" if isinstance(exc, common.Timeout)
                                        else "fxprune" if common.is_fxprune_error(exc) else "unexpected")

    # --- checks and MACs (untimed) -------------------------------------------------------------------
    common.progress("count")
    counter = "fxprune"
    try:
        row["macs_before"], row["params_before"] = _fx_macs(model, x)
    except Exception as exc:  # noqa: BLE001 - fall back to torch-pruning's counter for both sides
        counter = "tp"
        row["counter_note"] = "fxprune counter failed: " + common.error_text(exc)
        try:
            row["macs_before"], row["params_before"] = _tp_macs(model, x)
        except Exception:  # noqa: BLE001
            pass
    row["counter"] = counter
    if tp_ok:
        row["tp_s"] = common.median(tp_times)
        row["tp_copy_s"] = common.median(copy_times)
        row["tp_times"] = tp_times
        try:
            tp_fixup(tp_model)
            shape = _out_shape(tp_model, x)
            if shape != ref_shape:
                row["tp_status"], row["tp_error"] = "wrong output", f"output shape {ref_shape} -> {shape}"
            else:
                row["tp_status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            row["tp_status"], row["tp_error"] = "broken model", "forward of pruned model failed: " + common.error_text(exc)
        try:
            count = _fx_macs if counter == "fxprune" else _tp_macs
            row["tp_macs_after"], row["tp_params_after"] = count(tp_model, x)
        except Exception as exc:  # noqa: BLE001
            row["tp_count_error"] = common.error_text(exc)
    if fx_ok:
        row["fx_s"] = common.median(fx_times)
        row["fx_times"] = fx_times
        row["fx_groups"] = f"{fx_res.report.groups_pruned}/{fx_res.report.groups_total}"
        try:
            shape = _out_shape(fx_res.module, x)
            if shape != ref_shape:
                row["fx_status"], row["fx_error"] = "wrong output", f"output shape {ref_shape} -> {shape}"
            else:
                row["fx_status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            row["fx_status"], row["fx_error"] = "broken model", "forward of pruned model failed: " + common.error_text(exc)
        if counter == "fxprune":
            row["fx_macs_after"], row["fx_params_after"] = fx_res.report.macs_after, fx_res.report.params_after
        else:
            try:
                row["fx_macs_after"], row["fx_params_after"] = _tp_macs(fx_res.module, x)
            except Exception as exc:  # noqa: BLE001
                row["fx_count_error"] = common.error_text(exc)
    return row


def _pct(after: Any, before: Any) -> str:
    if after is None or not before:
        return "–"
    return f"{after / before:.1%}"


def _render(rows: list[dict[str, Any]], args, repeats: int, elapsed: float) -> str:
    import fxprune

    try:
        import torch_pruning as tp
        tp_version = getattr(tp, "__version__", "?")
        try:
            from importlib.metadata import version
            tp_version = f"{version('torch-pruning')} (torch_pruning.__version__ = {tp_version})"
        except Exception:  # noqa: BLE001
            pass
    except ImportError:
        tp_version = "not installed"
    headers = ["model", "input", "tp", "fxprune", "t_tp s", "t_fx s", "t_fx / t_tp", "MACs before",
               "MACs after tp", "MACs after fx", "params after tp", "params after fx", "error(s)"]
    body = []
    for r in rows:
        dag = " †" if r.get("counter") == "tp" else ""
        ratio = (f"{r['fx_s'] / r['tp_s']:.2f}" if r["tp_status"] == "ok" and r["fx_status"] == "ok" else "–")
        errs = []
        if r.get("tp_error"):
            errs.append(f"tp: {r['tp_error']}")
        if r.get("fx_error"):
            errs.append(f"fx: {r['fx_error']}")
        body.append([
            r["model"], r["size"], r["tp_status"], r["fx_status"], common.fmt_s(r.get("tp_s")),
            common.fmt_s(r.get("fx_s")), ratio, common.fmt_count(r.get("macs_before")) + dag,
            (common.fmt_count(r["tp_macs_after"]) + f" ({_pct(r['tp_macs_after'], r.get('macs_before'))})"
             if r.get("tp_macs_after") is not None else "–"),
            (common.fmt_count(r["fx_macs_after"]) + f" ({_pct(r['fx_macs_after'], r.get('macs_before'))})"
             if r.get("fx_macs_after") is not None else "–"),
            common.fmt_count(r.get("tp_params_after")), common.fmt_count(r.get("fx_params_after")),
            "; ".join(errs),
        ])
    both = [r for r in rows if r["tp_status"] == "ok" and r["fx_status"] == "ok"]
    only_tp = [r["model"] for r in rows if r["tp_status"] == "ok" and r["fx_status"] != "ok"]
    only_fx = [r["model"] for r in rows if r["fx_status"] == "ok" and r["tp_status"] != "ok"]
    neither = [r["model"] for r in rows if r["fx_status"] != "ok" and r["tp_status"] != "ok"]
    lines = [
        "# Pruning time: torch-pruning vs fxprune",
        "",
        f"ratio {RATIO}, L2 magnitude, local per-group ranking; batch 1, input {args.size}x{args.size} "
        "(vit/swin/maxvit 224, inception_v3 299); median of "
        f"{repeats} interleaved run(s) per side after a warm-up. fxprune {fxprune.__version__}, torch-pruning "
        f"{tp_version}; {common.machine_info()}.",
        "",
        "t_tp = `MetaPruner(model_copy, x, MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[classifier], "
        "num_heads=...)` construction (DependencyGraph build) + `.step()`, excluding the deepcopy of the model. "
        "t_fx = the whole `fxprune.compile(model, (x,), importance=\"l2\", ratio=0.5)` call at its defaults "
        "(shape verification, the class copy and its check, absorption), which includes fxprune's own copy. "
        "MACs/params of both results: fxprune's counter on a fresh trace (`†`: torch-pruning's "
        "`count_ops_and_params` for both, because fxprune could not trace the model). Percentages are MACs "
        "after / before. A side is `ok` if it raised nothing and the pruned model's output shape is unchanged "
        "(accuracy/equivalence of torch-pruning's result is not checked).",
        "",
        common.markdown_table(headers, body),
        "",
    ]
    if both:
        t_tp = sum(r["tp_s"] for r in both)
        t_fx = sum(r["fx_s"] for r in both)
        geo = math.exp(sum(math.log(r["fx_s"] / r["tp_s"]) for r in both) / len(both))
        copy_s = sum(r.get("tp_copy_s", 0.0) for r in both)
        faster = sum(r["tp_s"] > r["fx_s"] for r in both)
        lines.append(
            f"**TOTAL over the {len(both)} models both handle: t_tp = {t_tp:.1f}s, t_fx = {t_fx:.1f}s, "
            f"geometric mean of the per-model t_fx / t_tp = {geo:.2f}** (t_fx / t_tp of the totals "
            f"{t_fx / t_tp:.2f}; fxprune faster on "
            f"{faster}/{len(both)}; the untimed deepcopies on the tp side took {copy_s:.1f}s in total)."
        )
        cmp = [(r.get("fx_macs_after"), r.get("tp_macs_after")) for r in both]
        cmp = [(a, b) for a, b in cmp if a is not None and b is not None]
        lines.append(
            f"MACs after pruning (same counter for both), over the {len(cmp)} of them counted for both: fxprune's "
            f"result has fewer MACs on {sum(a < b for a, b in cmp)}, the same on {sum(a == b for a, b in cmp)}, "
            f"more on {sum(a > b for a, b in cmp)}.")
    else:
        lines.append("**TOTAL: no model was handled by both tools.**")
    lines += [
        "",
        f"Only torch-pruning ok ({len(only_tp)}): {', '.join(only_tp) or '–'}",
        "",
        f"Only fxprune ok ({len(only_fx)}): {', '.join(only_fx) or '–'}",
        "",
        f"Neither ok ({len(neither)}): {', '.join(neither) or '–'}",
        "",
        f"tp ok {sum(r['tp_status'] == 'ok' for r in rows)} / {len(rows)}, fxprune ok "
        f"{sum(r['fx_status'] == 'ok' for r in rows)} / {len(rows)}; benchmark wall time {elapsed / 60:.1f} min.",
    ]
    return "\n".join(lines)


def _run_isolated_model(fn_args: tuple, repeats: int, args) -> dict[str, Any]:
    """Run one model in a child. If the child is killed (memory limit, hard timeout, crash) while one tool
    was running, that tool gets the error and the model is run again in a fresh child without it, so the
    other tool's numbers are not lost."""
    name, size = fn_args[0], fn_args[1]
    sides = ("tp", "fx")
    killed: dict[str, str] = {}
    for _ in range(3):
        status, out, last = common.run_isolated(run_one, fn_args + (sides,),
                                                timeout=2 * repeats * args.timeout + 300,
                                                max_rss_gb=args.max_rss_gb)
        if status == "ok":
            row = out
            break
        why = "worker killed: " + out.splitlines()[0]
        if last in sides:
            killed[last] = why
            sides = tuple(s for s in sides if s != last)
            if sides:
                common.log(f"    worker killed while running {last} ({why}); re-running {name} without it")
                continue
        row = {"model": name, "size": size, "tp_status": "not run", "fx_status": "not run",
               "tp_error": None, "fx_error": None, "traceback": out}
        for side in ("tp", "fx"):
            if side in sides:
                killed.setdefault(side, why)
        break
    for side, why in killed.items():
        row[f"{side}_status"], row[f"{side}_error"] = "error", why
        row[f"{side}_error_kind"] = "killed"
        row.pop(f"{side}_s", None)
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(timeout=600.0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median); --quick sets 1")
    args = p.parse_args(argv)
    common.apply_threads(args)
    repeats = 1 if args.quick else args.repeats
    spec = {"issue": ",".join(ISSUE), "timm": ",".join("timm:" + n for n in TIMM)}.get(args.models, args.models)
    models = common.select_models(spec, args.exclude)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for i, name in enumerate(models):
        size = common.input_size_for(name, args.size)
        common.log(f"[{i + 1}/{len(models)}] {name} @ {size} ...")
        t0 = time.perf_counter()
        fn_args = (name, size, args.seed, repeats, args.timeout)
        if args.isolate:
            row = _run_isolated_model(fn_args, repeats, args)
        else:
            row = run_one(*fn_args)
        common.log(f"    tp {row['tp_status']} {common.fmt_s(row.get('tp_s'))}s, fx {row['fx_status']} "
                   f"{common.fmt_s(row.get('fx_s'))}s ({time.perf_counter() - t0:.0f}s)"
                   + (f"; tp: {row['tp_error']}" if row.get("tp_error") else "")
                   + (f"; fx: {row['fx_error']}" if row.get("fx_error") else ""))
        rows.append(row)
    text = _render(rows, args, repeats, time.perf_counter() - t_start)
    print(text)
    common.write_results(NAME, text, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
