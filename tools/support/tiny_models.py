"""Tiny models for the support table (``tools/support/table.py``): every causal-LM family of the installed transformers
built from its default config with small sizes, and the third-party-style models of ``tests/thirdparty``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SIZE = dict(
    hidden_size=64,
    n_embd=64,
    d_model=64,
    dim=64,
    num_hidden_layers=2,
    n_layer=2,
    num_layers=2,
    n_layers=2,
    decoder_layers=2,
    encoder_layers=2,
    rotary_dim=8,
    num_attention_heads=4,
    n_head=4,
    n_heads=4,
    num_heads=4,
    decoder_attention_heads=4,
    encoder_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    n_inner=128,
    ffn_dim=128,
    decoder_ffn_dim=128,
    encoder_ffn_dim=128,
    d_ff=128,
    vocab_size=256,
    max_position_embeddings=128,
    n_positions=128,
    head_dim=16,
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    sliding_window=4,
    attention_chunk_size=4,
    pad_token_id=0,
    is_decoder=True,
    bos_token_id=1,
    eos_token_id=2,
)


_LAYERS = {"num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers"}


def tiny_config(model_type: str, keep_layers: bool = False):
    """A tiny config of ``model_type``: sizes overridden where the default config has the attribute
    (``keep_layers``: the default number of layers, for configs with per-layer lists)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    keys = default.to_dict()
    size = {k: v for k, v in _SIZE.items() if not (keep_layers and k in _LAYERS)}
    if "qk_rope_head_dim" in keys or "kv_lora_rank" in keys:
        size.pop("head_dim", None)  # multi-head latent attention: head_dim follows the rope / nope split
        size["num_key_value_heads"] = size["num_attention_heads"]  # keys are per query head
    kwargs = {k: v for k, v in size.items() if k in keys}
    if "num_key_value_heads" in kwargs and keys.get("num_key_value_heads") is None:
        kwargs.pop("num_key_value_heads")  # MHA by default: keep it
    if "sliding_window" in kwargs and keys.get("sliding_window") is None:
        kwargs.pop("sliding_window")
    if "attention_chunk_size" in kwargs and keys.get("attention_chunk_size") is None:
        kwargs.pop("attention_chunk_size")
    text = default.get_text_config() if hasattr(default, "get_text_config") else default
    if text is not default:
        sub = next(k for k, v in vars(default).items() if v is text)
        tk = text.to_dict()
        sub_kwargs = {k: v for k, v in size.items() if k in tk}
        if tk.get("num_key_value_heads") is None:
            sub_kwargs.pop("num_key_value_heads", None)
        for k in ("sliding_window", "attention_chunk_size"):
            if tk.get(k) is None:
                sub_kwargs.pop(k, None)
        kwargs[sub] = {**tk, **sub_kwargs}
        kwargs[sub].pop("layer_types", None)
    for k in ("layer_types", "mlp_layer_types", "layers_block_type", "block_types"):
        if not keep_layers and k in keys and isinstance(keys[k], list) and len(keys[k]) > 2:
            kwargs[k] = _pick_layer_types(keys[k])
    return cls(**kwargs)


def _pick_layer_types(types: list) -> list:
    """Two layers that keep the variety of the default's (an attention layer first where there is one)."""
    uniq = list(dict.fromkeys(types))
    att = [t for t in uniq if "attention" in str(t) or "full" in str(t) or "sliding" in str(t)]
    first = att[0] if att else uniq[0]
    rest = [t for t in uniq if t != first]
    return [first, rest[0] if rest else first]


# ------------------------------------------------------------------------------------------------- builders


def build_hf(model_type: str, attn: str):
    """``(model, input_ids)``: the tiny model (2 layers; the default number of layers where 2 does not build)."""
    try:
        model, ids = _build_hf(model_type, attn, False)
        logits(model, ids)
        return model, ids
    except Exception as first:  # noqa: BLE001
        try:
            model, ids = _build_hf(model_type, attn, True)
            logits(model, ids)
            return model, ids
        except Exception:  # noqa: BLE001
            raise first from None


def _build_hf(model_type: str, attn: str, keep_layers: bool):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, keep_layers)
    torch.manual_seed(0)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).parameters())
    if n > 150e6:
        raise RuntimeError(f"too large when built from the tiny config ({n / 1e6:.0f} M parameters)")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():
        for p in model.parameters():  # some families init weights to zero / constant: make the logits informative
            if p.dim() >= 1 and p.abs().sum() == 0 and p.numel() > 1:
                p.normal_(0, 0.02)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = int(getattr(text, "vocab_size", 256) or 256)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 250), (1, 8), generator=gen)
    return model, ids


def build_thirdparty(name: str):
    sys.path.insert(0, str(ROOT / "tests"))
    from thirdparty import models

    return models.build(name.split(":", 1)[1])


def logits(model, ids, **kw):
    """The logits of one forward (a tensor of ids, or a dict of inputs)."""
    import torch

    with torch.no_grad():
        out = model(ids, **kw) if not isinstance(ids, dict) else model(**ids, **kw)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
