"""Compressed export of sparse weights (Han et al.'s relative-index encoding): :func:`export_sparse` writes the
non-zero values and the gaps between them (``bits``-bit gaps, padding zeros where a gap overflows),
:func:`load_sparse` reads them back into dense tensors; :class:`ExportStats` measures the sizes against dense.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, InputError

from .magnitude import select_layers

__all__ = ["ExportStats", "export_sparse", "load_sparse"]

log = logging.getLogger(__name__)

# -- compressed export ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportStats:
    """Measured sizes (bytes): the written file vs ``torch.save`` of the dense state dict."""

    file_bytes: int
    dense_file_bytes: int
    payload_bytes: int  # bytes of the encoded sparse tensors (values + indices) alone
    dense_payload_bytes: int  # bytes of the same tensors stored densely
    fillers: int  # relative-index filler entries (gaps longer than the index width)

    @property
    def ratio(self) -> float:
        return self.dense_file_bytes / max(self.file_bytes, 1)


_FORMAT = "fxprune.sparse/1"


def _encode_relative(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Han's relative indexing over the flattened tensor: (values, gaps) with filler zeros for long gaps."""
    flat = w.detach().reshape(-1)
    pos = torch.nonzero(flat, as_tuple=False).reshape(-1).numpy().astype(np.int64)
    vals = flat[torch.as_tensor(pos)].numpy() if len(pos) else np.zeros(0, dtype=flat.numpy().dtype)
    cap = (1 << bits) - 1
    gaps = np.diff(np.concatenate([[-1], pos]))
    # a gap g > cap becomes ceil(g / cap) - 1 fillers of width cap and a final gap of g - fillers * cap
    nfill = np.maximum((gaps - 1) // cap, 0)
    total = int(len(pos) + nfill.sum())
    out_gap = np.full(total, cap, dtype=np.int64)
    out_val = np.zeros(total, dtype=vals.dtype)
    idx = np.cumsum(nfill + 1) - 1  # where each real entry lands
    out_gap[idx] = gaps - nfill * cap
    out_val[idx] = vals
    dt = torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32
    return torch.from_numpy(out_val.copy()), torch.from_numpy(out_gap).to(dt), int(nfill.sum())


def _decode_relative(values: torch.Tensor, gaps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    flat = torch.zeros(n, dtype=values.dtype)
    if values.numel():
        pos = torch.cumsum(gaps.to(torch.int64), 0) - 1
        flat[pos] = values
    return flat.reshape(tuple(shape))


def export_sparse(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                  layers: Any = None, index_bits: int = 8, values_dtype: torch.dtype | None = None,
                  min_sparsity: float = 0.5) -> ExportStats:
    """Write the state dict with sparse weights in Han's relative-index form; return measured sizes.

    Weights of ``layers`` (default: every Linear/Conv layer; or pass a state dict to encode every
    tensor) that are at least ``min_sparsity`` zero are stored as ``values`` + ``gaps`` (uint8 for
    ``index_bits=8``: position of each nonzero relative to the previous one, with explicit zero fillers
    when a gap exceeds 2^bits − 1); everything else is stored dense. The file holds only tensors, strings
    and ints, so ``torch.load(path, weights_only=True)`` reads it; :func:`load_sparse` decodes it.
    ``values_dtype`` (e.g. ``torch.float16``) optionally stores the values in a smaller float type.
    """
    if not isinstance(index_bits, int) or isinstance(index_bits, bool) or not 2 <= index_bits <= 31:
        raise ConfigError(f"index_bits must be an integer in [2, 31], got {index_bits!r}")
    if not 0 <= min_sparsity <= 1:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if isinstance(model, nn.Module):
        state = {k: v.detach() for k, v in model.state_dict().items()}
        targets = {f"{n}.weight" if n else "weight" for n in select_layers(model, layers)}
    elif isinstance(model, Mapping):
        state = {k: v.detach() for k, v in model.items()}
        targets = {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    else:
        raise InputError(f"export_sparse needs an nn.Module or a state dict, got {type(model).__name__}")
    dense: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    payload = dense_payload = fillers = 0
    for k, v in state.items():
        if k in targets and v.numel() and float((v == 0).float().mean()) >= min_sparsity:
            vals, gaps, nf = _encode_relative(v.cpu(), index_bits)
            if values_dtype is not None:
                vals = vals.to(values_dtype)
            sparse[k] = {"values": vals, "gaps": gaps, "shape": list(v.shape), "dtype": str(v.dtype)}
            payload += vals.numel() * vals.element_size() + gaps.numel() * gaps.element_size()
            dense_payload += v.numel() * v.element_size()
            fillers += nf
        else:
            dense[k] = v.cpu().clone()
    torch.save({"format": _FORMAT, "index_bits": index_bits, "dense": dense, "sparse": sparse}, path)
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in state.items()}, buf)
    return ExportStats(os.path.getsize(path), buf.getbuffer().nbytes, payload, dense_payload, fillers)


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Decode a file written by :func:`export_sparse` into a dense state dict (and load it into ``model``)."""
    blob = torch.load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise InputError(f"{os.fspath(path)!r} is not a file written by fxprune.sparsity.export_sparse")
    state = dict(blob["dense"])
    for k, e in blob["sparse"].items():
        dt = getattr(torch, e["dtype"].replace("torch.", ""))
        state[k] = _decode_relative(e["values"], e["gaps"], e["shape"]).to(dt)
    if model is not None:
        model.load_state_dict(state)
    return state


