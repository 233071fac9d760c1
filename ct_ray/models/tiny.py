"""Tiny random models built in code, one per supported family: for unit tests and benchmarks only."""

from __future__ import annotations

from pathlib import Path

import torch

from .loading import LoadedModel, _finalise

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens + BOS/EOS, built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {chr(i): i for i in range(256)}
    tk = Tokenizer(models.WordLevel({**byte_vocab, "<bos>": 256, "<eos>": 257}, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<eos>")


def tiny_config(family: str, n_layers: int = 3, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                d_mlp: int = 128, vocab: int = 258, max_pos: int = 128):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=max_pos,
                  bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**common, attention_bias=True, rms_norm_eps=1e-5)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=d_model // n_heads)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=d_model // n_heads, query_pre_attn_scalar=d_model // n_heads,
                               sliding_window=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=d_model // n_heads, query_pre_attn_scalar=d_model // n_heads,
                                   sliding_window=8)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=max_pos,
                             n_inner=d_mlp, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True)
    raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")


def tiny_model(family: str = "llama", seed: int = 0, **kw) -> LoadedModel:
    """A randomly initialised model of the family; weights are perturbed away from init (norm gains, biases)
    so that every linear path in the replacement model is exercised."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm gains and biases start at 0/1: make them generic
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
    return _finalise(model, byte_tokenizer(), f"tiny-{family}", "code", torch.float32)


def save_tiny(family: str, path: str | Path, seed: int = 0, **kw) -> Path:
    """Write a tiny model + tokenizer as a local HF directory (loadable with `load_model(path)`)."""
    lm = tiny_model(family, seed, **kw)
    path = Path(path)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
