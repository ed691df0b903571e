"""The ``@triton.jit`` code of ``mka::decode_attention``: split-K partial attention per KV split, then a
log-sum-exp merge of the splits (launchers in :mod:`mka_compile.kernels.decode_attention`)."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import LN2


@triton.jit
def _decode_attention_split_kernel(
    Q,
    K,
    V,
    KvValid,
    PartOut,
    PartLse,
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
    stride_vab,
    stride_van,
    num_kv_heads,
    group,
    seq_q,
    seq_k,
    split_len,
    num_splits,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Kernel 1 of split-K decode: one program = one KV split x one (batch, kv head) x BLOCK_M rows, where
    the ``group * Tq`` query rows sharing the kv head are packed (row ``r`` = head ``hk * group + r // Tq``,
    query ``r % Tq``), so each K/V tile is read once for the whole GQA group.

    Writes the split's normalised output ``PartOut [B, H, Tq, S, d]`` and log-sum-exp ``PartLse [B, H, Tq, S]``
    (float32, contiguous; ``-inf`` and zeros for a split the row sees no key of)."""
    split = tl.program_id(0)
    pid_bk = tl.program_id(1).to(tl.int64)
    b = pid_bk // num_kv_heads
    hk = pid_bk % num_kv_heads
    offset = seq_k - seq_q

    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * seq_q
    t = rows % seq_q
    h = hk * group + (rows // seq_q).to(tl.int64)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (
        Q + b * stride_qb + h[:, None] * stride_qh + t.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * split_len
    hi = tl.minimum(seq_k, lo + split_len)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_n64 = offs_n.to(tl.int64)
        col_ok = offs_n < hi
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        ok = row_ok[:, None] & col_ok[None, :]
        if HAS_VALID:
            real = tl.load(KvValid + b * stride_vab + offs_n64 * stride_van, mask=col_ok, other=0)
            ok = ok & (real != 0)[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= t[:, None] + offset)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n64[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_use = tl.where(empty, 1.0, l_i)
    out = acc / l_use[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_use)) * LN2)
    row = (b * num_kv_heads * group + h) * seq_q + t  # index into [B, H, Tq]
    part = row * num_splits + split  # index into [B, H, Tq, S]
    tl.store(PartOut + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(PartLse + part, lse, mask=row_ok)


@triton.jit
def _decode_attention_merge_kernel(
    PartOut,
    PartLse,
    Out,
    Lse,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    num_heads,
    seq_q,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Kernel 2 of split-K decode: one program = one query row; merges its splits by log-sum-exp::

    out = sum_s exp(lse_s - lse) out_s,  lse = log sum_s exp(lse_s)

    Each lane of BLOCK_S keeps a running (max, sum, acc) over splits ``lane, lane + BLOCK_S, ...``; the lanes
    are merged at the end. Writes ``Out [B, H, Tq, d]`` (dtype of q) and ``Lse [B, H, Tq]`` (float32)."""
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * Tq + t
    t = row % seq_q
    bh = row // seq_q
    b = bh // num_heads
    h = bh % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    m_s = tl.full([BLOCK_S], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for start_s in range(0, num_splits, BLOCK_S):
        offs_s = start_s + tl.arange(0, BLOCK_S)
        s_ok = offs_s < num_splits
        part = row * num_splits + offs_s
        lse = tl.load(PartLse + part, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
        po = tl.load(
            PartOut + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
        )
        m_new = tl.maximum(m_s, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_s - m_use)
        w = tl.exp(lse - m_use)
        l_s = l_s * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * po
        m_s = m_new

    m = tl.max(m_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    f = tl.exp(m_s - m_use)  # (BLOCK_S,)
    l_tot = tl.sum(l_s * f, 0)
    out = tl.sum(acc * f[:, None], 0)  # (BLOCK_D,)
    empty = l_tot == 0.0
    out = out / tl.where(empty, 1.0, l_tot)
    lse_tot = tl.where(empty, float("-inf"), m_use + tl.log(tl.where(empty, 1.0, l_tot)))
    o_ptrs = Out + b * stride_ob + h * stride_oh + t * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + row, lse_tot)
