"""Triton kernels for ``mka::session_scan`` and ``mka::session_scan_backward`` (the CUDA implementations).

Math (per batch row b, kv head h, feature i; see :mod:`.reference` for the definition)::

    forward:   s_t = a_t s_{t-1} + (1 - a_t) k_t,   s_{-1} = state
               a_t = 1 (padding), 0 (first real token when n_seen == 0), beta (otherwise)
    backward:  lam_t = g_t + a_{t+1} lam_{t+1},     lam_{T-1} = g_{T-1} + g_state
               dk_t = (1 - a_t) lam_t,              dstate = a_0 lam_0

Both are first-order linear recurrences ``h_t = c_t h_{t-1} + x_t``. One program owns a
(batch, kv head, feature block of BLOCK_D) and walks T in tiles of BLOCK_T tokens (the backward from
the end): inside a tile ``tl.associative_scan`` solves the recurrence over pairs ``(c, x)`` with
``(c1, x1) o (c2, x2) = (c1 c2, c2 x1 + x2)`` (zero carry in, plus the running product ``C_t``), and
``h_t = H_t + C_t * carry`` adds the state carried in registers from the previous tile. k and v share
the decays, so one scan carries both. The state and all arithmetic are in the state dtype (float32;
float64 for float64 states); ``s_k, s_v`` are written in the dtype of the output tensors (the
activation dtype for the op). ``beta`` reaches the kernel as a float32 scalar.

Launchers: :func:`session_scan_fwd`, :func:`session_scan_bwd` (strided inputs and outputs; CPU tensors
run the Triton interpreter). Importing this module registers them for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import as_bytes, for_device, pow2
from .reference import SESSION_SCAN


@triton.jit
def _linrec2_combine(c1, x1, y1, c2, x2, y2):
    # (c1, x1) then (c2, x2): h -> c2 (c1 h + x1) + x2; two right-hand sides share the decays
    return c1 * c2, c2 * x1 + x2, c2 * y1 + y2


@triton.jit
def _batch_head(H):
    """Program axis 0 is ``b * H + h``: ``(pid_bh, b, h)``, int64 so that offsets built on them are 64-bit."""
    pid_bh = tl.program_id(0).to(tl.int64)
    return pid_bh, pid_bh // H, pid_bh % H


@triton.jit
def _feature_block(H, D, BLOCK_D: tl.constexpr):
    """Grid ``(B * H, cdiv(D, BLOCK_D))``: ``(pid_bh, b, h)`` of :func:`_batch_head`, this program's feature
    columns and their mask, and the columns' offsets in a contiguous ``[B, H, D]`` state."""
    pid_bh, b, h = _batch_head(H)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return pid_bh, b, h, cols, cols < D, pid_bh * D + cols


