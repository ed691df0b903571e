"""Flash attention for plain attention sites: ``out = softmax(scale * q k^T + mask) v`` per head.

Shapes::

    q:     [B, H, Tq, d]
    k, v:  [B, Hkv, Tk, d]            H % Hkv == 0: query head h reads kv head h // (H / Hkv) (GQA, MQA)
    mask:  [B or 1, H or 1, Tq, Tk]   optional; bool (True = attend) or additive float (any float dtype)
    out:   [B, H, Tq, d]              dtype of q
    lse:   [B, H, Tq]                 row log-sum-exp of the scores; float32 (float64 for float64 inputs)

Math, per head (S = scale * q k^T + mask, -inf where masked or causally hidden)::

    lse_i = log sum_j exp(S_ij),   P_ij = exp(S_ij - lse_i),   out_i = sum_j P_ij v_j
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   Delta_i = rowsum(dO * O)_i - dlse_i
    dQ = scale * dS K,   dK = scale * dS^T Q   (dK, dV summed over the query heads sharing a kv head)

Queries are the last Tq of the Tk positions (bottom-right alignment): ``causal`` lets query i see keys
``j <= i + Tk - Tq`` and needs Tq <= Tk. A row that sees no key (everything masked) outputs zeros with
lse = -inf and passes no gradient. The mask receives no gradient; lse does (``dlse`` above). Additive
mask values <= ``HIDDEN_BIAS = -1e4`` hide the key exactly like -inf: padding masks built from
``finfo.min``, -1e9 or -10000 then act as boolean masks. Rows with a visible key are unaffected (such keys
get weight exp(-1e4) = 0 in float32 anyway); a row with no visible key gives zeros. (Eager softmax would
average v over such a row, an artefact of rounding, and its lse near -3e38 would lose the log-sum that
the backward needs.)

``mka::flash_attention(q, k, v, mask, scale, causal) -> (out, lse)`` returns lse because the backward
needs it (a custom op can only save its outputs) and because level merges (MKA) combine attention
results by their log-sum-exp; :func:`flash_attention` returns ``out`` alone. Implementations: CPU =
:func:`reference_flash_attention` (float32 accumulation, float64 for float64 inputs, query blocks of
``Q_BLOCK`` rows); CUDA = the Triton launcher :func:`flash_attention_fwd` for fp16/bf16/fp32 and
d <= 256 (anything else runs the reference). ``mka::flash_attention_backward`` is the adjoint: CPU =
:func:`reference_flash_attention_backward` (analytic, recomputes P), CUDA = :func:`flash_attention_bwd`
(FlashAttention-2: a preprocess kernel for Delta, one kernel for dK/dV per key block, one for dQ per
query block). The ``@triton.jit`` kernels are in :mod:`.triton_kernels`, defined when this module is
imported (like the other families' kernels, so that all of them see the same ``TRITON_INTERPRET``);
without triton (a Linux-only dependency) every device runs the reference. CPU tensors run the kernels
in the Triton interpreter (:func:`launchable`).
"""

from __future__ import annotations

import torch

from .. import _validate as check
from .._grads import new_like
from ..declare import Backward, declare
from .plumbing import (  # noqa: F401  (re-exported for tools)
    _AS_JIT,
    _CHOSEN,
    DKDV_CONFIGS,
    DQ_CONFIGS,
    FWD_CONFIGS,
    INTERPRETER_CONFIG,
    Config,
    _mask_args,
    _scale,
    block_d,
    cdiv,
    configs_for,
    device_scope,
    dot_precision,
    launch,
    launchable,
)
from .reference import (  # noqa: F401  (re-exported: the package's public reference and constants)
    HIDDEN_BIAS,
    Q_BLOCK,
    _lse_dtype,
    reference_flash_attention,
    reference_flash_attention_backward,
)

try:  # triton is optional (Linux-only); without it the ops run the reference on every device
    from .. import _triton
    from . import triton_backward, triton_kernels
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only where triton is missing
    if _err.name != "triton":
        raise
    _triton = triton_kernels = triton_backward = None

MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # B * H (B * Hkv) programs run along grid axis 1
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------ validation


