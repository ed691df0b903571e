"""Triton kernels of plain attention: flash attention's forward and the helpers its backward
(:mod:`.triton_backward`) shares.

Only ``@triton.jit`` code lives here; the launchers (strides, grids, block sizes) are
:func:`mka_compile.kernels.flash_attention.flash_attention_fwd` / ``flash_attention_bwd``, which run CPU
tensors through the Triton interpreter (``flash_attention.launchable``).

Conventions shared by every kernel:

- tensors are addressed through explicit strides, one tuple per tensor (``stride_q = q.stride()``: batch, head,
  row, feature; Triton specialises each element as it would a scalar argument); program ids and row/column
  offsets are cast to ``tl.int64`` before they meet a stride, so a tensor may exceed 2**31 elements;
- query row ``i`` sits at key position ``i + Tk - Tq`` (bottom-right alignment), so ``CAUSAL`` lets it
  see keys ``j <= i + Tk - Tq``; GQA maps query head ``h`` to kv head ``h // group``;
- scores live in base 2: ``qk_scale = scale * log2(e)``, so ``exp2`` replaces ``exp``; the stored
  log-sum-exp is in natural units (``-inf`` for a row that sees no key, whose output is 0);
- the head dim is padded to ``BLOCK_D`` (a power of two >= 16) by masked loads of zeros;
- ``MASK_KIND``: 0 = no mask, 1 = boolean keep-mask (stored as uint8), 2 = additive float mask (values
  <= -1e4 act as -inf, see ``_bias_log2``); the mask is read through its own strides, 0 on broadcast
  dims.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import load_head_tile, load_tile, store_head_tile

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
HIDDEN_BIAS: tl.constexpr = tl.constexpr(-1.0e4)  # additive-mask values at or below it act as -inf


@triton.jit
def _bias_log2(bias):
    """An additive mask tile in log2 units (float32); values <= ``HIDDEN_BIAS`` hide the key as -inf does."""
    b = bias.to(tl.float32)
    return tl.where(b <= HIDDEN_BIAS, float("-inf"), tl.maximum(b, HIDDEN_BIAS) * LOG2E)  # no overflow


@triton.jit
def _key_range(seq_k, start_m, offset, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys a query block reads: ``[0, hi)``; ``[0, full_hi)`` are visible to every row (no causal mask)."""
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + offset)
        full_hi = tl.minimum(seq_k, start_m + 1 + offset)
    else:
        hi = seq_k
        full_hi = seq_k
    return hi, full_hi


@triton.jit
def _rows(start, n, d_ok, BLOCK: tl.constexpr):
    """Rows ``start + [0, BLOCK)`` of a ``[n, HEAD_DIM]`` tensor: ``(offs, offs as int64, row mask, tile mask)``
    (``d_ok``: the head-dim mask)."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < n
    return offs, offs.to(tl.int64), ok, ok[:, None] & d_ok[None, :]


@triton.jit
def _user_mask(s, tile, tile_ok, MASK_KIND: tl.constexpr):
    """Apply the user mask (1: bool keep, 2: additive; not 0) to log2-scaled scores ``s``, in either orientation:
    ``tile`` points at the mask entry of each score, ``tile_ok`` where it exists."""
    if MASK_KIND == 1:
        keep = tl.load(tile, mask=tile_ok, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    else:
        bias = tl.load(tile, mask=tile_ok, other=0.0)
        s = s + _bias_log2(bias)
    return s


@triton.jit
def _mask_scores(
    s,
    mask_rows,
    stride_mn,
    pos_m,
    offs_n,
    row_ok,
    col_ok,
    start_n,
    full_hi,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
):
    """Apply the user mask (``mask_rows``: ``(BLOCK_M, 1)`` pointers to the block's mask rows) and, past
    ``full_hi``, the causal/bounds mask to a ``(BLOCK_M, BLOCK_N)`` tile of log2-scaled scores (``pos_m``: the
    key position of each query row)."""
    if MASK_KIND != 0:
        tile = mask_rows + offs_n.to(tl.int64)[None, :] * stride_mn
        s = _user_mask(s, tile, row_ok[:, None] & col_ok[None, :], MASK_KIND)
    if start_n + BLOCK_N > full_hi:
        ok = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= pos_m[:, None])
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _flash_attention_fwd_kernel(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    stride_q,
    stride_k,
    stride_v,
    stride_m,
    stride_o,
    num_heads,
    group,
    seq_q,
    seq_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, head); online softmax over key blocks.

    Writes ``Out [B, H, Tq, d]`` and ``Lse [B, H, Tq]`` (float32, contiguous)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    offset = seq_k - seq_q  # query row i sits at key position i + offset

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_m, offs_m64, row_ok, qd_mask = _rows(start_m, seq_q, d_ok, BLOCK_M)
    pos_m = offs_m + offset
    q = load_head_tile(Q, stride_q, b, h, offs_m64, offs_d, qd_mask)
    k_base = K + b * stride_k[0] + hk * stride_k[1]
    v_base = V + b * stride_v[0] + hk * stride_v[1]
    mask_rows = Mask + b * stride_m[0] + h * stride_m[1] + offs_m64[:, None] * stride_m[2]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi, full_hi = _key_range(seq_k, start_m, offset, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n, offs_n64, col_ok, kv_mask = _rows(start_n, seq_k, d_ok, BLOCK_N)
        k = load_tile(k_base, offs_n64, stride_k[2], offs_d, stride_k[3], kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = _mask_scores(
            s, mask_rows, stride_m[3], pos_m, offs_n, row_ok, col_ok, start_n, full_hi, BLOCK_N, CAUSAL, MASK_KIND
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_base, offs_n64, stride_v[2], offs_d, stride_v[3], kv_mask)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_use = tl.where(empty, 1.0, l_i)
    out = acc / l_use[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_use)) * LN2)
    store_head_tile(Out, stride_o, b, h, offs_m64, offs_d, out, qd_mask)
    tl.store(Lse + pid_bh * seq_q + offs_m64, lse, mask=row_ok)