@triton.jit
def _session_scan_fwd_kernel(
    k_ptr,
    v_ptr,
    valid_ptr,
    n_seen_ptr,
    state_k_ptr,
    state_v_ptr,
    sk_ptr,
    sv_ptr,
    out_state_k_ptr,
    out_state_v_ptr,
    beta,
    T,
    D,
    H,
    stride_k,
    stride_v,
    stride_m,
    stride_o,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(B * H, cdiv(D, BLOCK_D))``; states are contiguous ``[B, H, D]``; ``sk``/``sv`` share strides."""
    pid_bh, b, h, cols, cmask, st_off = _feature_block(H, D, BLOCK_D)
    cdt = state_k_ptr.dtype.element_ty
    carry_k = tl.load(state_k_ptr + st_off, mask=cmask, other=0.0).to(cdt)  # (BLOCK_D,)
    carry_v = tl.load(state_v_ptr + st_off, mask=cmask, other=0.0).to(cdt)
    seen = tl.load(n_seen_ptr + b)  # real tokens before the current tile
    k_base = k_ptr + b * stride_k[0] + h * stride_k[1]
    v_base = v_ptr + b * stride_v[0] + h * stride_v[1]
    o_off = b * stride_o[0] + h * stride_o[1]
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        ok = tl.load(valid_ptr + b * stride_m[0] + rows * stride_m[1], mask=rmask, other=0) != 0  # (BLOCK_T,)
        first = ok & (seen + tl.cumsum(ok.to(tl.int32), 0) == 1)
        a = tl.where(first, 0.0, tl.where(ok, beta, 1.0)).to(cdt)  # pads (and rows past T) keep the state
        m2 = rmask[:, None] & cmask[None, :]
        kx = tl.load(k_base + rows[:, None] * stride_k[2] + cols[None, :] * stride_k[3], mask=m2, other=0.0).to(cdt)
        vx = tl.load(v_base + rows[:, None] * stride_v[2] + cols[None, :] * stride_v[3], mask=m2, other=0.0).to(cdt)
        a2 = tl.broadcast_to(a[:, None], (BLOCK_T, BLOCK_D))  # (BLOCK_T, BLOCK_D)
        prod, hk, hv = tl.associative_scan((a2, (1.0 - a2) * kx, (1.0 - a2) * vx), 0, _linrec2_combine)
        sk = hk + prod * carry_k[None, :]
        sv = hv + prod * carry_v[None, :]
        offs = o_off + rows[:, None] * stride_o[2] + cols[None, :] * stride_o[3]
        tl.store(sk_ptr + offs, sk.to(sk_ptr.dtype.element_ty), mask=m2)
        tl.store(sv_ptr + offs, sv.to(sv_ptr.dtype.element_ty), mask=m2)
        last = rows[:, None] == t0 + BLOCK_T - 1  # rows past T carry the state unchanged to the tile end
        carry_k = tl.sum(tl.where(last, sk, 0.0), 0)
        carry_v = tl.sum(tl.where(last, sv, 0.0), 0)
        seen += tl.sum(ok.to(tl.int32), 0)
    tl.store(out_state_k_ptr + st_off, carry_k, mask=cmask)
    tl.store(out_state_v_ptr + st_off, carry_v, mask=cmask)


def _scan(kernel, xk, xv, valid, n_seen, state_k, state_v, beta, out_dtype, state_dtype, block_t, block_d, num_warps):
    """Launch one of the two scan kernels (same arguments in the same order): ``xk, xv: [B, H, T, d]`` (any
    strides) and the carried-in states ``[B, H, d]`` -> new contiguous ``(yk, yv)`` in ``out_dtype`` and the
    carried-out states in ``state_dtype``."""
    B, H, T, D = xk.shape
    yk = torch.empty(B, H, T, D, dtype=out_dtype, device=xk.device)  # (B, H, T, d)
    yv = torch.empty_like(yk)
    st_k = torch.empty(B, H, D, dtype=state_dtype, device=xk.device)  # (B, H, d)
    st_v = torch.empty_like(st_k)
    valid = as_bytes(valid)
    bt, bd = block_t or pow2(T, 16, 64), block_d or pow2(D, 1, 16)
    for_device(kernel, xk.device)[(B * H, triton.cdiv(D, bd))](
        xk,
        xv,
        valid,
        n_seen.contiguous(),
        state_k.contiguous(),
        state_v.contiguous(),
        yk,
        yv,
        st_k,
        st_v,
        float(beta),
        T,
        D,
        H,
        xk.stride(),
        xv.stride(),
        valid.stride(),
        yk.stride(),
        BLOCK_T=bt,
        BLOCK_D=bd,
        num_warps=num_warps,
    )
    return yk, yv, st_k, st_v


def session_scan_fwd(
    *args,
    out_dtype: torch.dtype | None = None,
    BLOCK_T: int | None = None,
    BLOCK_D: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward scan on the op's ``args`` (``k, v, valid, state_k, state_v, n_seen, beta``, typed by
    :func:`.reference.reference_session_scan`): ``k, v: [B, H, T, d]`` (any strides), ``valid: [B, T]`` bool,
    ``state_k, state_v: [B, H, d]`` (float32/float64), ``n_seen: [B]`` int64 -> ``(s_k, s_v, state_k, state_v)``.

    ``s_k, s_v`` are new contiguous ``[B, H, T, d]`` tensors in ``out_dtype`` (default: ``k.dtype``); the
    states keep the state dtype. No argument checks (the op does them).
    """
    k, v, valid, state_k, state_v, n_seen, beta = args
    out_dtype = out_dtype or k.dtype
    return _scan(
        _session_scan_fwd_kernel,
        k,
        v,
        valid,
        n_seen,
        state_k,
        state_v,
        beta,
        out_dtype,
        state_k.dtype,
        BLOCK_T,
        BLOCK_D,
        num_warps,
    )


@triton.jit
def _session_scan_bwd_kernel(
    gk_ptr,
    gv_ptr,
    valid_ptr,
    n_seen_ptr,
    gstate_k_ptr,
    gstate_v_ptr,
    dk_ptr,
    dv_ptr,
    dstate_k_ptr,
    dstate_v_ptr,
    beta,
    T,
    D,
    H,
    stride_gk,
    stride_gv,
    stride_m,
    stride_o,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(B * H, cdiv(D, BLOCK_D))``; the reverse scan, walking tiles from the end of T."""
    pid_bh, b, h, cols, cmask, st_off = _feature_block(H, D, BLOCK_D)
    cdt = dstate_k_ptr.dtype.element_ty
    n_seen = tl.load(n_seen_ptr + b)
    # the first real token of the row (only it has a_t = 0, and only when n_seen == 0)
    first = T
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = tl.load(valid_ptr + b * stride_m[0] + rows * stride_m[1], mask=rows < T, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(ok, rows, T), 0))
    first = tl.where((n_seen == 0) & (first < T), first, -1)
    # lam just after the tile being processed; g_state enters at T - 1 with a_T := 1
    carry_k = tl.load(gstate_k_ptr + st_off, mask=cmask, other=0.0).to(cdt)
    carry_v = tl.load(gstate_v_ptr + st_off, mask=cmask, other=0.0).to(cdt)
    gk_base = gk_ptr + b * stride_gk[0] + h * stride_gk[1]
    gv_base = gv_ptr + b * stride_gv[0] + h * stride_gv[1]
    o_off = b * stride_o[0] + h * stride_o[1]
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_tiles):
        t0 = (n_tiles - 1 - i) * BLOCK_T
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        ok = tl.load(valid_ptr + b * stride_m[0] + rows * stride_m[1], mask=rmask, other=0) != 0
        a = tl.where(rows == first, 0.0, tl.where(ok, beta, 1.0)).to(cdt)  # a_t
        nxt = rows + 1
        ok_n = tl.load(valid_ptr + b * stride_m[0] + nxt * stride_m[1], mask=nxt < T, other=0) != 0
        a_n = tl.where(nxt == first, 0.0, tl.where(ok_n, beta, 1.0)).to(cdt)  # a_{t+1}; 1 past the end
        m2 = rmask[:, None] & cmask[None, :]
        gk = tl.load(gk_base + rows[:, None] * stride_gk[2] + cols[None, :] * stride_gk[3], mask=m2, other=0.0).to(cdt)
        gv = tl.load(gv_base + rows[:, None] * stride_gv[2] + cols[None, :] * stride_gv[3], mask=m2, other=0.0).to(cdt)
        c2 = tl.broadcast_to(a_n[:, None], (BLOCK_T, BLOCK_D))  # (BLOCK_T, BLOCK_D)
        prod, lk, lv = tl.associative_scan((c2, gk, gv), 0, _linrec2_combine, reverse=True)
        lam_k = lk + prod * carry_k[None, :]
        lam_v = lv + prod * carry_v[None, :]
        u = 1.0 - a[:, None]
        offs = o_off + rows[:, None] * stride_o[2] + cols[None, :] * stride_o[3]
        tl.store(dk_ptr + offs, (u * lam_k).to(dk_ptr.dtype.element_ty), mask=m2)
        tl.store(dv_ptr + offs, (u * lam_v).to(dv_ptr.dtype.element_ty), mask=m2)
        head = rows[:, None] == t0
        carry_k = tl.sum(tl.where(head, lam_k, 0.0), 0)
        carry_v = tl.sum(tl.where(head, lam_v, 0.0), 0)
    ok0 = tl.load(valid_ptr + b * stride_m[0]) != 0
    a0 = tl.where(first == 0, 0.0, tl.where(ok0, beta, 1.0)).to(cdt)
    tl.store(dstate_k_ptr + st_off, a0 * carry_k, mask=cmask)
    tl.store(dstate_v_ptr + st_off, a0 * carry_v, mask=cmask)


def session_scan_bwd(
    grad_sk: torch.Tensor,
    grad_sv: torch.Tensor,
    grad_state_k: torch.Tensor,
    grad_state_v: torch.Tensor,
    valid: torch.Tensor,
    n_seen: torch.Tensor,
    beta: float,
    out_dtype: torch.dtype | None = None,
    state_dtype: torch.dtype | None = None,
    *,
    BLOCK_T: int | None = None,
    BLOCK_D: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse scan: ``grad_sk, grad_sv: [B, H, T, d]`` (any strides), ``grad_state_k, grad_state_v: [B, H, d]``
    -> ``(dk, dv, dstate_k, dstate_v)``.

    ``dk, dv`` are contiguous in ``out_dtype`` (default ``grad_sk.dtype``); ``dstate_*`` and the arithmetic
    are in ``state_dtype`` (default ``grad_state_k.dtype``).
    """
    out_dtype, state_dtype = out_dtype or grad_sk.dtype, state_dtype or grad_state_k.dtype
    return _scan(
        _session_scan_bwd_kernel,
        grad_sk,
        grad_sv,
        valid,
        n_seen,
        grad_state_k,
        grad_state_v,
        beta,
        out_dtype,
        state_dtype,
        BLOCK_T,
        BLOCK_D,
        num_warps,
    )


# -- CUDA implementations of the ops --------------------------------------------------------------------


_session_scan_cuda = SESSION_SCAN.implement_cuda(session_scan_fwd)


@SESSION_SCAN.backward.implement_cuda
def _session_scan_backward_cuda(
    grad_sk, grad_sv, grad_state_k, grad_state_v, k, v, valid, state_k, state_v, n_seen, beta
):
    return session_scan_bwd(grad_sk, grad_sv, grad_state_k, grad_state_v, valid, n_seen, beta, k.dtype, state_k.dtype)
