"""The rule table (:data:`RULES`) and the built-in rules, one module per op family.

Importing this package registers every built-in rule. User rules go through
:func:`fxprune.register_module_rule` / :func:`register_function_rule` / :func:`register_method_rule`.
"""

from .base import RULES, Axis, Rule, RuleContext, RewriteContext, RuleTable, shrink_tensors
from . import elementwise, conv, norm, shape, reduce, attention, misc  # noqa: F401  (registration)
from . import aten  # noqa: F401,E402  (ATen rules for the torch.export front end; after the fx-level ones)

__all__ = ["RULES", "Axis", "Rule", "RuleContext", "RewriteContext", "RuleTable", "shrink_tensors"]
