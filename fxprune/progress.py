"""Progress reporting for long work (calibration, reconstruction, fine-tuning, sensitivity scans).

One helper for every long loop: :func:`progress` is a tqdm bar on a terminal and, when the output is not a
terminal (a CI log, a notebook's captured stderr, ``nohup``), plain progress lines on stderr at most every
``interval`` seconds (``desc: 3/10 (30%), 1.2 s``) so a long run still shows it is alive. ``enabled=False``
silences it; ``None`` (the default) shows the bar on a terminal and the lines elsewhere only for work that
takes longer than ``interval``.

>>> with progress(3, "demo", enabled=False) as bar:
...     for _ in range(3):
...         bar.update(1)
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator

from tqdm.auto import tqdm

__all__ = ["progress", "Lines"]


class Lines:
    """A tqdm-like counter that writes a line to ``stream`` at most every ``interval`` seconds."""

    def __init__(self, total: int | None, desc: str, interval: float = 5.0, stream: Any = None) -> None:
        self.total, self.desc, self.interval = total, desc, interval
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.start = self.last = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._write(now)

    def set_postfix(self, *args: Any, **kw: Any) -> None:
        items = [str(a) for a in args] + [f"{k}={v}" for k, v in kw.items()]
        self.postfix = ", ".join(items)

    def close(self) -> None:
        if self.last != self.start:  # lines were written: say when it ended
            self._write(time.perf_counter())

    def _write(self, now: float) -> None:
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}, {now - self.start:.1f} s{extra}", file=self.stream, flush=True)


@contextlib.contextmanager
def progress(total: int | None, desc: str, enabled: bool | None = None, interval: float = 5.0) -> Iterator[Any]:
    """A progress counter (``update(n)``, ``set_postfix(...)``): see the module docstring."""
    if enabled is False:
        bar: Any = Lines(total, desc, float("inf"))
        yield bar
        return
    if sys.stderr.isatty():
        with tqdm(total=total, desc=desc, leave=False) as t:
            yield t
        return
    bar = Lines(total, desc, interval)
    try:
        yield bar
    finally:
        bar.close()
