"""``FastMKAAttention`` and ``MKAAttention``: attention layers built on the ``mka::`` ops.

Both take ``x: [B, T, D]`` and return ``[B, T, D]``. A layer owns q/k/v/o projections, an optional
RoPE, GQA (``num_kv_heads`` dividing ``num_heads``), a router MLP on the query projection, and a gate
on the non-local levels. Pass an :class:`MKACache` to run prefill and decode: the KV cache and the
MKA state (session EMA, long-term chunk state) ride in it, so decoding equals one full forward.

``attention_mask: [B, T]`` (bool, True = real token) marks padding of this call's tokens; padded
tokens leave the memory untouched and do not count as positions (left padding gives the same
outputs on the real tokens as running each sequence alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mka_compile import bounded, bounded_levels
from mka_compile import kernels as K
from mka_compile.config import MKAConfig
from mka_compile.kernels import _validate as check
from mka_compile.layers.cache import MKACache, MKALayerState
from mka_compile.layers.rope import RotaryEmbedding
from mka_compile.memory import (  # noqa: F401  (Router, routing_weights, effective_gate: part of this API)
    Router,
    Step,
    effective_gate,
    memory_step,
    routing_weights,
)

MemoryBank = tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _MKABase(nn.Module):
    mode: str = ""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        config: MKAConfig | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else MKAConfig()
        if not isinstance(self.config, MKAConfig):
            raise ValueError(f"config must be an MKAConfig, got {type(self.config).__name__}")
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            check.positive_int(name, val)
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check.positive_int("num_kv_heads", self.num_kv_heads)
        check.heads_divide(num_heads, self.num_kv_heads, "num_heads", "num_kv_heads")
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}; pass head_dim")
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        check.positive_int("head_dim", self.head_dim)
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.scale = self.head_dim**-0.5
        qd, kvd = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, qd, bias=bias)
        self.k_proj = nn.Linear(hidden_size, kvd, bias=bias)
        self.v_proj = nn.Linear(hidden_size, kvd, bias=bias)
        self.o_proj = nn.Linear(qd, hidden_size, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rope else None
        self.groups = self.num_kv_heads if self.config.router_per_head else 1
        hidden = self.config.router_hidden or max(1, qd // 2)
        self.router = Router(qd, hidden, self.groups * self.config.num_levels)
        self.gate = nn.Parameter(torch.full((1,), self.config.initial_gate(converting=False)))

    # -- shared pieces ---------------------------------------------------------------------------
    def _rope(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return t if self.rotary is None else self.rotary(t, pos)

    def _check_inputs(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        check.rank("x", x, 3, "[B, T, hidden_size]")
        check.floating("x", x)
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has {x.shape[-1]} features but the layer expects hidden_size={self.hidden_size}")
        if x.shape[1] < 1:
            raise ValueError("x must hold at least one token (T >= 1)")
        w = self.q_proj.weight
        if x.dtype != w.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the layer's weights are {w.dtype}; cast one to the other")
        check.same_device("layer weights", w, x=x)
        B, T, _ = x.shape
        if attention_mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=x.device)
        check.shape("attention_mask", attention_mask, (B, T), "[B, T] for this call's tokens")
        check.same_device("x", x, attention_mask=attention_mask)
        if attention_mask.dtype != torch.bool:
            if attention_mask.is_floating_point() or attention_mask.dtype == torch.bool:
                raise ValueError("attention_mask must be bool or 0/1 integers (True/1 = real token)")
            attention_mask = attention_mask != 0
        return attention_mask

    def _state(self, cache: MKACache | None, B: int, x: torch.Tensor) -> MKALayerState:
        sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        kw = dict(batch=B, kv_heads=self.num_kv_heads, head_dim=self.head_dim, device=x.device, state_dtype=sdt)
        if cache is not None and not self.config.causal:
            raise ValueError("a bidirectional layer (MKAConfig(causal=False)) sees its whole sequence: no cache")
        if cache is None:
            return MKALayerState.empty(kw["batch"], kw["kv_heads"], kw["head_dim"], kw["device"], sdt)
        if not isinstance(cache, MKACache):
            raise ValueError(f"cache must be an MKACache, got {type(cache).__name__}")
        return cache.layer(self.layer_idx, **kw)

    def _bank(self, bank: MemoryBank | None, B: int, x: torch.Tensor):
        if bank is None:
            return None, None, None
        if not self.config.uses_longterm:
            raise ValueError("memory_bank needs the 'longterm' level in config.levels")
        if not isinstance(bank, (tuple, list)) or len(bank) not in (2, 3):
            raise ValueError("memory_bank must be (bank_k, bank_v) or (bank_k, bank_v, bank_valid)")
        bk, bv = bank[0], bank[1]
        bvalid = bank[2] if len(bank) == 3 else None
        check.rank("memory_bank[0]", bk, 4, "[B, Hkv, M, head_dim]")
        check.shape("memory_bank[0]", bk, (B, self.num_kv_heads, bk.shape[2], self.head_dim), "[B, Hkv, M, head_dim]")
        check.shape("memory_bank[1]", bv, bk.shape, "[B, Hkv, M, head_dim] like memory_bank[0]")
        check.same_device("x", x, memory_bank_k=bk, memory_bank_v=bv, memory_bank_valid=bvalid)
        return bk, bv, bvalid

    def _project(self, x: torch.Tensor):
        """``q_flat: [B, T, H*d]``, its head view ``q: [B, H, T, d]``, and ``k1, v1: [B, Hkv, T, d]``."""
        B, T, _ = x.shape
        q_flat = self.q_proj(x)
        q = q_flat.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k1 = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v1 = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q_flat, q, k1, v1

    def _memory(self, x, valid, st: MKALayerState, bank, discarded: bool):
        """Projections and the memory step (:func:`~mka_compile.memory.memory_step`, as converted sites run it):
        ``(q [B, H, T, d], step, pos [B, T])``; advances ``st``, its count included."""
        cfg = self.config
        q_flat, q, k1, v1 = self._project(x)
        pos = K.real_positions(valid, st.n_seen)  # (B, T)
        step = memory_step(
            self.mode, cfg, st, k1, v1, q_flat, self.router, self.gate, valid, causal=cfg.causal,
            scale=cfg.recall_scale or self.scale, groups=self.groups, discarded=discarded, bank=bank,
        )  # fmt: skip
        st.n_seen = st.n_seen + valid.sum(-1)
        return q, step, pos

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: MKACache | None = None,
        attention_mask: torch.Tensor | None = None,
        memory_bank: MemoryBank | None = None,
    ) -> torch.Tensor:
        """``x: [B, T, hidden_size] -> [B, T, hidden_size]``; see the module docstring."""
        valid = self._check_inputs(x, attention_mask)
        B, T, _ = x.shape
        st = self._state(cache, B, x)
        q, step, pos = self._memory(x, valid, st, self._bank(memory_bank, B, x), cache is None)
        out = self._attend(q, step, pos, valid, st)  # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, step: Step, pos, valid, st: MKALayerState) -> torch.Tensor:
        """The mode's attention over the memory step's levels: ``[B, H, T, d]``."""
        raise NotImplementedError

    def _bounded_inputs(self, q, k, st: MKALayerState, levels: int):
        """Bounded memory's stores (one per full-length level, in the state: fresh ones without a cache), the recall
        query of ``chunk_keys="mean"`` (None otherwise: the bounds recall turns the queries back itself), the chunk
        summaries it scores, and the RoPE frequencies."""
        cfg = self.config
        B, H, T, d = q.shape
        Hkv = self.num_kv_heads
        if st.bounded is None or len(st.bounded) != levels or st.bounded[0].n.shape[0] != B:
            st.bounded = bounded_levels.level_stores(levels, Hkv, d, k, cfg)
        q_r = None
        if cfg.exact_recall > 0 and cfg.chunk_keys == "mean":
            q_r = q.view(B, Hkv, H // Hkv, T, d).mean(2).float()
        freqs = None if self.rotary is None else self.rotary.frequencies(q.device).float()
        return st.bounded, q_r, st.summ_k if cfg.uses_longterm else None, freqs

    def level_weights(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Routing weights this layer would use for ``x`` (no cache): ``[B, G, T, L]``, for statistics."""
        with torch.no_grad():
            valid = self._check_inputs(x, attention_mask)
            st = self._state(None, x.shape[0], x)
            return self._memory(x, valid, st, self._bank(None, x.shape[0], x), True)[1].lam


