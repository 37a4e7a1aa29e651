"""The pass library: grouping, importance criteria, selection, rewrite, verification.

Every pass here is also constructible by name from a pipeline spec string (see
:mod:`fxprune.pipeline`)."""

from ..pipeline import register_pass
from .group import Analysis, GroupChannels, analyze_graph
from .importance import (
    BNScaleImportance,
    ImportancePass,
    MagnitudeImportance,
    RandomImportance,
    named_importance,
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
from . import datadriven as _datadriven  # noqa: E402,F401  (registers the names)

__all__ += ["ThiNetImportance", "LassoImportance", "ActivationImportance", "Reconstruct", "SequentialPrune"]
