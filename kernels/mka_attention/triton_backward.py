"""Triton kernels of MKA attention's backward: dQ per query block and dK/dV per key block of each level. The
conventions and the helpers they share are those of :mod:`.triton_kernels`; the launcher is
:mod:`.triton_launch`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import load_head_tile, store_head_tile
from .triton_kernels import _LOG2E, _key_block, _key_end, _level_kv, _mm, _program, _recalled_slot, _tile_rows


@triton.jit
def _dq_block(q, go, k, v, vis, lse2, dot, w, dq, qk_scale, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``dq += dS k`` for one key block of one level (``dS = P (lam dO . v - lam dot)``), unscaled."""
    s = _mm(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (M, N)
    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _mm(go, tl.trans(v), DOT_PRECISION, DOT_UPCAST)  # (M, N)
    ds = p * (dp - dot[:, None]) * w[:, None]
    return dq + _mm(ds.to(k.dtype), k, DOT_PRECISION, DOT_UPCAST)


@triton.jit
def _mka_attention_bwd_dq_kernel(
    Q, K1, V1, K2, V2, LAM, Q3, MEM_K, MEM_V, IDX, FOUND, KV_VALID, GO, LSE, DOT,
    DQ, DQ3, DMEM_K, DMEM_V,
    stride_q, stride_k1, stride_v1, stride_k2, stride_v2, stride_lam, stride_q3, stride_mk, stride_mv,
    stride_i, stride_f, stride_valid, stride_g, stride_dq, stride_dq3, stride_dm,
    H, REP, TQ, TK, S, R, D, NLVL, scale, qk_scale,
    NUM_LEVELS: tl.constexpr,
    HAS_L3: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(Tq, BLOCK_M), B * H)``: ``DQ`` over the key blocks of every level, then ``DQ3`` and
    float32 atomic adds into ``DMEM_K, DMEM_V [B, Hkv, S, d]`` over the recalled slots."""
    pid_m, pid_bh, b, h, hk = _program(H, REP)
    offs_m, m_mask, offs_d, d_mask, md_mask = _tile_rows(pid_m * BLOCK_M, TQ, D, BLOCK_M, BLOCK_D)
    off = TK - TQ

    q = load_head_tile(Q, stride_q, b, h, offs_m, offs_d, md_mask)
    go = load_head_tile(GO, stride_g, b, h, offs_m, offs_d, md_mask)
    go_kv = go.to(V1.dtype.element_ty)
    lam_row = LAM + b * stride_lam[0] + hk * stride_lam[1] + offs_m * stride_lam[2]
    lse_row = LSE + pid_bh * NLVL * TQ + offs_m
    dot_row = DOT + pid_bh * NLVL * TQ + offs_m
    lse1 = tl.load(lse_row, mask=m_mask, other=0.0)
    lse1 = tl.where(lse1 > float("-inf"), lse1 * _LOG2E, 0.0)  # rows that see nothing: every key is masked
    dot1 = tl.load(dot_row, mask=m_mask, other=0.0)
    w1 = tl.load(lam_row, mask=m_mask, other=0.0).to(tl.float32)
    lse2 = tl.zeros([BLOCK_M], tl.float32)
    dot2 = tl.zeros([BLOCK_M], tl.float32)
    w2 = tl.zeros([BLOCK_M], tl.float32)
    if NUM_LEVELS == 2:
        lse2 = tl.load(lse_row + TQ, mask=m_mask, other=0.0)
        lse2 = tl.where(lse2 > float("-inf"), lse2 * _LOG2E, 0.0)
        dot2 = tl.load(dot_row + TQ, mask=m_mask, other=0.0)
        w2 = tl.load(lam_row + stride_lam[3], mask=m_mask, other=0.0).to(tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _key_end(pid_m, TK, off, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n, nd_mask, vis = _key_block(
            start_n, KV_VALID, b, stride_valid, offs_m, m_mask, TK, D, off, CAUSAL, BLOCK_N, BLOCK_D
        )
        k, v = _level_kv(K1, V1, b, hk, offs_n, offs_d, nd_mask, stride_k1, stride_v1)
        dq = _dq_block(q, go_kv, k, v, vis, lse1, dot1, w1, dq, qk_scale, DOT_PRECISION, DOT_UPCAST)
        if NUM_LEVELS == 2:
            k, v = _level_kv(K2, V2, b, hk, offs_n, offs_d, nd_mask, stride_k2, stride_v2)
            dq = _dq_block(q, go_kv, k, v, vis, lse2, dot2, w2, dq, qk_scale, DOT_PRECISION, DOT_UPCAST)
    store_head_tile(DQ, stride_dq, b, h, offs_m, offs_d, dq * scale, md_mask)

    if HAS_L3:
        go32 = go.to(tl.float32)
        q3 = load_head_tile(Q3, stride_q3, b, h, offs_m, offs_d, md_mask).to(tl.float32)
        lse3 = tl.load(lse_row + NUM_LEVELS * TQ, mask=m_mask, other=0.0)
        lse3 = tl.where(lse3 > float("-inf"), lse3 * _LOG2E, 0.0)
        dot3 = tl.load(dot_row + NUM_LEVELS * TQ, mask=m_mask, other=0.0)
        w3 = tl.load(lam_row + NUM_LEVELS * stride_lam[3], mask=m_mask, other=0.0).to(tl.float32)
        idx_row = IDX + b * stride_i[0] + hk * stride_i[1] + offs_m * stride_i[2]
        found_row = FOUND + b * stride_f[0] + hk * stride_f[1] + offs_m * stride_f[2]
        dm_base = b * stride_dm[0] + hk * stride_dm[1]
        dq3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for r in range(0, R):
            slot, keep = _recalled_slot(idx_row, found_row, r, stride_i[3], stride_f[3], m_mask, S)
            ld = keep[:, None] & d_mask[None, :]
            mk, mv = _level_kv(MEM_K, MEM_V, b, hk, slot, offs_d, ld, stride_mk, stride_mv)
            mk = mk.to(tl.float32)
            s = tl.sum(q3 * mk, 1) * qk_scale  # (M,)
            p = tl.where(keep, tl.exp2(s - lse3), 0.0)
            ds = p * (tl.sum(go32 * mv.to(tl.float32), 1) - dot3) * w3
            dq3 += ds[:, None] * mk
            dm_ptrs = dm_base + slot[:, None] * stride_dm[2] + offs_d[None, :] * stride_dm[3]  # (M, D) offsets
            tl.atomic_add(DMEM_K + dm_ptrs, ds[:, None] * q3 * scale, mask=ld, sem="relaxed")
            tl.atomic_add(DMEM_V + dm_ptrs, (p * w3)[:, None] * go32, mask=ld, sem="relaxed")
        store_head_tile(DQ3, stride_dq3, b, h, offs_m, offs_d, dq3 * scale, md_mask)


@triton.jit
def _mka_attention_bwd_dkdv_kernel(
    Q, K, V, LAM, KV_VALID, GO, LSE, DOT,
    DK, DV,
    stride_q, stride_k, stride_v, stride_lam, stride_valid, stride_g, stride_dk, stride_dv,
    H, HKV, REP, TQ, TK, D, NLVL, LEVEL, scale, qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(Tk, BLOCK_N), B * Hkv)`` for full-length level ``LEVEL``: ``DK, DV`` of one key block,
    summed over the query blocks of the ``REP`` query heads that share the kv head (no atomics)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n, n_mask, offs_d, d_mask, nd_mask = _tile_rows(start_n, TK, D, BLOCK_N, BLOCK_D)
    off = TK - TQ

    k, v = _level_kv(K, V, b, hk, offs_n, offs_d, nd_mask, stride_k, stride_v)
    valid = tl.load(KV_VALID + b * stride_valid[0] + offs_n * stride_valid[1], mask=n_mask, other=0) != 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        lo = (tl.maximum(start_n - off, 0) // BLOCK_M) * BLOCK_M  # first query that sees this block
    else:
        lo = 0
    lam_base = LAM + b * stride_lam[0] + hk * stride_lam[1] + LEVEL * stride_lam[3]
    for h in range(hk * REP, hk * REP + REP):
        q_base = Q + b * stride_q[0] + h * stride_q[1]
        go_base = GO + b * stride_g[0] + h * stride_g[1]
        stat_base = ((b * H + h) * NLVL + LEVEL) * TQ
        for start_m in range(lo, TQ, BLOCK_M):
            offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_mask = offs_m < TQ
            md_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_q[2] + offs_d[None, :] * stride_q[3], mask=md_mask, other=0.0)
            go = tl.load(
                go_base + offs_m[:, None] * stride_g[2] + offs_d[None, :] * stride_g[3], mask=md_mask, other=0.0
            )
            go = go.to(V.dtype.element_ty)
            lse = tl.load(LSE + stat_base + offs_m, mask=m_mask, other=0.0)
            lse = tl.where(lse > float("-inf"), lse * _LOG2E, 0.0)
            dot = tl.load(DOT + stat_base + offs_m, mask=m_mask, other=0.0)
            w = tl.load(lam_base + offs_m * stride_lam[2], mask=m_mask, other=0.0).to(tl.float32)
            vis_t = valid[:, None] & m_mask[None, :]  # (N, M)
            if CAUSAL:
                vis_t = vis_t & (offs_n[:, None] <= offs_m[None, :] + off)
            s_t = _mm(k, tl.trans(q), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (N, M)
            p_t = tl.where(vis_t, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += _mm((p_t * w[None, :]).to(go.dtype), go, DOT_PRECISION, DOT_UPCAST)
            dp_t = _mm(v, tl.trans(go), DOT_PRECISION, DOT_UPCAST)  # (N, M)
            ds_t = p_t * (dp_t - dot[None, :]) * w[None, :]
            dk += _mm(ds_t.to(q.dtype), q, DOT_PRECISION, DOT_UPCAST)
    dk_ptrs = (
        DK + b * stride_dk[0] + hk * stride_dk[1] + offs_n[:, None] * stride_dk[2] + offs_d[None, :] * stride_dk[3]
    )
    dv_ptrs = (
        DV + b * stride_dv[0] + hk * stride_dv[1] + offs_n[:, None] * stride_dv[2] + offs_d[None, :] * stride_dv[3]
    )
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=nd_mask)


# --------------------------------------------------------------------------------------------- launchers
