"""Hand-written attention modules for the tests (nanoGPT, Meta's reference Llama, timm's ViT block) and softmax
look-alikes that are not attention. Re-exported by ``zoo``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --- hand-written models -------------------------------------------------------------------------------


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused c_attn, split, flash (SDPA) or manual path with a tril buffer."""

    def __init__(self, n_embd: int = 32, n_head: int = 4, block_size: int = 16, flash: bool = True) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.0)
        self.n_head, self.n_embd, self.flash = n_head, n_embd, flash
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NanoGPT(nn.Module):
    def __init__(self, flash: bool = True, n_layer: int = 2, n_embd: int = 32, vocab: int = 50) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.h = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(n_embd),
                    "attn": NanoGPTAttention(n_embd, flash=flash),
                    "ln_2": nn.LayerNorm(n_embd),
                    "mlp": nn.Linear(n_embd, n_embd),
                }
            )
            for _ in range(n_layer)
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for blk in self.h:
            x = x + blk["attn"](blk["ln_1"](x))
            x = x + blk["mlp"](blk["ln_2"](x))
        return self.lm_head(x)


# --- look-alikes: softmaxes that are not attention ----------------------------------------------------


class MoERouter(nn.Module):
    """A mixture-of-experts layer: softmax over experts weights the expert outputs (an einsum with values)."""

    def __init__(self, d: int = 16, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1)  # (B, T, E)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, T, E, d)
        return torch.einsum("bte,bted->btd", probs, outs)


class FeatureSoftmax(nn.Module):
    """``softmax(q k^T)`` over the query axis (dim=-2), then times v: normalises the wrong axis."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.q(x) @ self.k(x).transpose(-1, -2) / 4.0
        return torch.softmax(s, dim=-2) @ self.v(x)


class AttentionPooling(nn.Module):
    """Attention pooling with a learned query (as in perceiver / pooling heads)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, d))
        self.k, self.v = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(x.shape[0], -1, -1)
        w = torch.softmax(q @ self.k(x).transpose(-1, -2) / 4.0, dim=-1)
        return w @ self.v(x)


class ForeignValues(nn.Module):
    """matmul-softmax-matmul whose right operand is not a projection of the keys' sequence."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4.0, dim=-1)
        return w @ y


class ClassifierHead(nn.Module):
    """A classifier softmax over features."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x), dim=-1)


class MetaLlamaAttention(nn.Module):
    """Meta's reference Llama attention: complex-multiply RoPE and a static cache written by slice assignment."""

    def __init__(self, dim: int = 32, n_heads: int = 4, n_kv_heads: int = 2, max_batch: int = 2, max_seq: int = 16):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        shape = (max_batch, max_seq, n_kv_heads, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape), persistent=False)
        freqs = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.outer(torch.arange(max_seq).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        f = self.freqs_cis[start : start + x.shape[1]].view(1, x.shape[1], 1, -1)
        return torch.view_as_real(xc * f).flatten(3).type_as(x)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = self.rope(xq, start_pos), self.rope(xk, start_pos)
        self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv
        keys = self.cache_k[:bsz, : start_pos + seqlen]
        values = self.cache_v[:bsz, : start_pos + seqlen]
        rep = self.n_heads // self.n_kv_heads
        keys = keys[:, :, :, None].expand(bsz, start_pos + seqlen, self.n_kv_heads, rep, self.head_dim)
        keys = keys.reshape(bsz, start_pos + seqlen, self.n_heads, self.head_dim)
        values = values[:, :, :, None].expand(bsz, start_pos + seqlen, self.n_kv_heads, rep, self.head_dim)
        values = values.reshape(bsz, start_pos + seqlen, self.n_heads, self.head_dim)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)
            mask = torch.hstack([torch.zeros(seqlen, start_pos), mask])
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(out)


class TimmBlockAttention(nn.Module):
    """timm's ViT attention: fused qkv, reshape + permute, ``unbind(0)``, optional q/k LayerNorm, fused SDPA."""

    def __init__(self, dim: int = 32, num_heads: int = 4, qk_norm: bool = True, fused: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused = num_heads, dim // num_heads, fused
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))
