"""Triton kernels for ``mka::bounded_attention`` and ``mka::bounded_attention_backward`` (the CUDA implementations).

Semantics are those of :func:`.reference.reference_bounded_attention`: query ``t`` of head ``h``
(kv head ``g = h // (H / Hkv)``) attends to the keys ``k[b, g, idx[b, g, t, m]]`` (``idx < 0``: left out; a key
listed twice counts twice; an entry past the pool is left out too, where the reference raises), each rotated by
the angles ``delta[b, g, t, m] * freqs``::

    s_tm = scale * q_t . rot(k_{idx_tm}, a_tm),   p_t = softmax_m(s_t),   out_t = sum_m p_tm v_{idx_tm}
    lse_t = log sum_m exp(s_tm)                   (a query with no entry: out 0, lse -inf)

Backward (FlashAttention-2 style, with ``D_t = dO_t . out_t`` from a forward pass in ``BWD_PREP`` mode)::

    dS_tm = p_tm (dO_t . v_{idx_tm} - D_t + dlse_t),   dq_t = scale sum_m dS_tm rot(k_{idx_tm}, a_tm)
    dk[idx_tm] += rot(scale dS_tm q_t, -a_tm),   dv[idx_tm] += p_tm dO_t

There is no matmul here: every query has its own key list, so a program owns ``BLOCK_T`` queries of one
query head and walks their lists ``BLOCK_M`` entries at a time, gathering ``[BLOCK_T, BLOCK_M, d]`` tiles of
k and v (one online softmax per query, float32). The RoPE pairs are loaded as two half tiles ``x1, x2``
(rotate-half: features ``i, i + rot/2``; interleaved: ``2i, 2i + 1``) plus the pass-through tail, so each
angle's cos/sin is computed once per pair. GQA heads of one kv head gather the same pool rows (served by
the cache); the pool is never repeated. ``dk, dv`` are summed with float32 ``atomic_add`` into ``[B, Hkv,
P, d]`` buffers, since several queries (and heads, and duplicate entries) gather the same pool row; the
order of the atomics is not deterministic (float32 rounding differences only).

Angles. ``delta`` reaches ~1e6 and ``freqs`` ~1 rad, so the float32 product ``delta * f`` would be off by up
to ~0.06 rad. The kernels instead work in fixed-point turns: :func:`turn_steps` gives each frequency as a
signed 64-bit count of ``2**-64`` turns per position (``f / 2pi`` rounded in float64 on the device), and
``delta * step`` in wrapping int64 arithmetic is the angle modulo one turn, exactly, for every int64
``delta``. Its float32 conversion times ``2pi / 2**64`` is the angle reduced to ``[-pi, pi)`` (error
<= 2**-24 * pi, plus ``|delta| * ~2**-53`` turns from the rounded step: ~1e-10 rad at ``|delta| = 1e6``), and
float32 cos/sin of a reduced angle are accurate. The reference takes float64 angles and rounds cos/sin
to float32, so the two agree to float32 rounding for any ``|delta|`` the reference itself computes
exactly (``|delta| < 2**29``).

This module holds the helpers, the forward kernel (also the backward's preprocess, ``BWD_PREP``) and its
launcher :func:`bounded_attention_fwd`; :mod:`.triton_backward` the backward kernel and its launcher
:func:`bounded_attention_bwd` (any strides; CPU tensors run the Triton interpreter, see :mod:`._triton`).
Importing each registers its launcher for CUDA tensors; float64 inputs and head sizes over 256 run the
reference there.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._triton import for_device, load_head_tile, pow2, store_head_tile
from .reference import BOUNDED_ATTENTION, check_bounded_attention

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_LOG2E_F = 1.4426950408889634
_LOG2E: tl.constexpr = tl.constexpr(_LOG2E_F)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_RAD_PER_UNIT: tl.constexpr = tl.constexpr(2 * math.pi / 2.0**64)  # one 2**-64 turn in radians


def turn_steps(freqs: torch.Tensor) -> torch.Tensor:
    """``freqs: [rot/2]`` (rad per position) -> ``[rot/2]`` int64: ``round(frac(f / 2pi) * 2**64)`` wrapped to
    ``[-2**63, 2**63)``, so that ``delta * step`` (int64, wrapping) is ``delta * f`` modulo one turn."""
    x = freqs.to(torch.float64) / (2 * math.pi)
    units = torch.round((x - torch.round(x)) * 2.0**64)  # in [-2**63, 2**63]
    return torch.where(units >= 2.0**63, units - 2.0**64, units).to(torch.int64)


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _entries(IDX_ROW, offs_m, t_mask, M, P, stride_im):
    """Pool rows of entries ``offs_m`` of each query (``IDX_ROW: [BT]`` row pointers): ``(ix, ok)``, both
    ``[BT, BM]``; ``ok``: the entry exists and its row is in the pool (``ix`` is 0 where not ok)."""
    tm = t_mask[:, None] & (offs_m < M)[None, :]
    ix = tl.load(IDX_ROW[:, None] + offs_m[None, :] * stride_im, mask=tm, other=-1)
    ok = tm & (ix >= 0) & (ix < P)
    return tl.where(ok, ix, 0), ok


@triton.jit
def _pair_parts(ROWS, off1, off2, offp, m12, mp, stride):
    """Float32 pair halves and pass-through tail of rows ``ROWS`` (pointers; the feature offsets come shaped to
    broadcast against them, ``m12``/``mp`` their masks), 0 where masked."""
    x1 = tl.load(ROWS + off1 * stride, mask=m12, other=0.0).to(tl.float32)
    x2 = tl.load(ROWS + off2 * stride, mask=m12, other=0.0).to(tl.float32)
    xp = tl.load(ROWS + offp * stride, mask=mp, other=0.0).to(tl.float32)
    return x1, x2, xp


@triton.jit
def _rotated_keys(K_ROWS, DELTA_ROW, offs_m, ok, steps, off1, off2, offp, h_mask, p_mask, stride_dm, stride_kd):
    """Gathered keys ``K_ROWS: [BT, BM, 1]`` row pointers rotated by their angles: ``(y1, y2, kp, c, s)``, the
    pair halves ``[BT, BM, BH]``, the pass-through tail ``[BT, BM, BP]`` and the angles' cos/sin."""
    mh = ok[:, :, None] & h_mask[None, None, :]
    mp = ok[:, :, None] & p_mask[None, None, :]
    x1, x2, kp = _pair_parts(K_ROWS, off1[None, None, :], off2[None, None, :], offp[None, None, :], mh, mp, stride_kd)
    dl = tl.load(DELTA_ROW[:, None] + offs_m[None, :] * stride_dm, mask=ok, other=0)  # (BT, BM) int64
    turns = dl[:, :, None] * steps[None, None, :]  # angle mod one turn, in 2**-64 turns (int64 wraps)
    a = turns.to(tl.float32) * _RAD_PER_UNIT  # (BT, BM, BH) in [-pi, pi)
    c = tl.cos(a)
    s = tl.sin(a)
    return x1 * c - x2 * s, x2 * c + x1 * s, kp, c, s


