"""Triton kernels of flash attention's backward (FlashAttention-2): a preprocess kernel for ``Delta = rowsum(dO * O)``,
one kernel for dK/dV per key block and one for dQ per query block. The conventions (strides, alignment, base-2
scores, masks) are those of :mod:`.triton_kernels`, whose helpers they share; the launcher is
:func:`mka_compile.kernels.flash_attention.flash_attention_bwd`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import LOG2E, _bias_log2, _key_range, _mask_scores


@triton.jit
def _flash_attention_bwd_preprocess(
    Out,
    DOut,
    DLse,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    num_heads,
    seq_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """``Delta = rowsum(dO * O) - dLse``  (float32 ``[B, H, Tq]``; ``DLse`` contiguous like ``Lse``)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m64[:, None] * stride_om + offs_d[None, :] * stride_od,
        mask=tile_ok,
        other=0.0,
    )
    do = tl.load(
        DOut + b * stride_gb + h * stride_gh + offs_m64[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        mask=tile_ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    if HAS_DLSE:
        delta = delta - tl.load(DLse + pid_bh * seq_q + offs_m64, mask=row_ok, other=0.0)
    tl.store(Delta + pid_bh * seq_q + offs_m64, delta, mask=row_ok)


@triton.jit
def _flash_attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    num_kv_heads,
    group,
    seq_q,
    seq_k,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, kv head); loops over the ``group`` query heads sharing
    that kv head and over their query blocks, so dK/dV of a GQA group are summed without atomics::

        P^T = exp(S^T - lse),  dV += P^T dO,  dS^T = P^T * (V dO^T - Delta),  dK += dS^T Q * scale
    """
    start_n = tl.program_id(0) * BLOCK_N
    pid_bk = tl.program_id(1).to(tl.int64)
    b = pid_bk // num_kv_heads
    hk = pid_bk % num_kv_heads
    num_heads = num_kv_heads * group
    offset = seq_k - seq_q

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_k
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + offs_n64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # causal: rows < start_n - offset see none of these keys; rows >= full_lo see all of them
    if CAUSAL:
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
        full_lo = start_n + BLOCK_N - 1 - offset
    else:
        lo = 0
        full_lo = 0
    for r in range(0, group):
        h = hk * group + r
        q_base = Q + b * stride_qb + h * stride_qh
        g_base = DOut + b * stride_gb + h * stride_gh
        mask_base = Mask + b * stride_mb + h * stride_mh
        row_base = (b * num_heads + h) * seq_q  # Lse / Delta are contiguous [B, H, Tq]
        for start_m in range(lo, seq_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_m64 = offs_m.to(tl.int64)
            row_ok = offs_m < seq_q
            qd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
            lse = tl.load(Lse + row_base + offs_m64, mask=row_ok, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # a row with no key: P = 0
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            if MASK_KIND != 0:
                tile = mask_base + offs_m64[None, :] * stride_mm + offs_n64[:, None] * stride_mn
                tile_ok = col_ok[:, None] & row_ok[None, :]
                if MASK_KIND == 1:
                    keep = tl.load(tile, mask=tile_ok, other=0)
                    s_t = tl.where(keep != 0, s_t, float("-inf"))
                else:
                    bias = tl.load(tile, mask=tile_ok, other=0.0)
                    s_t = s_t + _bias_log2(bias)
            if CAUSAL:
                if start_m < full_lo:
                    s_t = tl.where(offs_n[:, None] <= offs_m[None, :] + offset, s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse2[None, :])  # (BLOCK_N, BLOCK_M)
            do = tl.load(g_base + offs_m64[:, None] * stride_gm + offs_d[None, :] * stride_gd, mask=qd_mask, other=0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            delta = tl.load(Delta + row_base + offs_m64, mask=row_ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + hk * stride_dkh + offs_n64[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b * stride_dvb + hk * stride_dvh + offs_n64[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _flash_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    Mask,
    DOut,
    Lse,
    Delta,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    num_heads,
    group,
    seq_q,
    seq_k,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, head)::

    P = exp(S - lse),  dS = P * (dO V^T - Delta),  dQ = dS K * scale
    """
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    offset = seq_k - seq_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=qd_mask,
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    do = tl.load(
        DOut + b * stride_gb + h * stride_gh + offs_m64[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        mask=qd_mask,
        other=0.0,
    )
    lse = tl.load(Lse + pid_bh * seq_q + offs_m64, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + pid_bh * seq_q + offs_m64, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi, full_hi = _key_range(seq_k, start_m, offset, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_n64 = offs_n.to(tl.int64)
        col_ok = offs_n < seq_k
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n64[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = _mask_scores(
            s,
            mask_base,
            stride_mm,
            stride_mn,
            offs_m,
            offs_n,
            row_ok,
            col_ok,
            offset,
            start_n,
            full_hi,
            BLOCK_N=BLOCK_N,
            CAUSAL=CAUSAL,
            MASK_KIND=MASK_KIND,
        )
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m64[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )
