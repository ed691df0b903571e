"""Tiny random Hugging Face models (built from configs, no downloads) and hand-written models for tests."""

from __future__ import annotations

import torch
from torch import nn
from zoo_handwritten import (  # noqa: F401  (the hand-written models are part of the zoo)
    AttentionPooling,
    ClassifierHead,
    FeatureSoftmax,
    ForeignValues,
    MetaLlamaAttention,
    MoERouter,
    NanoGPT,
    NanoGPTAttention,
    TimmBlockAttention,
)

COMMON = dict(vocab_size=96, max_position_embeddings=64)


def _cfg(name: str):
    import transformers as tf

    h, L, H, kv, inter = 64, 2, 4, 2, 128
    table = {
        "llama": lambda: tf.LlamaConfig(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            **COMMON,
        ),
        "mistral": lambda: tf.MistralConfig(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            **COMMON,
        ),
        "qwen2": lambda: tf.Qwen2Config(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            **COMMON,
        ),
        "qwen3": lambda: tf.Qwen3Config(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            head_dim=16,
            **COMMON,
        ),
        "gemma": lambda: tf.GemmaConfig(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            head_dim=16,
            **COMMON,
        ),
        "phi3": lambda: tf.Phi3Config(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            pad_token_id=0,
            **COMMON,
        ),
        "gpt2": lambda: tf.GPT2Config(n_embd=h, n_layer=L, n_head=H, vocab_size=96, n_positions=64),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            hidden_size=h, num_hidden_layers=L, num_attention_heads=H, intermediate_size=inter, **COMMON
        ),
        "gptj": lambda: tf.GPTJConfig(n_embd=h, n_layer=L, n_head=H, rotary_dim=8, vocab_size=96, n_positions=64),
        "opt": lambda: tf.OPTConfig(
            hidden_size=h, num_hidden_layers=L, num_attention_heads=H, ffn_dim=inter, word_embed_proj_dim=h, **COMMON
        ),
        "falcon": lambda: tf.FalconConfig(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            new_decoder_architecture=True,
            num_kv_heads=kv,
            vocab_size=96,
        ),
        "stablelm": lambda: tf.StableLmConfig(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            **COMMON,
        ),
        "starcoder2": lambda: tf.Starcoder2Config(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            **COMMON,
        ),
        "olmo": lambda: tf.OlmoConfig(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            pad_token_id=0,
            **COMMON,
        ),
        "cohere": lambda: tf.CohereConfig(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            pad_token_id=0,
            **COMMON,
        ),
        "granite": lambda: tf.GraniteConfig(
            hidden_size=h,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=kv,
            intermediate_size=inter,
            **COMMON,
        ),
    }
    return table[name]()


CAUSAL_LMS = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gptj",
    "opt",
    "falcon",
    "stablelm",
    "starcoder2",
    "olmo",
    "cohere",
    "granite",
]


def causal_lm(name: str, attn: str = "eager", seed: int = 0):
    """``(model, config)`` for a tiny random causal LM of family ``name`` with ``attn_implementation``."""
    import transformers as tf

    cfg = _cfg(name)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval(), cfg


def expected_heads(cfg) -> tuple[int, int, int]:
    """``(H, Hkv, d)`` from a config."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    H = getattr(text, "num_attention_heads", None) or text.n_head
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    kv = getattr(text, "num_key_value_heads", None)
    if kv is None:
        kv = getattr(text, "num_kv_heads", None) if getattr(text, "new_decoder_architecture", False) else None
    if kv is None and getattr(text, "multi_query", False):
        kv = 1
    d = getattr(text, "head_dim", None) or hidden // H
    return H, kv or H, d


def attention_modules(model: nn.Module) -> list[str]:
    """Dotted names of the modules that compute attention (class name ending in 'Attention' with projections)."""
    out = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith(("Attention", "SelfAttention", "Attention2")) and any(
            isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D" for c in mod.children()
        ):
            if not any(name.startswith(o + ".") for o in out):
                out.append(name)
    return out


def bart(attn: str = "eager"):
    """A tiny random BART (encoder self-attention, decoder self- and cross-attention)."""
    import transformers as tf

    cfg = tf.BartConfig(
        vocab_size=96,
        d_model=64,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
    )
    return tf.BartForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def randomize_mka(model: nn.Module) -> None:
    """Random values (seeded) in every new ``.mka`` parameter and gate = 1: the rewrite is live and every memory
    level contributes."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mka." in f".{name}":  # a converted root module's parameters are mka.*
                p.fill_(1.0) if name.endswith("gate") else p.normal_(0, 0.5)
