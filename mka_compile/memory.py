"""The MKA memory step, written once: the router, the gated routing weights, and the memory levels of one call (the
session EMA, the chunk summaries and the long-term recall) composed from the ``mka::`` ops, and for FastMKA the
routed mix (:func:`memory_step`). The layers built from scratch (:mod:`mka_compile.layers.attention`) and converted
sites (:mod:`mka_compile.sites.memory`) both call :func:`memory_step`; the cache's rewind
(:mod:`mka_compile.layers.cache`) replays :func:`memory_levels`. :func:`fused_memory` is the same step as one op
(``mka::memory_mix`` / ``mka::memory_levels``, ``kernels/fastmka_memory_cpu``: a fused C++ pass on the CPU), chosen
by :func:`fused_step`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mka_compile import kernels as K
from mka_compile.config import MKAConfig
from mka_compile.kernels.fastmka_memory_cpu import effective_gate  # noqa: F401  (part of this module's API)


def session_both_ways(k1: torch.Tensor, v1: torch.Tensor, beta: float, valid: torch.Tensor):
    """``k1, v1: [B, Hkv, T, d]``, ``valid: [B, T]`` -> the bidirectional session keys and
    values (state dtype), see :mod:`mka_compile.layers.noncausal`."""
    fk, fv, _, _ = K.session_scan(k1, v1, beta, valid)
    bk, bv, _, _ = K.session_scan(k1.flip(2), v1.flip(2), beta, valid.flip(1))
    return (fk + bk.flip(2)) / 2, (fv + bv.flip(2)) / 2


def whole_sequence_positions(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions for ``mka::recall_select`` that make every complete chunk of the row recallable."""
    return valid.long().sum(-1, keepdim=True).expand_as(valid).contiguous()


class Recall(NamedTuple):
    """What the long-term level recalled for one call: queries ``q_r: [B, Hkv, T, d]``, the memory it chose from
    (``mem_k, mem_v: [B, Hkv, S, d]``, chunk summaries then a bank's entries) and ``idx, found: [B, Hkv, T, R]``."""

    q_r: torch.Tensor
    mem_k: torch.Tensor
    mem_v: torch.Tensor
    idx: torch.Tensor
    found: torch.Tensor


def memory_levels(
    cfg: MKAConfig,
    st: Any,
    k1: torch.Tensor,
    v1: torch.Tensor,
    valid: torch.Tensor,
    q_r: torch.Tensor | None,
    causal: bool,
    bank: tuple | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], Recall | None]:
    """One call's memory levels; ``st`` (an :class:`~mka_compile.layers.cache.MKALayerState`) is advanced, except its
    count ``n_seen`` (the caller's). ``k1, v1: [B, Hkv, T, d]``, ``valid: [B, T]``; ``q_r: [B, Hkv, T, d]`` the
    recall queries (None: advance the long-term state without recalling); ``bank``: an external memory
    ``(keys, values, valid)`` or None. Returns the levels ``[k1, (session)]``, ``[v1, (session)]`` and the recall."""
    ks, vs = [k1], [v1]
    if cfg.uses_session:
        if causal:
            sk, sv, st.ema_k, st.ema_v = K.session_scan(k1, v1, cfg.ema_beta, valid, st.ema_k, st.ema_v, st.n_seen)
        else:  # a bidirectional site: the EMA from both ends (layers.noncausal)
            sk, sv = session_both_ways(k1, v1, cfg.ema_beta, valid)
        ks.append(sk)
        vs.append(sv)
    if not cfg.uses_longterm:
        return ks, vs, None
    bk, bv, bvalid = bank if bank is not None else (None, None, None)
    fresh = causal and bk is None and not st.fixed_slots and st.tokens_bound == 0  # nothing seen before this call
    st.reserve(k1.shape[2], cfg.chunk_size)
    st.part_k, st.part_v, st.summ_k, st.summ_v = torch.ops.mka.chunk_update(
        k1, v1, valid, st.n_seen, st.part_k, st.part_v, st.summ_k, st.summ_v, cfg.chunk_size
    )
    if q_r is None:
        return ks, vs, None
    at = K.real_positions(valid, st.n_seen) if causal else whole_sequence_positions(valid)  # bidirectional: all
    idx, found = _select(q_r, st.summ_k, at, cfg, bk, bvalid, fresh)  # (B, Hkv, T, R) each
    mem_k = st.summ_k if bk is None else torch.cat([st.summ_k, bk.to(st.summ_k.dtype)], 2)  # (B, Hkv, S, d)
    mem_v = st.summ_v if bv is None else torch.cat([st.summ_v, bv.to(st.summ_v.dtype)], 2)
    return ks, vs, Recall(q_r, mem_k, mem_v, idx, found)


