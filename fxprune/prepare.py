"""Capture: from the user's model and example inputs to a private, shape-propagated graph with its cost.

:func:`prepare` copies the model (the user's model is never touched), puts the copy in eval mode, captures
it with the chosen front end (:mod:`fxprune.trace` for torch.fx, :mod:`fxprune.export` for torch.export),
propagates shapes (:mod:`fxprune.shapes`) and records the MACs and parameters (:mod:`fxprune.flops`). Every
pass, the testing helpers, the sensitivity scan, the fine-tuning helpers and ``fxprune.load`` start here.

>>> import torch
>>> gm, inputs = prepare(torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(2, 4))
>>> from fxprune import meta
>>> meta.get(gm, "cost").macs
24
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from . import meta
from .clone import set_training
from .errors import InputError
from .export import capture
from .flops import count_cost
from .rules import RULES, RuleTable
from .shapes import propagate_shapes
from .trace import copy_model, normalize_inputs

__all__ = ["prepare", "prepare_with_note"]


def prepare_with_note(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any] = (),
                      rules: RuleTable = RULES, frontend: str = "auto", share_weights: bool = False
                      ) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...], str]:
    """:func:`prepare`, plus the note saying why a fallback front end was used ('' if none).

    ``share_weights=True`` (what ``fxprune.compile`` uses): the graph's parameters are views of the user's,
    not copies (:func:`fxprune.trace.copy_model`); the caller must treat the graph as read-only."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    work = copy_model(model, share_weights)
    set_training(work, False)
    gm, _, note = capture(work, inputs, rules.has_module_rule, leaf_modules, frontend)
    propagate_shapes(gm, inputs)
    meta.put(gm, "cost", count_cost(gm, rules))
    return gm, inputs, note


def prepare(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any] = (),
            rules: RuleTable = RULES, frontend: str = "auto") -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Copy, capture and shape-propagate ``model``.

    ``frontend``: ``"fx"`` (symbolic tracing), ``"export"`` (torch.export, ATen graph) or ``"auto"`` /
    ``"whole"`` (fx, falling back to export when tracing fails); see :mod:`fxprune.export`."""
    gm, inputs, _ = prepare_with_note(model, example_inputs, leaf_modules, rules, frontend)
    return gm, inputs
