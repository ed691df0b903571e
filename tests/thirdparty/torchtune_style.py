"""A decoder written the way torchtune's ``modules/attention.py``, ``modules/kv_cache.py`` and
``modules/position_embeddings.py`` write it (not a copy: see ``NOTE.md``).

The code forms that matter for detection: separate q/k/v projections; RoPE applied on ``[b, s, n_h, h_d]`` to
adjacent pairs, written as ``stack([...], -1).flatten(3)``; GQA expanded with ``expand`` + ``reshape``; a
``KVCache`` submodule whose buffers are written with ``cache[:, :, input_pos] = k`` (``index_put``); a boolean
causal mask buffer indexed at ``input_pos``; SDPA with that mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RotaryPositionalEmbeddings(nn.Module):
    def __init__(self, dim: int, max_seq_len: int = 64, base: int = 10_000) -> None:
        super().__init__()
        theta = 1.0 / (base ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        idx_theta = torch.einsum("i, j -> ij", torch.arange(max_seq_len).float(), theta)
        cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)  # (max_seq, dim / 2, 2)
        self.register_buffer("cache", cache, persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [b, s, n_h, h_d]``."""
        seq_len = x.size(1)
        rope_cache = self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)  # (b, s, n_h, h_d / 2, 2)
        rope_cache = rope_cache.view(-1, xshaped.size(1), 1, xshaped.size(3), 2)
        x_out = torch.stack(
            [
                xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
                xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1],
            ],
            -1,
        )
        return x_out.flatten(3).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def update(self, input_pos: torch.Tensor, k_val: torch.Tensor, v_val: torch.Tensor):
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k_val
        v_out[:, :, input_pos] = v_val
        return k_out, v_out


class MultiHeadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.embed_dim = num_heads, num_kv_heads, head_dim, embed_dim
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=False)
        self.pos_embeddings = RotaryPositionalEmbeddings(head_dim, max_seq_len)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None):
        b, s_x, _ = x.shape
        q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
        q = self.pos_embeddings(q, input_pos=input_pos)
        k = self.k_proj(x).view(b, s_x, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s_x, self.num_kv_heads, self.head_dim)
        k = self.pos_embeddings(k, input_pos=input_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, n_h, s, h_d)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if self.num_heads != self.num_kv_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(b, self.num_heads, -1, self.head_dim)
            v = v.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(b, self.num_heads, -1, self.head_dim)
        if mask is not None:
            mask = mask[:, None, :, :]  # (b, 1, s, s_kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.output_proj(out.transpose(1, 2).contiguous().view(b, s_x, -1))


class TransformerSelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, attn: MultiHeadAttention) -> None:
        super().__init__()
        self.sa_norm, self.mlp_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.SiLU(), nn.Linear(2 * dim, dim, bias=False))

    def forward(self, x, *, mask=None, input_pos=None):
        h = self.attn(self.sa_norm(x), mask=mask, input_pos=input_pos) + x
        return self.mlp(self.mlp_norm(h)) + h


class TransformerDecoder(nn.Module):
    def __init__(self, vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64):
        super().__init__()
        head_dim = embed_dim // num_heads
        self.tok_embeddings = nn.Embedding(vocab_size, embed_dim)
        self.layers = nn.ModuleList(
            TransformerSelfAttentionLayer(
                embed_dim, MultiHeadAttention(embed_dim, num_heads, num_kv_heads, head_dim, max_seq_len)
            )
            for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(embed_dim, eps=1e-6)
        self.output = nn.Linear(embed_dim, vocab_size, bias=False)
        self.max_seq_len = max_seq_len
        self.causal_mask: torch.Tensor | None = None

    def setup_caches(self, batch_size: int) -> None:
        for layer in self.layers:
            a = layer.attn
            layer.attn.kv_cache = KVCache(batch_size, self.max_seq_len, a.num_kv_heads, a.head_dim)
        self.causal_mask = torch.tril(torch.ones(self.max_seq_len, self.max_seq_len, dtype=torch.bool))

    def forward(self, tokens: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if self.causal_mask is not None and input_pos is not None:
            mask = self.causal_mask[None, input_pos]  # (1, s, max_seq_len)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        return self.output(self.norm(h)).float()
