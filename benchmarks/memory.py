"""Peak extra memory while pruning: fxprune vs torch-pruning, each run in a fresh process.

Models (random weights): torchvision ``vit_l_16`` (224 px) and ``regnet_y_16gf`` (128 px), and a ~270M-parameter
Llama-style Hugging Face model (``LlamaForCausalLM``: hidden 1024, 16 layers, 16 heads, vocab 32000; a
32-token example). ratio 0.5.

Each (model, tool) pair runs in its own new Python process (``subprocess``, not fork): it builds the model,
collects garbage, reads its resident set size (VmRSS), resets the kernel's high-water mark
(``/proc/self/clear_refs`` = 5), prunes, and reads the high-water mark (VmHWM). *Extra* = VmHWM − VmRSS
before pruning: everything the pruning call held at its peak beyond the model itself (the new weights
included). It is quoted as a multiple of the model's size (its parameters and buffers).

- **fxprune**: ``fxprune.compile(model, (x,), importance="l2", ratio=0.5)`` (vision) /
  ``fxprune.compile(model, {"input_ids", "attention_mask"}, ratio=0.5)`` (Llama), defaults otherwise; the
  user's model is kept intact, so the result's weights are new memory.
- **torch-pruning**: the same calls as ``vs_torch_pruning.py`` (vision) and ``hf_models.py``'s LLM recipe
  (Llama), pruning the model **in place** (no copy: its old weights are freed as the new ones are made).

    python benchmarks/memory.py [--models vit_l_16,regnet_y_16gf,llama250m] [--tools fx,tp]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

NAME = "memory"
MODELS = ["vit_l_16", "regnet_y_16gf", "llama250m"]
TOOLS = ["fx", "tp"]


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _build(name: str) -> tuple[Any, Any, bool]:
    """(model, example, is_hf)."""
    import torch

    if name == "llama250m":
        from benchmarks import hf_models

        model, ex = hf_models.make(name)
        return model, ex, True
    model = common.build_model(name, 0)
    size = common.input_size_for(name)
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)), False


def child(name: str, tool: str) -> dict[str, Any]:
    """Runs in the fresh process: build, measure, prune, measure."""
    import torch

    common.setup_torch(0)
    model, ex, hf = _build(name)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    params_before = sum(p.numel() for p in model.parameters())
    if tool == "tp" and not hf:
        with torch.no_grad():
            ncls = int(model(ex).shape[-1])
    gc.collect()
    time.sleep(0.2)
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    t0 = time.perf_counter()
    if tool == "fx":
        import fxprune

        res = fxprune.compile(model, ex if hf else (ex,), ratio=0.5, **({} if hf else {"importance": "l2"}))
        pruned = res.module
    elif hf:
        from benchmarks import hf_models

        hf_models.tp_llm_prune(model, ex)
        pruned = model
    else:
        from benchmarks import vs_torch_pruning

        pruned = vs_torch_pruning.tp_prune(model, ex, ncls)
    secs = time.perf_counter() - t0
    hwm = _status("VmHWM")
    return {"model": name, "tool": tool, "model_bytes": model_bytes, "rss_before": rss, "hwm": hwm,
            "extra": hwm - rss, "s": secs, "params_before": params_before,
            "params_after": sum(p.numel() for p in pruned.parameters())}


def run(name: str, tool: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, tool]
    env = dict(os.environ, OMP_NUM_THREADS=str(common.NUM_THREADS))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "tool": tool, "error": f"timeout after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "tool": tool, "error": f"exit {p.returncode}: {err[:200]}"}


def _mib(b: Any) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
        return []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--timeout", type=float, default=1200.0, help="per run, seconds")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/results/memory.md; '-' none)")
    args = p.parse_args(argv)
    common.apply_threads(args)
    rows = []
    t_all = time.perf_counter()
    for name in [m for m in args.models.split(",") if m]:
        for tool in [t for t in args.tools.split(",") if t]:
            common.log(f"{name}: {tool} ...")
            row = run(name, tool, args.timeout)
            msg = row.get("error") or f"extra {_mib(row['extra'])} MiB ({row['extra'] / row['model_bytes']:.2f}x)"
            common.log("   " + msg)
            rows.append(row)
    by = {(r["model"], r["tool"]): r for r in rows}
    table = []
    for name in dict.fromkeys(r["model"] for r in rows):
        fx, tp = by.get((name, "fx"), {}), by.get((name, "tp"), {})
        size = fx.get("model_bytes") or tp.get("model_bytes")

        def cell(r: dict[str, Any]) -> str:
            if not r:
                return "not run"
            if r.get("error"):
                return r["error"]
            return f"{_mib(r['extra'])} MiB = **{r['extra'] / r['model_bytes']:.2f}×**"

        def kept(r: dict[str, Any]) -> str:
            return f"{r['params_after'] / r['params_before']:.1%}" if r and not r.get("error") else "–"

        ratio = (f"{fx['extra'] / tp['extra']:.2f}" if fx and tp and not fx.get("error") and not tp.get("error")
                 else "–")
        table.append([name, _mib(size), cell(fx), cell(tp), ratio, kept(fx), kept(tp),
                      common.fmt_s(fx.get("s")), common.fmt_s(tp.get("s"))])
    text = "\n".join([
        "# Peak extra memory while pruning: fxprune vs torch-pruning",
        "",
        f"ratio 0.5, one fresh process per cell; {common.machine_info()}; wall time "
        f"{(time.perf_counter() - t_all) / 60:.1f} min.",
        "",
        "extra = peak resident memory during the pruning call minus the resident memory just before it "
        "(kernel high-water mark, reset before the call), as a multiple of the model's size. fxprune keeps "
        "the user's model and returns a new one; torch-pruning prunes the model in place.",
        "",
        common.markdown_table(["model", "model MiB", "fxprune extra", "torch-pruning extra", "fx / tp",
                               "params kept fx", "params kept tp", "fx s", "tp s"], table),
    ])
    print(text)
    common.write_results(NAME, text, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
