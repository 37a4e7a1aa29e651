"""Stock Hugging Face models (``transformers``, small random configs) pruned with fxprune's defaults stay
Hugging Face models: the result is the model's own class (``generate()`` with its KV cache,
``attention_mask=``, other batch and sequence sizes, ``.to(bfloat16)``, training, ``save_pretrained``), and it
computes what the graph result computes — which is itself checked against the masked reference in float64
(``verify="equivalence"``). The oracles here never come from the class copy: greedy decoding re-runs the
graph result on the whole sequence at every step (no cache), and the graph result is the verified one.
"""

from __future__ import annotations

import tempfile

import pytest
import torch

import fxprune
from fxprune.testing import assert_model_unchanged, snapshot

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")

V = 128


def make(name: str) -> torch.nn.Module:
    T = transformers
    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**small)).eval()
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**small)).eval()
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**small, sliding_window=None)).eval()
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=1)).eval()
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=64)).eval()
    if name == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                       num_heads=4, decoder_start_token_id=0)).eval()
    if name == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)).eval()
    if name == "vit":
        return T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)).eval()
    raise KeyError(name)


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, V, (b, t), generator=torch.Generator().manual_seed(seed))


def logits(out) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out.logits


def greedy_on_graph(gm, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by re-running the graph result on the whole sequence (no cache)."""
    seq = prompt
    for _ in range(n):
        nxt = logits(gm(seq))[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


_CACHE: dict[str, fxprune.CompileResult] = {}


def compiled(name: str) -> tuple[torch.nn.Module, fxprune.CompileResult]:
    """One compile per model with the defaults (ratio 0.5, a batch-1 example) and the float64 check."""
    model = make(name)
    if name not in _CACHE:
        snap = snapshot(model)
        if name == "t5":
            ex = (ids(1, 8), torch.ones(1, 8, dtype=torch.long), ids(1, 5, 2))
        elif name == "vit":
            ex = (torch.randn(1, 3, 32, 32),)
        elif name == "bert":
            ex = {"input_ids": ids(1, 8), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
        else:
            ex = (ids(1, 8),)
        _CACHE[name] = fxprune.compile(model, ex, ratio=0.5, verify="equivalence")
        assert_model_unchanged(model, snap, training=False)
    return model, _CACHE[name]


CAUSAL = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lm_keeps_its_class_and_generates_like_the_graph(name):
    model, res = compiled(name)
    pm = res.module
    assert type(pm) is type(model) and res.report.form == f"class {type(model).__name__}"
    assert res.report.groups_pruned >= 4  # heads and MLP width of both layers
    assert res.report.params_after < 0.65 * res.report.params_before
    assert "another batch/sequence size" in " ".join(res.report.notes)
    prompt = ids(2, 5, 3)
    got = pm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(got, greedy_on_graph(res.graph_module, prompt, 6))
    # another batch and sequence length than the example's, logits equal to the verified graph's
    x = ids(3, 11, 4)
    torch.testing.assert_close(logits(pm(x)), logits(res.graph_module(x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_lm_attention_mask_dtype_and_training(name):
    model, res = compiled(name)
    pm = res.module
    # left padding: the padded row generates what it generates alone
    a = ids(1, 6, 5)
    b = ids(1, 4, 6)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    both = pm.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = pm.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 2:], alone[0])
    # bfloat16 (a copy: res.module shares its tensors with res.graph_module)
    import copy
    low = copy.deepcopy(pm).to(torch.bfloat16)
    x = ids(2, 7, 7)
    ref = logits(pm(x))
    assert (logits(low(x)).float() - ref).abs().max() < 0.05 * ref.abs().max()
    # training: the loss backpropagates into the pruned layers
    train = copy.deepcopy(pm).train()
    loss = train(x, labels=x).loss
    loss.backward()
    grads = [p.grad for n, p in train.named_parameters() if "mlp" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_uniformly_pruned_lm_round_trips_through_save_pretrained(name):
    model, res = compiled(name)
    cfg = res.module.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (2, 1, 64)
    assert cfg.head_dim == 16  # kept explicit: a head's width does not change
    assert model.config.num_attention_heads == 4  # the user's config is untouched
    with tempfile.TemporaryDirectory() as d:
        res.module.save_pretrained(d)
        back = type(model).from_pretrained(d).eval()
    x = ids(2, 9, 8)
    torch.testing.assert_close(logits(back(x)), logits(res.module(x)), rtol=0, atol=0)


def test_derived_head_width_is_reported_and_fxprune_save_keeps_the_class(tmp_path):
    """GPT-2 derives a head's width from n_embd / n_head: a config cannot describe pruned heads, which the
    report says; fxprune.save/load round-trips the class instead."""
    model, res = compiled("gpt2")
    assert any("save_pretrained/from_pretrained will not restore" in n for n in res.report.notes)
    assert res.module.lm_head.weight is res.module.transformer.wte.weight  # tied embeddings stay tied
    path = tmp_path / "gpt2.pt"
    fxprune.save(res, path)
    back = fxprune.load(path, make("gpt2"))
    assert type(back) is type(model)
    x = ids(2, 6, 9)
    torch.testing.assert_close(logits(back(x)), logits(res.module(x)), rtol=0, atol=0)
    prompt = ids(1, 4, 10)
    assert torch.equal(back.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0),
                       greedy_on_graph(res.graph_module, prompt, 3))


def test_bert_with_attention_mask_as_keyword_inputs():
    model, res = compiled("bert")
    assert type(res.module) is type(model)
    x = ids(3, 7, 11)
    mask = torch.ones_like(x)
    mask[0, 4:] = 0
    got = res.module(input_ids=x, attention_mask=mask).last_hidden_state
    want = res.graph_module(input_ids=x, attention_mask=mask)["last_hidden_state"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    att = res.module.encoder.layer[0].attention.self
    assert att.num_attention_heads == 2 and att.query.out_features == 32


def test_t5_encoder_decoder_prunes_every_attention_and_generates():
    model, res = compiled("t5")
    pm = res.module
    assert type(pm) is type(model)
    for block in (pm.encoder.block[0], pm.decoder.block[1]):
        for layer in block.layer[:-1]:
            att = getattr(layer, "SelfAttention", None) or layer.EncDecAttention
            assert att.n_heads == 2  # cross-attention too (its zero position bias is patched)
    x = ids(2, 7, 12)
    out = pm.generate(x, max_new_tokens=4, do_sample=False)
    # the cached generation equals greedy decoding without the cache on the same class
    dec = out[:, :1]
    for _ in range(4):
        nxt = pm(input_ids=x, decoder_input_ids=dec, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        dec = torch.cat([dec, nxt], 1)
    assert torch.equal(out, dec)
    d = ids(2, 5, 13)
    torch.testing.assert_close(pm(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=d).logits,
                               res.graph_module(x, torch.ones_like(x), d)["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_results_round_trip_through_torch_save(name, tmp_path):
    model = make(name)
    x, d = ids(2, 8, 3), ids(2, 5, 4)
    res = fxprune.compile(model, {"input_ids": x, "decoder_input_ids": d}, ratio=0.5)
    assert type(res.module) is type(model) and res.report.groups_pruned >= 6
    x2, d2 = ids(3, 6, 5), ids(3, 4, 6)  # other batch and lengths than the capture
    for form in ("module", "graph_module"):
        torch.save(getattr(res, form), tmp_path / f"{form}.pt")
        back = torch.load(tmp_path / f"{form}.pt", weights_only=False)
        want, got = (m(input_ids=x2, decoder_input_ids=d2) for m in (getattr(res, form), back))
        torch.testing.assert_close(logits(got), logits(want), rtol=0, atol=0)
    out = res.module.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_t5_accepts_none_for_optional_inputs():
    model = make("t5")
    res = fxprune.compile(model, (ids(1, 8), None, ids(1, 5, 2)), ratio=0.5)
    assert type(res.module) is type(model) and res.report.groups_pruned >= 6


def test_vit_other_batch_size():
    model, res = compiled("vit")
    assert type(res.module) is type(model)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(res.module(x).last_hidden_state, res.graph_module(x)["last_hidden_state"],
                               rtol=1e-4, atol=1e-5)


def test_hidden_size_through_rmsnorm_is_lossy_and_keeps_tied_embeddings():
    model = make("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    res = fxprune.compile(model, (ids(1, 8),), ratio=0.5, allow_lossy=True)
    pm = res.module
    assert any(n.startswith("lossy") for n in res.report.notes)
    assert pm.config.hidden_size == 32 and pm.lm_head.weight is pm.model.embed_tokens.weight
    prompt = ids(1, 4, 14)
    assert torch.equal(pm.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0),
                       greedy_on_graph(res.graph_module, prompt, 3))


def test_result_graph_and_class_forms():
    model = make("llama")
    g = fxprune.compile(model, (ids(1, 8),), ratio=0.5, result="graph")
    assert isinstance(g.module, torch.fx.GraphModule) and g.report.form == "GraphModule"
    with pytest.raises(fxprune.ConfigError, match="result"):
        fxprune.compile(model, (ids(1, 8),), ratio=0.5, result="hf")


# -- the command line on hf:PATH models ---------------------------------------------------------------------

TEXT = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat and the bird sings "
        "a song about the river that runs past the old mill near the green hill where children play ") * 20


def _hf_dir(tmp_path, weights: bool = True):
    """A small Llama saved with save_pretrained, with a word-level tokenizer made from TEXT (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.split()))
    tok = Tokenizer(models.WordLevel({w: i + 2 for i, w in enumerate(words)} | {"<pad>": 0, "<unk>": 1}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    model = make("llama")
    d = tmp_path / "llama"
    if weights:
        model.save_pretrained(d)
    else:
        d.mkdir()
        model.config.save_pretrained(d)
    fast.save_pretrained(d)
    (tmp_path / "text.txt").write_text(TEXT)
    return d, model


def test_cli_prunes_an_hf_directory_with_text_calibration(tmp_path, capsys):
    from fxprune.cli import main

    d, model = _hf_dir(tmp_path)
    out = tmp_path / "out"
    code = main(["prune", f"hf:{d}", "--input-ids", "1,12", "--ratio", "0.5", "--importance", "thinet",
                 "--reconstruct", "lstsq", "--calib", f"text:{tmp_path / 'text.txt'}", "--calib-batches", "2",
                 "--calib-batch-size", "4", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "result: class LlamaForCausalLM" in text and "save_pretrained" in text
    back = type(model).from_pretrained(out / "hf").eval()
    assert back.config.intermediate_size == 64 and back.config.num_key_value_heads == 1
    assert back.generate(ids(1, 4), max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
    assert transformers.AutoTokenizer.from_pretrained(out / "hf")("the quick fox")["input_ids"]
    loaded = fxprune.load(out / "model.pt", type(model).from_pretrained(d))
    x = ids(2, 9, 15)
    torch.testing.assert_close(logits(loaded(x)), logits(back(x)), rtol=0, atol=0)


def test_cli_hf_errors_speak_in_flags(tmp_path, capsys):
    from fxprune.cli import main

    d, _ = _hf_dir(tmp_path, weights=False)  # config only: random weights
    code = main(["prune", f"hf:{d}", "--ratio", "0.5", "--importance", "thinet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--calib" in err and "calib=" not in err
    code = main(["prune", "torchvision:resnet18", "--input-ids", "1,8", "--ratio", "0.5", "--out", str(tmp_path)])
    assert code == 2 and "--input-ids is for hf:PATH" in capsys.readouterr().err
    code = main(["inspect", f"hf:{d}", "--brief"])
    assert code == 0 and "LlamaForCausalLM" not in capsys.readouterr().err
    code = main(["bench", f"hf:{d}", "--input-ids", "2,8", "--batch", "2", "--ratio", "0.5", "--repeats", "2",
                 "--warmup", "1", "--unknown-ops", "block", "--no-progress"])
    assert code == 0 and "| ratio 0.5 |" in capsys.readouterr().out
