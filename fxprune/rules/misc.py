"""Rules for helper functions that torch and torchvision keep as single graph nodes (``torch.fx.wrap``).

``torch._assert`` reads shapes only. torchvision's Swin helpers compute head counts and widths from the
input inside the function, so they are *opaque*: only the batch dim passes through and every other dim
they touch is pinned (the MLP widths between them stay prunable). Stochastic depth and drop-block are
element-wise.
"""

from __future__ import annotations

import torch

from .base import RULES, Rule, RuleContext
from .elementwise import Unary

__all__ = ["NoOp", "Opaque"]


class NoOp(Rule):
    """Reads tensors only for their shapes/values and returns no tensor (assertions)."""

    name = "no_op"

    def analyze(self, node, rc: RuleContext) -> None:
        for x in rc.tensor_args():
            for ax in rc.all_dims(x):
                rc.free(ax)


class Opaque(Rule):
    """A known function whose internals fxprune does not model: ties the listed leading dims of its
    first input to the output, pins everything else."""

    name = "opaque"

    def __init__(self, name: str, tie_leading: int = 1) -> None:
        self.name = name
        self.tie_leading = tie_leading

    def analyze(self, node, rc: RuleContext) -> None:
        x = rc.arg(0)
        if not rc.is_tensor(x) or rc.out_shape() is None:
            return
        for d in range(min(self.tie_leading, len(rc.shape(x)), len(rc.out_shape()))):
            if rc.shape(x)[d] == rc.out_shape()[d]:
                rc.tie(rc.act(x, d), rc.out(d))


RULES.register_function(torch._assert, NoOp())
try:
    from torchvision.models import swin_transformer as _swin
    from torchvision.ops import drop_block as _db
    import importlib

    _sd = importlib.import_module("torchvision.ops.stochastic_depth")

    for _fn in ("shifted_window_attention", "_patch_merging_pad", "_get_relative_position_bias"):
        if hasattr(_swin, _fn):
            RULES.register_function(getattr(_swin, _fn), Opaque(f"swin.{_fn}", tie_leading=1))
    RULES.register_function((_sd.stochastic_depth, _db.drop_block2d, _db.drop_block3d), Unary("stochastic"))
except ImportError:  # pragma: no cover
    pass
