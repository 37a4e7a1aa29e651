"""Shared helpers of the fxprune benchmarks.

* :func:`randomize_norms` gives every normalisation layer random running statistics and affine params,
  so that freshly constructed models (whose BN layers are identities) are non-trivial to prune and to
  verify.
* :func:`median_time` times a callable (median of repeats).
* :func:`input_size_for` picks the input resolution per torchvision model.
* :func:`run_isolated` runs one unit of work in a forked child process with a hard timeout, so that an
  out-of-memory kill, a segfault or a hang on one model cannot take the whole benchmark down.
* :func:`markdown_table` / :func:`write_results` render and store the result tables.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SIZE = 128
NUM_THREADS = 2

# models with a fixed input resolution (position embeddings / fixed window partitions)
_FIXED_224 = ("vit_", "swin_", "maxvit_")


def setup_torch(seed: int = 0) -> None:
    """The same thread count and seed in every benchmark process."""
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(seed)


def input_size_for(name: str, default: int = DEFAULT_SIZE) -> int:
    """Input side length for a torchvision classification model."""
    if name.startswith(_FIXED_224):
        return 224
    if name.startswith("inception"):
        return 299
    return default


# _NormBase covers BatchNorm*d, SyncBatchNorm and InstanceNorm*d
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise running stats and affine params of every norm layer of ``model`` (in place; returns it).

    BatchNorm/InstanceNorm: running_mean ~ N(0, 0.5²), running_var ~ U(0.5, 2); affine weight ~ U(0.5, 1.5)
    with a random sign, bias ~ N(0, 0.5²). GroupNorm/LayerNorm: the affine params likewise. The values are
    drawn from a private generator, so the global RNG state is not consumed.
    """
    g = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor | None, kind: str) -> None:
        if t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return
        shape = t.shape
        if kind == "mean" or kind == "bias":
            v = torch.randn(shape, generator=g) * 0.5
        elif kind == "var":
            v = torch.rand(shape, generator=g) * 1.5 + 0.5
        else:  # weight
            mag = torch.rand(shape, generator=g) + 0.5
            sign = torch.where(torch.rand(shape, generator=g) < 0.1, -1.0, 1.0)
            v = mag * sign
        t.copy_(v.to(t.dtype))

    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            fill(getattr(m, "running_mean", None), "mean")
            fill(getattr(m, "running_var", None), "var")
            fill(getattr(m, "weight", None), "weight")
            fill(getattr(m, "bias", None), "bias")
    return model


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 0) -> tuple[float, Any]:
    """Run ``fn`` ``warmup`` + ``repeats`` times; return (median wall seconds of the timed runs, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class Timeout(Exception):
    """Raised by :func:`time_limit` when the time is up."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`Timeout` after ``seconds`` (SIGALRM; main thread only; a no-op elsewhere or if None).

    A signal is only handled between Python bytecodes, so a single very long C call overruns the limit; the
    parent's hard timeout of :func:`run_isolated` is the backstop for that."""
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise Timeout(f"timed out after {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_text(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` (shortened), for a table cell."""
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_fxprune_error(exc: BaseException) -> bool:
    import fxprune

    return isinstance(exc, fxprune.FxpruneError)


def full_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# ------------------------------------------------------------------------------------------------------
# process isolation


_PROGRESS_CONN = None


def progress(obj: Any) -> None:
    """From inside a :func:`run_isolated` child: tell the parent how far we got (the last message is
    returned to the parent if the child is killed). A no-op outside a child."""
    if _PROGRESS_CONN is not None:
        _PROGRESS_CONN.send(("progress", obj))


def _child(conn, fn, args) -> None:
    global _PROGRESS_CONN
    _PROGRESS_CONN = conn
    try:
        res = fn(*args)
        conn.send(("ok", res))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        conn.send(("error", f"{error_text(exc)}\n{full_traceback(exc)}"))
    finally:
        conn.close()


DEFAULT_MAX_RSS_GB = 12.0


def _rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux /proc; 0 if unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_isolated(fn: Callable[..., Any], args: tuple = (), timeout: float | None = None,
                 max_rss_gb: float | None = DEFAULT_MAX_RSS_GB) -> tuple[str, Any, Any]:
    """Run ``fn(*args)`` in a forked child; return ("ok", result, last progress) or ("error", text, last
    progress), where "last progress" is the last object the child passed to :func:`progress` (or None).

    The child is killed after ``timeout`` seconds, or as soon as its resident memory exceeds
    ``max_rss_gb`` (polled every 0.2 s), so that a runaway model is stopped by us rather than by the system
    OOM killer (which might pick another process). A child that dies without answering (segfault, OOM
    killer) is reported with its exit code. The parent must not have run torch kernels before forking (an
    OpenMP pool does not survive fork); the benchmarks only build tables in the parent.
    """
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
    p.start()
    send.close()
    deadline = None if timeout is None else time.monotonic() + timeout
    limit = None if not max_rss_gb else int(max_rss_gb * 2**30)
    result: tuple[str, Any] | None = None
    last: Any = None
    reason = ""
    peak = 0
    while True:
        if recv.poll(0.2):
            try:
                msg = recv.recv()
            except EOFError:
                result = None
                break
            if msg[0] == "progress":
                last = msg[1]
                continue
            result = msg
            break
        if not p.is_alive():
            break
        rss = _rss_bytes(p.pid) if p.pid else 0
        peak = max(peak, rss)
        if limit is not None and rss > limit:
            reason = f"MemoryLimit: killed at {rss / 2**30:.1f} GB RSS (limit {max_rss_gb:g} GB)"
            break
        if deadline is not None and time.monotonic() >= deadline:
            reason = f"Timeout: killed after {timeout:.0f}s (hard limit; peak RSS {peak / 2**30:.1f} GB)"
            break
    if result is None:
        if not reason:  # the pipe closed or the child exited: let it finish dying
            p.join(10)
        alive = p.is_alive()
        if alive:
            p.kill()
        p.join(10)
        if alive:
            return "error", reason or "Killed: worker closed its pipe but did not exit", last
        code = p.exitcode
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if code == -9:
            why += " (SIGKILL: probably the OOM killer)"
        return "error", f"ChildDied: worker died without a result ({why})", last
    p.join(30)
    if p.is_alive():
        p.kill()
        p.join(5)
    return result[0], result[1], last


# ------------------------------------------------------------------------------------------------------
# tables


def fmt_count(n: float | int | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def fmt_s(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(v: Any) -> str:
    s = "–" if v is None else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> str:
    import platform

    import torchvision

    try:
        load = os.getloadavg()
        load_s = f", load avg at start {load[0]:.2f}"
    except OSError:
        load_s = ""
    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs, torch threads {NUM_THREADS}{load_s}")


def write_results(name: str, text: str, rows: Any, out: str | None) -> Path | None:
    """Write ``text`` to ``out`` (default ``benchmarks/results/<name>.md``) and the raw rows next to it as
    JSON. ``out='-'`` writes nothing."""
    if out == "-":
        return None
    path = Path(out) if out else RESULTS_DIR / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return path


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads``: the thread count every later :func:`setup_torch` (and forked child) uses."""
    global NUM_THREADS
    if getattr(args, "threads", None):
        NUM_THREADS = int(args.threads)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", default="", help="comma-separated subset of torchvision model names "
                   "(default: every classification model of torchvision.models.list_models)")
    p.add_argument("--exclude", default="", help="comma-separated model names to leave out")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"input side for models without a fixed resolution (default {DEFAULT_SIZE}; "
                        "vit/swin/maxvit always use 224, inception_v3 299)")
    p.add_argument("--quick", action="store_true", help="one repeat instead of several")
    p.add_argument("--timeout", type=float, default=900.0, help="per-model time limit in seconds")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each model in a forked child process (survives OOM/crash/hang; default on)")
    p.add_argument("--max-rss-gb", type=float, default=DEFAULT_MAX_RSS_GB,
                   help="with --isolate: kill a worker whose resident memory exceeds this (default "
                        f"{DEFAULT_MAX_RSS_GB:g} GB), reported as a MemoryLimit error")
    p.add_argument("--out", default=None, help="markdown output path (default benchmarks/results/<name>.md; "
                   "'-' for none); the raw rows go next to it as .json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads in every benchmark process (default {NUM_THREADS}; time with 1 and nothing "
                        "else running)")
    return p


def select_models(spec: str, exclude: str = "") -> list[str]:
    import torchvision

    all_models = torchvision.models.list_models(module=torchvision.models)
    if spec:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [n for n in names if n not in all_models and not n.startswith("timm:")]
        if unknown:
            raise SystemExit(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(all_models)}")
    else:
        names = list(all_models)
    drop = {s.strip() for s in exclude.split(",") if s.strip()}
    return [n for n in names if n not in drop]


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision classification model (``timm:<name>``: a timm one) with random weights, eval mode,
    randomised norm layers."""
    import warnings

    import torchvision

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("timm:"):
            import timm

            model = timm.create_model(name[5:], pretrained=False)
        else:
            model = torchvision.models.get_model(name, weights=None)
    model.eval()
    randomize_norms(model, seed)
    return model


def tiny_net() -> nn.Module:
    """A small conv net used to warm up lazy initialisation before anything is timed."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
