"""Triton kernels of MKA attention's backward: dQ per query block and dK/dV per key block of each level. The
conventions and the helpers they share are those of :mod:`.triton_kernels`; the launcher is
:mod:`.triton_launch`.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_k1b, stride_k1h, stride_k1t, stride_k1d,
    stride_v1b, stride_v1h, stride_v1t, stride_v1d,
    stride_k2b, stride_k2h, stride_k2t, stride_k2d,
    stride_v2b, stride_v2h, stride_v2t, stride_v2d,
    stride_lamb, stride_lamg, stride_lamt, stride_laml,
    stride_q3b, stride_q3h, stride_q3t, stride_q3d,
    stride_mkb, stride_mkh, stride_mks, stride_mkd,
    stride_mvb, stride_mvh, stride_mvs, stride_mvd,
    stride_ib, stride_ih, stride_it, stride_ir,
    stride_fb, stride_fh, stride_ft, stride_fr,
    stride_vb, stride_vt,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_dq3b, stride_dq3h, stride_dq3t, stride_dq3d,
    stride_dmb, stride_dmh, stride_dms, stride_dmd,
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

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)  # fmt: skip
    go = tl.load(GO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                 mask=md_mask, other=0.0)  # fmt: skip
    go_kv = go.to(V1.dtype.element_ty)
    lam_row = LAM + b * stride_lamb + hk * stride_lamg + offs_m * stride_lamt
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
        w2 = tl.load(lam_row + stride_laml, mask=m_mask, other=0.0).to(tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _key_end(pid_m, TK, off, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n, nd_mask, vis = _key_block(start_n, KV_VALID + b * stride_vb, stride_vt, offs_m, m_mask, TK, D, off,
                                          CAUSAL, BLOCK_N, BLOCK_D)  # fmt: skip
        k, v = _level_kv(K1, V1, b, hk, offs_n, offs_d, nd_mask, stride_k1b, stride_k1h, stride_k1t, stride_k1d,
                         stride_v1b, stride_v1h, stride_v1t, stride_v1d)  # fmt: skip
        dq = _dq_block(q, go_kv, k, v, vis, lse1, dot1, w1, dq, qk_scale, DOT_PRECISION, DOT_UPCAST)
        if NUM_LEVELS == 2:
            k, v = _level_kv(K2, V2, b, hk, offs_n, offs_d, nd_mask, stride_k2b, stride_k2h, stride_k2t, stride_k2d,
                             stride_v2b, stride_v2h, stride_v2t, stride_v2d)  # fmt: skip
            dq = _dq_block(q, go_kv, k, v, vis, lse2, dot2, w2, dq, qk_scale, DOT_PRECISION, DOT_UPCAST)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)

    if HAS_L3:
        go32 = go.to(tl.float32)
        q3 = tl.load(Q3 + b * stride_q3b + h * stride_q3h + offs_m[:, None] * stride_q3t + offs_d[None, :] * stride_q3d,
                     mask=md_mask, other=0.0).to(tl.float32)  # fmt: skip
        lse3 = tl.load(lse_row + NUM_LEVELS * TQ, mask=m_mask, other=0.0)
        lse3 = tl.where(lse3 > float("-inf"), lse3 * _LOG2E, 0.0)
        dot3 = tl.load(dot_row + NUM_LEVELS * TQ, mask=m_mask, other=0.0)
        w3 = tl.load(lam_row + NUM_LEVELS * stride_laml, mask=m_mask, other=0.0).to(tl.float32)
        idx_row = IDX + b * stride_ib + hk * stride_ih + offs_m * stride_it
        found_row = FOUND + b * stride_fb + hk * stride_fh + offs_m * stride_ft
        dm_base = b * stride_dmb + hk * stride_dmh
        dq3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for r in range(0, R):
            slot, keep = _recalled_slot(idx_row, found_row, r, stride_ir, stride_fr, m_mask, S)
            ld = keep[:, None] & d_mask[None, :]
            mk, mv = _level_kv(MEM_K, MEM_V, b, hk, slot, offs_d, ld, stride_mkb, stride_mkh, stride_mks, stride_mkd,
                               stride_mvb, stride_mvh, stride_mvs, stride_mvd)  # fmt: skip
            mk = mk.to(tl.float32)
            s = tl.sum(q3 * mk, 1) * qk_scale  # (M,)
            p = tl.where(keep, tl.exp2(s - lse3), 0.0)
            ds = p * (tl.sum(go32 * mv.to(tl.float32), 1) - dot3) * w3
            dq3 += ds[:, None] * mk
            dm_ptrs = dm_base + slot[:, None] * stride_dms + offs_d[None, :] * stride_dmd  # (M, D) offsets
            tl.atomic_add(DMEM_K + dm_ptrs, ds[:, None] * q3 * scale, mask=ld, sem="relaxed")
            tl.atomic_add(DMEM_V + dm_ptrs, (p * w3)[:, None] * go32, mask=ld, sem="relaxed")
        dq3_ptrs = DQ3 + b * stride_dq3b + h * stride_dq3h + offs_m[:, None] * stride_dq3t
        tl.store(dq3_ptrs + offs_d[None, :] * stride_dq3d, (dq3 * scale).to(DQ3.dtype.element_ty), mask=md_mask)


@triton.jit
def _mka_attention_bwd_dkdv_kernel(
    Q, K, V, LAM, KV_VALID, GO, LSE, DOT, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_lamb, stride_lamg, stride_lamt, stride_laml,
    stride_kvb, stride_kvt,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
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

    k, v = _level_kv(K, V, b, hk, offs_n, offs_d, nd_mask, stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd)  # fmt: skip
    valid = tl.load(KV_VALID + b * stride_kvb + offs_n * stride_kvt, mask=n_mask, other=0) != 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        lo = (tl.maximum(start_n - off, 0) // BLOCK_M) * BLOCK_M  # first query that sees this block
    else:
        lo = 0
    lam_base = LAM + b * stride_lamb + hk * stride_lamg + LEVEL * stride_laml
    for h in range(hk * REP, hk * REP + REP):
        q_base = Q + b * stride_qb + h * stride_qh
        go_base = GO + b * stride_gb + h * stride_gh
        stat_base = ((b * H + h) * NLVL + LEVEL) * TQ
        for start_m in range(lo, TQ, BLOCK_M):
            offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_mask = offs_m < TQ
            md_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
            go = tl.load(go_base + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd, mask=md_mask, other=0.0)
            go = go.to(V.dtype.element_ty)
            lse = tl.load(LSE + stat_base + offs_m, mask=m_mask, other=0.0)
            lse = tl.where(lse > float("-inf"), lse * _LOG2E, 0.0)
            dot = tl.load(DOT + stat_base + offs_m, mask=m_mask, other=0.0)
            w = tl.load(lam_base + offs_m * stride_lamt, mask=m_mask, other=0.0).to(tl.float32)
            vis_t = valid[:, None] & m_mask[None, :]  # (N, M)
            if CAUSAL:
                vis_t = vis_t & (offs_n[:, None] <= offs_m[None, :] + off)
            s_t = _mm(k, tl.trans(q), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (N, M)
            p_t = tl.where(vis_t, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += _mm((p_t * w[None, :]).to(go.dtype), go, DOT_PRECISION, DOT_UPCAST)
            dp_t = _mm(v, tl.trans(go), DOT_PRECISION, DOT_UPCAST)  # (N, M)
            ds_t = p_t * (dp_t - dot[None, :]) * w[None, :]
            dk += _mm(ds_t.to(q.dtype), q, DOT_PRECISION, DOT_UPCAST)
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=nd_mask)


# --------------------------------------------------------------------------------------------- launchers
