"""The ``@triton.jit`` code of ``mka::fastmka_mix`` (fused session scan + route-mix + RoPE, forward and
backward). Layout, math, launchers and registration are in :mod:`.fastmka_mix_triton`."""

from __future__ import annotations

import triton
import triton.language as tl

from .session_scan_triton import _linrec2_combine


@triton.jit
def _rotate_half(x, first):
    """``x: [BT, 2, BH]`` (first / second half of each feature pair) -> ``cat(-x2, x1)`` in the same layout."""
    lo = tl.sum(tl.where(first, x, 0.0), 1)  # (BT, BH)
    hi = tl.sum(tl.where(first, 0.0, x), 1)
    return tl.where(first, -hi[:, None, :], lo[:, None, :])


@triton.jit
def _decay(valid_ptr, rows, T, first_row, beta):
    """``a_t`` for ``rows``: 0 at ``first_row``, beta for other real tokens, 1 for padding and rows past T."""
    ok = tl.load(valid_ptr + rows, mask=(rows >= 0) & (rows < T), other=0) != 0
    return tl.where(rows == first_row, 0.0, tl.where(ok, beta, 1.0))


@triton.jit
def _first_real(valid_ptr, n_seen, T, BLOCK_T: tl.constexpr):
    """Index of the first real token when ``n_seen == 0`` (it alone has ``a_t = 0``), else -1."""
    first = T
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = tl.load(valid_ptr + rows, mask=rows < T, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(ok, rows, T), 0))
    return tl.where((n_seen == 0) & (first < T), first, -1)


