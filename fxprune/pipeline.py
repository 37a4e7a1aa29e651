"""Passes, pipelines and the context they share.

A pass is a small object (its options are dataclass fields) with a ``name``, the meta keys it ``reads``
and ``writes`` (see :mod:`fxprune.meta`), the keys it ``invalidates`` (a rewrite makes the old groups
meaningless) and ``run(gm, ctx) -> PassResult``. What a pass needs may depend on its options
(``verify(equivalence=True)`` needs the rewrite's provenance, ``verify`` alone does not): :meth:`Pass.requires`
answers for an instance, and facts passes exchange are meta keys only — :class:`Context` carries the run's
inputs (model, example inputs, calibration data, the pipeline itself), never facts. A :class:`Pipeline` is a tuple of passes, also
parseable from a string (``"group | importance(criterion='l1') | select(ratio=0.5) | rewrite | verify"``)
or a list of dicts, and checked before it runs: a pass whose inputs no earlier pass produces is a
:class:`~fxprune.errors.PipelineError` up front, not halfway through.

User passes are first class: subclass :class:`Pass` or decorate a function with :func:`graph_pass`.

>>> @graph_pass(name="count_convs", reads=("groups",))
... def count_convs(gm, ctx):
...     n = sum(1 for n in gm.graph.nodes if n.op == "call_module")
...     return PassResult(gm, False, {"modules": n})
>>> count_convs.name
'count_convs'
"""

from __future__ import annotations

import ast
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import meta
from .errors import ConfigError, PipelineError

__all__ = ["Pass", "PassResult", "Context", "Pipeline", "graph_pass", "register_pass", "PASSES"]

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """The inputs of one compile shared by its passes: the user's model (read-only), example inputs, the
    traced unpruned graph (``original``), calibration data, the pipeline being run, the report's notes and
    the pass log. ``extras`` is a scratch dict for *user* passes; fxprune's own passes exchange facts through
    meta keys only (:mod:`fxprune.meta`)."""

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    original: fx.GraphModule | None = None
    calib: Any = None
    seed: int = 0
    log: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the calibration batches of a one-shot iterator, kept for the passes that re-read them
    calib_cache: list[Any] | None = None
    #: the pipeline being run (a criterion may read the downstream selection's options, e.g. LASSO's count)
    pipeline: "Pipeline | None" = None
    #: what the compile did materially less of than it was asked (a criterion that could not score, a refit
    #: that did not run): the report's first line, a FxpruneWarning, an error with ``strict=True``
    shortfalls: list[str] = field(default_factory=list)

    def shortfall(self, msg: str) -> None:
        """Record ``msg`` as a note and as a shortfall (see :attr:`shortfalls`)."""
        self.notes.append(msg)
        self.shortfalls.append(msg)


class Pass:
    """Base class of passes. Subclasses are usually ``@dataclass(frozen=True)`` with option fields."""

    name: ClassVar[str] = "pass"
    reads: ClassVar[tuple[str, ...]] = ()
    #: keys read when present (the pass works without them)
    optional_reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()

    def requires(self) -> tuple[str, ...]:
        """The keys this instance cannot run without (default: :attr:`reads`; options may add some)."""
        return tuple(self.reads)

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        return self.run(gm, ctx)


class _FunctionPass(Pass):
    def __init__(self, fn: Callable[[fx.GraphModule, Context], PassResult | None], name: str,
                 reads: tuple[str, ...], writes: tuple[str, ...], invalidates: tuple[str, ...]) -> None:
        self.fn = fn
        self.name = name  # type: ignore[misc]
        self.reads = reads  # type: ignore[misc]
        self.writes = writes  # type: ignore[misc]
        self.invalidates = invalidates  # type: ignore[misc]

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        res = self.fn(gm, ctx)
        return res if isinstance(res, PassResult) else PassResult(gm, False, {})

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def graph_pass(name: str | None = None, reads: Iterable[str] = (), writes: Iterable[str] = (),
               invalidates: Iterable[str] = ()) -> Callable[[Callable], Pass]:
    """Decorator turning ``fn(gm, ctx) -> PassResult | None`` into a pass."""

    def wrap(fn: Callable) -> Pass:
        for k in (*reads, *writes, *invalidates):
            meta.check_key(k)
        return _FunctionPass(fn, name or fn.__name__, tuple(reads), tuple(writes), tuple(invalidates))

    return wrap


