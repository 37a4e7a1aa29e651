"""Public testing helpers: the masked-reference oracle, an independent oracle that reads what was kept off the
pruned weights' values (:mod:`.independent`), and hypothesis strategies for random networks.

``fxprune.testing.strategies`` needs ``hypothesis`` (the ``test`` extra); the oracle does not.
"""

from .independent import assert_pruned_like_original, dropped_inputs_zeroed, kept_inputs
from .oracle import (
    PruneCheck,
    assert_model_unchanged,
    assert_prune_equivalent,
    assert_transform_equivalent,
    prune_with,
    random_selection,
    snapshot,
)

__all__ = [
    "assert_pruned_like_original",
    "dropped_inputs_zeroed",
    "kept_inputs",
    "PruneCheck",
    "assert_prune_equivalent",
    "assert_transform_equivalent",
    "assert_model_unchanged",
    "prune_with",
    "random_selection",
    "snapshot",
    "strategies",
]


def __getattr__(name: str):
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(name)
