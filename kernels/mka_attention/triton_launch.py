"""Triton kernels for ``mka::mka_attention`` and ``mka::mka_attention_backward`` (the CUDA implementation).

Semantics are those of :func:`.reference.reference_mka_attention`. For query row ``i`` of head
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
interpreter, see :mod:`._triton`). Importing this module registers them for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton

from .._triton import as_bytes, for_device, pow2
from .reference import MKA_ATTENTION, check_mka_attention
from .triton_backward import _mka_attention_bwd_dkdv_kernel, _mka_attention_bwd_dq_kernel
from .triton_kernels import _LOG2E_F, _mka_attention_fwd_kernel

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _config(d_pad: int, tq: int, block_m, block_n, num_warps, num_stages) -> tuple[int, int, int, int]:
    """Tile sizes: untuned guesses for a Hopper/Ampere-class GPU (two float32 accumulators per program in
    the forward), query tiles no taller than the queries (decode); every value can be overridden."""
    if d_pad <= 64:
        bm, bn, nw, ns = 64, 64, 4, 3
    elif d_pad <= 128:
        bm, bn, nw, ns = 64, 32, 4, 3  # H200 sweep (bf16, T=8192): best of 9 tiles
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


def _common(args: tuple, tiles):
    """Argument checks and preparation shared by the forward and the backward launchers (``args``: the op's)."""
    check_mka_attention(*args)
    q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal = args
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
            q.stride(),
            k1.stride(),
            v1.stride(),
            k2.stride(),
            v2.stride(),
            _lam_strides(lam),
            q3.stride(),
            mk.stride(),
            mv.stride(),
            idx_strides,
            found_strides,
            kv_valid.stride(),
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


def _run_fwd(args: tuple, go, store_levels, cfg):
    """Launch the forward kernel on the op's ``args`` (``go`` given: ``BWD_PREP`` mode). Returns ``(out, lse,
    levels, dot)``."""
    q, _, _, lam, q3, *_, scale, causal = args
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
        *cfg["strides"], out.stride(), go_t.stride(),
        H, H // Hkv, Tq, Tk, S, R, d, nlvl, float(scale) * _LOG2E_F,
        CAUSAL=bool(causal), STORE_LEVELS=bool(store_levels), BWD_PREP=prep,
        **cfg["meta"], **cfg["launch"],
    )  # fmt: skip
    return (None if prep else out), lse, (levels if store_levels else None), (dot if prep else None)


def mka_attention_fwd(
    *args,
    store_levels: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward of ``mka::mka_attention`` in one Triton pass: ``args`` are the op's (``q, ks, vs, lam, q3, mem_k,
    mem_v, idx3, found3, kv_valid, scale, causal``, typed by :func:`reference_mka_attention`; any strides).

    Returns ``out: [B, H, Tq, d]`` (dtype of q), ``lse: [B, H, L, Tq]`` float32 (natural log, per level, -inf
    where a level has nothing to attend) and, with ``store_levels``, ``levels: [B, H, L, Tq, d]`` float32 (each
    level's own output, for :func:`mka_attention_bwd` to skip its recompute), else None.
    ``L = len(ks) + (R > 0)``.
    """
    cfg = _common(args, (block_m, block_n, num_warps, num_stages))
    q = args[0]
    cfg["meta"].update(_dot_meta(q, allow_tf32))
    B, H, Tq, d, Hkv, Tk, nf, R, S = cfg["dims"]
    if q.numel() == 0:
        nlvl = nf + (R > 0)
        lse = q.new_full((B, H, nlvl, Tq), float("-inf"), dtype=torch.float32)
        return torch.empty_like(q), lse, (q.new_zeros(B, H, nlvl, Tq, d, dtype=torch.float32) if store_levels else None)
    out, lse, levels, _ = _run_fwd(args, None, store_levels, cfg)
    return out, lse, levels


def mka_attention_bwd(
    grad_out: torch.Tensor,
    *args,
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
    """Backward of ``mka::mka_attention`` (``grad_out: [B, H, Tq, d]``, then the op's ``args``); returns what
    :func:`reference_mka_attention_backward` returns: ``dq, dks, dvs, dlam, dq3, dmem_k, dmem_v``.

    With ``lse`` and ``levels`` from ``mka_attention_fwd(..., store_levels=True)`` the per-level dots come
    from the stored outputs; without them one forward-like pass (``BWD_PREP``) recomputes ``lse`` and the
    dots. Then one dq kernel (+ L3 gradients) and one dk/dv kernel per full-length level run.
    """
    cfg = _common(args, (block_m, block_n, num_warps, num_stages))
    q, ks, vs, lam, q3, mem_k, mem_v, idx3, found3, kv_valid, scale, causal = args
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
        _, lse, _, dot = _run_fwd(args, grad_out, False, cfg)
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
        *cfg["strides"], grad_out.stride(), dq.stride(), dq3.stride(),
        (dmk.stride() if has_l3 else (0, 0, 0, 0)),
        H, rep, Tq, Tk, S, R, d, nlvl, scale, scale * _LOG2E_F,
        CAUSAL=bool(causal), **meta, **launch,
    )  # fmt: skip
    if Tk > 0:
        grid = (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)
        for lvl in range(nf):
            k, v = cfg["tensors"][2 * lvl], cfg["tensors"][2 * lvl + 1]
            for_device(_mka_attention_bwd_dkdv_kernel, q.device)[grid](
                q, k, v, lam, valid, grad_out, lse, dot, dks[lvl], dvs[lvl],
                q.stride(), k.stride(), v.stride(), _lam_strides(lam), kv_valid.stride(), grad_out.stride(),
                dks[lvl].stride(), dvs[lvl].stride(),
                H, Hkv, rep, Tq, Tk, d, nlvl, lvl, scale, scale * _LOG2E_F,
                CAUSAL=bool(causal), BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"], BLOCK_D=meta["BLOCK_D"],
                DOT_PRECISION=meta["DOT_PRECISION"], DOT_UPCAST=meta["DOT_UPCAST"], **launch,
            )  # fmt: skip
    dmem_k = torch.empty_like(mem_k).copy_(dmk) if has_l3 else torch.zeros_like(mem_k)  # layout of mem_k
    dmem_v = torch.empty_like(mem_v).copy_(dmv) if has_l3 else torch.zeros_like(mem_v)
    return dq, dks, dvs, dlam, dq3, dmem_k, dmem_v


# ---------------------------------------------------------------------------------------- registration


def _triton_ok(q, ks, vs, lam, q3, mem_k, *rest) -> bool:
    """Cases the kernels cover (the op's arguments); anything else (float64, d > 256, more levels) runs the
    reference."""
    dtypes = (q.dtype, lam.dtype, q3.dtype, mem_k.dtype)
    return all(t in _SUPPORTED for t in dtypes) and q.shape[-1] <= MAX_HEAD_DIM and len(ks) in (1, 2)


@MKA_ATTENTION.implement_cuda(supported=_triton_ok, check=False)  # the launchers check their arguments
def _mka_attention_cuda(*args):
    return mka_attention_fwd(*args)[0]


_mka_attention_backward_cuda = MKA_ATTENTION.backward.implement_cuda(
    mka_attention_bwd, supported=lambda grad_out, *args: _triton_ok(*args)
)
