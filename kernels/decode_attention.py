"""Split-K decode attention: a few query tokens (Tq = 1 .. a few) against a long KV cache.

Shapes::

    q:        [B, H, Tq, d]
    k, v:     [B, Hkv, Tk, d]     H % Hkv == 0 (GQA / MQA, K/V never repeated)
    kv_valid: [B, Tk] bool        optional; False = padded key
    out:      [B, H, Tq, d]       dtype of q
    lse:      [B, H, Tq]          float32 (float64 for float64 inputs)

Same semantics as ``mka::flash_attention`` with ``mask = kv_valid[:, None, None, :]``: queries are the
last Tq positions (``causal``: query i sees keys ``j <= i + Tk - Tq``), a row with no visible key gives
zeros and lse = -inf.

With one query per head a flash kernel would run B*H programs that each stream the whole cache. Split-K
instead cuts the keys into S splits of ``split_len`` keys (a multiple of BLOCK_N):

1. ``_decode_attention_split_kernel`` (grid S x B*Hkv x row blocks): the ``group * Tq`` query rows that
   share a kv head are packed into one tile, so each K/V tile is read once per GQA group; online softmax
   over the split gives a normalised partial output ``o_s`` and its log-sum-exp ``lse_s`` (float32).
2. ``_decode_attention_merge_kernel`` (grid B*H*Tq): ``lse = log sum_s exp(lse_s)``,
   ``out = sum_s exp(lse_s - lse) o_s``.

Launcher: :func:`decode_attention_fwd`. ``mka::decode_attention(q, k, v, kv_valid, scale, causal) ->
(out, lse)``: CPU = :func:`reference_decode_attention`, CUDA = the launcher (fp16/bf16/fp32, d <= 256;
anything else runs the reference). Inference only: the op has no backward (it raises); train with
``mka::flash_attention``.
"""

from __future__ import annotations

import torch

from . import _validate as check
from .flash_attention import (
    LOG2E,
    _lse_dtype,
    _scale,
    _triton_ok,
    block_d,
    cdiv,
    check_flash_attention,
    check_triton,
    decode_kernels,
    device_scope,
    dot_precision,
    launch,
    launchable,
    reference_flash_attention,
)

