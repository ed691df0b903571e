"""Hand-written attention modules, one per form that detection canonicalises (issue 13, section 3).

Each is a tiny causal self-attention ``forward(x: [B, T, D]) -> [B, T, D]`` (``CachedIndexPut`` also takes
``input_pos``). ``FORMS`` maps a name to ``(constructor, facts the site must have)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

D, H, HD, T_MAX = 32, 4, 8, 16


def _causal(t: int, device=None) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()  # (T, T) True = attend


class _Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, H * HD) for _ in range(3))
        self.o_proj = nn.Linear(H * HD, D)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        return tuple(p(x).view(B, T, H, HD).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))

    def out(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = v.shape
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, T, H * HD))


class WhereKeep(_Base):
    """``where(mask, scores, finfo.min)``."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) / math.sqrt(HD)
        s = torch.where(_causal(x.shape[1], x.device), s, torch.finfo(s.dtype).min)
        return self.out(s.softmax(-1), v)


class WhereHide(_Base):
    """``where(~mask, -inf, scores)`` (fill first)."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) * HD**-0.5
        s = torch.where(~_causal(x.shape[1], x.device), torch.tensor(float("-inf")), s)
        return self.out(s.softmax(-1), v)


def _alibi(t: int) -> torch.Tensor:
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)])
    dist = torch.arange(t)[None, :] - torch.arange(t)[:, None]  # (T, T) j - i
    return slopes[:, None, None] * dist  # (H, T, T)


class BaddbmmAlibiWhere(_Base):
    """ALiBi bias from ``baddbmm`` then ``where(mask, scores, fill)`` (BLOOM-like)."""

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        alibi = _alibi(T).repeat(B, 1, 1)  # (B*H, T, T)
        s = torch.baddbmm(alibi, q.reshape(B * H, T, HD), k.reshape(B * H, T, HD).transpose(1, 2), alpha=HD**-0.5)
        s = torch.where(_causal(T), s.view(B, H, T, T), torch.finfo(s.dtype).min)
        return self.out(s.softmax(-1), v)


class AlibiAdd(_Base):
    """ALiBi bias added to the scores, additive causal mask, no RoPE."""

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) * HD**-0.5 + _alibi(T)
        s = s + torch.zeros(T, T).masked_fill(~_causal(T), float("-inf"))
        return self.out(s.softmax(-1), v)


class MaskedFillBuffer(_Base):
    """``masked_fill`` on a boolean buffer sliced to the length."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", _causal(T_MAX).view(1, 1, T_MAX, T_MAX), persistent=False)

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x)
        s = (q @ k.transpose(-1, -2)) * HD**-0.5
        s = s.masked_fill(~self.bias[:, :, :T, :T], float("-inf"))
        return self.out(s.softmax(-1), v)


class SoftCap(_Base):
    """``tanh(scores / cap) * cap`` with a query scaled by a config scalar (``query_pre_attn_scalar``)."""

    cap, query_pre_attn_scalar = 20.0, 24.0

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x)
        q = q * self.query_pre_attn_scalar**-0.5
        s = q @ k.transpose(-1, -2)
        s = torch.tanh(s / self.cap) * self.cap
        s = s.masked_fill(~_causal(T), torch.finfo(s.dtype).min)
        return self.out(torch.softmax(s.float(), -1).to(q.dtype), v)


class SlidingWindow(_Base):
    window = 3

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        keep = (j <= i) & (i - j < self.window)
        s = (q @ k.transpose(-1, -2) * HD**-0.5).masked_fill(~keep, float("-inf"))
        return self.out(s.softmax(-1), v)


class Chunked(_Base):
    chunk = 3

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        keep = (j <= i) & (i // self.chunk == j // self.chunk)
        s = (q @ k.transpose(-1, -2) * HD**-0.5).masked_fill(~keep, float("-inf"))
        return self.out(s.softmax(-1), v)


class Sinks(_Base):
    """A learned per-head logit concatenated to the scores, softmax, then dropped (gpt-oss)."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(H))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) * HD**-0.5
        s = s + torch.zeros(T, T).masked_fill(~_causal(T), float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, T, -1)
        logits = torch.cat([s, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = logits.softmax(-1)[..., :-1]
        return self.out(probs, v)


class Differential(_Base):
    """Two attention maps over the same q and k, on the two halves of v (DiffLlama): one site, two maps."""

    def __init__(self) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        v1, v2 = (u.repeat(1, 2, 1, 1) for u in torch.chunk(v, 2, dim=1))
        mask = torch.zeros(T, T).masked_fill(~_causal(T), float("-inf"))
        o1 = (q @ k.transpose(-1, -2) * HD**-0.5 + mask).softmax(-1) @ v1
        o2 = (q @ k.transpose(-1, -2) * HD**-0.5 + mask).softmax(-1) @ v2
        o = o1 - self.lam * o2
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * HD))


class ClipQKV(_Base):
    clip = 0.5

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).clamp(-self.clip, self.clip) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (t.view(B, T, H, HD).transpose(1, 2) for t in (q, k, v))
        s = (q @ k.transpose(-1, -2) * HD**-0.5).masked_fill(~_causal(T), float("-inf"))
        return self.out(s.softmax(-1), v)


def _rope_pairs(x: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs written as stack / flatten (torchtune, litgpt-like): ``x: [B, H, T, d]``."""
    T, d = x.shape[-2], x.shape[-1]
    theta = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(T).float()[:, None] * theta[None, :]  # (T, d/2)
    cos, sin = ang.cos(), ang.sin()
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, H, T, d/2, 2)
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class StackRope(_Base):
    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x)
        q, k = _rope_pairs(q), _rope_pairs(k)
        s = (q @ k.transpose(-1, -2) * HD**-0.5).masked_fill(~_causal(T), float("-inf"))
        return self.out(s.softmax(-1), v)


