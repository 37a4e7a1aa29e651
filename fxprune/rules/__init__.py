"""The op layer: the rule table (:data:`RULES`) and the built-in op families, one file per family.

Each family file holds a normalised call record, the family's meaning written once (channel ties,
parameter slices, shrink, MACs, what calibration sees) and one thin binder per spelling of the op (module
type, torch function, Tensor method, ATen overload). Importing this package registers every built-in rule;
user rules go through :func:`fxprune.register_module_rule` / :func:`register_function_rule` /
:func:`register_method_rule`.

Families: :mod:`.elementwise`, :mod:`.conv`, :mod:`.linear`, :mod:`.matmul`, :mod:`.embedding`,
:mod:`.norm`, :mod:`.reduce`, :mod:`.reshape` (with :mod:`.heads`), :mod:`.permute`, :mod:`.index`,
:mod:`.pool`, :mod:`.attention`, :mod:`.composite`, :mod:`.creation`.
"""

from . import (  # noqa: F401  (registration, in dependency order)
    elementwise, conv, linear, matmul, embedding, norm, reduce, reshape, permute, index, pool, attention,
    composite, creation,
)
from .base import RULES, Axis, Rule, RuleContext, RewriteContext, RuleTable, lookup_tensor, shrink_tensors
from .calls import Bound, Consumer, Family

__all__ = ["RULES", "Axis", "Rule", "RuleContext", "RewriteContext", "RuleTable", "shrink_tensors", "lookup_tensor",
           "Bound", "Consumer", "Family"]