def check_mask(mask: torch.Tensor, B: int, H: int, Tq: int, Tk: int) -> None:
    layout = "[B or 1, H or 1, Tq, Tk]"
    check.rank("mask", mask, 4, layout)
    if mask.dtype != torch.bool and mask.dtype not in check.FLOAT_DTYPES:
        raise ValueError(f"mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
    b, h, tq, tk = mask.shape
    if b not in (1, B) or h not in (1, H) or (tq, tk) != (Tq, Tk):
        raise ValueError(
            f"mask must have shape {layout} = [{B} or 1, {H} or 1, {Tq}, {Tk}], got {tuple(mask.shape)}; "
            "only the batch and head dims broadcast"
        )


def check_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> None:
    check.rank("q", q, 4, "[B, H, Tq, d]")
    check.floating("q", q)
    check.rank("k", k, 4, "[B, Hkv, Tk, d]")
    check.rank("v", v, 4, "[B, Hkv, Tk, d]")
    B, H, Tq, d = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    check.heads_divide(H, Hkv, "q", "k")
    check.shape("k", k, (B, Hkv, Tk, d), "[B, Hkv, Tk, d]")
    check.shape("v", v, (B, Hkv, Tk, d), "[B, Hkv, Tk, d] like k")
    check.same_dtype("q", q, k=k, v=v)
    if Tk == 0:
        raise ValueError("k must hold at least one key position (Tk = 0)")
    if causal and Tq > Tk:
        raise ValueError(f"q has {Tq} positions but k only {Tk}; causal queries are the last Tq keys (Tq <= Tk)")
    if mask is not None:
        check_mask(mask, B, H, Tq, Tk)
    check.same_device("q", q, k=k, v=v, mask=mask)
    if not isinstance(scale, float) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")


def check_triton(q: torch.Tensor) -> None:
    """What the Triton kernels cover (the ops send anything else to the reference)."""
    if triton_kernels is None:
        raise RuntimeError("triton is not installed; the Triton launchers need it (the ops fall back to torch)")
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; the Triton kernels take float16, bfloat16 or float32")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"q has head dim {q.shape[-1]} > {MAX_HEAD_DIM}; the Triton kernels keep a head row in registers"
        )
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        raise ValueError(f"q has B * H = {q.shape[0] * q.shape[1]} > {MAX_GRID_Y} (CUDA grid y limit); split the batch")


def _triton_ok(q: torch.Tensor, *rest) -> bool:
    """The op arguments the Triton kernels cover (the ops send anything else to the reference)."""
    B, H = q.shape[:2]
    return (
        triton_kernels is not None and q.dtype in TRITON_DTYPES and q.shape[-1] <= MAX_HEAD_DIM and B * H <= MAX_GRID_Y
    )


# ----------------------------------------------------------------------------------------- launchers


