"""Argument checks of :class:`~fxprune.modules.mha.PrunedMultiheadAttention`, as torch's multi-head attention
makes them: masks made additive, shapes checked, keep-lists validated."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["IndexLike", "canonical_mask", "index_list", "shape_check"]

IndexLike = Union[Sequence[int], Tensor, range, None]


def canonical_mask(
    mask: Optional[Tensor],
    mask_name: str,
    other_type: Optional[torch.dtype],
    other_name: str,
    target_type: torch.dtype,
    check_other: bool = True,
) -> Optional[Tensor]:
    """Turn a bool mask into an additive float mask (True -> -inf), like torch's ``F._canonical_mask``."""
    if mask is None:
        return None
    is_float = torch.is_floating_point(mask)
    if mask.dtype != torch.bool and not is_float:
        raise AssertionError(f"only bool and floating types of {mask_name} are supported")
    if check_other and other_type is not None and mask.dtype != other_type:
        warnings.warn(
            f"Support for mismatched {mask_name} and {other_name} is deprecated. Use same type for both instead.",
            stacklevel=2,
        )
    if not is_float:
        mask = torch.zeros_like(mask, dtype=target_type).masked_fill_(mask, float("-inf"))
    return mask


def index_list(idx: IndexLike, n: int, what: str) -> Optional[list[int]]:
    """Validate a keep-list against ``range(n)``. Accepts ints, a 1-D integer tensor or a 1-D bool mask."""
    if idx is None:
        return None
    if isinstance(idx, Tensor):
        if idx.dim() != 1:
            raise ConfigError(f"{what}: expected a 1-D index tensor, got shape {tuple(idx.shape)}")
        if idx.dtype == torch.bool:
            if idx.numel() != n:
                raise ConfigError(f"{what}: bool mask has length {idx.numel()}, expected {n}")
            idx = idx.nonzero().flatten()
        elif idx.is_floating_point() or idx.is_complex():
            raise ConfigError(f"{what}: index tensor must be integer or bool, got {idx.dtype}")
        out = [int(i) for i in idx.tolist()]
    else:
        out = []
        for i in idx:
            if isinstance(i, bool):
                raise ConfigError(f"{what}: indices must be integers, got {i!r}")
            try:
                out.append(operator.index(i))
            except TypeError:
                raise ConfigError(f"{what}: indices must be integers, got {i!r}") from None
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ConfigError(f"{what}: indices {bad} out of range(0, {n})")
    if len(set(out)) != len(out):
        raise ConfigError(f"{what}: duplicate indices in {out}")
    return out


def shape_check(num_heads: int, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                attn_mask: Optional[Tensor]) -> bool:
    """torch's ``_mha_shape_check`` with the pruned head count: whether the call is batched."""
    # torch's _mha_shape_check, with the pruned head count.
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError(
                "For batched (3-D) `query`, expected `key` and `value` to be 3-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError(
                "For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D"
                f" but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(
                "For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                f" but found {attn_mask.dim()}-D tensor instead"
            )
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError(
                "For unbatched (2-D) `query`, expected `key` and `value` to be 2-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError(
                "For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D"
                f" but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError(
                    "For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                    f" but found {attn_mask.dim()}-D tensor instead"
                )
            if attn_mask.dim() == 3:
                expected = (num_heads, query.shape[0], key.shape[0])
                if attn_mask.shape != expected:
                    raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
        return False
    raise AssertionError(
        f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
    )
