"""fxprune: a declarative graph-rewriting compiler on torch.fx that removes whole channels, filters,
neurons and heads.

>>> import torch, fxprune
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
...                           torch.nn.Conv2d(16, 8, 3))
>>> res = fxprune.compile(net, torch.randn(1, 3, 16, 16), importance="l2", ratio=0.5)
>>> res.module[0].out_channels if hasattr(res.module, "__getitem__") else res.module.get_submodule("0").out_channels
8
"""

from .api import compile, register_function_rule, register_method_rule, register_module_rule
from .options import CompileOptions
from .prepare import prepare
from .result import CompileResult, Report
from .errors import (
    ConfigError,
    FxpruneError,
    InputError,
    PipelineError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
    ShortfallError,
    FxpruneWarning,
)
from .flops import Cost, count_cost
from .ir import ChannelGroup, ChannelRef, Constraint, Explicit, ParamSlice, Selection, Span
from .modules import PrunedMultiheadAttention
from .passes import (
    BNScaleImportance,
    GroupChannels,
    ImportancePass,
    MagnitudeImportance,
    RandomImportance,
    Rewrite,
    Select,
    Verify,
)
from .passes.gradient import HessianImportance, TaylorImportance
from .passes.absorb import AbsorbConstants
from .passes import ActivationImportance, LassoImportance, Reconstruct, SequentialPrune, ThiNetImportance
from .passes import calib  # calibration engine for data-driven passes (compile(..., calib=...))
from .pipeline import Context, Pass, PassResult, Pipeline, graph_pass, register_pass
from .rules import RULES, Rule, RuleContext, RuleTable
from . import sparsity  # registers importance="dead" and "l1_projection"
from .finetune import IterativePruner, finetune, iterative_prune
from .serialize import load, save

from .version import __version__

__all__ = [
    "compile", "prepare", "CompileOptions", "CompileResult", "Report",
    "register_module_rule", "register_function_rule", "register_method_rule",
    "FxpruneError", "ConfigError", "InputError", "TraceError", "UnsupportedOpError", "PipelineError",
    "VerificationError",
    "ShortfallError",
    "FxpruneWarning",
    "Cost", "count_cost",
    "Span", "Explicit", "ChannelRef", "ParamSlice", "Constraint", "ChannelGroup", "Selection",
    "PrunedMultiheadAttention",
    "GroupChannels", "ImportancePass", "MagnitudeImportance", "BNScaleImportance", "RandomImportance", "Select",
    "Rewrite", "Verify",
    "TaylorImportance", "HessianImportance",
    "Pass", "PassResult", "Context", "Pipeline", "graph_pass", "register_pass",
    "RULES", "Rule", "RuleContext", "RuleTable",
    "save", "load",
    "AbsorbConstants",
    "ThiNetImportance", "LassoImportance", "ActivationImportance", "Reconstruct", "SequentialPrune", "calib",
    "sparsity", "finetune", "iterative_prune", "IterativePruner",
    "__version__",
]