@triton.jit
def _query_block(NT, H, REP, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(NT * B * H,)``, program ``(b * H + h) * NT + query block``: ``(pid_bh, b, h, g)`` (int64; ``g`` the kv
    head), the block's queries ``offs_t`` with their mask, and the feature offsets with theirs."""
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = pid // NT
    h = pid_bh % H
    offs_t = (pid % NT) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    return pid_bh, pid_bh // H, h, h // REP, offs_t, offs_t < T, offs_d, offs_d < D


@triton.jit
def _features(HALF, D, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Feature offsets of the pair halves and of the pass-through tail, with their masks."""
    i = tl.arange(0, BLOCK_H).to(tl.int64)
    if INTERLEAVED:
        off1 = 2 * i
        off2 = 2 * i + 1
    else:
        off1 = i
        off2 = i + HALF
    offp = 2 * HALF + tl.arange(0, BLOCK_P).to(tl.int64)
    return off1, off2, offp, i < HALF, offp < D


@triton.jit
def _entry_lists(
    STEPS, IDX, DELTA, K, V, b, g, offs_t, h_mask, stride_i, stride_d, stride_k, stride_v, BLOCK_H: tl.constexpr
):
    """What the block's queries gather from: ``(steps, idx_row, delta_row, k_base, v_base)``, the frequencies' turn
    steps, the ``[BT]`` row pointers of their entry lists and the pool of their kv head ``g``."""
    steps = tl.load(STEPS + tl.arange(0, BLOCK_H), mask=h_mask, other=0)
    idx_row = IDX + b * stride_i[0] + g * stride_i[1] + offs_t * stride_i[2]
    delta_row = DELTA + b * stride_d[0] + g * stride_d[1] + offs_t * stride_d[2]
    return steps, idx_row, delta_row, K + b * stride_k[0] + g * stride_k[1], V + b * stride_v[0] + g * stride_v[1]


# ----------------------------------------------------------------------------------------------- forward


@triton.jit
def _bounded_attention_fwd_kernel(
    Q, K, V, IDX, DELTA, STEPS, OUT, LSE, GO, DOT,
    stride_q, stride_k, stride_v, stride_i, stride_d, stride_o, stride_g,
    H, REP, T, M, P, D, HALF, NT, qk_scale,
    INTERLEAVED: tl.constexpr,
    BWD_PREP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid ``(NT * B * H,)``, ``NT = cdiv(T, BLOCK_T)``. Writes ``OUT [B, H, T, d]`` and ``LSE [B, H, T]``
    (contiguous, natural log); ``BWD_PREP`` writes ``DOT [B, H, T] = GO . out`` instead of ``OUT``."""
    pid_bh, b, h, g, offs_t, t_mask, offs_d, d_mask = _query_block(NT, H, REP, T, D, BLOCK_T, BLOCK_D)
    off1, off2, offp, h_mask, p_mask = _features(HALF, D, INTERLEAVED, BLOCK_H, BLOCK_P)

    q_row = Q + b * stride_q[0] + h * stride_q[1] + offs_t * stride_q[2]  # (BT,) pointers
    th = t_mask[:, None] & h_mask[None, :]
    tp = t_mask[:, None] & p_mask[None, :]
    q1, q2, qp = _pair_parts(q_row[:, None], off1[None, :], off2[None, :], offp[None, :], th, tp, stride_q[3])
    steps, idx_row, delta_row, k_base, v_base = _entry_lists(
        STEPS, IDX, DELTA, K, V, b, g, offs_t, h_mask, stride_i, stride_d, stride_k, stride_v, BLOCK_H
    )

    m_i = tl.full([BLOCK_T], -1.0e30, tl.float32)  # finite: chunks without entries leave (l_i, acc) alone
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        ix, ok = _entries(idx_row, offs_m, t_mask, M, P, stride_i[3])  # (BT, BM)
        y1, y2, kp, c, s_ = _rotated_keys(
            k_base + ix[:, :, None] * stride_k[2], delta_row, offs_m, ok, steps,
            off1, off2, offp, h_mask, p_mask, stride_d[3], stride_k[3],
        )  # fmt: skip
        s = tl.sum(q1[:, None, :] * y1, 2) + tl.sum(q2[:, None, :] * y2, 2) + tl.sum(qp[:, None, :] * kp, 2)
        s = tl.where(ok, s * qk_scale, float("-inf"))  # (BT, BM), log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # 0 where not ok
        l_i = l_i * alpha + tl.sum(p, 1)
        vmask = ok[:, :, None] & d_mask[None, None, :]
        v = tl.load(v_base + ix[:, :, None] * stride_v[2] + offs_d[None, None, :] * stride_v[3], mask=vmask, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), 1)  # (BT, BD)
        m_i = m_new

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(LSE + pid_bh * T + offs_t, lse, mask=t_mask)
    td = t_mask[:, None] & d_mask[None, :]
    if BWD_PREP:
        go = load_head_tile(GO, stride_g, b, h, offs_t, offs_d, td).to(tl.float32)
        tl.store(DOT + pid_bh * T + offs_t, tl.sum(go * o, 1), mask=t_mask)
    else:
        store_head_tile(OUT, stride_o, b, h, offs_t, offs_d, o, td)


# --------------------------------------------------------------------------------------------- launchers


def _config(T: int, M: int, d: int, block_t, block_m, num_warps, budget: int) -> tuple[int, int, int]:
    """Tile sizes: untuned guesses (no GPU measurement yet) that keep a ``[BLOCK_T, BLOCK_M, d]`` float32 tile
    near ``budget`` values per program; decode (``T = 1``) takes longer entry chunks instead. All overridable."""
    bd = pow2(d)
    bt = block_t or min(pow2(T), 16 if bd <= 64 else 8)
    bm = block_m or pow2(M, 1, max(1, budget // (bt * bd)))
    return bt, bm, num_warps or 4


def _prepare(args: tuple, tiles, budget=4096):
    """Argument checks and the launch arguments shared by the forward and the backward (``args``: the op's)."""
    check_bounded_attention(*args)
    q, k, v, idx, delta, freqs, scale, interleaved = args[:8]
    B, H, T, d = q.shape
    G, P, M = k.shape[1], k.shape[2], idx.shape[3]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head size {d} > {MAX_HEAD_DIM}; the Triton kernels keep a whole head row in registers")
    half = freqs.numel()
    steps = turn_steps(freqs) if half else torch.zeros(1, dtype=torch.int64, device=q.device)
    bt, bm, nw = _config(T, M, d, *tiles, budget)
    nt = triton.cdiv(T, bt)
    kk, vv = (k, v) if P > 0 else (q, q)  # no entry is ever loaded from an empty pool; pass real pointers
    meta = dict(
        INTERLEAVED=bool(interleaved),
        BLOCK_T=bt,
        BLOCK_M=bm,
        BLOCK_H=pow2(half),
        BLOCK_P=pow2(d - 2 * half),
        BLOCK_D=pow2(d),
        num_warps=nw,
    )
    return dict(
        grid=(nt * B * H,),
        tensors=(q, kk, vv, idx, delta, steps),
        strides=(q.stride(), k.stride(), v.stride(), idx.stride(), delta.stride()),
        dims=(H, H // G, T, M, P, d, half, nt),
        meta=meta,
    )


def _run_fwd(cfg, q, scale, go=None):
    B, H, T, d = q.shape
    prep = go is not None
    out = q if prep else torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, H, T, d); unused in prep
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    dot = torch.empty_like(lse) if prep else lse
    go_t = go if prep else q
    for_device(_bounded_attention_fwd_kernel, q.device)[cfg["grid"]](
        *cfg["tensors"], out, lse, go_t, dot,
        *cfg["strides"], out.stride(), go_t.stride(),
        *cfg["dims"], float(scale) * _LOG2E_F,
        BWD_PREP=prep, **cfg["meta"],
    )  # fmt: skip
    return out, lse, dot


def bounded_attention_fwd(
    *args, block_t: int | None = None, block_m: int | None = None, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of ``mka::bounded_attention``: ``args`` are the op's (``q, k, v, idx, delta, freqs, scale,
    interleaved[, run]``, typed by :func:`.reference.reference_bounded_attention`; any strides; ``run`` only speeds
    the reference up, the kernels read each entry's own ``delta``). Returns ``out: [B, H, T, d]`` (q's dtype,
    contiguous) and ``lse: [B, H, T]`` float32."""
    cfg = _prepare(args, (block_t, block_m, num_warps))
    q, scale = args[0], args[6]
    if q.numel() == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), q.new_full(q.shape[:3], -math.inf).float()
    out, lse, _ = _run_fwd(cfg, q, scale)
    return out, lse


# ---------------------------------------------------------------------------------------------- registration


def _triton_ok(q: torch.Tensor, *rest) -> bool:
    """Cases the kernels cover; anything else (float64 for gradcheck, d > 256) runs the reference."""
    return q.dtype in _SUPPORTED and q.shape[-1] <= MAX_HEAD_DIM


_bounded_attention_cuda = BOUNDED_ATTENTION.implement_cuda(
    bounded_attention_fwd,
    supported=_triton_ok,
    check=False,  # the launchers check their arguments
)
