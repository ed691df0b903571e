"""A small decoder LM with six interchangeable attention variants, for the paper-table experiments.

    from tools.paper.lm_variants import LMConfig, DecoderLM
    model = DecoderLM(LMConfig(vocab_size=65), "gqa")
    logits = model(ids)                              # ids: [B, T] -> [B, T, V]
    cache = model.new_cache(); model(prompt, cache=cache); model(next_id, cache=cache)   # cached decode

Every variant shares the same blocks (pre-norm RMSNorm, SwiGLU or GELU MLP, tied embeddings), the same
rotate-half RoPE (``mka_compile.layers.rope.RotaryEmbedding``) and the same width, depth and head size;
only the attention differs:

- ``mha``: H query heads, H key/value heads; ``F.scaled_dot_product_attention`` with a KV cache.
- ``mqa``: one key/value head shared by all query heads.
- ``gqa``: ``gqa_kv_heads`` key/value heads.
- ``mla``: DeepSeek-V2 multi-head latent attention: keys/values are up-projected from a normalised
  low-rank latent ``c_kv = norm(W_dkv x)`` (rank ``mla_kv_rank``), plus a decoupled RoPE key
  ``k_rope = rope(W_kr x)`` (``mla_rope_dim`` wide) shared by all heads; queries are
  ``[q_nope, rope(q_rope)]``. The cache holds only ``c_kv`` and ``k_rope``. Training and prefill
  up-project the latent; one-token decode uses the absorbed form (``q_nope W_uk`` scores directly
  against the cached latent, the output is up-projected once by ``W_uv``), as DeepSeek-V2 serves it.
- ``mka`` / ``fastmka``: the project's :class:`mka_compile.MKAAttention` / :class:`mka_compile.FastMKAAttention`
  (local, session EMA and long-term chunk recall, routed; ``gate_init=1``: trained from scratch) with
  :class:`mka_compile.MKACache`.

``cache_bytes(cache)`` counts the bytes the cache object actually holds; ``analytic_cache_bytes`` gives
the same count from the configuration (per token, per completed chunk, per sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from mka_compile import FastMKAAttention, MKAAttention, MKACache, MKAConfig
from mka_compile.layers.rope import RotaryEmbedding

VARIANTS = ("mha", "mqa", "gqa", "mla", "mka", "fastmka")


@dataclass(frozen=True)
class LMConfig:
    """Shape of the LM. Head size is ``d_model // n_heads`` for every variant (MLA: for ``q_nope``/``k_nope``/``v``).

    ``mla_kv_rank`` defaults to 2 head sizes and ``mla_rope_dim`` to half a head (DeepSeek-V2 uses
    4 and 1/2 head sizes with far more heads); ``mka_kv_heads`` defaults to ``n_heads`` (MKA/FastMKA
    built on MHA, as in the paper)."""

    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    gqa_kv_heads: int = 2
    mlp: str = "swiglu"
    rope_base: float = 10000.0
    mla_kv_rank: int | None = None
    mla_rope_dim: int | None = None
    mka_kv_heads: int | None = None
    mka: MKAConfig = field(default_factory=lambda: MKAConfig(chunk_size=16, top_r=4))

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "gqa_kv_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"LMConfig: d_model {self.d_model} must split into n_heads {self.n_heads} heads of even size (RoPE)"
            )
        if self.n_heads % self.gqa_kv_heads:
            raise ValueError(f"LMConfig: gqa_kv_heads {self.gqa_kv_heads} must divide n_heads {self.n_heads}")
        if self.mka_kv_heads is not None and self.n_heads % self.mka_kv_heads:
            raise ValueError(f"LMConfig: mka_kv_heads {self.mka_kv_heads} must divide n_heads {self.n_heads}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"LMConfig.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.rope_dim % 2:
            raise ValueError(f"LMConfig.mla_rope_dim must be even (RoPE), got {self.rope_dim}")
        if not isinstance(self.mka, MKAConfig):
            raise ValueError(f"LMConfig.mka must be an MKAConfig, got {type(self.mka).__name__}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_rank(self) -> int:
        return self.mla_kv_rank or 2 * self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.mla_rope_dim or self.head_dim // 2

    def kv_heads(self, variant: str) -> int:
        """Key/value heads of a variant (MLA: 1, the shared latent)."""
        _check_variant(variant)
        return {
            "mha": self.n_heads,
            "mqa": 1,
            "gqa": self.gqa_kv_heads,
            "mla": 1,
            "mka": self.mka_kv_heads or self.n_heads,
            "fastmka": self.mka_kv_heads or self.n_heads,
        }[variant]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


# -- KV cache of the plain variants ---------------------------------------------------------------------
class KVCache:
    """Per-layer cached tensors ``[B, h, T, *]`` (MHA/MQA/GQA: ``k, v``; MLA: ``c_kv, k_rope``).

    ``get_seq_length`` / ``update`` follow Hugging Face's cache protocol closely enough that
    ``mka_compile.convert`` keeps a converted site's MKA state with this object during decoding."""

    def __init__(self) -> None:
        self.layers: dict[int, list[torch.Tensor]] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        kv = self.layers.get(layer_idx)
        return 0 if kv is None else int(kv[0].shape[2])

    def update(self, tensors: list[torch.Tensor], layer_idx: int) -> list[torch.Tensor]:
        """Append this call's tensors (along dim 2) and return the full cached ones."""
        old = self.layers.get(layer_idx)
        self.layers[layer_idx] = list(tensors) if old is None else [torch.cat([a, b], 2) for a, b in zip(old, tensors)]
        return self.layers[layer_idx]


