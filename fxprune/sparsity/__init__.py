"""Training-time sparsity tools and the pruning-method extras that sit around the compiler.

Magnitude connection pruning (Han et al.) lives in :mod:`.magnitude`, its compressed export in
:mod:`.sparse_io` and the structural payoff criterion ``importance="dead"`` in :mod:`.dead`; Li et al.'s sensitivity analysis, ratio choice and projection-shortcut rule
(``importance="l1_projection"``) in :mod:`.sensitivity`.
"""

from ..passes.importance import register_importance
from .dead import DeadUnitImportance
from .magnitude import MagnitudePruner, PruneStep, SparsityReport, iterative_magnitude_prune, sparsity_report
from .sparse_io import ExportStats, export_sparse, load_sparse
from .sensitivity import (
    MissingDependencyError,
    ProjectionShortcutImportance,
    SensitivityRow,
    SensitivityTable,
    choose_ratios,
    sensitivity,
)

register_importance("dead", DeadUnitImportance)

__all__ = [
    "MagnitudePruner", "PruneStep", "iterative_magnitude_prune", "SparsityReport", "sparsity_report",
    "ExportStats", "export_sparse", "load_sparse", "DeadUnitImportance",
    "sensitivity", "SensitivityRow", "SensitivityTable", "choose_ratios", "ProjectionShortcutImportance",
    "MissingDependencyError",
]

# Network Slimming (Liu et al. 2017) and ISTA on BN scales (Ye et al. 2018); exact removal of γ = 0
# channels is the compiler's AbsorbConstants pass (fxprune.passes.absorb).
from .ista import ISTA, BNScaling, ista_penalties, scale_bn  # noqa: E402
from .slimming import (  # noqa: E402
    BNL1,
    SlimmingHistory,
    SlimmingRound,
    SlimmingSelect,
    bn_modules,
    init_bn_gamma,
    slimming_prune,
    slimming_schedule,
)

__all__ += [
    "BNL1", "init_bn_gamma", "bn_modules", "SlimmingSelect", "slimming_prune", "slimming_schedule",
    "SlimmingRound", "SlimmingHistory", "ISTA", "ista_penalties", "scale_bn", "BNScaling",
]
