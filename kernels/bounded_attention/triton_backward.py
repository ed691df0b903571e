"""Triton kernel of ``mka::bounded_attention_backward`` and its launcher :func:`bounded_attention_bwd` (the CUDA
implementation). The math, the conventions and the helpers it shares with the forward are those of
:mod:`.triton_kernels`: one forward pass in ``BWD_PREP`` mode recomputes ``lse`` and ``D_t = dO_t . out_t``, then
one pass computes dq and adds dk, dv up with float32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import for_device, load_head_tile
from .reference import BOUNDED_ATTENTION
from .triton_kernels import (
    _LOG2E,
    _LOG2E_F,
    _entries,
    _entry_lists,
    _features,
    _pair_parts,
    _prepare,
    _query_block,
    _rotated_keys,
    _run_fwd,
    _triton_ok,
)


@triton.jit
def _bounded_attention_bwd_kernel(
    Q, K, V, IDX, DELTA, STEPS, GO, LSE, DOT, DQ, DK, DV,
    stride_q, stride_k, stride_v, stride_i, stride_d, stride_g, stride_dq,
    H, REP, T, M, P, D, HALF, NT, scale, qk_scale,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid ``(NT * B * H,)``: ``DQ`` of ``BLOCK_T`` queries, float32 atomic adds into the contiguous
    ``DK, DV [B, Hkv, P, d]`` at the gathered pool rows."""
    pid_bh, b, h, g, offs_t, t_mask, offs_d, d_mask = _query_block(NT, H, REP, T, D, BLOCK_T, BLOCK_D)
    off1, off2, offp, h_mask, p_mask = _features(HALF, D, INTERLEAVED, BLOCK_H, BLOCK_P)

    q_row = Q + b * stride_q[0] + h * stride_q[1] + offs_t * stride_q[2]
    th = t_mask[:, None] & h_mask[None, :]
    tp = t_mask[:, None] & p_mask[None, :]
    q1, q2, qp = _pair_parts(q_row[:, None], off1[None, :], off2[None, :], offp[None, :], th, tp, stride_q[3])
    go = load_head_tile(GO, stride_g, b, h, offs_t, offs_d, t_mask[:, None] & d_mask[None, :]).to(tl.float32)
    lse = tl.load(LSE + pid_bh * T + offs_t, mask=t_mask, other=0.0)
    lse = tl.where(lse > float("-inf"), lse * _LOG2E, 0.0)  # queries with no entry: every p is 0 anyway
    dot = tl.load(DOT + pid_bh * T + offs_t, mask=t_mask, other=0.0)
    steps, idx_row, delta_row, k_base, v_base = _entry_lists(
        STEPS, IDX, DELTA, K, V, b, g, offs_t, h_mask, stride_i, stride_d, stride_k, stride_v, BLOCK_H
    )
    pool = (b * (H // REP) + g) * P * D  # DK, DV are contiguous

    dq1 = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    dq2 = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    dqp = tl.zeros([BLOCK_T, BLOCK_P], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        ix, ok = _entries(idx_row, offs_m, t_mask, M, P, stride_i[3])
        y1, y2, kp, c, s_ = _rotated_keys(
            k_base + ix[:, :, None] * stride_k[2], delta_row, offs_m, ok, steps,
            off1, off2, offp, h_mask, p_mask, stride_d[3], stride_k[3],
        )  # fmt: skip
        s = tl.sum(q1[:, None, :] * y1, 2) + tl.sum(q2[:, None, :] * y2, 2) + tl.sum(qp[:, None, :] * kp, 2)
        p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)  # (BT, BM)
        vmask = ok[:, :, None] & d_mask[None, None, :]
        v = tl.load(v_base + ix[:, :, None] * stride_v[2] + offs_d[None, None, :] * stride_v[3], mask=vmask, other=0.0)
        dp = tl.sum(go[:, None, :] * v.to(tl.float32), 2)
        ds = p * (dp - dot[:, None])  # dL/ds, (BT, BM)
        dq1 += tl.sum(ds[:, :, None] * y1, 1)
        dq2 += tl.sum(ds[:, :, None] * y2, 1)
        dqp += tl.sum(ds[:, :, None] * kp, 1)
        dsc = (ds * scale)[:, :, None]
        dy1 = dsc * q1[:, None, :]  # gradient of the rotated key, (BT, BM, BH)
        dy2 = dsc * q2[:, None, :]
        rows = pool + ix[:, :, None] * D  # (BT, BM, 1)
        mh = ok[:, :, None] & h_mask[None, None, :]
        tl.atomic_add(DK + rows + off1[None, None, :], dy1 * c + dy2 * s_, mask=mh, sem="relaxed")  # rotate back
        tl.atomic_add(DK + rows + off2[None, None, :], dy2 * c - dy1 * s_, mask=mh, sem="relaxed")
        mp = ok[:, :, None] & p_mask[None, None, :]
        tl.atomic_add(DK + rows + offp[None, None, :], dsc * qp[:, None, :], mask=mp, sem="relaxed")
        tl.atomic_add(DV + rows + offs_d[None, None, :], p[:, :, None] * go[:, None, :], mask=vmask, sem="relaxed")

    dq_row = DQ + b * stride_dq[0] + h * stride_dq[1] + offs_t * stride_dq[2]
    tl.store(dq_row[:, None] + off1[None, :] * stride_dq[3], (dq1 * scale).to(DQ.dtype.element_ty), mask=th)
    tl.store(dq_row[:, None] + off2[None, :] * stride_dq[3], (dq2 * scale).to(DQ.dtype.element_ty), mask=th)
    tl.store(dq_row[:, None] + offp[None, :] * stride_dq[3], (dqp * scale).to(DQ.dtype.element_ty), mask=tp)


# ---------------------------------------------------------------------------------------------- launcher


def bounded_attention_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    *args,
    block_t: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``mka::bounded_attention`` (``args``: the op's, as :func:`.triton_kernels.bounded_attention_fwd`
    takes them): ``(dq, dk, dv)`` like ``q, k, v`` (contiguous). One forward pass (``BWD_PREP``) recomputes ``lse``
    and ``dO . out``, then one pass computes dq and adds up dk, dv."""
    cfg = _prepare(args, (block_t, block_m, num_warps), budget=2048)
    q, k, v, scale = args[0], args[1], args[2], args[6]
    if grad_out.shape != q.shape or grad_out.device != q.device:
        raise ValueError(f"grad_out must be like q {tuple(q.shape)} on {q.device}, got {tuple(grad_out.shape)}")
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # (B, H, T, d)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)  # (B, Hkv, P, d)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if q.numel() > 0 and k.numel() > 0:
        _, lse, dot = _run_fwd(cfg, q, scale, grad_out)
        dot = dot - grad_lse.to(dot.dtype)  # d lse / d s = p: the lse gradient enters as D_t - dlse_t
        for_device(_bounded_attention_bwd_kernel, q.device)[cfg["grid"]](
            *cfg["tensors"], grad_out, lse, dot, dq, dk, dv,
            *cfg["strides"], grad_out.stride(), dq.stride(),
            *cfg["dims"], float(scale), float(scale) * _LOG2E_F,
            **cfg["meta"],
        )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------- registration


_bounded_attention_backward_cuda = BOUNDED_ATTENTION.backward.implement_cuda(
    bounded_attention_bwd, supported=lambda grad_out, grad_lse, q, *rest: _triton_ok(q)
)
