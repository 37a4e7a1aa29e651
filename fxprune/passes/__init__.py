"""The pass library: grouping, importance criteria, selection, rewrite, verification.

Every pass here is also constructible by name from a pipeline spec string (see
:mod:`fxprune.pipeline`)."""

import functools
from typing import Any

from ..pipeline import register_pass
from .group import Analysis, GroupChannels, analyze_graph
from .importance import (
    BNScaleImportance,
    ImportancePass,
    MagnitudeImportance,
    RandomImportance,
    named_importance,
    register_importance,
)
from .rewrite import Rewrite, rewrite_graph
from .select import Select
from .verify import Verify, masked_reference

register_pass("group", GroupChannels)
register_pass("importance", lambda criterion="l2", **kw: named_importance(criterion, **kw))
register_pass("select", Select)
register_pass("rewrite", Rewrite)
register_pass("verify", Verify)

from .gradient import HessianImportance, TaylorImportance  # noqa: E402  (also registers taylor/taylor_weight/hessian)

register_pass("taylor", lambda **kw: TaylorImportance(**{"mode": "activation", **kw}))
register_pass("taylor_weight", lambda **kw: TaylorImportance(**{"mode": "weight", **kw}))
register_pass("hessian", HessianImportance)

__all__ = [
    "Analysis", "GroupChannels", "analyze_graph", "ImportancePass", "MagnitudeImportance", "BNScaleImportance",
    "RandomImportance", "Select", "Rewrite", "rewrite_graph", "Verify", "masked_reference",
]
__all__ += ["TaylorImportance", "HessianImportance"]

from .absorb import AbsorbConstants, Absorbed  # noqa: E402

register_pass("absorb", AbsorbConstants)
__all__ += ["AbsorbConstants", "Absorbed"]

# data-driven criteria and reconstruction (calibration data: compile(..., calib=...))
from .activation import ActivationImportance  # noqa: E402
from .lasso import LassoImportance  # noqa: E402
from .reconstruct import Reconstruct  # noqa: E402
from .sequential import SequentialPrune  # noqa: E402
from .thinet import ThiNetImportance  # noqa: E402

from . import calib  # noqa: E402,F401  (the calibration engine of the data-driven passes)

__all__ += ["ThiNetImportance", "LassoImportance", "ActivationImportance", "Reconstruct", "SequentialPrune", "calib"]

# the data-driven criteria by name: compile(importance=...) and pipeline specs; "reconstruct" (method=) and
# "sequential" (criterion=, ratio=/ratios=, reconstruct=) as passes
_FACTORIES = {
    "thinet": ThiNetImportance,
    "thinet_forward": functools.partial(ThiNetImportance, method="forward"),
    "lasso": LassoImportance,
    "apoz": functools.partial(ActivationImportance, stat="apoz"),
    "activation_mean": functools.partial(ActivationImportance, stat="mean"),
}

for _name, _factory in _FACTORIES.items():
    register_importance(_name, _factory)
    register_pass(_name, _factory)


def _sequential(criterion: str = "thinet", ratio: float | None = None, ratios: dict | None = None,
                min_keep: int = 1, round_to: int = 1, reconstruct: str | None = None, **kw: Any) -> SequentialPrune:
    sel = Select(ratio=ratio, ratios=dict(ratios or {}), min_keep=min_keep, round_to=round_to)
    return SequentialPrune(criterion=named_importance(criterion), select=sel, reconstruct=reconstruct, **kw)


register_pass("reconstruct", Reconstruct)
register_pass("sequential", _sequential)