class CachedIndexPut(_Base):
    """A KV cache kept in the module, written with ``index_put`` at an ``input_pos`` tensor, SDPA with a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, H, T_MAX, HD), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, H, T_MAX, HD), persistent=False)

    def forward(self, x, input_pos):
        q, k, v = self.qkv(x)
        q, k = _rope_pairs(q), _rope_pairs(k)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        mask = torch.arange(T_MAX)[None, :] <= input_pos[:, None]  # (T, T_MAX)
        o = torch.nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * HD))


class NoPETemperature(_Base):
    """A layer without positional encoding that scales its query by a position-dependent temperature (Llama 4)."""

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x)
        temp = torch.log(torch.floor((torch.arange(T).float() + 1) / 4) + 1) * 0.1 + 1.0  # (T,)
        q = q * temp[None, None, :, None]
        s = (q @ k.transpose(-1, -2) * HD**-0.5).masked_fill(~_causal(T), float("-inf"))
        return self.out(s.softmax(-1), v)


class RMSNorm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q and kv projections with norms, q/k split into a
    RoPE part and a no-RoPE part, concatenated."""

    nope, rope, r_q, r_kv = 8, 4, 16, 16

    def __init__(self) -> None:
        super().__init__()
        self.q_a_proj = nn.Linear(D, self.r_q, bias=False)
        self.q_a_norm = RMSNorm(self.r_q)
        self.q_b_proj = nn.Linear(self.r_q, H * (self.nope + self.rope), bias=False)
        self.kv_a_proj = nn.Linear(D, self.r_kv + self.rope, bias=False)
        self.kv_a_norm = RMSNorm(self.r_kv)
        self.kv_b_proj = nn.Linear(self.r_kv, H * (self.nope + HD), bias=False)
        self.o_proj = nn.Linear(H * HD, D, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))).view(B, T, H, -1).transpose(1, 2)
        q_nope, q_rot = torch.split(q, [self.nope, self.rope], dim=-1)
        ckv = self.kv_a_proj(x)
        c, k_rot = torch.split(ckv, [self.r_kv, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(c)).view(B, T, H, -1).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, HD], dim=-1)
        k_rot = k_rot.view(B, 1, T, self.rope)
        q_rot, k_rot = _rope_pairs(q_rot), _rope_pairs(k_rot)
        q = torch.cat([q_nope, q_rot], -1)
        k = torch.cat([k_nope, k_rot.expand(B, H, T, self.rope)], -1)
        s = (q @ k.transpose(-1, -2) * (self.nope + self.rope) ** -0.5).masked_fill(~_causal(T), float("-inf"))
        o = s.softmax(-1) @ v
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * HD))


# name -> (module class, facts of its one site: attribute -> value; "transforms" lists required entries)
FORMS: dict[str, tuple[type[nn.Module], dict]] = {
    "where_keep": (WhereKeep, {"mask": "causal"}),
    "where_hide": (WhereHide, {"mask": "causal"}),
    "baddbmm_alibi_where": (BaddbmmAlibiWhere, {"mask": "causal", "transforms": ["bias"]}),
    "alibi_add": (AlibiAdd, {"mask": "causal", "transforms": ["bias"], "rope": None}),
    "masked_fill_buffer": (MaskedFillBuffer, {"mask": "causal"}),
    "softcap": (SoftCap, {"mask": "causal", "transforms": ["softcap=20"], "scale": 24.0**-0.5}),
    "sliding_window": (SlidingWindow, {"mask": "sliding_window", "window": 3}),
    "chunked": (Chunked, {"mask": "chunked"}),
    "sinks": (Sinks, {"mask": "causal", "transforms": ["sinks"]}),
    "differential": (Differential, {"mask": "causal", "transforms": ["differential"], "maps": 2}),
    "clip_qkv": (ClipQKV, {"mask": "causal", "transforms": ["clip_qkv"]}),
    "stack_rope": (StackRope, {"mask": "causal", "rope": "interleaved"}),
    "nope_temperature": (NoPETemperature, {"mask": "causal", "transforms": ["query_temperature"], "rope": None}),
    "index_put_cache": (CachedIndexPut, {"cache": "index_put", "rope": "interleaved", "has_kv_cache": True}),
    "latent": (LatentAttention, {"transforms": ["latent_kv"]}),
}


def example(name: str, T: int = 8, seed: int = 0) -> tuple[nn.Module, tuple]:
    """``(module, example inputs)`` of form ``name`` with seeded weights."""
    torch.manual_seed(seed)
    mod = FORMS[name][0]().eval()
    x = torch.randn(2 if name != "index_put_cache" else 1, T, D)
    return mod, ((x, torch.arange(T)) if name == "index_put_cache" else (x,))
