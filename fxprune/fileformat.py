"""The fxprune model file: plain data and tensors only, a checksum over both, architecture fingerprints.

A file is a ``torch.save`` of a dict holding only tensors, strings, numbers, booleans, ``None``, lists and
dicts, so it opens with ``torch.load(path, weights_only=True)``: reading a model file never executes code
from it. :func:`read_file` checks the header, the version and the checksum; what the plan inside means is
:mod:`fxprune.serialize`'s business.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .errors import ConfigError, InputError

__all__ = ["FORMAT", "VERSION", "FormatError", "ArchitectureMismatchError", "plain_data", "canonical", "checksum",
           "fingerprint", "graph_fingerprint", "write_file", "read_file"]

FORMAT = "fxprune"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


class FormatError(InputError):
    """The file is not an fxprune model file, or it is damaged (truncated, edited, wrong checksum)."""


class ArchitectureMismatchError(InputError):
    """The model given to :func:`load` is not the architecture the file was saved from."""


# -- plain-data helpers -----------------------------------------------------------------------------


def plain_data(x: Any, where: str = "value") -> Any:
    """``x`` as JSON-like plain data (tuples become lists); anything else is a ConfigError."""
    if isinstance(x, _PLAIN):
        return x
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (list, tuple)):
        return [plain_data(v, where) for v in x]
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: keys must be strings, got {k!r}")
            out[k] = plain_data(v, where)
        return out
    raise ConfigError(f"{where}: {type(x).__name__} is not plain data (str, number, bool, None, list, dict)")


def canonical(x: Any) -> bytes:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def checksum(body: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of every non-tensor field, then each tensor (sorted by name)."""
    h = hashlib.sha256()
    h.update(canonical({k: v for k, v in body.items() if k not in ("state_dict", "checksum", "hmac")}))
    for name in sorted(body["state_dict"]):
        t = body["state_dict"][name]
        h.update(canonical([name, str(t.dtype), list(t.shape)]))
        h.update(tensor_bytes(t))
    return h.hexdigest()


def fingerprint(module: nn.Module) -> str:
    """sha256 of the names and shapes of ``module``'s parameters and buffers (its architecture's identity)."""
    items = sorted((k, list(v.shape)) for k, v in module.state_dict().items())
    return hashlib.sha256(canonical(items)).hexdigest()


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """sha256 of the traced graph's structure: every node's op, target and arguments (nodes by position)."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def arg(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return ["%", index[a]]
        if isinstance(a, (list, tuple)):
            return [arg(v) for v in a]
        if isinstance(a, dict):
            return {str(k): arg(v) for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))}
        return repr(a)

    def target(t: Any) -> str:
        if isinstance(t, str):
            return t
        try:
            return fx.node._get_qualified_name(t)
        except Exception:  # noqa: BLE001 - any unnamed callable is described by its repr
            return repr(t)

    rows = [[n.op, target(n.target), arg(n.args), arg(n.kwargs)] for n in gm.graph.nodes]
    return hashlib.sha256(canonical(rows)).hexdigest()


def _signature(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def _check_key(key: Any) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ConfigError(f"key must be non-empty bytes or str (an HMAC secret), got {type(key).__name__}")
    return bytes(key)


def write_file(path: str | os.PathLike, body: dict[str, Any], key: bytes | str | None = None) -> None:
    """Write ``body`` with its checksum (and, with ``key``, an HMAC-SHA256 of it: tamper evidence for whoever
    holds the key; the plain checksum only detects damage, anyone can recompute it)."""
    key = _check_key(key)
    body.pop("hmac", None)
    body["checksum"] = checksum(body)
    if key is not None:
        body["hmac"] = _signature(key, body["checksum"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(body, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_file(path: str | os.PathLike, key: bytes | str | None = None) -> dict[str, Any]:
    """Open an fxprune model file with ``torch.load(weights_only=True)`` and check its format and checksum
    (and, with ``key``, its HMAC: a file saved without that key, or edited since, is refused).

    Returns the stored dict (plan, metadata, ``state_dict``); raises :class:`FormatError` on anything else.
    """
    key = _check_key(key)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such fxprune model file: {path}")
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, flipped bytes, pickled code refused by weights_only...
        raise FormatError(f"{path} is not a readable fxprune model file ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise FormatError(f"{path} is not an fxprune model file (no 'format': 'fxprune' header)")
    if body.get("version") != VERSION:
        raise FormatError(f"{path} has format version {body.get('version')!r}; this fxprune reads version {VERSION}")
    need = ("arch", "arch_tensors", "state_dict", "checksum", "training", "meta")
    need += ("regions",) if "regions" in body else ("inputs", "steps")  # hierarchical: one plan per region
    missing = [k for k in need if k not in body]
    if missing:
        raise FormatError(f"{path} is incomplete: missing {', '.join(missing)}")
    sd = body["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FormatError(f"{path}: 'state_dict' must map names to tensors")
    if checksum({k: v for k, v in body.items() if k != "hmac"}) != body["checksum"]:
        raise FormatError(f"{path} failed its checksum: the file was modified or damaged after it was saved")
    if key is not None:
        sig = body.get("hmac")
        if not isinstance(sig, str):
            raise FormatError(f"{path} carries no HMAC: it was saved without a key, so it cannot be authenticated")
        if not hmac.compare_digest(sig, _signature(key, body["checksum"])):
            raise FormatError(f"{path} failed its HMAC check: it was modified after it was saved, or saved with "
                              "another key")
    return body
