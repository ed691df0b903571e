"""A GPT written the way litgpt's ``litgpt/model.py`` writes it (not a copy: see ``NOTE.md``).

The code forms that matter for detection: one fused ``qkv`` linear split into q, k, v; grouped queries expanded
with ``repeat_interleave``; partial rotary written as ``cat((apply_rope(x[..., :n]), x[..., n:]), -1)`` with
rotate-half; a ``KVCache`` submodule holding buffers written with ``index_copy_`` at an ``input_pos`` tensor; a
boolean mask cache indexed at ``input_pos``; SDPA, or eager attention with logit soft-capping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 128
    block_size: int = 64
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_query_groups: int = 2
    head_size: int = 16
    rotary_percentage: float = 0.5
    rope_base: int = 10000
    intermediate_size: int = 128
    attention_logit_softcapping: float | None = None

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        norm = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return (norm * self.weight).to(x.dtype)


def build_rope_cache(seq_len: int, n_elem: int, base: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2).float() / n_elem))
    idx_theta = torch.outer(torch.arange(seq_len).float(), theta).repeat(1, 2)  # (T, n_elem)
    return torch.cos(idx_theta), torch.sin(idx_theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    head_size = x.size(-1)
    x1, x2 = x[..., : head_size // 2], x[..., head_size // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(dtype=x.dtype)


class KVCache(nn.Module):
    def __init__(self, k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(k_shape), persistent=False)
        self.register_buffer("v", torch.zeros(v_shape), persistent=False)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k.index_copy_(2, input_pos, k)  # (B, n_query_groups, max_seq, hs)
        v = self.v.index_copy_(2, input_pos, v)
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=False)
        self.proj = nn.Linear(config.head_size * config.n_head, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None
        self.config = config

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        c = self.config
        B, T, _ = x.size()
        sizes = (c.n_head * c.head_size, c.n_query_groups * c.head_size, c.n_query_groups * c.head_size)
        q, k, v = self.qkv(x).split(sizes, dim=-1)  # 3 x (B, T, C*)
        q = q.view(B, T, c.n_head, c.head_size).transpose(1, 2)  # (B, nh_q, T, hs)
        k = k.view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        v = v.view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        n = c.rope_n_elem
        q = torch.cat((apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        if input_pos is not None:
            k, v = self.kv_cache(input_pos, k, v)
        if c.n_query_groups != c.n_head:
            q_per_kv = c.n_head // c.n_query_groups
            k = k.repeat_interleave(q_per_kv, dim=1)
            v = v.repeat_interleave(q_per_kv, dim=1)
        y = self.scaled_dot_product_attention(q, k, v, mask)
        return self.proj(y.reshape(B, T, c.head_size * c.n_head))

    def scaled_dot_product_attention(self, q, k, v, mask=None):
        scale = 1.0 / math.sqrt(self.config.head_size)
        cap = self.config.attention_logit_softcapping
        if cap is not None:
            scores = q @ k.mT * scale
            scores = torch.tanh(scores / cap) * cap
            if mask is None:
                mask = torch.ones(q.size(2), q.size(2), dtype=q.dtype, device=q.device).triu(diagonal=1)
                mask.masked_fill_(mask.bool(), torch.finfo(q.dtype).min)
                scores = scores + mask
            else:
                scores = scores.masked_fill(~mask, torch.finfo(q.dtype).min)
            y = F.softmax(scores, dim=-1, dtype=torch.float).to(dtype=q.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=mask is None)
        return y.transpose(1, 2)


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1, self.norm_2 = RMSNorm(config.n_embd), RMSNorm(config.n_embd)
        self.attn, self.mlp = CausalSelfAttention(config), LLaMAMLP(config)

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        x = self.attn(self.norm_1(x), cos, sin, mask, input_pos) + x
        return self.mlp(self.norm_2(x)) + x


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd),
            )
        )
        cos, sin = build_rope_cache(config.block_size, config.rope_n_elem, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.mask_cache: torch.Tensor | None = None

    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None) -> None:
        c, T = self.config, max_seq_length or self.config.block_size
        for block in self.transformer.h:
            shape = (batch_size, c.n_query_groups, T, c.head_size)
            block.attn.kv_cache = KVCache(shape, shape)
        self.mask_cache = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.size(1)
        if input_pos is not None:
            cos, sin = self.cos.index_select(0, input_pos), self.sin.index_select(0, input_pos)
            mask = self.mask_cache.index_select(2, input_pos)  # (1, 1, T, max_seq)
        else:
            cos, sin, mask = self.cos[:T], self.sin[:T], None
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x, cos, sin, mask, input_pos)
        return self.lm_head(self.transformer.ln_f(x))
