"""The options of a compile: one frozen, validated :class:`CompileOptions` shared by :func:`fxprune.compile`,
the hierarchical front end's regions, the command line and the fine-tuning helpers.

Every option is checked when the object is made (types, ranges, names of passes and criteria), and the
options that name parts of the model (``ignore``, ``ratios``) are checked against it by
:meth:`CompileOptions.check_model` — all before any work, every problem a :class:`~fxprune.errors.ConfigError`.
:meth:`CompileOptions.pipeline_for` turns the keyword form into the default pipeline::

    group(unknown_ops, ignore, allow_lossy) | importance | select | rewrite | absorb | verify | reconstruct

>>> opts = CompileOptions(ratio=0.5, importance="l1")
>>> str(opts.pipeline_for())
'group | importance | select | rewrite | absorb | verify'
>>> CompileOptions(ratio=1.5)
Traceback (most recent call last):
...
fxprune.errors.ConfigError: ratio must be a number with 0 <= ratio < 1, got 1.5
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from .errors import ConfigError
from .export import FRONTENDS
from .passes import GroupChannels, ImportancePass, Rewrite, Select, Verify
from .passes.absorb import AbsorbConstants
from .passes.importance import IMPORTANCE, resolve_importance
from .passes.sequential import SequentialPrune
from .pipeline import PASSES, Pass, Pipeline
from .rules import RULES, RuleTable

__all__ = ["CompileOptions", "check_names", "VERIFY", "RESULT_FORMS"]

VERIFY = ("shapes", "equivalence", "none")

#: ``result=``: "auto" returns the user's own class when its rebuilt copy verifies against the graph result
#: (else the graph, with the reason in the report), "class" insists on it (an error otherwise), "graph" skips it
RESULT_FORMS = ("auto", "class", "graph")


def check_names(model: nn.Module, names: Iterable[str], what: str) -> tuple[str, ...]:
    """``names`` as a tuple after checking every one names a module of ``model`` (a ConfigError with close
    matches otherwise)."""
    if isinstance(names, str):
        names = (names,)
    if names is None:
        raise ConfigError(f"{what} must be a list of module names, got None (use () for none)")
    names = tuple(names)
    if not names:
        return names
    modules = dict(model.named_modules())
    bad = [n for n in names if not isinstance(n, str) or n not in modules]
    if bad:
        close = [n for n in modules if n and any(str(b).split(".")[-1] in n for b in bad)][:5]
        raise ConfigError(f"{what}: no module named {', '.join(map(repr, bad))} in the model"
                          + (f" (similar: {', '.join(close)})" if close else ""))
    return names


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    """Everything :func:`fxprune.compile` takes besides the model and its example inputs (see its docstring
    and the README's option table); validated when made, immutable after. ``dataclasses.replace`` (or
    :meth:`replace`) derives variants, re-validated."""

    importance: str | Pass = "l2"
    ratio: float | None = None
    threshold: float | None = None
    global_ranking: bool = False
    target_macs: float | None = None
    ratios: Mapping[str, float] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    min_keep: int = 1
    round_to: int = 1
    reduction: str = "sum"
    normalize: str | None = None
    unknown_ops: str = "error"
    allow_lossy: bool = False
    verify: str = "shapes"
    leaf_modules: tuple[Any, ...] = ()
    pipeline: Any = None
    rules: RuleTable | None = None
    seed: int = 0
    callback: Callable[[Pass, Any], None] | None = None
    calib: Any = None
    reconstruct: str | Pass | None = None
    frontend: str = "auto"
    absorb: bool = True
    sequential: bool = False
    step_callback: Callable[[fx.GraphModule, dict], None] | None = None
    result: str = "auto"
    #: True: a compile that does materially less than asked raises ShortfallError instead of warning
    strict: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (normalising a frozen instance)
        v = {True: "equivalence", False: "none", None: "none"}.get(self.verify, self.verify) \
            if isinstance(self.verify, (bool, type(None))) else self.verify
        if v not in VERIFY:
            raise ConfigError(f"verify must be 'shapes', 'equivalence', 'none' or a bool, got {self.verify!r}")
        set_("verify", v)
        if self.frontend not in FRONTENDS:
            raise ConfigError(f"frontend must be one of {', '.join(map(repr, FRONTENDS))}, got {self.frontend!r}")
        if self.result not in RESULT_FORMS:
            raise ConfigError(f"result must be one of {', '.join(map(repr, RESULT_FORMS))}, got {self.result!r}")
        if self.unknown_ops not in ("error", "block"):
            raise ConfigError(f"unknown_ops must be 'error' or 'block', got {self.unknown_ops!r}")
        for name in ("global_ranking", "allow_lossy", "absorb", "sequential", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.ignore is None or isinstance(self.ignore, str):
            set_("ignore", () if self.ignore is None else (self.ignore,))
        set_("ignore", tuple(self.ignore))
        if self.ratios is None:
            set_("ratios", {})
        if not isinstance(self.ratios, Mapping):
            raise ConfigError(f"ratios must be a mapping of module name to ratio, got {type(self.ratios).__name__}")
        set_("ratios", dict(self.ratios))
        set_("leaf_modules", tuple(self.leaf_modules or ()))
        if self.rules is not None and not isinstance(self.rules, RuleTable):
            raise ConfigError(f"rules must be a RuleTable, got {type(self.rules).__name__}")
        for name in ("callback", "step_callback"):
            f = getattr(self, name)
            if f is not None and not callable(f):
                raise ConfigError(f"{name} must be callable, got {type(f).__name__}")
        if self.reduction not in ("sum", "mean", "max"):
            raise ConfigError(f"reduction must be 'sum', 'mean' or 'max', got {self.reduction!r}")
        if not (isinstance(self.importance, (str, ImportancePass)) or hasattr(self.importance, "run")):
            raise ConfigError(f"importance must be a name ({', '.join(IMPORTANCE)}) or a Pass, got "
                              f"{type(self.importance).__name__}")
        if isinstance(self.importance, str) and self.importance not in IMPORTANCE:
            raise ConfigError(f"unknown importance {self.importance!r}; known: {', '.join(IMPORTANCE)}, or pass an "
                              "ImportancePass object")
        if self.reconstruct is not None and not isinstance(self.reconstruct, (str, Pass)):
            raise ConfigError(f"reconstruct must be a method name or a Pass, got {self.reconstruct!r}")
        for name in ("ratio", "threshold", "target_macs"):
            x = getattr(self, name)
            if x is not None and not _is_number(x):
                raise ConfigError(f"{name} must be a number, got {x!r}")
        if self.pipeline is None:
            self._selection()  # Select validates ratios, thresholds, targets, min_keep, round_to
            if self.ratio is None and self.threshold is None and self.target_macs is None and not self.ratios:
                raise ConfigError("give one of ratio=, threshold= or target_macs= (or a pipeline=)")
        if self.calib is not None and (isinstance(self.calib, (str, bytes, Mapping)) or not (
                isinstance(self.calib, torch.Tensor) or hasattr(self.calib, "__iter__"))):
            raise ConfigError(f"calib must be an iterable of input batches, got {type(self.calib).__name__}")

    def replace(self, **changes: Any) -> "CompileOptions":
        return dataclasses.replace(self, **changes)

    @property
    def rule_table(self) -> RuleTable:
        return self.rules or RULES

    # -- what the options mean --------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> "CompileOptions":
        """The options with ``ignore`` checked against ``model``'s module names, and ``ratios`` too (a name
        that is neither a module nor a group root is a ConfigError, never a silent no-op)."""
        ignore = check_names(model, self.ignore, "ignore")
        modules = dict(model.named_modules()) if self.ratios else {}
        bad = [k for k in self.ratios if k not in modules]
        if bad:
            close = [n for n in modules if n and any(b.split(".")[-1] in n for b in bad)][:5]
            raise ConfigError(f"ratios: no module named {', '.join(map(repr, bad))} in the model"
                              + (f" (similar: {', '.join(close)})" if close else ""))
        return self if ignore == self.ignore else self.replace(ignore=ignore)

    def _selection(self) -> Select:
        some = self.ratio is not None or self.threshold is not None or self.target_macs is not None
        return Select(ratio=self.ratio if some else 0.0, threshold=self.threshold, global_ranking=self.global_ranking,
                      target_macs=self.target_macs, min_keep=self.min_keep, round_to=self.round_to,
                      ratios=dict(self.ratios))

    def criterion(self) -> Pass:
        normalize = "mean" if (self.global_ranking and self.normalize is None) else self.normalize
        return resolve_importance(self.importance, normalize, self.reduction, self.seed)

    def reconstruction(self) -> Pass | None:
        if self.reconstruct is None or isinstance(self.reconstruct, Pass):
            return self.reconstruct
        return PASSES["reconstruct"](method=self.reconstruct)

    def pipeline_for(self) -> Pipeline:
        """The pipeline these options describe (``pipeline=`` parsed, or the default one)."""
        if self.pipeline is not None:
            return Pipeline.parse(self.pipeline)
        imp, sel = self.criterion(), self._selection()
        group = GroupChannels(self.unknown_ops, self.ignore, self.allow_lossy, self.rules)
        if self.sequential:  # data-driven layer-by-layer: replaces importance | select | rewrite
            if not isinstance(imp, ImportancePass):
                raise ConfigError("sequential=True needs an importance criterion (an ImportancePass)")
            if self.reconstruct is not None and not isinstance(self.reconstruct, str):
                raise ConfigError("with sequential=True, reconstruct must be a method name ('thinet' or 'lstsq')")
            if self.verify == "equivalence" and (self.reconstruct is not None or self.step_callback is not None):
                raise ConfigError("verify='equivalence' cannot hold when sequential steps change weights "
                                  "(reconstruct= or step_callback=); use verify='shapes'")
            passes: list[Pass] = [group, SequentialPrune(criterion=imp, select=sel, reconstruct=self.reconstruct,
                                                         step_callback=self.step_callback)]
            if self.verify != "none":
                passes.append(Verify(equivalence=self.verify == "equivalence"))
            return Pipeline(tuple(passes))
        passes = [group, imp, sel, Rewrite()]
        if self.absorb:  # fold constant outputs of removed channels (γ = 0 BN channels...) into consumers' biases
            passes.append(AbsorbConstants())
        if self.verify != "none":
            passes.append(Verify(equivalence=self.verify == "equivalence"))
        rec = self.reconstruction()
        if rec is not None:  # after verify: the check is of the rewrite, the refit then changes weights
            passes.append(rec)
        return Pipeline(tuple(passes))

    def check_calib(self, pipe: Pipeline) -> None:
        """Data-driven passes need calibration data: fail before any work when it is missing."""
        needy = [p.name for p in pipe.passes if getattr(p, "needs_calib", False)]
        if needy and self.calib is None:
            raise ConfigError(f"{', '.join(needy)} need(s) calibration data: pass calib= (an iterable of input "
                              "batches, e.g. a list of tensors or a DataLoader)")
