"""Hugging Face helpers for the command line and the benchmarks: a model from a local directory, example
token inputs shaped for its kind (causal LM, encoder, encoder-decoder, vision), and calibration batches of
real text tokenised with the model's own tokenizer. ``transformers`` is imported only when these run (it is
an optional extra: ``pip install 'fxprune[hf]'``).

>>> import torch
>>> token_batches(list(range(100)), seq_len=8, batches=3, batch_size=2)[0]["input_ids"].shape
torch.Size([2, 8])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["load_hf", "hf_example_inputs", "token_batches", "text_batches", "tokenizer_for"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("hf:PATH models need transformers (pip install 'fxprune[hf]')") from exc
    return transformers


def load_hf(path: str) -> tuple[nn.Module, str]:
    """The model saved in the local directory ``path`` (``from_pretrained``, offline), as the class its config
    names (``LlamaForCausalLM``...); a directory with only a ``config.json`` gives a randomly initialised model.
    Returns the model (eval mode) and a note on how it was made."""
    T = _transformers()
    root = Path(path)
    if not (root / "config.json").is_file():
        raise ConfigError(f"hf:{path}: not a Hugging Face model directory (no config.json there)")
    cfg = T.AutoConfig.from_pretrained(str(root), local_files_only=True)
    archs = list(getattr(cfg, "architectures", None) or [])
    cls = getattr(T, archs[0], None) if archs else None
    if cls is None:
        cls = T.AutoModel
    weights = any(root.glob("*.safetensors")) or any(root.glob("*.bin"))
    if weights:
        model = cls.from_pretrained(str(root), local_files_only=True)
        how = f"{type(model).__name__} loaded from {path}"
    else:
        model = cls(cfg) if cls is not T.AutoModel else T.AutoModel.from_config(cfg)
        how = f"{type(model).__name__} from {path}/config.json with random weights (no weight files there)"
    return model.eval(), how


def hf_example_inputs(model: nn.Module, batch: int = 1, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword example inputs for a Hugging Face model: ``input_ids`` and ``attention_mask`` (plus
    ``decoder_input_ids`` for encoder-decoders), or ``pixel_values`` for a vision model."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError(f"{type(model).__name__} has no Hugging Face config")
    gen = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        side = int(getattr(cfg, "image_size", 224))
        return {"pixel_values": torch.randn(batch, int(getattr(cfg, "num_channels", 3)), side, side, generator=gen)}
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if vocab < 2:
        raise ConfigError(f"{type(model).__name__}: its config has no vocab_size; give --input-shape instead")
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(cfg, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(0, vocab, (batch, max(seq // 2, 2)), generator=gen)
    return out


def token_batches(tokens: list[int], seq_len: int, batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``batches`` batches of ``batch_size`` consecutive, non-overlapping windows of ``seq_len`` tokens (no
    padding, so every position is a real token), as ``input_ids``/``attention_mask`` mappings."""
    need = seq_len * batch_size
    if len(tokens) < need:
        raise ConfigError(f"the calibration text has {len(tokens)} tokens; one batch of {batch_size} x {seq_len} "
                          f"needs {need} (give more text, or a smaller --calib-batch-size / --input-ids length)")
    out = []
    t = torch.as_tensor(tokens, dtype=torch.long)
    for i in range(min(batches, len(tokens) // need)):
        ids = t[i * need:(i + 1) * need].reshape(batch_size, seq_len)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def tokenizer_for(path: str) -> Any:
    T = _transformers()
    try:
        return T.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--calib text: needs the model's tokenizer in {path} ({exc})") from exc


def text_batches(path: str, text_file: str, seq_len: int, batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from a text file tokenised with the tokenizer saved next to the model in ``path``
    (see :func:`token_batches`)."""
    f = Path(text_file)
    if not f.is_file():
        raise ConfigError(f"--calib text:{text_file}: no such file")
    tok = tokenizer_for(path)
    text = f.read_text(encoding="utf-8", errors="replace")
    if f.suffix == ".jsonl":  # one {"text": ...} object per line
        text = "\n".join(str(json.loads(line).get("text", "")) for line in text.splitlines() if line.strip())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return token_batches(list(ids), seq_len, batches, batch_size)
