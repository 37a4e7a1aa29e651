"""Deterministic, seeded re-initialisation of parameters and normalisation statistics.

The point is that every channel of every layer of a drawn network is distinguishable: a pruning bug that
keeps the wrong channel index then changes the output, and the masked-reference oracle notices.

Owns :func:`randomize_` (alias :func:`randomize_bn`), :func:`init_params_` and :func:`seeded_generator`, the
private ``torch.Generator`` factory that every seeded draw of the package (weights, norm statistics, example
inputs) goes through, so that the global torch RNG is neither used nor advanced.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["init_params_", "randomize_", "randomize_bn", "seeded_generator"]

#: The normalisation module types :func:`randomize_` touches (RMSNorm only where torch has it).
_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``seed`` (reduced modulo ``2**63``)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) % (2**63))
    return g


@torch.no_grad()
def _fill_(t: Tensor | None, values: Tensor) -> None:
    """Copy ``values`` (any shape with ``t.numel()`` entries) into ``t`` in place; ``None`` is skipped."""
    if t is not None:
        t.copy_(values.reshape(t.shape).to(device=t.device, dtype=t.dtype))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every normalisation layer of ``module`` distinct, seeded per-channel parameters and statistics.

    In place, for every BatchNorm / GroupNorm / LayerNorm / InstanceNorm / RMSNorm sub-module (in
    ``named_modules`` order): ``weight ~ U(0.5, 1.5)`` with the sign flipped on about 20% of the entries,
    ``bias ~ N(0, 0.5)``, ``running_mean ~ N(0, 0.5)``, ``running_var ~ U(0.5, 2.0)``. Tensors that are
    ``None`` (non-affine layers, no running statistics) are skipped. Only a private ``torch.Generator``
    seeded with ``seed`` is used. Returns ``module``.

    >>> bn = randomize_(torch.nn.BatchNorm2d(4), seed=0)
    >>> bool(torch.all(bn.running_var >= 0.5)) and len(set(bn.weight.tolist())) == 4
    True
    """
    g = seeded_generator(seed)
    f64 = torch.float64
    for _, m in module.named_modules():
        if not isinstance(m, _NORM_TYPES):
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor):
            n = w.numel()
            mag = torch.rand(n, generator=g, dtype=f64) + 0.5
            sign = torch.where(torch.rand(n, generator=g, dtype=f64) < 0.2, -1.0, 1.0).to(f64)
            _fill_(w, mag * sign)
        b = getattr(m, "bias", None)
        if isinstance(b, Tensor):
            _fill_(b, torch.randn(b.numel(), generator=g, dtype=f64) * 0.5)
        rm = getattr(m, "running_mean", None)
        if isinstance(rm, Tensor):
            _fill_(rm, torch.randn(rm.numel(), generator=g, dtype=f64) * 0.5)
        rv = getattr(m, "running_var", None)
        if isinstance(rv, Tensor):
            _fill_(rv, torch.rand(rv.numel(), generator=g, dtype=f64) * 1.5 + 0.5)
    return module


randomize_bn = randomize_


@torch.no_grad()
def init_params_(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter of ``module`` from a private generator seeded with ``seed``.

    Parameters with two or more dimensions get ``U(-b, b)``, ``b = sqrt(3 / fan_in)`` (variance preserving,
    ``fan_in = weight[0].numel()``, correct for grouped convolutions and ``in_proj_weight``); one-dimensional
    parameters get ``U(-0.5, 0.5)``. Shared parameters are initialised once. Call :func:`randomize_` afterwards
    to give normalisation layers their distinguishable values. Returns ``module``.
    """
    g = seeded_generator(seed)
    for _, p in module.named_parameters():  # deduplicated, deterministic order
        if p.dim() >= 2:
            fan_in = max(1, p[0].numel())
            bound = math.sqrt(3.0 / fan_in)
            _fill_(p, (torch.rand(p.numel(), generator=g, dtype=torch.float64) * 2 - 1) * bound)
        else:
            _fill_(p, torch.rand(p.numel(), generator=g, dtype=torch.float64) - 0.5)
    return module