def cache_bytes(cache: KVCache | MKACache) -> int:
    """Bytes of every tensor the cache holds (MKA: KV levels, validity, EMA state, partial chunk, summaries)."""
    if isinstance(cache, KVCache):
        return sum(t.numel() * t.element_size() for kv in cache.layers.values() for t in kv)
    if isinstance(cache, MKACache):
        total = 0
        for st in cache.layers.values():
            ts = [*st.kv, st.kv_valid, st.n_seen, st.ema_k, st.ema_v, st.part_k, st.part_v, st.summ_k, st.summ_v]
            total += sum(t.numel() * t.element_size() for t in ts if t is not None)
        return total
    raise ValueError(f"cache must be a KVCache or an MKACache, got {type(cache).__name__}")


@dataclass(frozen=True)
class CacheFormula:
    """Cache bytes per sequence = ``per_token * T + per_chunk * (T // chunk) + fixed`` (all layers)."""

    per_token: int
    per_chunk: int = 0
    chunk: int = 0
    fixed: int = 0
    text: str = ""

    def at(self, tokens: int) -> int:
        chunks = tokens // self.chunk if self.chunk else 0
        return self.per_token * tokens + self.per_chunk * chunks + self.fixed


def analytic_cache_bytes(cfg: LMConfig, variant: str, elem: int = 4) -> CacheFormula:
    """The cache size of ``variant`` from the configuration (``elem`` bytes per activation; MKA state is fp32)."""
    L, d, Hk = cfg.n_layers, cfg.head_dim, cfg.kv_heads(variant)
    if variant in ("mha", "mqa", "gqa"):
        per_token = L * 2 * Hk * d * elem
        return CacheFormula(per_token, text=f"L*2*Hkv*d*{elem} = {per_token} B/token")
    if variant == "mla":
        r, dr = cfg.kv_rank, cfg.rope_dim
        per_token = L * (r + dr) * elem
        return CacheFormula(per_token, text=f"L*(r+d_rope)*{elem} = {per_token} B/token")
    levels = 2 if variant == "fastmka" else 2 * (1 + cfg.mka.uses_session)  # FastMKA: kf, vf; MKA: k1 v1 (k2 v2)
    per_token = L * (levels * Hk * d * elem + 1)  # + 1 byte of token validity
    state = L * (8 + 4 * Hk * d * 4)  # n_seen (int64), EMA k/v and partial-chunk k/v (fp32, always held)
    per_chunk = L * 2 * Hk * d * 4 if cfg.mka.uses_longterm else 0
    C = cfg.mka.chunk_size
    text = (
        f"L*({levels}*Hkv*d*{elem}+1) per token + L*2*Hkv*d*4 per {C}-token chunk + L*(4*Hkv*d*4+8) fixed"
        f" = {per_token} B/token + {per_chunk} B/chunk + {state} B"
    )
    return CacheFormula(per_token, per_chunk, C, state, text)


