"""Replacement modules for layers whose torch class cannot express a pruned shape
(:class:`~fxprune.modules.mha.PrunedMultiheadAttention`), and the traceable stand-ins of torch's transformer
containers (:mod:`fxprune.modules.transformer`)."""

from .mha import PrunedMultiheadAttention
from .transformer import register_trace_through

__all__ = ["PrunedMultiheadAttention", "register_trace_through"]
