"""Registers the data-driven criteria and passes by name (imported by :mod:`fxprune.passes`).

``compile(importance=...)`` names: ``"thinet"``, ``"thinet_forward"``, ``"lasso"``, ``"apoz"``,
``"activation_mean"``. Pipeline pass names: the same, plus ``"reconstruct"`` (``method=``) and
``"sequential"`` (``criterion=``, ``ratio=``/``ratios=``, ``reconstruct=``).
"""

from __future__ import annotations

import functools
from typing import Any

from ..pipeline import register_pass
from .activation import ActivationImportance
from .importance import named_importance, register_importance
from .lasso import LassoImportance
from .reconstruct import Reconstruct
from .select import Select
from .sequential import SequentialPrune
from .thinet import ThiNetImportance

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
