"""One exception hierarchy for fxprune.

Every error fxprune raises on purpose derives from :class:`FxpruneError`. Graph-related errors carry the
node and, when torch.fx recorded it, the user's source line, so that the message points at the model code
that caused it.
"""

from __future__ import annotations

from typing import Any

from .meta import stack_trace

__all__ = [
    "FxpruneError",
    "ConfigError",
    "InputError",
    "TraceError",
    "RewriteError",
    "UnsupportedOpError",
    "PipelineError",
    "VerificationError",
    "MissingShapeMetaError",
    "ShortfallError",
    "FxpruneWarning",
    "node_location",
    "summary",
]


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class ConfigError(FxpruneError, ValueError):
    """An option passed to fxprune is invalid (ratio out of range, unknown module name, ...)."""


class InputError(FxpruneError, ValueError):
    """The example inputs are unusable (not tensors, or the model fails to run on them)."""


class TraceError(FxpruneError):
    """The model cannot be captured as a graph by the tracing front end."""


class PipelineError(FxpruneError):
    """A pipeline is malformed: unknown pass, or a pass reads meta no earlier pass writes."""


class VerificationError(FxpruneError):
    """The pruned module does not match its specification (shapes or the masked reference)."""


class RewriteError(VerificationError):
    """The pruned graph fxprune built does not run on the example inputs the original ran on (a bug, or a size
    computation no rule models): no model is returned."""


class ShortfallError(FxpruneError):
    """``strict=True``: the compile did materially less than asked (nothing pruned, a criterion that could not
    score, a reconstruction that did not run); the message lists what."""


class FxpruneWarning(UserWarning):
    """fxprune's own warning category: a compile did materially less than asked (``strict=True`` makes it a
    :class:`ShortfallError`). Filter it with ``warnings.simplefilter("error", fxprune.FxpruneWarning)``."""


class MissingShapeMetaError(FxpruneError, ValueError):
    """A costed node (or one of its tensor arguments) carries no ``tensor_meta``."""


def summary(exc: BaseException | str) -> str:
    """The first line of an error message, never cut mid-sentence: a line ending in ':' (an introduction)
    is joined with what follows it, until a line that completes it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    out = lines[0]
    for ln in lines[1:]:
        if not out.endswith(":"):
            break
        out += " " + ln
    return out


def node_location(node: Any) -> str:
    """Return the last user frame of ``node``'s stack trace (``File "...", line N, in f`` + code), or ''."""
    trace = stack_trace(node)
    if not trace:
        return ""
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    frames = []  # ('File "x.py", line 3, in forward', code line)
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].lstrip().startswith("File ") else ""
            frames.append((ln.strip(), code))
    if not frames:
        return lines[-1].strip()
    # the innermost frame that is the user's code, not torch's tracing machinery
    user = [f for f in frames if "/torch/" not in f[0] and "/fxprune/" not in f[0]]
    head, code = (user or frames)[-1]
    return f"{head}\n    {code}" if code else head


class UnsupportedOpError(FxpruneError):
    """An op has no channel rule; fxprune never guesses how an unknown op ties channels."""

    def __init__(self, node: Any, op_key: str, reason: str, fix: str = "") -> None:
        self.node = node
        self.op_key = op_key
        self.reason = reason
        self.fix = fix
        where = node_location(node)
        msg = f"node '{getattr(node, 'name', node)}' ({op_key}): {reason}"
        if where:
            msg += f"\n  at {where}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)
