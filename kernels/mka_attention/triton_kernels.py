"""The ``@triton.jit`` code of ``mka::mka_attention``'s forward and the helpers its backward
(:mod:`.triton_backward`) shares. The math, the launchers and the registration are in
:mod:`.triton_launch`."""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import load_head_tile, store_head_tile

_LOG2E_F = 1.4426950408889634
_LOG2E: tl.constexpr = tl.constexpr(_LOG2E_F)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


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
def _program(H, REP):
    """Grid ``(query blocks, B * H)``: ``(pid_m, pid_bh, b, h, hk)``, ``pid_bh`` int64 (64-bit offsets) and ``hk`` the
    kv head of query head ``h``."""
    pid_bh = tl.program_id(1).to(tl.int64)
    h = pid_bh % H
    return tl.program_id(0), pid_bh, pid_bh // H, h, h // REP


@triton.jit
def _tile_rows(start, T, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``start + [0, BLOCK)`` of a ``[T, D]`` tensor, int64: ``(offs, mask, offs_d, d_mask, tile mask)``."""
    offs = (start + tl.arange(0, BLOCK)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = offs < T
    d_mask = offs_d < D
    return offs, mask, offs_d, d_mask, mask[:, None] & d_mask[None, :]


@triton.jit
def _key_end(pid_m, TK, off, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the keys query block ``pid_m`` reads (causal: past its last query's key position)."""
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M + off)
    else:
        hi = TK
    return hi


@triton.jit
def _key_block(start_n, KV_VALID, b, stride_valid, offs_m, m_mask, TK, D, off, CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Keys ``start_n + [0, BLOCK_N)`` of query rows ``offs_m`` of batch ``b``: ``(offs_n, nd_mask, vis)``,
    ``vis: [M, N]`` (valid, causal; shared by every level)."""
    offs_n, n_mask, _, _, nd_mask = _tile_rows(start_n, TK, D, BLOCK_N, BLOCK_D)
    valid = tl.load(KV_VALID + b * stride_valid[0] + offs_n * stride_valid[1], mask=n_mask, other=0) != 0
    vis = valid[None, :] & m_mask[:, None]  # (M, N)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + off)
    return offs_n, nd_mask, vis


@triton.jit
def _level_kv(K, V, b, hk, rows, offs_d, mask, stride_k, stride_v):  # fmt: skip
    """Rows ``rows`` of kv head ``hk`` of one level's (or the memory's) ``K, V``: ``(k, v)``, 0 where not ``mask``."""
    k = load_head_tile(K, stride_k, b, hk, rows, offs_d, mask)
    v = load_head_tile(V, stride_v, b, hk, rows, offs_d, mask)
    return k, v


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
    stride_q, stride_k1, stride_v1, stride_k2, stride_v2, stride_lam, stride_q3, stride_mk, stride_mv,
    stride_i, stride_f, stride_valid, stride_o, stride_g,
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
    pid_m, pid_bh, b, h, hk = _program(H, REP)
    offs_m, m_mask, offs_d, d_mask, md_mask = _tile_rows(pid_m * BLOCK_M, TQ, D, BLOCK_M, BLOCK_D)
    off = TK - TQ  # bottom-right alignment: query i is key position i + off

    q = load_head_tile(Q, stride_q, b, h, offs_m, offs_d, md_mask)
    m1 = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m2 = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start_n in range(0, _key_end(pid_m, TK, off, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n, nd_mask, vis = _key_block(
            start_n, KV_VALID, b, stride_valid, offs_m, m_mask, TK, D, off, CAUSAL, BLOCK_N, BLOCK_D
        )
        k, v = _level_kv(K1, V1, b, hk, offs_n, offs_d, nd_mask, stride_k1, stride_v1)
        m1, l1, acc1 = _attend_block(q, k, v, vis, m1, l1, acc1, qk_scale, DOT_PRECISION, DOT_UPCAST)
        if NUM_LEVELS == 2:
            k, v = _level_kv(K2, V2, b, hk, offs_n, offs_d, nd_mask, stride_k2, stride_v2)
            m2, l2, acc2 = _attend_block(q, k, v, vis, m2, l2, acc2, qk_scale, DOT_PRECISION, DOT_UPCAST)

    lam_row = LAM + b * stride_lam[0] + hk * stride_lam[1] + offs_m * stride_lam[2]  # stride_lam[1] = 0 when G = 1
    lse_row = LSE + pid_bh * NLVL * TQ + offs_m
    lvl_tile = LVL + (pid_bh * NLVL * TQ + offs_m[:, None]) * D + offs_d[None, :]
    dot_row = DOT + pid_bh * NLVL * TQ + offs_m
    if BWD_PREP:
        go = load_head_tile(GO, stride_g, b, h, offs_m, offs_d, md_mask).to(tl.float32)

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
        out += tl.load(lam_row + stride_lam[3], mask=m_mask, other=0.0).to(tl.float32)[:, None] * o
        lse = tl.where(seen, (m2 + tl.log2(tl.where(seen, l2, 1.0))) * _LN2, float("-inf"))
        tl.store(lse_row + TQ, lse, mask=m_mask)
        if STORE_LEVELS:
            tl.store(lvl_tile + TQ * D, o, mask=md_mask)
        if BWD_PREP:
            tl.store(dot_row + TQ, tl.sum(go * o, 1), mask=m_mask)

    if HAS_L3:
        q3 = load_head_tile(Q3, stride_q3, b, h, offs_m, offs_d, md_mask).to(tl.float32)
        idx_row = IDX + b * stride_i[0] + hk * stride_i[1] + offs_m * stride_i[2]
        found_row = FOUND + b * stride_f[0] + hk * stride_f[1] + offs_m * stride_f[2]
        m3 = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l3 = tl.zeros([BLOCK_M], tl.float32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for r in range(0, R):
            slot, keep = _recalled_slot(idx_row, found_row, r, stride_i[3], stride_f[3], m_mask, S)
            ld = keep[:, None] & d_mask[None, :]
            mk, mv = _level_kv(MEM_K, MEM_V, b, hk, slot, offs_d, ld, stride_mk, stride_mv)
            s = tl.where(keep, tl.sum(q3 * mk.to(tl.float32), 1) * qk_scale, float("-inf"))  # (M,)
            m_new = tl.maximum(m3, s)
            alpha = tl.exp2(m3 - m_new)
            p = tl.exp2(s - m_new)
            l3 = l3 * alpha + p
            acc3 = acc3 * alpha[:, None] + p[:, None] * mv.to(tl.float32)
            m3 = m_new
        seen3 = l3 > 0
        o = acc3 / tl.where(seen3, l3, 1.0)[:, None]
        out += tl.load(lam_row + NUM_LEVELS * stride_lam[3], mask=m_mask, other=0.0).to(tl.float32)[:, None] * o
        lse = tl.where(seen3, (m3 + tl.log2(tl.where(seen3, l3, 1.0))) * _LN2, float("-inf"))
        tl.store(lse_row + NUM_LEVELS * TQ, lse, mask=m_mask)
        if STORE_LEVELS:
            tl.store(lvl_tile + NUM_LEVELS * TQ * D, o, mask=md_mask)
        if BWD_PREP:
            tl.store(dot_row + NUM_LEVELS * TQ, tl.sum(go * o, 1), mask=m_mask)

    if not BWD_PREP:
        store_head_tile(OUT, stride_o, b, h, offs_m, offs_d, out, md_mask)


# ---------------------------------------------------------------------------------------------- backward