class FastMKAAttention(_MKABase):
    """FastMKA (route-fused): ``kf = sum_l lam_l k_l``, ``vf`` likewise, then ordinary attention.

    The cache stores ``kf, vf`` (rotated keys), so memory equals a plain KV cache's.
    """

    mode = "fastmka"

    def _attend(self, q, step: Step, pos, valid, st: MKALayerState) -> torch.Tensor:
        (kf,), (vf,) = step.ks, step.vs  # the routed mixes
        if self.config.bounded:
            return self._attend_bounded(q, kf, vf, pos, valid, st)
        (kc, vc), kv_valid = st.append([self._rope(kf, pos), vf], valid)
        return attend(self._rope(q, pos), kc, vc, kv_valid, self.scale, self.config.causal)  # (B, H, T, d)

    def _attend_bounded(self, q, kf, vf, pos, valid, st: MKALayerState) -> torch.Tensor:
        """Bounded memory (:mod:`mka_compile.bounded`): the store rides in the layer's state (a fresh one without a
        cache); keys move from ``config.trained_length`` on (None: never)."""
        stores, q_r, summ, freqs = self._bounded_inputs(q, kf, st, 1)
        return bounded.attend(
            stores[0], self._rope(q, pos), self._rope(kf, pos), vf, valid, q_r, summ, self.config, freqs, False,
            self.config.trained_length or 0, self.scale,
        )  # fmt: skip


