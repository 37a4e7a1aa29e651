"""An oracle that takes nothing from fxprune's analysis: what was kept is read off the pruned weights' values.

``assert_pruned_like_original(original, pruned, inputs)`` finds, for every weighted layer (Linear, Conv,
ConvTranspose) of the original, which of its input channels survive, by locating each value of the pruned
layer's weight in the original weight (random-initialised weights have distinct values, so every value
names its position). It then zeroes the dropped input channels in a *copy of the original model* and
compares that copy with the pruned module. Nothing comes from the groups, the selection, the masked
reference or the rewrite: a wrong span, a wrong dim, a slice dropped or a group count miscounted in any rule
gives a different function, and this check sees it.

It holds for pure channel removal (no reconstruction, no absorbed constants: compile with ``absorb=False``
and no ``reconstruct``) of models whose weights have distinct values (random initialisation). A pruned layer
whose weight values cannot all be found in the original is itself a failure (the weights were changed).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..passes.verify import compare_outputs, run_outputs

__all__ = ["kept_inputs", "dropped_inputs_zeroed", "assert_pruned_like_original"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _input_channel(mod: nn.Module, pos: np.ndarray) -> np.ndarray:
    """The input channel of each weight position ``pos`` (rows of ``np.unravel_index`` over the weight)."""
    w = mod.weight
    if isinstance(mod, nn.Linear):
        return pos[1]
    g = mod.groups
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return pos[0]  # weight (in, out/groups, k...)
    per_group_out = w.shape[0] // g
    return (pos[0] // per_group_out) * w.shape[1] + pos[1]  # weight (out, in/groups, k...)


def kept_inputs(orig: nn.Module, new_weight: torch.Tensor, name: str = "") -> np.ndarray:
    """Sorted input channels of ``orig`` (a Linear/Conv) whose weights appear in ``new_weight``."""
    old = orig.weight.detach().to(torch.float64).flatten().numpy()
    order = np.argsort(old, kind="stable")
    srt = old[order]
    vals = new_weight.detach().to(torch.float64).flatten().numpy()
    idx = np.clip(np.searchsorted(srt, vals), 0, len(srt) - 1)
    found = srt[idx] == vals
    if not found.all():
        raise AssertionError(f"{name}: {int((~found).sum())} of {vals.size} pruned weight values are not in the "
                             "original weight (weights changed, or not a channel removal)")
    dup = np.zeros(len(srt), dtype=bool)
    dup[1:] |= srt[1:] == srt[:-1]
    dup[:-1] |= srt[1:] == srt[:-1]
    unique = ~dup[idx]
    pos = np.stack(np.unravel_index(order[idx[unique]], tuple(orig.weight.shape)))
    return np.unique(_input_channel(orig, pos)) if pos.size else np.zeros(0, dtype=int)


def _in_features(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def dropped_inputs_zeroed(original: nn.Module, pruned: nn.Module) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """A copy of ``original`` in which every weighted layer's input channels missing from ``pruned`` (matched
    by parameter name, ``<layer>.weight``) have zero weights; and the dropped channels per layer."""
    ref = copy.deepcopy(original)
    new_params = dict(pruned.named_parameters(remove_duplicate=False))
    originals = dict(original.named_modules())
    dropped: dict[str, np.ndarray] = {}
    for name, mod in ref.named_modules():
        w_name = f"{name}.weight" if name else "weight"
        if not isinstance(mod, _WEIGHTED) or w_name not in new_params:
            continue
        orig = originals[name]
        kept = kept_inputs(orig, new_params[w_name], name)
        gone = np.setdiff1d(np.arange(_in_features(mod)), kept)
        if new_params[w_name].shape == orig.weight.shape:
            gone = np.zeros(0, dtype=int)  # nothing removed (a value that repeats is not a dropped input)
        if not gone.size:
            continue
        dropped[name] = gone
        with torch.no_grad():
            w = mod.weight
            if isinstance(mod, nn.Linear):
                w[:, gone] = 0
            elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                w[gone] = 0
            else:
                per_in, per_out = w.shape[1], w.shape[0] // mod.groups
                for c in gone:
                    grp, col = divmod(int(c), per_in)
                    w[grp * per_out:(grp + 1) * per_out, col] = 0
    return ref, dropped


def assert_pruned_like_original(original: nn.Module, pruned: nn.Module, inputs: Sequence[Any] | torch.Tensor,
                                *, rtol: float = 1e-5, atol: float = 1e-6) -> dict[str, np.ndarray]:
    """Assert ``pruned`` computes what ``original`` computes with the dropped input channels (recovered from
    the weights' values) zeroed; returns the dropped channels per layer. Both run in eval mode, in float64."""
    xs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    ref, dropped = dropped_inputs_zeroed(original, pruned)
    ref.eval()
    was = pruned.training
    pruned.eval()
    try:
        got = run_outputs(pruned, xs, torch.float64)
        want = run_outputs(ref, xs, torch.float64)
    finally:
        pruned.train(was)
    assert [t.shape for t in got] == [t.shape for t in want], (
        f"output shapes differ: {[tuple(t.shape) for t in want]} -> {[tuple(t.shape) for t in got]}")
    msg = compare_outputs(got, want, rtol, atol)
    assert not msg, f"pruned module differs from the original with its dropped inputs zeroed: {msg}; dropped: " + \
        ", ".join(f"{k}: {len(v)}" for k, v in dropped.items())
    return dropped
