"""Triton forward kernels for ``mka::chunk_update`` and ``mka::recall_select`` (the CUDA implementations).

chunk_update (see :mod:`.reference`): with ``p_t`` the real position of token t, the running sum of the
current chunk is a linear recurrence with resets::

    h_t = c_t h_{t-1} + x_t,   h_{-1} = part,   x_t = [k_t, v_t] on real tokens (0 on padding)
    c_t = 0 if token t is real, p_t % C == 0 and p_t > n_seen (it opens a new chunk), else 1
    summ[p_t // C] = h_t / C   where a real token closes its chunk (p_t % C == C - 1)
    part' = 0 if a chunk closed in this call and n' % C == 0, else h_{T-1}     (n' = n_seen + real tokens)

Summary slots outside ``[n_seen // C, n' // C)`` are copied unchanged. One program per (batch, kv head,
feature block of BLOCK_D); T is walked in tiles of BLOCK_T tokens with ``tl.associative_scan`` inside a
tile and the running sum carried in registers (as in :mod:`..session_scan.triton_kernels`).

recall_select: one program per (batch, kv head, block of BLOCK_Q queries)::

    score[t, n] = q_r[t] . summ_k[n]   available iff n < p_t // C     (n < N)
    score[t, N + m] = q_r[t] . bank_k[m]   available iff bank_valid[m]
    idx, found = the top-R available entries per query, by score, best first (``found`` False and
                 ``idx`` 0 for the slots beyond the available count)

The program loads its query tile once, scores BLOCK_N entries at a time with ``tl.dot`` (IEEE float32;
no TF32, which would change selections) and keeps a running top-R per query in registers: each key tile
is merged by R rounds of "take the best remaining candidate" (ties go to the smaller index, the order
the tiles are visited in). Summary tiles past the latest slot any query of the block may see are skipped
(causal), and a tile none of whose scores beats the current R-th best is not merged. Limits (the CUDA
op falls back to the torch reference beyond them): ``top_r <= MAX_TOP_R`` (32; the merge is unrolled R
times), head size ``d <= MAX_HEAD_DIM`` (256; one query tile holds all of d), float32 state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import as_bytes, for_device, load_head_tile, pow2
from ..session_scan.triton_kernels import _batch_head, _feature_block, _linrec2_combine
from .reference import CHUNK_UPDATE, RECALL_SELECT

MAX_TOP_R = 32
MAX_HEAD_DIM = 256


@triton.jit
def _chunk_update_fwd_kernel(
    k_ptr,
    v_ptr,
    valid_ptr,
    n_seen_ptr,
    part_k_ptr,
    part_v_ptr,
    summ_k_ptr,
    summ_v_ptr,
    out_part_k_ptr,
    out_part_v_ptr,
    out_summ_k_ptr,
    out_summ_v_ptr,
    T,
    D,
    H,
    N,
    C,
    stride_k,
    stride_v,
    stride_m,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(B * H, cdiv(D, BLOCK_D))``; part/summ buffers (in and out) are contiguous ``[B, H, D]`` /
    ``[B, H, N, D]``."""
    pid_bh, b, h, cols, cmask, st_off = _feature_block(H, D, BLOCK_D)
    cdt = part_k_ptr.dtype.element_ty
    acc_k = tl.load(part_k_ptr + st_off, mask=cmask, other=0.0).to(cdt)  # (BLOCK_D,) sum of the open chunk
    acc_v = tl.load(part_v_ptr + st_off, mask=cmask, other=0.0).to(cdt)
    n_seen = tl.load(n_seen_ptr + b)
    seen = n_seen
    k_base = k_ptr + b * stride_k[0] + h * stride_k[1]
    v_base = v_ptr + b * stride_v[0] + h * stride_v[1]
    summ_base = pid_bh * N * D
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        ok = tl.load(valid_ptr + b * stride_m[0] + rows * stride_m[1], mask=rmask, other=0) != 0  # (BLOCK_T,)
        pos = seen + tl.cumsum(ok.to(tl.int32), 0) - 1  # real position of each real token
        opens = ok & (pos % C == 0) & (pos > n_seen)
        closes = ok & (pos % C == C - 1)
        c = tl.where(opens, 0.0, 1.0).to(cdt)
        m2 = ok[:, None] & cmask[None, :]
        xk = tl.load(k_base + rows[:, None] * stride_k[2] + cols[None, :] * stride_k[3], mask=m2, other=0.0).to(cdt)
        xv = tl.load(v_base + rows[:, None] * stride_v[2] + cols[None, :] * stride_v[3], mask=m2, other=0.0).to(cdt)
        c2 = tl.broadcast_to(c[:, None], (BLOCK_T, BLOCK_D))
        prod, hk, hv = tl.associative_scan((c2, xk, xv), 0, _linrec2_combine)
        hk += prod * acc_k[None, :]
        hv += prod * acc_v[None, :]
        slot = pos // C
        w_mask = (closes & (slot < N))[:, None] & cmask[None, :]
        w_off = summ_base + slot[:, None] * D + cols[None, :]
        tl.store(out_summ_k_ptr + w_off, (hk / C).to(out_summ_k_ptr.dtype.element_ty), mask=w_mask)
        tl.store(out_summ_v_ptr + w_off, (hv / C).to(out_summ_v_ptr.dtype.element_ty), mask=w_mask)
        last = rows[:, None] == t0 + BLOCK_T - 1  # rows past T carry the sum unchanged to the tile end
        acc_k = tl.sum(tl.where(last, hk, 0.0), 0)
        acc_v = tl.sum(tl.where(last, hv, 0.0), 0)
        seen += tl.sum(ok.to(tl.int32), 0)
    first = n_seen // C
    done = seen // C
    empty = (done > first) & (seen % C == 0)  # the last real token closed a chunk: nothing is open
    tl.store(out_part_k_ptr + st_off, tl.where(empty, 0.0, acc_k), mask=cmask)
    tl.store(out_part_v_ptr + st_off, tl.where(empty, 0.0, acc_v), mask=cmask)
    # slots this call did not complete keep their summaries (disjoint from the slots written above)
    for n0 in range(0, N, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        keep = ((slots < first) | (slots >= done)) & (slots < N)
        m2 = keep[:, None] & cmask[None, :]
        offs = summ_base + slots[:, None] * D + cols[None, :]
        tl.store(out_summ_k_ptr + offs, tl.load(summ_k_ptr + offs, mask=m2, other=0.0), mask=m2)
        tl.store(out_summ_v_ptr + offs, tl.load(summ_v_ptr + offs, mask=m2, other=0.0), mask=m2)


def chunk_update_fwd(
    *args, BLOCK_T: int | None = None, BLOCK_D: int | None = None, BLOCK_N: int = 16, num_warps: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mka::chunk_update`` on the op's ``args`` (``k, v, valid, n_seen, part_k, part_v, summ_k, summ_v,
    chunk_size``, typed by :func:`.reference.reference_chunk_update`): ``k, v: [B, H, T, d]`` (any strides),
    ``valid: [B, T]``, ``n_seen: [B]``, ``part_*: [B, H, d]``, ``summ_*: [B, H, N, d]`` -> new ``(part_k, part_v,
    summ_k, summ_v)`` (contiguous, state dtype).

    No argument or capacity checks (the op does them); chunks past slot N - 1 are dropped.
    """
    k, v, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk_size = args
    B, H, T, D = k.shape
    N = summ_k.shape[2]
    summ_k, summ_v = summ_k.contiguous(), summ_v.contiguous()
    out_pk = torch.empty(B, H, D, dtype=part_k.dtype, device=k.device)  # (B, H, d)
    out_pv = torch.empty_like(out_pk)
    out_sk = torch.empty_like(summ_k)  # (B, H, N, d)
    out_sv = torch.empty_like(summ_v)
    valid = as_bytes(valid)
    bt = BLOCK_T or pow2(T, 16, 64)
    bd = BLOCK_D or pow2(D, 1, 16)
    for_device(_chunk_update_fwd_kernel, k.device)[(B * H, triton.cdiv(D, bd))](
        k,
        v,
        valid,
        n_seen.contiguous(),
        part_k.contiguous(),
        part_v.contiguous(),
        summ_k,
        summ_v,
        out_pk,
        out_pv,
        out_sk,
        out_sv,
        T,
        D,
        H,
        N,
        int(chunk_size),
        k.stride(),
        v.stride(),
        valid.stride(),
        BLOCK_T=bt,
        BLOCK_D=bd,
        BLOCK_N=BLOCK_N,
        num_warps=num_warps,
    )
    return out_pk, out_pv, out_sk, out_sv


@triton.jit
def _merge_top_r(top_v, top_i, cand_v, cand_i, R: tl.constexpr, R_PAD: tl.constexpr, BIG: tl.constexpr):
    """Best R of ``top (BQ, R_PAD)`` and ``cand (BQ, BN)`` per row, best first (-inf = empty / unavailable)."""
    r_col = tl.arange(0, R_PAD)[None, :]
    new_v = tl.full(top_v.shape, float("-inf"), top_v.dtype)
    new_i = tl.zeros(top_i.shape, top_i.dtype)
    for r in tl.static_range(R):
        best = tl.maximum(tl.max(top_v, 1), tl.max(cand_v, 1))[:, None]  # (BQ, 1)
        pick_t = tl.min(tl.where(top_v == best, top_i, BIG), 1)
        pick_c = tl.min(tl.where(cand_v == best, cand_i, BIG), 1)
        pick = tl.minimum(pick_t, pick_c)[:, None]  # smallest index among the best
        new_v = tl.where(r_col == r, best, new_v)
        new_i = tl.where(r_col == r, pick, new_i)
        top_v = tl.where((top_i == pick) & (top_v == best), float("-inf"), top_v)
        cand_v = tl.where((cand_i == pick) & (cand_v == best), float("-inf"), cand_v)
    return new_v, new_i


@triton.jit
def _recall_select_fwd_kernel(
    q_ptr,
    summ_ptr,
    pos_ptr,
    bank_ptr,
    bank_valid_ptr,
    idx_ptr,
    found_ptr,
    T,
    D,
    H,
    N,
    M,
    C,
    stride_q,
    stride_s,
    stride_p,
    stride_b,
    stride_v,
    HAS_BANK: tl.constexpr,
    HAS_BANK_VALID: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(B * H, cdiv(T, BLOCK_Q))``; ``idx`` (int64) and ``found`` (bytes) are contiguous ``[B, H, T, R]``."""
    pid_bh, b, h = _batch_head(H)
    pid_q = tl.program_id(1)
    cdt = summ_ptr.dtype.element_ty
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = rows < T
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q_mask = rmask[:, None] & dmask[None, :]
    q = load_head_tile(q_ptr, stride_q, b, h, rows, dcols, q_mask).to(cdt)  # (BQ, BD)
    n_avail = (tl.load(pos_ptr + b * stride_p[0] + rows * stride_p[1], mask=rmask, other=0) // C).to(tl.int32)
    n_hi = tl.minimum(tl.max(n_avail, 0), N)  # summaries any query of the block may see (int32)
    top_v = tl.full((BLOCK_Q, R_PAD), float("-inf"), cdt)
    top_i = tl.zeros((BLOCK_Q, R_PAD), tl.int32)
    r_col = tl.arange(0, R_PAD)[None, :]
    ar = tl.arange(0, BLOCK_N)
    n_summ = tl.cdiv(n_hi, BLOCK_N)
    n_tiles = n_summ
    if HAS_BANK:
        n_tiles += tl.cdiv(M, BLOCK_N)
    for i in range(0, n_tiles):
        if i < n_summ:
            ent = i * BLOCK_N + ar  # summary slots
            emask = ent < n_hi
            e_mask = emask[:, None] & dmask[None, :]
            kt = load_head_tile(summ_ptr, stride_s, b, h, ent, dcols, e_mask).to(cdt)
            avail = emask[None, :] & (ent[None, :] < n_avail[:, None])  # (BLOCK_Q, BLOCK_N) causal, n < N
            eidx = ent
        else:
            ent = (i - n_summ) * BLOCK_N + ar  # bank entries
            emask = ent < M
            e_mask = emask[:, None] & dmask[None, :]
            kt = load_head_tile(bank_ptr, stride_b, b, h, ent, dcols, e_mask).to(cdt)
            ok = emask
            if HAS_BANK_VALID:
                ok = ok & (tl.load(bank_valid_ptr + b * stride_v[0] + ent * stride_v[1], mask=emask, other=0) != 0)
            avail = tl.broadcast_to(ok[None, :], (BLOCK_Q, BLOCK_N))
            eidx = N + ent
        s = tl.dot(q, tl.trans(kt), input_precision="ieee")  # (BLOCK_Q, BLOCK_N)
        s = tl.where(avail & rmask[:, None], s, float("-inf"))
        thr = tl.min(tl.where(r_col < R, top_v, float("inf")), 1)  # R-th best so far (-inf until R are held)
        if tl.max(tl.max((s > thr[:, None]).to(tl.int32), 1), 0) > 0:
            cand_i = tl.broadcast_to(eidx[None, :], (BLOCK_Q, BLOCK_N)).to(tl.int32)
            top_v, top_i = _merge_top_r(top_v, top_i, s, cand_i, R, R_PAD, 2147483647)
    found = top_v > float("-inf")
    out = (pid_bh * T + rows[:, None]) * R + r_col
    omask = rmask[:, None] & (r_col < R)
    tl.store(idx_ptr + out, tl.where(found, top_i, 0).to(tl.int64), mask=omask)
    tl.store(found_ptr + out, found.to(tl.uint8), mask=omask)


def recall_select_fwd(
    *args, BLOCK_Q: int = 16, BLOCK_N: int = 32, num_warps: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mka::recall_select`` on the op's ``args`` (``q_r, summ_k, pos, chunk_size, top_r[, bank_k, bank_valid]``,
    typed by :func:`.reference.reference_recall_select`): ``q_r: [B, H, T, d]``, ``summ_k: [B, H, N, d]``,
    ``pos: [B, T]``, ``bank_k?: [B, H, M, d]``, ``bank_valid?: [B, M]`` (any strides) -> ``idx: [B, H, T, R]``
    int64, ``found: [B, H, T, R]`` bool.

    Needs ``top_r <= MAX_TOP_R`` and ``d <= MAX_HEAD_DIM``; scores in the dtype of ``summ_k``.
    """
    q_r, summ_k, pos, chunk_size, top_r, bank_k, bank_valid = (*args, None, None)[:7]  # the bank is optional
    B, H, T, D = q_r.shape
    N = summ_k.shape[2]
    if top_r > MAX_TOP_R or D > MAX_HEAD_DIM:
        raise ValueError(f"recall_select_fwd supports top_r <= {MAX_TOP_R} and d <= {MAX_HEAD_DIM}")
    idx = torch.empty(B, H, T, top_r, dtype=torch.int64, device=q_r.device)  # (B, H, T, R)
    found = torch.empty(B, H, T, top_r, dtype=torch.bool, device=q_r.device)
    has_bank = bank_k is not None
    bank = bank_k if has_bank else summ_k
    M = bank_k.shape[2] if has_bank else 0
    bvalid = as_bytes(bank_valid) if bank_valid is not None else pos
    for_device(_recall_select_fwd_kernel, q_r.device)[(B * H, triton.cdiv(T, BLOCK_Q))](
        q_r,
        summ_k,
        pos,
        bank,
        bvalid,
        idx,
        found.view(torch.uint8),
        T,
        D,
        H,
        N,
        M,
        int(chunk_size),
        q_r.stride(),
        summ_k.stride(),
        pos.stride(),
        bank.stride(),
        bvalid.stride(),
        HAS_BANK=has_bank,
        HAS_BANK_VALID=bank_valid is not None,
        R=top_r,
        R_PAD=pow2(top_r),
        BLOCK_Q=BLOCK_Q,
        BLOCK_N=BLOCK_N,
        BLOCK_D=pow2(D, 16),
        num_warps=num_warps,
    )
    return idx, found


# -- CUDA implementations of the ops --------------------------------------------------------------------


_chunk_update_cuda = CHUNK_UPDATE.implement_cuda(chunk_update_fwd)


def _recall_select_supported(q_r, summ_k, pos, chunk_size, top_r, bank_k, bank_valid) -> bool:
    """The cases the kernel covers; beyond them the CUDA op runs the torch reference."""
    return top_r <= MAX_TOP_R and q_r.shape[-1] <= MAX_HEAD_DIM and summ_k.dtype == torch.float32


_recall_select_cuda = RECALL_SELECT.implement_cuda(recall_select_fwd, supported=_recall_select_supported)