class MKAAttention(_MKABase):
    """MKA (full): ``out = sum_l lam_l Attn(q, K_l, V_l)`` through ``mka::mka_attention``.

    The cache stores ``k1, v1`` and ``k2, v2`` (L2 EMA keys/values), twice a plain KV cache.
    """

    mode = "mka"

    def _attend(self, q, step: Step, pos, valid, st: MKALayerState) -> torch.Tensor:
        ks, vs, lam, recall = step
        if self.config.bounded:
            stores, q_r, summ, freqs = self._bounded_inputs(q, ks[0], st, len(ks))
            l3 = None if recall is None else (q, *recall)
            return bounded_levels.attend_levels(
                stores, self._rope(q, pos), [self._rope(k, pos) for k in ks], vs, valid, lam, q_r, summ, l3,
                self.config, freqs, False, self.config.trained_length or 0, self.scale,
            )  # fmt: skip
        stored = [t for pair in zip([self._rope(k, pos) for k in ks], vs) for t in pair]
        full, kv_valid = st.append(stored, valid)
        kw = {}
        if recall is not None:
            mem_k, mem_v, idx, found = recall
            kw = dict(q3=q, mem_k=mem_k, mem_v=mem_v, idx3=idx, found3=found)
        out = K.mka_attention(
            self._rope(q, pos),
            full[0::2],
            full[1::2],
            lam,
            kv_valid=kv_valid,
            scale=self.scale,
            causal=self.config.causal,
            **kw,
        )  # (B, H, T, d)
        return out


def attend(q, k, v, kv_valid, scale: float, causal: bool) -> torch.Tensor:
    """Ordinary attention over a (cached) key set: ``q: [B, H, Tq, d]``, ``k, v: [B, Hkv, Tk, d]``.

    Queries are the last Tq keys; padded keys are masked; a query that sees no key returns zeros.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and Tq == Tk and not torch.compiler.is_compiling() and bool(kv_valid.all()):  # eager fast path
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    vis = K.visibility(kv_valid, Tq, causal)  # (B, 1, Tq, Tk)
    empty = ~vis.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=vis | empty, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)
