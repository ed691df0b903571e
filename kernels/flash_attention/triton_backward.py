"""Triton kernels of flash attention's backward (FlashAttention-2): a preprocess kernel for ``Delta = rowsum(dO * O)``,
one kernel for dK/dV per key block and one for dQ per query block. The conventions (strides, alignment, base-2
scores, masks) are those of :mod:`.triton_kernels`, whose helpers they share; the launcher is
:func:`mka_compile.kernels.flash_attention.flash_attention_bwd`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import load_head_tile, load_tile, store_head_tile
from .triton_kernels import LOG2E, _key_range, _mask_scores, _rows, _user_mask


@triton.jit
def _lse2(LSE_ROWS, row_ok):
    """The rows' log-sum-exp in log2 units (``LSE_ROWS``: their pointers); ``inf`` for a row that sees no key, so
    that its ``P = exp2(S - lse2)`` is 0."""
    lse = tl.load(LSE_ROWS, mask=row_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _flash_attention_bwd_preprocess(
    Out,
    DOut,
    DLse,
    Delta,
    stride_o,
    stride_g,
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
    offs_d = tl.arange(0, BLOCK_D)
    _, offs_m64, row_ok, tile_ok = _rows(start_m, seq_q, offs_d < HEAD_DIM, BLOCK_M)
    o = load_head_tile(Out, stride_o, b, h, offs_m64, offs_d, tile_ok)
    do = load_head_tile(DOut, stride_g, b, h, offs_m64, offs_d, tile_ok)
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
    stride_q,
    stride_k,
    stride_v,
    stride_m,
    stride_g,
    stride_dk,
    stride_dv,
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

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n, offs_n64, col_ok, kv_mask = _rows(start_n, seq_k, d_ok, BLOCK_N)
    k = load_head_tile(K, stride_k, b, hk, offs_n64, offs_d, kv_mask)  # (BLOCK_N, BLOCK_D)
    v = load_head_tile(V, stride_v, b, hk, offs_n64, offs_d, kv_mask)
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
        q_base = Q + b * stride_q[0] + h * stride_q[1]
        g_base = DOut + b * stride_g[0] + h * stride_g[1]
        mask_base = Mask + b * stride_m[0] + h * stride_m[1]
        row_base = (b * num_heads + h) * seq_q  # Lse / Delta are contiguous [B, H, Tq]
        for start_m in range(lo, seq_q, BLOCK_M):
            offs_m, offs_m64, row_ok, qd_mask = _rows(start_m, seq_q, d_ok, BLOCK_M)
            q = load_tile(q_base, offs_m64, stride_q[2], offs_d, stride_q[3], qd_mask)
            lse2 = _lse2(Lse + row_base + offs_m64, row_ok)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            if MASK_KIND != 0:
                tile = mask_base + offs_m64[None, :] * stride_m[2] + offs_n64[:, None] * stride_m[3]
                s_t = _user_mask(s_t, tile, col_ok[:, None] & row_ok[None, :], MASK_KIND)
            if CAUSAL:
                if start_m < full_lo:
                    s_t = tl.where(offs_n[:, None] <= offs_m[None, :] + offset, s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse2[None, :])  # (BLOCK_N, BLOCK_M)
            do = load_tile(g_base, offs_m64, stride_g[2], offs_d, stride_g[3], qd_mask)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            delta = tl.load(Delta + row_base + offs_m64, mask=row_ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    store_head_tile(DK, stride_dk, b, hk, offs_n64, offs_d, dk * sm_scale, kv_mask)
    store_head_tile(DV, stride_dv, b, hk, offs_n64, offs_d, dv, kv_mask)


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
    stride_q,
    stride_k,
    stride_v,
    stride_m,
    stride_g,
    stride_dq,
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

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_m, offs_m64, row_ok, qd_mask = _rows(start_m, seq_q, d_ok, BLOCK_M)
    pos_m = offs_m + offset
    q = load_head_tile(Q, stride_q, b, h, offs_m64, offs_d, qd_mask)
    do = load_head_tile(DOut, stride_g, b, h, offs_m64, offs_d, qd_mask)
    lse2 = _lse2(Lse + pid_bh * seq_q + offs_m64, row_ok)
    delta = tl.load(Delta + pid_bh * seq_q + offs_m64, mask=row_ok, other=0.0)
    k_base = K + b * stride_k[0] + hk * stride_k[1]
    v_base = V + b * stride_v[0] + hk * stride_v[1]
    mask_rows = Mask + b * stride_m[0] + h * stride_m[1] + offs_m64[:, None] * stride_m[2]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi, full_hi = _key_range(seq_k, start_m, offset, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n, offs_n64, col_ok, kv_mask = _rows(start_n, seq_k, d_ok, BLOCK_N)
        k = load_tile(k_base, offs_n64, stride_k[2], offs_d, stride_k[3], kv_mask)
        v = load_tile(v_base, offs_n64, stride_v[2], offs_d, stride_v[3], kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = _mask_scores(
            s, mask_rows, stride_m[3], pos_m, offs_n, row_ok, col_ok, start_n, full_hi, BLOCK_N, CAUSAL, MASK_KIND
        )
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    store_head_tile(DQ, stride_dq, b, h, offs_m64, offs_d, dq * sm_scale, qd_mask)
