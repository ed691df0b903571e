"""Triton kernels for ``mka::mka_attention`` and ``mka::mka_attention_backward`` (the CUDA implementation).

Semantics are those of :func:`kernels.mka_attention.reference_mka_attention`. For query row ``i`` of head
``h`` (kv head ``g = h // (H / Hkv)``, routing group ``g`` or 0), with ``visible(i, j) = kv_valid[j]`` and,
when causal, ``j <= i + Tk - Tq``:

- full-length level ``l`` (``ks[l], vs[l]``, ``l < Lf``, ``Lf in {1, 2}``)::

      s_lij = scale * q_i . k_lj                      over visible j
      lse_li = log sum_j exp(s_lij),   O_li = sum_j exp(s_lij - lse_li) v_lj
      (a row that sees no key: O_li = 0, lse_li = -inf)

- L3 over the recalled set ``R_i = {idx3[i, r] : found3[i, r]}`` (a set: a slot listed twice counts once,
  like the reference's ``recall_mask``)::

      s_3ir = scale * q3_i . mem_k[r],  O_3i = sum_r softmax(s_3i)_r mem_v[r]   (0 when R_i is empty)

- ``out_i = sum_l lam_il O_li + lam_i3 O_3i`` (the log-sum-exp merge of per-level online softmaxes). A row
  that sees no key gets 0 from the full-length levels; its L3 term is kept.

Forward (``_mka_attention_fwd_kernel``): one program per (query block, batch * head). It loads the q tile
once and walks the key blocks of the full-length levels once, running one online softmax ``(m, l, acc)``
per level on the same mask; then it gathers the R recalled rows of ``mem_k / mem_v`` (no ``[T, R, d]``
tensor) for the L3 online softmax, merges the levels with ``lam`` and stores ``out`` and the per-level
``lse: [B, H, L, Tq]`` (float32, natural log). GQA indexes the kv head ``h // (H / Hkv)``; K/V are never
repeated. Accumulation is float32 for every input dtype; the matmuls take the input dtype (fp32 uses IEEE
unless ``allow_tf32``).

Backward (FlashAttention-2 style), with ``dO_li = lam_il dO_i``::

      dot_li  = dO_i . O_li                   (dlam_il = sum of dot_li over the heads of the routing group)
      P_lij   = exp(s_lij - lse_li),  dP_lij = lam_il (dO_i . v_lj)
      dS_lij  = P_lij (dP_lij - lam_il dot_li)
      dq_i    = scale sum_lj dS_lij k_lj,  dk_lj = scale sum_i dS_lij q_i,  dv_lj = sum_i P_lij dO_li

``dot_l`` needs each level's own output ``O_l``, which the merged ``out`` does not hold. So the backward
either takes the per-level outputs the forward stored on request (``store_levels=True``), or, as the op
``mka::mka_attention_backward`` must (it gets only the inputs), recomputes them with the forward kernel in
its ``BWD_PREP`` mode, which writes ``lse`` and ``dot`` instead of ``out``. Then
``_mka_attention_bwd_dq_kernel`` (per query block: dq over the key blocks of every level, plus dq3 and the
L3 memory gradients) and ``_mka_attention_bwd_dkdv_kernel`` (per key block of one level and kv head:
dk, dv over the query blocks of the ``H / Hkv`` heads sharing it; no atomics) run.

``dmem_k, dmem_v`` are accumulated with float32 ``atomic_add`` into ``[B, Hkv, S, d]`` buffers from the dq
kernel: a query's R recalled slots are data-dependent, so a slot-major pass would need a sort of
``idx3`` (CSR) first; R is small and the atomics touch only ``R * d`` values per query row. The summation
order of the atomics is not deterministic (float32 rounding differences only).

Launchers: :func:`mka_attention_fwd`, :func:`mka_attention_bwd` (any strides; CPU tensors run the Triton
interpreter, see :mod:`._triton`). Importing this module registers them for CUDA tensors (:func:`register`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import as_bytes, for_device, pow2
from .mka_attention import check_mka_attention, reference_mka_attention, reference_mka_attention_backward

_LOG2E_F = 1.4426950408889634
_LOG2E: tl.constexpr = tl.constexpr(_LOG2E_F)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``a @ b`` with float32 accumulation. ``DOT_UPCAST``: multiply float32 copies (the operands are already
    rounded to their dtype), for the Triton interpreter, whose ``tl.dot`` misreads bfloat16."""
    if DOT_UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _attend_block(q, k, v, vis, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One online-softmax step of one level: ``q: [M, D]``, ``k, v: [N, D]``, ``vis: [M, N]``; scores in
    log2 units. ``m_i`` starts finite (-1e30) so fully masked blocks leave ``(l_i, acc)`` unchanged."""
    s = _mm(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (M, N)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # 0 where masked
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return m_new, l_i, acc


@triton.jit
def _recalled_slot(IDX_ROW, FOUND_ROW, r, stride_ir, stride_fr, row_mask, S):
    """Slot of recalled entry ``r`` of each row (``IDX_ROW, FOUND_ROW: [M]`` row pointers) and whether it
    counts: found, in range, and not a repeat of an earlier found entry of the same row."""
    slot = tl.load(IDX_ROW + r * stride_ir, mask=row_mask, other=0)
    found = tl.load(FOUND_ROW + r * stride_fr, mask=row_mask, other=0)
    keep = row_mask & (found != 0) & (slot >= 0) & (slot < S)
    for r2 in range(0, r):
        prev = tl.load(IDX_ROW + r2 * stride_ir, mask=row_mask, other=0)
        prev_found = tl.load(FOUND_ROW + r2 * stride_fr, mask=row_mask, other=0)
        keep = keep & ((prev != slot) | (prev_found == 0))
    return slot, keep


# ----------------------------------------------------------------------------------------------- forward


@triton.jit
def _mka_attention_fwd_kernel(
    Q, K1, V1, K2, V2, LAM, Q3, MEM_K, MEM_V, IDX, FOUND, KV_VALID,
    OUT, LSE, LVL, GO, DOT,
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
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_gb, stride_gh, stride_gt, stride_gd,
    H, REP, TQ, TK, S, R, D, NLVL, qk_scale,
    NUM_LEVELS: tl.constexpr,
    HAS_L3: tl.constexpr,
    CAUSAL: tl.constexpr,
    STORE_LEVELS: tl.constexpr,
    BWD_PREP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(Tq, BLOCK_M), B * H)``. Writes ``OUT [B, H, Tq, d]`` and ``LSE [B, H, NLVL, Tq]``;
    ``STORE_LEVELS`` also writes ``LVL [B, H, NLVL, Tq, d]`` (float32, each level's own output);
    ``BWD_PREP`` writes ``DOT [B, H, NLVL, Tq] = GO . O_l`` instead of ``OUT``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // REP
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_mask = offs_m < TQ
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    off = TK - TQ  # bottom-right alignment: query i is key position i + off

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)  # fmt: skip
    m1 = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m2 = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M + off)
    else:
        hi = TK
    k1_base = K1 + b * stride_k1b + hk * stride_k1h
    v1_base = V1 + b * stride_v1b + hk * stride_v1h
    k2_base = K2 + b * stride_k2b + hk * stride_k2h
    v2_base = V2 + b * stride_v2b + hk * stride_v2h
    for start_n in range(0, hi, BLOCK_N):
        offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = offs_n < TK
        valid = tl.load(KV_VALID + b * stride_vb + offs_n * stride_vt, mask=n_mask, other=0) != 0
        vis = valid[None, :] & m_mask[:, None]  # (M, N), shared by every level
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + off)
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k1_base + offs_n[:, None] * stride_k1t + offs_d[None, :] * stride_k1d, mask=nd_mask, other=0.0)
        v = tl.load(v1_base + offs_n[:, None] * stride_v1t + offs_d[None, :] * stride_v1d, mask=nd_mask, other=0.0)
        m1, l1, acc1 = _attend_block(q, k, v, vis, m1, l1, acc1, qk_scale, DOT_PRECISION, DOT_UPCAST)
        if NUM_LEVELS == 2:
            k = tl.load(k2_base + offs_n[:, None] * stride_k2t + offs_d[None, :] * stride_k2d, mask=nd_mask, other=0.0)
            v = tl.load(v2_base + offs_n[:, None] * stride_v2t + offs_d[None, :] * stride_v2d, mask=nd_mask, other=0.0)
            m2, l2, acc2 = _attend_block(q, k, v, vis, m2, l2, acc2, qk_scale, DOT_PRECISION, DOT_UPCAST)

    lam_row = LAM + b * stride_lamb + hk * stride_lamg + offs_m * stride_lamt  # stride_lamg = 0 when G = 1
    lse_row = LSE + pid_bh * NLVL * TQ + offs_m
    lvl_tile = LVL + (pid_bh * NLVL * TQ + offs_m[:, None]) * D + offs_d[None, :]
    dot_row = DOT + pid_bh * NLVL * TQ + offs_m
    if BWD_PREP:
        go = tl.load(GO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                     mask=md_mask, other=0.0).to(tl.float32)  # fmt: skip

    # level 1 (rows that see no key have l = 0 and acc = 0: their output is 0, their lse -inf)
    seen = l1 > 0
    o = acc1 / tl.where(seen, l1, 1.0)[:, None]
    out = tl.load(lam_row, mask=m_mask, other=0.0).to(tl.float32)[:, None] * o
    tl.store(lse_row, tl.where(seen, (m1 + tl.log2(tl.where(seen, l1, 1.0))) * _LN2, float("-inf")), mask=m_mask)
    if STORE_LEVELS:
        tl.store(lvl_tile, o, mask=md_mask)
    if BWD_PREP:
        tl.store(dot_row, tl.sum(go * o, 1), mask=m_mask)
    if NUM_LEVELS == 2:
        o = acc2 / tl.where(seen, l2, 1.0)[:, None]
        out += tl.load(lam_row + stride_laml, mask=m_mask, other=0.0).to(tl.float32)[:, None] * o
        lse = tl.where(seen, (m2 + tl.log2(tl.where(seen, l2, 1.0))) * _LN2, float("-inf"))
        tl.store(lse_row + TQ, lse, mask=m_mask)
        if STORE_LEVELS:
            tl.store(lvl_tile + TQ * D, o, mask=md_mask)
        if BWD_PREP:
            tl.store(dot_row + TQ, tl.sum(go * o, 1), mask=m_mask)

    if HAS_L3:
        q3 = tl.load(Q3 + b * stride_q3b + h * stride_q3h + offs_m[:, None] * stride_q3t + offs_d[None, :] * stride_q3d,
                     mask=md_mask, other=0.0).to(tl.float32)  # fmt: skip
        idx_row = IDX + b * stride_ib + hk * stride_ih + offs_m * stride_it
        found_row = FOUND + b * stride_fb + hk * stride_fh + offs_m * stride_ft
        mk_base = MEM_K + b * stride_mkb + hk * stride_mkh
        mv_base = MEM_V + b * stride_mvb + hk * stride_mvh
        m3 = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l3 = tl.zeros([BLOCK_M], tl.float32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for r in range(0, R):
            slot, keep = _recalled_slot(idx_row, found_row, r, stride_ir, stride_fr, m_mask, S)
            ld = keep[:, None] & d_mask[None, :]
            mk = tl.load(mk_base + slot[:, None] * stride_mks + offs_d[None, :] * stride_mkd, mask=ld, other=0.0)
            mv = tl.load(mv_base + slot[:, None] * stride_mvs + offs_d[None, :] * stride_mvd, mask=ld, other=0.0)
            s = tl.where(keep, tl.sum(q3 * mk.to(tl.float32), 1) * qk_scale, float("-inf"))  # (M,)
            m_new = tl.maximum(m3, s)
            alpha = tl.exp2(m3 - m_new)
            p = tl.exp2(s - m_new)
            l3 = l3 * alpha + p
            acc3 = acc3 * alpha[:, None] + p[:, None] * mv.to(tl.float32)
            m3 = m_new
        seen3 = l3 > 0
        o = acc3 / tl.where(seen3, l3, 1.0)[:, None]
        out += tl.load(lam_row + NUM_LEVELS * stride_laml, mask=m_mask, other=0.0).to(tl.float32)[:, None] * o
        lse = tl.where(seen3, (m3 + tl.log2(tl.where(seen3, l3, 1.0))) * _LN2, float("-inf"))
        tl.store(lse_row + NUM_LEVELS * TQ, lse, mask=m_mask)
        if STORE_LEVELS:
            tl.store(lvl_tile + NUM_LEVELS * TQ * D, o, mask=md_mask)
        if BWD_PREP:
            tl.store(dot_row + NUM_LEVELS * TQ, tl.sum(go * o, 1), mask=m_mask)

    if not BWD_PREP:
        o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=md_mask)


# ---------------------------------------------------------------------------------------------- backward


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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // REP
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_mask = offs_m < TQ
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
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
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M + off)
    else:
        hi = TK
    k1_base = K1 + b * stride_k1b + hk * stride_k1h
    v1_base = V1 + b * stride_v1b + hk * stride_v1h
    k2_base = K2 + b * stride_k2b + hk * stride_k2h
    v2_base = V2 + b * stride_v2b + hk * stride_v2h
    for start_n in range(0, hi, BLOCK_N):
        offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = offs_n < TK
        valid = tl.load(KV_VALID + b * stride_vb + offs_n * stride_vt, mask=n_mask, other=0) != 0
        vis = valid[None, :] & m_mask[:, None]
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + off)
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k1_base + offs_n[:, None] * stride_k1t + offs_d[None, :] * stride_k1d, mask=nd_mask, other=0.0)
        v = tl.load(v1_base + offs_n[:, None] * stride_v1t + offs_d[None, :] * stride_v1d, mask=nd_mask, other=0.0)
        dq = _dq_block(q, go_kv, k, v, vis, lse1, dot1, w1, dq, qk_scale, DOT_PRECISION, DOT_UPCAST)
        if NUM_LEVELS == 2:
            k = tl.load(k2_base + offs_n[:, None] * stride_k2t + offs_d[None, :] * stride_k2d, mask=nd_mask, other=0.0)
            v = tl.load(v2_base + offs_n[:, None] * stride_v2t + offs_d[None, :] * stride_v2d, mask=nd_mask, other=0.0)
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
        mk_base = MEM_K + b * stride_mkb + hk * stride_mkh
        mv_base = MEM_V + b * stride_mvb + hk * stride_mvh
        dm_base = b * stride_dmb + hk * stride_dmh
        dq3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for r in range(0, R):
            slot, keep = _recalled_slot(idx_row, found_row, r, stride_ir, stride_fr, m_mask, S)
            ld = keep[:, None] & d_mask[None, :]
            mk = tl.load(mk_base + slot[:, None] * stride_mks + offs_d[None, :] * stride_mkd, mask=ld, other=0.0)
            mv = tl.load(mv_base + slot[:, None] * stride_mvs + offs_d[None, :] * stride_mvd, mask=ld, other=0.0)
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
    offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    n_mask = offs_n < TK
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    off = TK - TQ

    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)  # fmt: skip
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)  # fmt: skip
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


def _config(d_pad: int, tq: int, block_m, block_n, num_warps, num_stages) -> tuple[int, int, int, int]:
    """Tile sizes: untuned guesses for a Hopper/Ampere-class GPU (two float32 accumulators per program in
    the forward), query tiles no taller than the queries (decode); every value can be overridden."""
    if d_pad <= 64:
        bm, bn, nw, ns = 64, 64, 4, 3
    elif d_pad <= 128:
        bm, bn, nw, ns = 64, 32, 4, 2
    else:
        bm, bn, nw, ns = 32, 32, 8, 1
    bm = min(bm, pow2(tq, lo=16))
    return block_m or bm, block_n or bn, num_warps or nw, num_stages or ns


def _nonempty(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Kernels never dereference an empty tensor, but some launchers reject null pointers: pass ``like``."""
    return t if t.numel() > 0 else like


def _lam_strides(lam: torch.Tensor) -> tuple[int, int, int, int]:
    sb, sg, st, sl = lam.stride()
    return sb, (sg if lam.shape[1] > 1 else 0), st, sl


def _common(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal, tiles):
    """Argument checks and preparation shared by the forward and the backward launchers."""
    check_mka_attention(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal)
    B, H, Tq, d = q.shape
    Hkv, Tk = ks[0].shape[1], ks[0].shape[2]
    nf, R, S = len(ks), idx3.shape[3], mem_k.shape[2]
    if nf not in (1, 2):
        raise ValueError(f"the Triton kernels take 1 or 2 full-length levels, got {nf}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head size {d} > {MAX_HEAD_DIM}; the Triton kernels keep a whole head row in registers")
    if B * max(H, Hkv) > 65535:
        raise ValueError(f"B * H = {B * H} exceeds the 65535 programs of grid axis 1")
    d_pad = pow2(d, lo=16)
    bm, bn, nw, ns = _config(d_pad, Tq, *tiles)
    k1, v1 = _nonempty(ks[0], q), _nonempty(vs[0], q)
    k2, v2 = (_nonempty(ks[1], q), _nonempty(vs[1], q)) if nf == 2 else (k1, v1)
    has_l3 = R > 0
    mk, mv = _nonempty(mem_k, q), _nonempty(mem_v, q)
    idx = _nonempty(idx3, kv_valid) if has_l3 else q
    found = _nonempty(as_bytes(found3), q) if has_l3 else q
    if not has_l3:
        idx_strides = found_strides = (0, 0, 0, 0)
    else:
        idx_strides, found_strides = idx3.stride(), found3.stride()
    valid = _nonempty(as_bytes(kv_valid), q)
    return dict(
        dims=(B, H, Tq, d, Hkv, Tk, nf, R, S),
        tensors=(k1, v1, k2, v2, mk, mv, idx, found, valid),
        strides=(
            *q.stride(),
            *k1.stride(),
            *v1.stride(),
            *k2.stride(),
            *v2.stride(),
            *_lam_strides(lam),
            *q3.stride(),
            *mk.stride(),
            *mv.stride(),
            *idx_strides,
            *found_strides,
            *kv_valid.stride(),
        ),
        meta=dict(NUM_LEVELS=nf, HAS_L3=has_l3, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d_pad),
        launch=dict(num_warps=nw, num_stages=ns),
    )


def _dot_meta(q: torch.Tensor, allow_tf32: bool) -> dict:
    """``DOT_PRECISION``: IEEE for float32 unless ``allow_tf32`` (Triton's default, which half-precision
    operands ignore, otherwise); ``DOT_UPCAST``: bfloat16 run by the interpreter."""
    interpreted = q.device.type == "cpu" or not isinstance(_mka_attention_fwd_kernel, triton.runtime.JITFunction)
    return dict(
        DOT_PRECISION="ieee" if q.dtype == torch.float32 and not allow_tf32 else "tf32",
        DOT_UPCAST=interpreted and q.dtype == torch.bfloat16,
    )


def _run_fwd(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal, go, store_levels, cfg):
    """Launch the forward kernel (``go`` given: ``BWD_PREP`` mode). Returns ``(out, lse, levels, dot)``."""
    B, H, Tq, d, Hkv, Tk, nf, R, S = cfg["dims"]
    k1, v1, k2, v2, mk, mv, idx, found, valid = cfg["tensors"]
    nlvl = nf + (R > 0)
    prep = go is not None
    out = q if prep else torch.empty_like(q)  # (B, H, Tq, d); not written in BWD_PREP mode
    lse = torch.empty(B, H, nlvl, Tq, dtype=torch.float32, device=q.device)
    levels = torch.empty(B, H, nlvl, Tq, d, dtype=torch.float32, device=q.device) if store_levels else lse
    dot = torch.empty(B, H, nlvl, Tq, dtype=torch.float32, device=q.device) if prep else lse
    go_t = go if prep else q
    grid = (triton.cdiv(Tq, cfg["meta"]["BLOCK_M"]), B * H)
    for_device(_mka_attention_fwd_kernel, q.device)[grid](
        q, k1, v1, k2, v2, lam, q3, mk, mv, idx, found, valid,
        out, lse, levels, go_t, dot,
        *cfg["strides"], *out.stride(), *go_t.stride(),
        H, H // Hkv, Tq, Tk, S, R, d, nlvl, float(scale) * _LOG2E_F,
        CAUSAL=bool(causal), STORE_LEVELS=bool(store_levels), BWD_PREP=prep,
        **cfg["meta"], **cfg["launch"],
    )  # fmt: skip
    return (None if prep else out), lse, (levels if store_levels else None), (dot if prep else None)


def mka_attention_fwd(
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    lam: torch.Tensor,
    q3: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    idx3: torch.Tensor,
    found3: torch.Tensor,
    kv_valid: torch.Tensor,
    scale: float,
    causal: bool,
    *,
    store_levels: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward of ``mka::mka_attention`` in one Triton pass (arguments as the op; any strides).

    Returns ``out: [B, H, Tq, d]`` (dtype of q), ``lse: [B, H, L, Tq]`` float32 (natural log, per level, -inf
    where a level has nothing to attend) and, with ``store_levels``, ``levels: [B, H, L, Tq, d]`` float32 (each
    level's own output, for :func:`mka_attention_bwd` to skip its recompute), else None.
    ``L = len(ks) + (R > 0)``.
    """
    tiles = (block_m, block_n, num_warps, num_stages)
    cfg = _common(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal, tiles)
    cfg["meta"].update(_dot_meta(q, allow_tf32))
    B, H, Tq, d, Hkv, Tk, nf, R, S = cfg["dims"]
    if q.numel() == 0:
        nlvl = nf + (R > 0)
        lse = q.new_full((B, H, nlvl, Tq), float("-inf"), dtype=torch.float32)
        return torch.empty_like(q), lse, (q.new_zeros(B, H, nlvl, Tq, d, dtype=torch.float32) if store_levels else None)
    out, lse, levels, _ = _run_fwd(
        q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal, None, store_levels, cfg
    )
    return out, lse, levels


def mka_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    lam: torch.Tensor,
    q3: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    idx3: torch.Tensor,
    found3: torch.Tensor,
    kv_valid: torch.Tensor,
    scale: float,
    causal: bool,
    *,
    lse: torch.Tensor | None = None,
    levels: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    allow_tf32: bool = False,
) -> tuple[
    torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Backward of ``mka::mka_attention`` (``grad_out: [B, H, Tq, d]``); returns what
    :func:`reference_mka_attention_backward` returns: ``dq, dks, dvs, dlam, dq3, dmem_k, dmem_v``.

    With ``lse`` and ``levels`` from ``mka_attention_fwd(..., store_levels=True)`` the per-level dots come
    from the stored outputs; without them one forward-like pass (``BWD_PREP``) recomputes ``lse`` and the
    dots. Then one dq kernel (+ L3 gradients) and one dk/dv kernel per full-length level run.
    """
    tiles = (block_m, block_n, num_warps, num_stages)
    cfg = _common(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal, tiles)
    cfg["meta"].update(_dot_meta(q, allow_tf32))
    if grad_out.shape != q.shape or grad_out.device != q.device:
        raise ValueError(f"grad_out must be like q {tuple(q.shape)} on {q.device}, got {tuple(grad_out.shape)}")
    B, H, Tq, d, Hkv, Tk, nf, R, S = cfg["dims"]
    k1, v1, k2, v2, mk, mv, idx, found, valid = cfg["tensors"]
    nlvl, rep, G = nf + (R > 0), H // Hkv, lam.shape[1]
    dq = torch.empty_like(q)
    dq3 = torch.empty_like(q3) if R > 0 else torch.zeros_like(q3)
    dks = [torch.empty_like(k) for k in ks]  # every key block is written (Tk = 0: empty)
    dvs = [torch.empty_like(v) for v in vs]
    dlam = torch.zeros_like(lam)
    if q.numel() == 0:
        return dq, dks, dvs, dlam, dq3, torch.zeros_like(mem_k), torch.zeros_like(mem_v)
    if levels is None:
        _, lse, _, dot = _run_fwd(
            q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal, grad_out, False, cfg
        )
    else:
        if lse is None:
            raise ValueError("pass lse together with levels (both come from mka_attention_fwd(store_levels=True))")
        lse = lse.float().contiguous()  # the kernels address lse and dot as contiguous [B, H, L, Tq]
        dot = torch.einsum("bhltd,bhtd->bhlt", levels, grad_out.float()).contiguous()  # (B, H, L, Tq)
    per_kv = dot.view(B, Hkv, rep, nlvl, Tq).sum(2)  # (B, Hkv, L, Tq)
    if G == 1:
        per_kv = per_kv.sum(1, keepdim=True)  # (B, 1, L, Tq)
    dlam.copy_(per_kv.transpose(-1, -2))  # (B, G, Tq, L)

    has_l3 = R > 0
    dm_shape = (B, Hkv, S, d)
    dmk = torch.zeros(dm_shape, dtype=torch.float32, device=q.device) if has_l3 else None
    dmv = torch.zeros(dm_shape, dtype=torch.float32, device=q.device) if has_l3 else None
    dmk_t, dmv_t = (_nonempty(dmk, q), _nonempty(dmv, q)) if has_l3 else (q, q)
    meta, launch, scale = cfg["meta"], cfg["launch"], float(scale)
    grid = (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)
    for_device(_mka_attention_bwd_dq_kernel, q.device)[grid](
        q, k1, v1, k2, v2, lam, q3, mk, mv, idx, found, valid, grad_out, lse, dot,
        dq, dq3, dmk_t, dmv_t,
        *cfg["strides"], *grad_out.stride(), *dq.stride(), *dq3.stride(),
        *(dmk.stride() if has_l3 else (0, 0, 0, 0)),
        H, rep, Tq, Tk, S, R, d, nlvl, scale, scale * _LOG2E_F,
        CAUSAL=bool(causal), **meta, **launch,
    )  # fmt: skip
    if Tk > 0:
        grid = (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)
        for lvl in range(nf):
            k, v = cfg["tensors"][2 * lvl], cfg["tensors"][2 * lvl + 1]
            for_device(_mka_attention_bwd_dkdv_kernel, q.device)[grid](
                q, k, v, lam, valid, grad_out, lse, dot, dks[lvl], dvs[lvl],
                *q.stride(), *k.stride(), *v.stride(), *_lam_strides(lam), *kv_valid.stride(), *grad_out.stride(),
                *dks[lvl].stride(), *dvs[lvl].stride(),
                H, Hkv, rep, Tq, Tk, d, nlvl, lvl, scale, scale * _LOG2E_F,
                CAUSAL=bool(causal), BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"], BLOCK_D=meta["BLOCK_D"],
                DOT_PRECISION=meta["DOT_PRECISION"], DOT_UPCAST=meta["DOT_UPCAST"], **launch,
            )  # fmt: skip
    dmem_k = torch.empty_like(mem_k).copy_(dmk) if has_l3 else torch.zeros_like(mem_k)  # layout of mem_k
    dmem_v = torch.empty_like(mem_v).copy_(dmv) if has_l3 else torch.zeros_like(mem_v)
    return dq, dks, dvs, dlam, dq3, dmem_k, dmem_v


# ---------------------------------------------------------------------------------------- registration


def _triton_ok(q: torch.Tensor, ks: list[torch.Tensor], lam: torch.Tensor, q3: torch.Tensor, mem_k: torch.Tensor):
    """Cases the kernels cover; anything else (float64, d > 256, more levels) runs the reference."""
    dtypes = (q.dtype, lam.dtype, q3.dtype, mem_k.dtype)
    return all(t in _SUPPORTED for t in dtypes) and q.shape[-1] <= MAX_HEAD_DIM and len(ks) in (1, 2)


def _mka_attention_cuda(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal):
    if not _triton_ok(q, ks, lam, q3, mem_k):
        check_mka_attention(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal)
        return reference_mka_attention(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal)
    return mka_attention_fwd(q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal)[0]


def _mka_attention_backward_cuda(grad_out, q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal):
    args = (grad_out, q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal)
    if not _triton_ok(q, ks, lam, q3, mem_k):
        return reference_mka_attention_backward(*args)
    return mka_attention_bwd(*args)


_registered = False


def register() -> None:
    """Make the Triton launchers the CUDA kernels of ``mka::mka_attention`` and its backward (idempotent)."""
    global _registered
    if _registered:
        return
    torch.library.register_kernel("mka::mka_attention", "cuda", _mka_attention_cuda)
    torch.library.register_kernel("mka::mka_attention_backward", "cuda", _mka_attention_backward_cuda)
    _registered = True


register()