def recall_level(q_r, mem_k, mem_v, idx, found, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FastMKA's long-term level ``k3, v3: [B, Hkv, T, d]``: the score-weighted recalled entries."""
    sel = K.recall_mask(idx, found, mem_k.shape[2])  # (B, Hkv, T, S)
    return K.recall_mix(q_r, mem_k, mem_v, sel, scale)


def _select(q_r, summ_k, pos, cfg: MKAConfig, bk, bvalid, fresh: bool):
    """``mka::recall_select``, except for the first rows of a call on a fresh state: a token at row
    ``t < (R + 1) C`` has at most R completed chunks before it, so it recalls all of them, no sort needed (the
    order of the recalled entries matters neither to the FastMKA mix nor to MKA attention)."""
    C, R = cfg.chunk_size, cfg.top_r
    T = pos.shape[1]
    head = min(T, (R + 1) * C) if fresh else 0
    if head == 0:
        return torch.ops.mka.recall_select(q_r, summ_k, pos, C, R, bk, bvalid)
    B, Hkv = q_r.shape[0], q_r.shape[1]
    r = torch.arange(R, device=pos.device)
    found = (r < (pos[:, :head] // C)[..., None])[:, None].expand(B, Hkv, head, R)  # chunks c < p // C
    idx = r * found  # (B, Hkv, head, R): slot r where found, 0 elsewhere (as recall_select)
    if head == T:
        return idx, found
    idx2, found2 = torch.ops.mka.recall_select(q_r[:, :, head:], summ_k, pos[:, head:], C, R, None, None)
    return torch.cat([idx, idx2], 2), torch.cat([found, found2], 2)


class Router(nn.Module):
    """``logits = W2 silu(W1 q)``: ``[B, T, D_q] -> [B, T, G * L]``."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        plain = all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in (fc1, fc2))
        if plain:
            return F.linear(F.silu(F.linear(q, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)  # no module calls
        return fc2(F.silu(fc1(q)))


def routing_weights(
    router: nn.Module,
    gate: torch.Tensor,
    q_flat: torch.Tensor,
    has_recall: torch.Tensor | None,
    num_levels: int,
    groups: int,
) -> torch.Tensor:
    """``lam: [B, G, T, L]`` float32 (float64 for float64 inputs): gated softmax routing.

    ``q_flat: [B, T, H*d]`` (the query projection); ``w = onehot(local) + g * (softmax(router(q)) - onehot)`` with
    the reflecting gate ``g = min(|gate|, 1)``: ``w`` is always a convex mix of the levels; the gradient is
    ``sign(gate)`` (``+1`` at exactly 0, so a zero gate trains; straight through the clip at 1), so a gate the
    optimizer pushes below 0 bounces back instead of giving the memory levels negative weights.
    L3 (the last level) is masked out where nothing is recalled (``has_recall: [B, T]``), so those positions
    route over the other levels. The math is ``mka::memory_mix``'s (:func:`~mka_compile.kernels.fastmka_memory_cpu.
    gated_routing`), written once."""
    rdt = torch.float64 if q_flat.dtype == torch.float64 else torch.float32
    logits = router(q_flat).to(rdt)  # (B, T, G * L)
    if logits.shape[-1] != groups * num_levels:
        raise ValueError(f"the router gives {logits.shape[-1]} logits per token; expected {groups} x {num_levels}")
    return K.fastmka_memory_cpu.gated_routing(logits, gate, has_recall, num_levels)


def fused_step(mode: str, cfg: MKAConfig, st: Any, causal: bool, fresh_and_discarded: bool, *tensors) -> bool:
    """Whether a call's memory step runs as one op (``mka::memory_mix`` / ``mka::memory_levels``, whose CPU kernel
    is the fused C++ pass) rather than as the composed ops. The same answer in eager and compiled runs: causal
    sites, float32 CPU tensors (``tensors``) with the extension built; under autograd only FastMKA on a fresh state
    that nothing keeps (``fresh_and_discarded``: the op gives the incoming state, ``lam`` and the new state no
    gradient), MKA mode only without autograd. ``torch.export`` (ONNX, ``inspect``) and fixed summary slots
    (export, the ``mka`` backend) see the composed ops, which their translations and rules read."""
    if not causal or st.fixed_slots or torch.compiler.is_exporting():
        return False
    if torch.is_grad_enabled() and (mode == "mka" or not fresh_and_discarded):
        return False
    return K.fastmka_memory_cpu.supports(*tensors)


def fused_memory(mode: str, cfg: MKAConfig, st: Any, k1, v1, q_flat, logits, gate, valid, scale: float):
    """One call's memory step as one op (``mka::memory_mix`` for FastMKA, ``mka::memory_levels`` for MKA mode),
    shared by the layers here and converted sites; ``st``'s EMA and chunk state are replaced (``n_seen`` is the
    caller's). ``k1, v1: [B, Hkv, T, d]``, ``q_flat: [B, T, H*d]``, ``logits: [B, T, G*L]`` (the router's output).

    FastMKA: returns ``(kf, vf, lam, None)``; MKA mode (no autograd): ``(s_k, s_v, lam, (idx, found))``, the
    session levels (None without them) and the recalled slots (None without the long-term level)."""
    if cfg.uses_longterm:
        st.reserve(k1.shape[2], cfg.chunk_size)
    state = (st.n_seen, st.ema_k, st.ema_v, st.part_k, st.part_v, st.summ_k, st.summ_v)
    opts = dict(
        session=cfg.uses_session, longterm=cfg.uses_longterm, beta=cfg.ema_beta, chunk=cfg.chunk_size,
        top_r=cfg.top_r, scale=scale,
    )  # fmt: skip
    ops = K.fastmka_memory_cpu
    if mode == "mka":
        sk, sv, idx, found, lam, new = ops.memory_levels(k1, v1, q_flat, logits, gate, valid, state, **opts)
        out = (sk, sv, lam, (idx, found))
    else:
        kf, vf, lam, new = ops.memory_mix(k1, v1, q_flat, logits, gate, valid, state, **opts)
        out = (kf, vf, lam, None)
    st.ema_k, st.ema_v, st.part_k, st.part_v, st.summ_k, st.summ_v = new
    return out


class Step(NamedTuple):
    """One call's memory step, as the mode's attention reads it.

    FastMKA: ``ks = [kf]``, ``vs = [vf]``, the routed mixes ``[B, Hkv, T, d]``. MKA mode: the levels
    ``ks = [k1, (session)]``, ``vs`` likewise, and ``recall = (mem_k, mem_v, idx, found)`` for the long-term level
    (None without it). ``lam: [B, G, T, L]`` the routing weights, in both modes."""

    ks: list[torch.Tensor]
    vs: list[torch.Tensor]
    lam: torch.Tensor
    recall: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None


def memory_step(
    mode: str,
    cfg: MKAConfig,
    st: Any,
    k1: torch.Tensor,
    v1: torch.Tensor,
    q_flat: torch.Tensor,
    router: nn.Module,
    gate: torch.Tensor,
    valid: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    groups: int,
    discarded: bool,
    bank: tuple | None = None,
) -> Step:
    """The memory step of one call, the one composition that the layers built from scratch and converted sites
    both run: the levels (:func:`memory_levels`), the routing weights (:func:`routing_weights`) and, for FastMKA,
    the recalled level and the routed mix; as one op (:func:`fused_memory`) where :func:`fused_step` says so.

    ``k1, v1: [B, Hkv, T, d]`` (this call's keys and values, un-rotated), ``q_flat: [B, T, H*d]`` (the query
    projection), ``valid: [B, T]``; ``scale`` scores the recalled summaries; ``discarded``: the state is fresh and
    nothing keeps it (no cache); ``bank``: an external memory ``(keys, values, valid)`` or None. ``st`` is advanced
    except its count ``n_seen`` (the caller's)."""
    has_bank = bank is not None and bank[0] is not None
    if not has_bank and fused_step(mode, cfg, st, causal, discarded, k1, v1, q_flat):
        a, b, lam, recalled = fused_memory(mode, cfg, st, k1, v1, q_flat, router(q_flat), gate, valid, scale)
        if mode != "mka":
            return Step([a], [b], lam, None)
        ks, vs = ([k1, a], [v1, b]) if cfg.uses_session else ([k1], [v1])
        return Step(ks, vs, lam, (st.summ_k, st.summ_v, *recalled) if cfg.uses_longterm else None)
    B, Hkv, T, d = k1.shape
    q_r = None
    if cfg.uses_longterm:  # the recall query of a kv group: the mean of its query heads
        q_r = group_mean(q_flat.view(B, T, Hkv, q_flat.shape[-1] // (Hkv * d), d)).transpose(1, 2)
    ks, vs, rec = memory_levels(cfg, st, k1, v1, valid, q_r, causal, bank if has_bank else None)
    has_recall = None if rec is None else rec.found[:, 0, :, 0]  # (B, T): recall_select lists a found entry first
    lam = routing_weights(router, gate, q_flat, has_recall, cfg.num_levels, groups)
    if mode == "mka":  # MKA mode attends over the recalled entries itself
        return Step(ks, vs, lam, None if rec is None else (rec.mem_k, rec.mem_v, rec.idx, rec.found))
    if rec is not None:
        k3, v3 = recall_level(*rec, scale)  # (B, Hkv, T, d) each
        ks.append(k3.to(k1.dtype))
        vs.append(v3.to(v1.dtype))
    kf, vf = K.route_mix(lam, ks, vs)  # (B, Hkv, T, d) each
    return Step([kf], [vf], lam, None)


def group_mean(q: torch.Tensor) -> torch.Tensor:
    """``[B, T, Hkv, rep, d] -> [B, T, Hkv, d]``, the mean over the query heads of each kv group (the recall
    query): a few adds of strided views, cheaper than a reduction over that short middle axis."""
    rep = q.shape[3]
    out = q[:, :, :, 0]
    for i in range(1, rep):
        out = out + q[:, :, :, i]
    return out / rep if rep > 1 else out