# -- attention variants ---------------------------------------------------------------------------------
def _positions(cache, layer_idx: int, B: int, T: int, device) -> torch.Tensor:
    past = 0 if cache is None else cache.get_seq_length(layer_idx)
    return torch.arange(past, past + T, device=device).expand(B, T)  # (B, T)


def _sdpa(q, k, v, scale: float | None = None) -> torch.Tensor:
    """Causal attention of the last ``Tq`` positions over ``Tk`` keys: ``q: [B, H, Tq, e]``, ``k: [B, h, Tk, e]``."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)  # bottom-right causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class SDPAAttention(nn.Module):
    """MHA / MQA / GQA: ``x: [B, T, D] -> [B, T, D]``, RoPE on q and k, cached ``k, v: [B, Hkv, T, d]``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, layer_idx: int, rope_base: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        pos = _positions(cache, self.layer_idx, B, T, x.device)
        q = self.rotary(self.q_proj(x).view(B, T, H, d).transpose(1, 2), pos)  # (B, H, T, d)
        k = self.rotary(self.k_proj(x).view(B, T, Hk, d).transpose(1, 2), pos)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, Hk, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update([k, v], self.layer_idx)  # (B, Hkv, Tk, d)
        out = _sdpa(q, k, v)  # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * d))


class MLAAttention(nn.Module):
    """DeepSeek-V2 multi-head latent attention: ``x: [B, T, D] -> [B, T, D]``; caches ``c_kv: [B, 1, T, r]``
    and the rotated ``k_rope: [B, 1, T, d_rope]``.

    ``q = [q_nope, rope(q_rope)]`` per head (``d + d_rope`` wide), ``c_kv = RMSNorm(W_dkv x)``,
    ``[k_nope, v] = W_ukv c_kv`` per head, ``k = [k_nope, rope(W_kr x)]`` (the rope key shared by all
    heads), scale ``(d + d_rope) ** -0.5``."""

    def __init__(self, d_model: int, n_heads: int, kv_rank: int, rope_dim: int, layer_idx: int, rope_base: float):
        super().__init__()
        self.n_heads, self.head_dim, self.kv_rank, self.rope_dim = n_heads, d_model // n_heads, kv_rank, rope_dim
        self.layer_idx = layer_idx
        H, d = n_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * (d + rope_dim), bias=False)
        self.kv_down = nn.Linear(d_model, kv_rank + rope_dim, bias=False)  # [c_kv, k_rope]
        self.kv_norm = nn.RMSNorm(kv_rank, eps=1e-6)
        self.kv_up = nn.Linear(kv_rank, H * 2 * d, bias=False)  # per head [k_nope, v]
        self.o_proj = nn.Linear(H * d, d_model, bias=False)
        self.rotary = RotaryEmbedding(rope_dim, rope_base)
        self.scale = (d + rope_dim) ** -0.5

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, d, r, dr = self.n_heads, self.head_dim, self.kv_rank, self.rope_dim
        pos = _positions(cache, self.layer_idx, B, T, x.device)
        q = self.q_proj(x).view(B, T, H, d + dr).transpose(1, 2)  # (B, H, T, d + dr)
        q_nope, q_rope = q.split([d, dr], -1)
        q_rope = self.rotary(q_rope, pos)
        c_kv, k_rope = self.kv_down(x).split([r, dr], -1)
        c_kv = self.kv_norm(c_kv)[:, None]  # (B, 1, T, r)
        k_rope = self.rotary(k_rope[:, None], pos)  # (B, 1, T, dr)
        if cache is not None:
            c_kv, k_rope = cache.update([c_kv, k_rope], self.layer_idx)  # (B, 1, Tk, r), (B, 1, Tk, dr)
        if cache is not None and T == 1:
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope)
        else:
            Tk = c_kv.shape[2]
            kv = self.kv_up(c_kv[:, 0]).view(B, Tk, H, 2 * d).transpose(1, 2)  # (B, H, Tk, 2d)
            k_nope, v = kv.split([d, d], -1)
            k = torch.cat([k_nope, k_rope.expand(B, H, Tk, dr)], -1)  # (B, H, Tk, d + dr)
            out = _sdpa(torch.cat([q_nope, q_rope], -1), k, v, scale=self.scale)  # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * d))

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope) -> torch.Tensor:
        """Decode in latent space: ``q_nope W_uk`` against ``c_kv``, values ``c_kv``, then ``W_uv``."""
        H, d, r = self.n_heads, self.head_dim, self.kv_rank
        w = self.kv_up.weight.view(H, 2 * d, r)
        w_uk, w_uv = w[:, :d], w[:, d:]  # (H, d, r) each
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        qq = torch.cat([q_lat, q_rope], -1)  # (B, H, T, r + dr)
        kk = torch.cat([c_kv, k_rope], -1)  # (B, 1, Tk, r + dr)
        o_lat = _sdpa(qq, kk, c_kv, scale=self.scale)  # (B, H, T, r)
        return torch.einsum("bhtr,hdr->bhtd", o_lat, w_uv)  # (B, H, T, d)