#: Named passes for string/dict specs (filled by :mod:`fxprune.passes`).
PASSES: dict[str, Callable[..., Pass]] = {}


def register_pass(name: str, factory: Callable[..., Pass]) -> None:
    """Make a pass constructible from a spec string (``"name(opt=1)"``)."""
    PASSES[name] = factory


def _parse_call(text: str) -> tuple[str, dict[str, Any]]:
    text = text.strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise PipelineError(f"cannot parse pass spec {text!r}: {exc.msg}") from exc
    if isinstance(tree, ast.Name):
        return tree.id, {}
    if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and not tree.args:
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords}
        except ValueError as exc:
            raise PipelineError(f"pass options must be literals in {text!r}") from exc
        return tree.func.id, kwargs
    raise PipelineError(f"pass spec {text!r} must look like name or name(key=value, ...)")


def _make(name: str, kwargs: Mapping[str, Any]) -> Pass:
    if name not in PASSES:
        raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    try:
        return PASSES[name](**kwargs)
    except (TypeError, ConfigError) as exc:
        raise PipelineError(f"bad options for pass {name!r}: {exc}") from exc


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[Pass, ...]

    @staticmethod
    def parse(spec: "str | Sequence[Any] | Mapping[str, Any] | Pipeline") -> "Pipeline":
        """Build a pipeline from pass objects, a ``"a | b(x=1)"`` string, or dicts ``{"pass": name, ...}``."""
        if isinstance(spec, Pipeline):
            return spec
        if isinstance(spec, str):
            return Pipeline(tuple(_make(*_parse_call(part)) for part in spec.split("|") if part.strip()))
        if isinstance(spec, Mapping):
            spec = spec.get("passes", None) or [spec]
        out: list[Pass] = []
        for item in spec:
            if isinstance(item, Pass):
                out.append(item)
            elif isinstance(item, str):
                out.append(_make(*_parse_call(item)))
            elif isinstance(item, Mapping):
                opts = dict(item)
                name = opts.pop("pass", None) or opts.pop("name", None)
                if name is None:
                    raise PipelineError(f"pass dict {item!r} needs a 'pass' key")
                out.append(_make(name, opts))
            else:
                raise PipelineError(f"cannot make a pass from {item!r}")
        return Pipeline(tuple(out))

    def check(self, provided: Iterable[str] = ("shapes", "cost")) -> None:
        """Reject, before any work, a pipeline in which a pass would find a fact it requires missing (facts
        are meta keys: :mod:`fxprune.meta`)."""
        have = set(provided)
        for i, p in enumerate(self.passes):
            for k in (*p.requires(), *p.writes, *getattr(p, "optional_reads", ())):
                try:
                    meta.check_key(k)
                except KeyError as exc:
                    raise PipelineError(f"pass #{i} '{p.name}' declares {exc.args[0]}") from None
            missing = [k for k in p.requires() if k not in have]
            if missing:
                writers = [q.name for q in self.passes[i + 1 :] if set(q.writes) & set(missing)]
                hint = f" ('{writers[0]}' writes it but runs later)" if writers else ""
                raise PipelineError(
                    f"pass #{i} '{p.name}' reads {missing} but no earlier pass writes it{hint}; "
                    f"available before it: {sorted(have)}"
                )
            have -= set(p.invalidates)
            have |= set(p.writes)

    def run(self, gm: fx.GraphModule, ctx: Context,
            callback: Callable[[Pass, PassResult], None] | None = None) -> fx.GraphModule:
        self.check(k for k in meta.KEYS if meta.has(gm, k))
        ctx.pipeline = self
        for p in self.passes:
            t0 = time.perf_counter()
            res = p.run(gm, ctx)
            if not isinstance(res, PassResult):
                raise PipelineError(f"pass '{p.name}' returned {type(res).__name__}, expected PassResult")
            dt = time.perf_counter() - t0
            gm = res.graph_module
            for k in p.invalidates:
                if k not in p.writes:
                    meta.drop(gm, k)
            ctx.log.append((p.name, dict(res.stats), dt))
            log.debug("pass %s: %s (%.3fs)", p.name, res.stats, dt)
            if callback is not None:
                callback(p, res)
        return gm

    def __str__(self) -> str:
        return " | ".join(p.name for p in self.passes)
