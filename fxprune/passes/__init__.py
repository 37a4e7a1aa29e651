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
    _named as _named_importance,
)
from .rewrite import Rewrite, rewrite_graph
from .select import Select
from .verify import Verify, masked_reference

register_pass("group", GroupChannels)
register_pass("importance", lambda criterion="l2", **kw: _named_importance(criterion, **kw))
register_pass("select", Select)
register_pass("rewrite", Rewrite)
register_pass("verify", Verify)

__all__ = [
    "Analysis", "GroupChannels", "analyze_graph", "ImportancePass", "MagnitudeImportance", "BNScaleImportance",
    "RandomImportance", "Select", "Rewrite", "rewrite_graph", "Verify", "masked_reference",
]