try:  # triton is optional (Linux-only); without it the op runs the reference on every device
    from . import _triton
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only where triton is missing
    if _err.name != "triton":
        raise
    _triton = None

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (element size, padded head dim); BLOCK_M is replaced by the
# packed row count (16 .. 64). Tried in order until one fits the GPU.
DECODE_CONFIGS: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {
    (2, 64): [(16, 64, 4, 3), (16, 32, 4, 2), (16, 16, 4, 1)],
    (2, 128): [(16, 64, 4, 3), (16, 32, 4, 2), (16, 16, 4, 1)],
    (2, 256): [(16, 32, 4, 2), (16, 16, 4, 1)],
    (4, 64): [(16, 64, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    (4, 128): [(16, 32, 4, 2), (16, 16, 4, 1)],
    (4, 256): [(16, 32, 4, 1), (16, 16, 4, 1)],
}
INTERPRETER_BLOCK_N = 32
MAX_SPLITS = 256
MERGE_BLOCK_S = 16


def reference_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch definition of ``mka::decode_attention``: ``(out, lse)``."""
    B, _, Tq, _ = q.shape
    Tk = k.shape[2]
    mask = None if kv_valid is None else kv_valid[:, None, None, :].expand(B, 1, Tq, Tk)  # (B, 1, Tq, Tk)
    return reference_flash_attention(q, k, v, mask, scale, causal)


def check_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None, scale: float, causal: bool
) -> None:
    check_flash_attention(q, k, v, None, scale, causal)
    if kv_valid is not None:
        check.rank("kv_valid", kv_valid, 2, "[B, Tk]")
        check.shape("kv_valid", kv_valid, (q.shape[0], k.shape[2]), "[B, Tk]")
        check.dtype("kv_valid", kv_valid, torch.bool, " (True = real key)")
        check.same_device("q", q, kv_valid=kv_valid)


def _num_splits(x: torch.Tensor, programs: int, tk: int, block_n: int) -> int:
    """Enough splits for about eight programs per SM (CPU: up to 4), at least one key block per split
    (H200 sweep, B=4 Hkv=32 T=8192: 8+ splits 0.198 ms vs 3 splits 0.241 ms)."""
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        want = cdiv(8 * sms, programs)
    else:
        want = 4
    return max(1, min(want, cdiv(tk, block_n), MAX_SPLITS))


def decode_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_valid: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    *,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton split-K decode: ``(out [B, H, Tq, d] dtype of q, lse [B, H, Tq] float32)``, both contiguous.

    q, k, v, kv_valid may have any strides. ``num_splits`` defaults to about two programs per SM, at most
    one split per key block (the split length is rounded up to a multiple of BLOCK_N, so fewer splits may
    run). ``block_m`` (packed rows per program) defaults to ``group * Tq`` rounded to a power of two in
    [16, 64]. CPU tensors run the Triton interpreter."""
    scale = _scale(q, scale)
    check_decode_attention(q, k, v, kv_valid, scale, causal)
    check_triton(q)
    if num_splits is not None:
        check.positive_int("num_splits", num_splits)
    B, H, Tq, d = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    out = q.new_empty(B, H, Tq, d)  # (B, H, Tq, d)
    lse = q.new_empty(B, H, Tq, dtype=torch.float32)  # (B, H, Tq)
    if B * H * Tq == 0:
        return out, lse
    bd = block_d(d)
    if q.device.type == "cpu":
        configs = [(16, INTERPRETER_BLOCK_N, 1, 1)]
    else:
        configs = DECODE_CONFIGS[(2 if q.element_size() == 2 else 4, max(64, bd))]
    bm = block_m or _triton.pow2(group * Tq, lo=16, hi=64)
    pinned = block_m is not None or block_n is not None or num_warps is not None or num_stages is not None
    if pinned:
        _, bn0, w0, st0 = configs[0]
        configs = [(bm, block_n or bn0, num_warps or w0, num_stages or st0)]
    configs = [(bm, bn, w, st) for _, bn, w, st in configs]
    row_blocks = cdiv(group * Tq, bm)
    bn = configs[0][1]
    splits = num_splits or _num_splits(q, B * Hkv * row_blocks, Tk, bn)
    split_len = cdiv(cdiv(Tk, splits), bn) * bn
    splits = cdiv(Tk, split_len)  # S: no empty trailing split
    part_out = torch.empty(B, H, Tq, splits, d, dtype=torch.float32, device=q.device)  # (B, H, Tq, S, d)
    part_lse = torch.empty(B, H, Tq, splits, dtype=torch.float32, device=q.device)  # (B, H, Tq, S)
    if kv_valid is None:
        valid, valid_strides = q, (0, 0)
    else:
        valid, valid_strides = _triton.as_bytes(kv_valid), kv_valid.stride()
    precision = dot_precision(q)
    args = (q, k, v, valid, part_out, part_lse, *q.stride(), *k.stride(), *v.stride(), *valid_strides)
    args += (Hkv, group, Tq, Tk, split_len, splits, scale * LOG2E)
    consts = dict(HEAD_DIM=d, BLOCK_D=bd, CAUSAL=bool(causal), HAS_VALID=kv_valid is not None, DOT_PRECISION=precision)
    key = None if pinned or q.device.type == "cpu" else ("decode", q.device, q.dtype, d, bm, bool(causal), precision)
    with device_scope(q):
        launch(
            decode_kernels._decode_attention_split_kernel,
            q,
            lambda bm_, bn_: (splits, B * Hkv, row_blocks),
            args,
            consts,
            configs,
            key,
        )
        launchable(decode_kernels._decode_attention_merge_kernel, q.device)[(B * H * Tq,)](
            part_out,
            part_lse,
            out,
            lse,
            *out.stride(),
            H,
            Tq,
            splits,
            HEAD_DIM=d,
            BLOCK_D=bd,
            BLOCK_S=_triton.pow2(splits, lo=2, hi=MERGE_BLOCK_S),
            num_warps=4,
        )
    return out, lse


@torch.library.custom_op("mka::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    check_decode_attention(q, k, v, kv_valid, scale, causal)
    return reference_decode_attention(q, k, v, kv_valid, scale, causal)


@_decode_attention_op.register_kernel("cuda")
def _(q, k, v, kv_valid, scale, causal):
    check_decode_attention(q, k, v, kv_valid, scale, causal)
    if not _triton_ok(q):
        return reference_decode_attention(q, k, v, kv_valid, scale, causal)
    return decode_attention_fwd(q, k, v, kv_valid, scale, causal)


@_decode_attention_op.register_fake
def _(q, k, v, kv_valid, scale, causal):
    check_decode_attention(q, k, v, kv_valid, scale, causal)
    B, H, Tq, d = q.shape
    return q.new_empty(B, H, Tq, d), q.new_empty(B, H, Tq, dtype=_lse_dtype(q))


def _no_backward(ctx, grad_out, grad_lse):
    raise RuntimeError("mka::decode_attention is inference-only (no backward); train with mka::flash_attention")


_decode_attention_op.register_autograd(_no_backward)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``mka::decode_attention`` with ``scale = d ** -0.5`` by default; returns ``out`` (and lse if asked)."""
    check.rank("q", q, 4, "[B, H, Tq, d]")
    out, lse = torch.ops.mka.decode_attention(q, k, v, kv_valid, _scale(q, scale), bool(causal))
    return (out, lse) if return_lse else out
