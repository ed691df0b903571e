"""The converted tiny Llama the bounded-memory tests share, with trained-looking memory (non-zero gates and
routers)."""

from __future__ import annotations

import torch
import transformers

import mka_compile


def _llama(max_pos=256, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_pos,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _train_memory(model, seed=1):
    """Trained-looking memory: gates 0.6 - 0.9 and random routers, so every level contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mka_compile.memory_parameters(model):
            if p.numel() == 1:
                p.fill_(0.6 + 0.3 * torch.rand(1, generator=g).item())
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _copy_memory(src, dst):
    dst.load_state_dict(src.state_dict())


CFG = dict(window=16, sink_tokens=4, chunk_size=8, top_r=2, recall_chunks=2)


def _converted(config, seed=0, max_pos=256, trained=True, mode="fastmka"):
    model = _llama(max_pos, seed)
    mka_compile.convert(model, mode=mode, config=config)
    if trained:
        _train_memory(model)
    return model