class MKASite(nn.Module):
    """Adapter giving the project's MKA layers this LM's call convention (``cache`` a :class:`MKACache`)."""

    def __init__(self, layer: MKAAttention | FastMKAAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cache: MKACache | None = None) -> torch.Tensor:
        return self.layer(x, cache=cache)


def make_attention(cfg: LMConfig, variant: str, layer_idx: int) -> nn.Module:
    _check_variant(variant)
    D, H = cfg.d_model, cfg.n_heads
    if variant in ("mha", "mqa", "gqa"):
        return SDPAAttention(D, H, cfg.kv_heads(variant), layer_idx, cfg.rope_base)
    if variant == "mla":
        return MLAAttention(D, H, cfg.kv_rank, cfg.rope_dim, layer_idx, cfg.rope_base)
    cls = MKAAttention if variant == "mka" else FastMKAAttention
    mka_cfg = replace(cfg.mka, gate_init=1.0)  # trained from scratch: route from the first step
    return MKASite(cls(D, H, cfg.kv_heads(variant), config=mka_cfg, rope_base=cfg.rope_base, layer_idx=layer_idx))


# -- the model ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU (hidden ``8/3 D`` rounded up to 16) or GELU (hidden ``4 D``)."""

    def __init__(self, d_model: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            hidden = 16 * math.ceil(8 * d_model / 3 / 16)
            self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        else:
            hidden = 4 * d_model
            self.gate_up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        if self.kind == "swiglu":
            g, u = h.chunk(2, -1)
            return self.down(F.silu(g) * u)
        return self.down(F.gelu(h))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, variant: str, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = make_attention(cfg, variant, layer_idx)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.mlp = MLP(cfg.d_model, cfg.mlp)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """``forward(ids: [B, T], cache=None) -> logits: [B, T, V]``; tied input/output embeddings."""

    def __init__(self, cfg: LMConfig, variant: str) -> None:
        super().__init__()
        _check_variant(variant)
        self.cfg, self.variant = cfg, variant
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, variant, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def new_cache(self) -> KVCache | MKACache:
        """An empty cache of the right kind for this variant (one per batch of sequences)."""
        return MKACache() if self.variant in ("mka", "fastmka") else KVCache()

    def forward(self, ids: torch.Tensor, cache: KVCache | MKACache | None = None) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be integer token ids [B, T], got {ids.dtype} {tuple(ids.shape)}")
        if cache is not None and not isinstance(cache, MKACache if self.variant in ("mka", "fastmka") else KVCache):
            raise ValueError(f"cache for variant {self.variant!r} must come from model.new_cache()")
        x = self.embed(ids)  # (B, T, D)
        for block in self.blocks:
            x = block(x, cache=cache)
        return F.linear(self.norm(x), self.embed.weight)  # (B, T, V)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, KVCache | MKACache]:
        """Greedy cached decoding: ``prompt: [B, P] -> [B, P + new_tokens]`` and the cache it filled."""
        cache = self.new_cache()
        logits = self(prompt, cache=cache)
        out = [prompt]
        for _ in range(new_tokens):
            nxt = logits[:, -1:].argmax(-1)  # (B, 1)
            out.append(nxt)
            logits = self(nxt, cache=cache)
        return torch.cat(out, 1), cache


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