@triton.jit
def _fastmka_mix_fwd_kernel(
    lam_ptr,
    k1_ptr,
    v1_ptr,
    k3_ptr,
    v3_ptr,
    valid_ptr,
    n_seen_ptr,
    state_k_ptr,
    state_v_ptr,
    cos_ptr,
    sin_ptr,
    kf_ptr,
    vf_ptr,
    out_state_k_ptr,
    out_state_v_ptr,
    beta,
    T,
    D,
    H,
    HALF,
    stride_lb,
    stride_lg,
    stride_lt,
    stride_ll,
    stride_k1b,
    stride_k1h,
    stride_k1t,
    stride_k1d,
    stride_v1b,
    stride_v1h,
    stride_v1t,
    stride_v1d,
    stride_k3b,
    stride_k3h,
    stride_k3t,
    stride_k3d,
    stride_v3b,
    stride_v3h,
    stride_v3t,
    stride_v3d,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_sb,
    stride_st,
    stride_sd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    HAS_K3: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid ``(B * H, cdiv(HALF, BLOCK_H))``. ``valid`` is contiguous ``[B, T]`` bytes; states contiguous
    ``[B, H, D]``; ``kf``/``vf`` share strides; ``stride_lg`` is 0 when G = 1."""
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets for large tensors
    pid_d = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    cdt = state_k_ptr.dtype.element_ty
    j = pid_d * BLOCK_H + tl.arange(0, BLOCK_H)
    pair = tl.arange(0, 2)
    cols = pair[:, None] * HALF + j[None, :]  # (2, BLOCK_H): columns j and j + HALF
    cmask = (j[None, :] < HALF) & (cols < D)
    first_half = (pair == 0)[None, :, None]  # (1, 2, 1)
    st_off = pid_bh * D + cols
    carry_k = tl.load(state_k_ptr + st_off, mask=cmask, other=0.0).to(cdt)  # (2, BLOCK_H)
    carry_v = tl.load(state_v_ptr + st_off, mask=cmask, other=0.0).to(cdt)
    valid_row = valid_ptr + b * T
    first = _first_real(valid_row, tl.load(n_seen_ptr + b), T, BLOCK_T)
    lam_base = lam_ptr + b * stride_lb + (h * stride_lg)
    k1_base = k1_ptr + b * stride_k1b + h * stride_k1h
    v1_base = v1_ptr + b * stride_v1b + h * stride_v1h
    k3_base = k3_ptr + b * stride_k3b + h * stride_k3h
    v3_base = v3_ptr + b * stride_v3b + h * stride_v3h
    out_base = b * stride_ob + h * stride_oh
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        a = _decay(valid_row, rows, T, first, beta).to(cdt)  # (BLOCK_T,)
        l0 = tl.load(lam_base + rows * stride_lt, mask=rmask, other=0.0).to(cdt)[:, None, None]
        l1 = tl.load(lam_base + rows * stride_lt + stride_ll, mask=rmask, other=0.0).to(cdt)[:, None, None]
        r3 = rows[:, None, None]
        c3 = cols[None, :, :]
        m3 = (rows < T)[:, None, None] & cmask[None, :, :]  # (BLOCK_T, 2, BLOCK_H)
        xk = tl.load(k1_base + r3 * stride_k1t + c3 * stride_k1d, mask=m3, other=0.0).to(cdt)
        xv = tl.load(v1_base + r3 * stride_v1t + c3 * stride_v1d, mask=m3, other=0.0).to(cdt)
        a3 = tl.broadcast_to(a[:, None, None], (BLOCK_T, 2, BLOCK_H))
        prod, sk, sv = tl.associative_scan((a3, (1.0 - a3) * xk, (1.0 - a3) * xv), 0, _linrec2_combine)
        sk += prod * carry_k[None, :, :]
        sv += prod * carry_v[None, :, :]
        last = r3 == t0 + BLOCK_T - 1
        carry_k = tl.sum(tl.where(last, sk, 0.0), 0)
        carry_v = tl.sum(tl.where(last, sv, 0.0), 0)
        mk = l0 * xk + l1 * sk  # (BLOCK_T, 2, BLOCK_H)
        mv = l0 * xv + l1 * sv
        if HAS_K3:
            l2 = tl.load(lam_base + rows * stride_lt + 2 * stride_ll, mask=rmask, other=0.0).to(cdt)[:, None, None]
            mk += l2 * tl.load(k3_base + r3 * stride_k3t + c3 * stride_k3d, mask=m3, other=0.0).to(cdt)
            mv += l2 * tl.load(v3_base + r3 * stride_v3t + c3 * stride_v3d, mask=m3, other=0.0).to(cdt)
        if ROPE:
            cs = tl.load(cos_ptr + b * stride_cb + r3 * stride_ct + c3 * stride_cd, mask=m3, other=0.0).to(cdt)
            sn = tl.load(sin_ptr + b * stride_sb + r3 * stride_st + c3 * stride_sd, mask=m3, other=0.0).to(cdt)
            mk = mk * cs + _rotate_half(mk, first_half) * sn
        offs = out_base + r3 * stride_ot + c3 * stride_od
        tl.store(kf_ptr + offs, mk.to(kf_ptr.dtype.element_ty), mask=m3)
        tl.store(vf_ptr + offs, mv.to(vf_ptr.dtype.element_ty), mask=m3)
    tl.store(out_state_k_ptr + st_off, carry_k, mask=cmask)
    tl.store(out_state_v_ptr + st_off, carry_v, mask=cmask)


@triton.jit
def _fastmka_mix_bwd_kernel(
    gkf_ptr,
    gvf_ptr,
    gstate_k_ptr,
    gstate_v_ptr,
    lam_ptr,
    k1_ptr,
    v1_ptr,
    k3_ptr,
    v3_ptr,
    sk_ptr,
    sv_ptr,
    valid_ptr,
    n_seen_ptr,
    cos_ptr,
    sin_ptr,
    dk1_ptr,
    dv1_ptr,
    dk3_ptr,
    dv3_ptr,
    dstate_k_ptr,
    dstate_v_ptr,
    dlam_ptr,
    dcos_ptr,
    dsin_ptr,
    beta,
    T,
    D,
    H,
    HALF,
    NDB,
    stride_gkb,
    stride_gkh,
    stride_gkt,
    stride_gkd,
    stride_gvb,
    stride_gvh,
    stride_gvt,
    stride_gvd,
    stride_lb,
    stride_lg,
    stride_lt,
    stride_ll,
    stride_k1b,
    stride_k1h,
    stride_k1t,
    stride_k1d,
    stride_v1b,
    stride_v1h,
    stride_v1t,
    stride_v1d,
    stride_k3b,
    stride_k3h,
    stride_k3t,
    stride_k3d,
    stride_v3b,
    stride_v3h,
    stride_v3t,
    stride_v3d,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_sb,
    stride_st,
    stride_sd,
    HAS_K3: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_GRAD: tl.constexpr,
    L: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid ``(B * H, NDB = cdiv(HALF, BLOCK_H))``. ``sk, sv`` (the recomputed scan), ``dk1, dv1, dk3, dv3``,
    ``dcos, dsin`` (per-head partials) are contiguous ``[B, H, T, D]``; ``dlam`` partials contiguous
    ``[B, H, NDB, T, L]``; states contiguous ``[B, H, D]``; ``valid`` contiguous ``[B, T]`` bytes."""
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets for large tensors
    pid_d = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    cdt = dstate_k_ptr.dtype.element_ty
    j = pid_d * BLOCK_H + tl.arange(0, BLOCK_H)
    pair = tl.arange(0, 2)
    cols = pair[:, None] * HALF + j[None, :]  # (2, BLOCK_H)
    cmask = (j[None, :] < HALF) & (cols < D)
    first_half = (pair == 0)[None, :, None]
    st_off = pid_bh * D + cols
    carry_k = tl.load(gstate_k_ptr + st_off, mask=cmask, other=0.0).to(cdt)  # mu after the tile
    carry_v = tl.load(gstate_v_ptr + st_off, mask=cmask, other=0.0).to(cdt)
    valid_row = valid_ptr + b * T
    first = _first_real(valid_row, tl.load(n_seen_ptr + b), T, BLOCK_T)
    lam_base = lam_ptr + b * stride_lb + (h * stride_lg)
    gk_base = gkf_ptr + b * stride_gkb + h * stride_gkh
    gv_base = gvf_ptr + b * stride_gvb + h * stride_gvh
    k1_base = k1_ptr + b * stride_k1b + h * stride_k1h
    v1_base = v1_ptr + b * stride_v1b + h * stride_v1h
    k3_base = k3_ptr + b * stride_k3b + h * stride_k3h
    v3_base = v3_ptr + b * stride_v3b + h * stride_v3h
    o_base = pid_bh * T * D  # contiguous [B, H, T, D] buffers
    dlam_base = dlam_ptr + (pid_bh * NDB + pid_d) * T * L
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_tiles):
        t0 = (n_tiles - 1 - i) * BLOCK_T
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        a = _decay(valid_row, rows, T, first, beta).to(cdt)[:, None, None]  # a_t
        a_next = _decay(valid_row, rows + 1, T, first, beta).to(cdt)  # a_{t+1}; 1 past the end
        l0 = tl.load(lam_base + rows * stride_lt, mask=rmask, other=0.0).to(cdt)[:, None, None]
        l1 = tl.load(lam_base + rows * stride_lt + stride_ll, mask=rmask, other=0.0).to(cdt)[:, None, None]
        r3 = rows[:, None, None]
        c3 = cols[None, :, :]
        m3 = rmask[:, None, None] & cmask[None, :, :]  # (BLOCK_T, 2, BLOCK_H)
        gk = tl.load(gk_base + r3 * stride_gkt + c3 * stride_gkd, mask=m3, other=0.0).to(cdt)
        gv = tl.load(gv_base + r3 * stride_gvt + c3 * stride_gvd, mask=m3, other=0.0).to(cdt)
        gm = gk
        if ROPE:
            cs = tl.load(cos_ptr + b * stride_cb + r3 * stride_ct + c3 * stride_cd, mask=m3, other=0.0).to(cdt)
            sn = tl.load(sin_ptr + b * stride_sb + r3 * stride_st + c3 * stride_sd, mask=m3, other=0.0).to(cdt)
            gm = gk * cs - _rotate_half(gk * sn, first_half)
        xk = tl.load(k1_base + r3 * stride_k1t + c3 * stride_k1d, mask=m3, other=0.0).to(cdt)
        xv = tl.load(v1_base + r3 * stride_v1t + c3 * stride_v1d, mask=m3, other=0.0).to(cdt)
        offs = o_base + r3 * D + c3
        sk = tl.load(sk_ptr + offs, mask=m3, other=0.0).to(cdt)
        sv = tl.load(sv_ptr + offs, mask=m3, other=0.0).to(cdt)
        dl_rows = dlam_base + rows * L
        tl.store(dl_rows, tl.sum(tl.sum(gm * xk + gv * xv, 2), 1), mask=rmask)
        tl.store(dl_rows + 1, tl.sum(tl.sum(gm * sk + gv * sv, 2), 1), mask=rmask)
        mk = l0 * xk + l1 * sk
        if HAS_K3:
            l2 = tl.load(lam_base + rows * stride_lt + 2 * stride_ll, mask=rmask, other=0.0).to(cdt)[:, None, None]
            x3k = tl.load(k3_base + r3 * stride_k3t + c3 * stride_k3d, mask=m3, other=0.0).to(cdt)
            x3v = tl.load(v3_base + r3 * stride_v3t + c3 * stride_v3d, mask=m3, other=0.0).to(cdt)
            tl.store(dl_rows + 2, tl.sum(tl.sum(gm * x3k + gv * x3v, 2), 1), mask=rmask)
            tl.store(dk3_ptr + offs, (l2 * gm).to(dk3_ptr.dtype.element_ty), mask=m3)
            tl.store(dv3_ptr + offs, (l2 * gv).to(dv3_ptr.dtype.element_ty), mask=m3)
            mk += l2 * x3k
        if ROPE_GRAD:
            tl.store(dcos_ptr + offs, gk * mk, mask=m3)
            tl.store(dsin_ptr + offs, gk * _rotate_half(mk, first_half), mask=m3)
        # adjoint of the scan: mu_t = lam_1 gm_t + a_{t+1} mu_{t+1}
        an3 = tl.broadcast_to(a_next[:, None, None], (BLOCK_T, 2, BLOCK_H))
        prod, mu_k, mu_v = tl.associative_scan((an3, l1 * gm, l1 * gv), 0, _linrec2_combine, reverse=True)
        mu_k += prod * carry_k[None, :, :]
        mu_v += prod * carry_v[None, :, :]
        head = r3 == t0
        carry_k = tl.sum(tl.where(head, mu_k, 0.0), 0)
        carry_v = tl.sum(tl.where(head, mu_v, 0.0), 0)
        tl.store(dk1_ptr + offs, (l0 * gm + (1.0 - a) * mu_k).to(dk1_ptr.dtype.element_ty), mask=m3)
        tl.store(dv1_ptr + offs, (l0 * gv + (1.0 - a) * mu_v).to(dv1_ptr.dtype.element_ty), mask=m3)
    ok0 = tl.load(valid_row) != 0
    a0 = tl.where(first == 0, 0.0, tl.where(ok0, beta, 1.0)).to(cdt)
    tl.store(dstate_k_ptr + st_off, a0 * carry_k, mask=cmask)
    tl.store(dstate_v_ptr + st_off, a0 * carry_v, mask=cmask)