def flash_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``(out [B, H, Tq, d] dtype of q, lse [B, H, Tq] float32)``, both contiguous.

    q, k, v and mask may have any strides (they reach the kernel as explicit strides; no copies).
    ``scale`` defaults to ``d ** -0.5``. Block sizes default per dtype and head dim (``FWD_CONFIGS``);
    passing any of them pins one config. CPU tensors run the Triton interpreter."""
    scale = _scale(q, scale)
    check_flash_attention(q, k, v, mask, scale, causal)
    check_triton(q)
    B, H, Tq, d = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = q.new_empty(B, H, Tq, d)  # (B, H, Tq, d)
    lse = q.new_empty(B, H, Tq, dtype=torch.float32)  # (B, H, Tq)
    if B * H * Tq == 0:
        return out, lse
    kind, mask_t, mask_strides = _mask_args(mask, q, B, H, Tq, Tk)
    bd = block_d(d)
    configs, cacheable = configs_for(FWD_CONFIGS, q, bd, block_m, block_n, num_warps, num_stages)
    precision = dot_precision(q)
    args = (q, k, v, mask_t, out, lse, q.stride(), k.stride(), v.stride(), mask_strides, out.stride())
    args += (H, H // Hkv, Tq, Tk, scale * LOG2E)
    consts = dict(HEAD_DIM=d, BLOCK_D=bd, CAUSAL=bool(causal), MASK_KIND=kind, DOT_PRECISION=precision)
    key = ("fwd", q.device, q.dtype, d, bool(causal), kind, precision) if cacheable else None
    with device_scope(q):
        launch(
            triton_kernels._flash_attention_fwd_kernel,
            q,
            lambda bm, bn: (cdiv(Tq, bm), B * H),
            args,
            consts,
            configs,
            key,
        )
    return out, lse


def flash_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    *,
    grad_lse: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: ``(dq [B, H, Tq, d], dk [B, Hkv, Tk, d], dv [B, Hkv, Tk, d])`` in the input dtype.

    ``out`` and ``lse`` are the forward's outputs; ``grad_lse`` (optional, ``[B, H, Tq]``) is the gradient
    of lse. Three launches: Delta = rowsum(dO * O) - dlse, then dK/dV (grid: key blocks x B*Hkv; each
    program loops over the query heads of its GQA group), then dQ (grid: query blocks x B*H). Block-size
    overrides apply to both the dK/dV and the dQ kernel."""
    scale = _scale(q, scale)
    check_flash_attention(q, k, v, mask, scale, causal)
    check_triton(q)
    B, H, Tq, d = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    check.shape("grad_out", grad_out, q.shape, "[B, H, Tq, d] like q")
    check.shape("out", out, q.shape, "[B, H, Tq, d] like q")
    check.shape("lse", lse, (B, H, Tq), "[B, H, Tq]")
    if grad_lse is not None:
        check.shape("grad_lse", grad_lse, (B, H, Tq), "[B, H, Tq] like lse")
    dq = q.new_empty(B, H, Tq, d)  # (B, H, Tq, d)
    dk = k.new_empty(B, Hkv, Tk, d)  # (B, Hkv, Tk, d)
    dv = v.new_empty(B, Hkv, Tk, d)
    if B * H * Tq == 0:
        return dq, dk.zero_(), dv.zero_()
    grad_out = grad_out.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()  # the kernels index lse and delta as contiguous [B, H, Tq]
    delta = torch.empty_like(lse)
    g_lse = delta if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    kind, mask_t, mask_strides = _mask_args(mask, q, B, H, Tq, Tk)
    bd = block_d(d)
    precision = dot_precision(q)
    flags = dict(HEAD_DIM=d, BLOCK_D=bd, CAUSAL=bool(causal), MASK_KIND=kind, DOT_PRECISION=precision)
    key = (q.device, q.dtype, d, bool(causal), kind, precision)
    tk = triton_backward
    with device_scope(q):
        pre_m = max(16, min(128, 4096 // bd))
        launchable(tk._flash_attention_bwd_preprocess, q.device)[(cdiv(Tq, pre_m), B * H)](
            out,
            grad_out,
            g_lse,
            delta,
            out.stride(),
            grad_out.stride(),
            H,
            Tq,
            HEAD_DIM=d,
            BLOCK_D=bd,
            BLOCK_M=pre_m,
            HAS_DLSE=grad_lse is not None,
            num_warps=4,
        )
        common = (q.stride(), k.stride(), v.stride(), mask_strides, grad_out.stride())
        configs, cacheable = configs_for(DKDV_CONFIGS, q, bd, block_m, block_n, num_warps, num_stages)
        launch(
            tk._flash_attention_bwd_dkdv_kernel,
            q,
            lambda bm, bn: (cdiv(Tk, bn), B * Hkv),
            (q, k, v, mask_t, grad_out, lse, delta, dk, dv, *common, dk.stride(), dv.stride())
            + (Hkv, H // Hkv, Tq, Tk, scale * LOG2E, scale),
            flags,
            configs,
            ("dkdv", *key) if cacheable else None,
        )
        configs, cacheable = configs_for(DQ_CONFIGS, q, bd, block_m, block_n, num_warps, num_stages)
        launch(
            tk._flash_attention_bwd_dq_kernel,
            q,
            lambda bm, bn: (cdiv(Tq, bm), B * H),
            (q, k, v, mask_t, grad_out, lse, delta, dq, *common, dq.stride())
            + (H, H // Hkv, Tq, Tk, scale * LOG2E, scale),
            flags,
            configs,
            ("dq", *key) if cacheable else None,
        )
    return dq, dk, dv


# -------------------------------------------------------------------------------------------------- ops


def _reference_backward(grad_out, grad_lse, q, k, v, mask, out, lse, scale, causal):
    """``mka::flash_attention_backward`` on the CPU: the reference recomputes what it needs of ``out, lse``."""
    return reference_flash_attention_backward(grad_out, grad_lse, q, k, v, mask, scale, causal)


FLASH_ATTENTION = declare(
    "mka::flash_attention",
    reference_flash_attention,
    check=check_flash_attention,
    fake=lambda q, *rest: (new_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))),
    backward=Backward(
        _reference_backward,
        outputs=("out", "lse"),
        wrt=("q", "k", "v"),
        params=("grad_out", "grad_lse", "q", "k", "v", "mask", "out", "lse", "scale", "causal"),
        optional_grads=("lse",),  # the backward takes ``Tensor? grad_lse``
    ),
)
_flash_attention_cuda = FLASH_ATTENTION.implement_cuda(flash_attention_fwd, supported=_triton_ok)


@FLASH_ATTENTION.backward.implement_cuda(supported=lambda grad_out, grad_lse, q, *rest: _triton_ok(q))
def _flash_attention_backward_cuda(grad_out, grad_lse, q, k, v, mask, out, lse, scale, causal):
    return flash_attention_bwd(grad_out, q, k, v, out, lse, mask, scale, causal, grad_lse=grad_lse)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``mka::flash_attention`` with ``scale = d ** -0.5`` by default; returns ``out`` (and lse if asked)."""
    check.rank("q", q, 4, "[B, H, Tq, d]")
    out, lse = torch.ops.mka.flash_attention(q, k, v, mask, _scale(q, scale), bool(causal))
    return (out, lse) if return_lse else out
