"""FastMKA's memory path in one op: session scan, route-mix and (optionally) RoPE on the mixed keys.

Math (per batch row b, kv head h, token t; ``g = h`` when ``G = Hkv``, else ``g = 0``)::

    s_k, s_v, state_k', state_v' = session_scan(k1, v1, valid, state_k, state_v, n_seen, beta)   # L2
    m_t  = lam[b,g,t,0] k1_t + lam[b,g,t,1] s_k,t (+ lam[b,g,t,2] k3_t)
    kf_t = m_t * cos_t + rotate_half(m_t) * sin_t        (kf_t = m_t without cos/sin)
    vf_t = lam[b,g,t,0] v1_t + lam[b,g,t,1] s_v,t (+ lam[b,g,t,2] v3_t)
    rotate_half(x) = cat(-x[d/2:], x[:d/2])

Shapes: ``lam: [B, G, T, L]`` with G in {1, Hkv} and L = 2 (local, session) or 3 (+ long-term k3/v3);
``k1, v1: [B, Hkv, T, d]``; ``k3, v3``: optional ``[B, Hkv, T, d]`` like k1; ``valid: [B, T]`` bool;
``state_k, state_v: [B, Hkv, d]`` float32 (float64 with float64 inputs); ``n_seen: [B]`` int64;
``cos, sin``: optional ``[B, T, d]`` (d even), the rotate-half tables at each token's real position
(:func:`rope_tables`). Returns ``kf, vf: [B, Hkv, T, d]`` in the dtype of k1 and the new states.

Precision: the scan runs in the state dtype and its output is mixed without rounding; the mix and the
rotation are accumulated in float32 (float64 for float64 inputs) and rounded once. This equals
``session_scan -> route_mix -> RoPE`` exactly in float32/float64 up to summation order; in bf16/fp16
it skips the intermediate roundings of ``s_k`` and ``kf`` (it is more accurate).

Ops: ``mka::fastmka_mix`` (CPU: :func:`reference_fastmka_mix`; CUDA: the fused Triton kernel in
:mod:`.fastmka_mix_triton`) and ``mka::fastmka_mix_backward`` (CPU: the analytic backward
:func:`reference_fastmka_mix_backward`, built from the session-scan and route-mix backwards).
"""

from __future__ import annotations

import torch

from . import _validate as check
from ._dtypes import acc_dtype as _acc_dtype
from ._grads import zeros_for_none
from .route_mix import reference_route_mix, reference_route_mix_backward
from .session_scan import check_session_scan, reference_session_scan, reference_session_scan_backward


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last axis, ``x = cat(x1, x2)``."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def rope_tables(
    pos: torch.Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin: [B, T, head_dim]`` for real positions ``pos: [B, T]``, as ``layers.rope.RotaryEmbedding``
    computes them (angles in float32, float64 for a float64 ``dtype``)."""
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    exps = torch.arange(0, head_dim, 2, dtype=torch.float64, device=pos.device) / head_dim
    inv_freq = (1.0 / base**exps).to(adt)
    ang = pos.to(adt)[..., None] * inv_freq  # (B, T, d/2)
    ang = torch.cat([ang, ang], -1)  # (B, T, d)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _levels(k1, v1, k3, v3, s_k, s_v, acc):
    ks = [k1.to(acc), s_k] + ([] if k3 is None else [k3.to(acc)])
    vs = [v1.to(acc), s_v] + ([] if v3 is None else [v3.to(acc)])
    return ks, vs


def reference_fastmka_mix(
    lam: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k3: torch.Tensor | None,
    v3: torch.Tensor | None,
    valid: torch.Tensor,
    state_k: torch.Tensor,
    state_v: torch.Tensor,
    n_seen: torch.Tensor,
    beta: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch definition (differentiable): scan, route-mix, rope; see the module docstring."""
    acc = _acc_dtype(k1)
    s_k, s_v, st_k, st_v = reference_session_scan(k1.to(acc), v1.to(acc), valid, state_k, state_v, n_seen, beta)
    ks, vs = _levels(k1, v1, k3, v3, s_k, s_v, acc)
    kf, vf = reference_route_mix(lam, ks, vs)  # (B, Hkv, T, d) in acc
    if cos is not None:
        kf = kf * cos.to(acc)[:, None] + rotate_half(kf) * sin.to(acc)[:, None]
    fmt = torch.contiguous_format
    return kf.to(k1.dtype, memory_format=fmt), vf.to(v1.dtype, memory_format=fmt), st_k, st_v


def check_fastmka_mix(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos, sin) -> None:
    check_session_scan(k1, v1, valid, state_k, state_v, n_seen, beta)
    B, H, T, d = k1.shape
    if (k3 is None) != (v3 is None):
        raise ValueError("pass both k3 and v3 (the long-term level) or neither")
    if k3 is not None:
        check.shape("k3", k3, k1.shape, "[B, Hkv, T, d] like k1")
        check.shape("v3", v3, k1.shape, "[B, Hkv, T, d] like k1")
        check.same_dtype("k1", k1, k3=k3, v3=v3)
    L = 2 if k3 is None else 3
    check.rank("lam", lam, 4, "[B, G, T, L]")
    check.floating("lam", lam)
    if lam.shape[1] not in (1, H):
        raise ValueError(f"lam has {lam.shape[1]} routing groups; use G = 1 (shared) or G = Hkv = {H}")
    check.shape("lam", lam, (B, lam.shape[1], T, L), f"[B, G, T, L] with L = {L} (local, session{', k3' * (L > 2)})")
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin (RoPE on the mixed keys) or neither")
    if cos is not None:
        if d % 2:
            raise ValueError(f"RoPE needs an even head size, got d = {d}")
        check.shape("cos", cos, (B, T, d), "[B, T, d]")
        check.shape("sin", sin, (B, T, d), "[B, T, d]")
        check.floating("cos", cos)
        check.same_dtype("cos", cos, sin=sin)
    check.same_device("k1", k1, lam=lam, k3=k3, v3=v3, cos=cos, sin=sin)


@torch.library.custom_op("mka::fastmka_mix", mutates_args=())
def _fastmka_mix_op(
    lam: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k3: torch.Tensor | None,
    v3: torch.Tensor | None,
    valid: torch.Tensor,
    state_k: torch.Tensor,
    state_v: torch.Tensor,
    n_seen: torch.Tensor,
    beta: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_fastmka_mix(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos, sin)
    return reference_fastmka_mix(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos, sin)


@_fastmka_mix_op.register_fake
def _(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos=None, sin=None):
    check_fastmka_mix(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos, sin)
    fmt = torch.contiguous_format  # kf, vf are new contiguous tensors whatever the strides of k1, v1
    e = torch.empty_like
    return e(k1, memory_format=fmt), e(v1, memory_format=fmt), e(state_k), e(state_v)


def reference_fastmka_mix_backward(
    grad_kf,
    grad_vf,
    grad_state_k,
    grad_state_v,
    lam,
    k1,
    v1,
    k3,
    v3,
    valid,
    state_k,
    state_v,
    n_seen,
    beta,
    cos,
    sin,
    rope_grad: bool,
):
    """Analytic adjoint. With ``gm = grad_kf * cos - rotate_half(grad_kf * sin)`` (RoPE transposed):
    ``dlam, dk_l, dv_l`` from the route-mix backward on ``(gm, grad_vf)``; the session level's gradients go
    through the session-scan backward into ``k1, v1`` and the states; ``dcos = sum_h grad_kf * m`` and
    ``dsin = sum_h grad_kf * rotate_half(m)`` (only with ``rope_grad``).

    Returns ``(dlam, dk1, dv1, dstate_k, dstate_v, [dk3, dv3] or [], [dcos, dsin] or [])``.
    """
    acc = _acc_dtype(k1)
    k1a, v1a = k1.to(acc), v1.to(acc)
    s_k, s_v, _, _ = reference_session_scan(k1a, v1a, valid, state_k, state_v, n_seen, beta)
    ks, vs = _levels(k1, v1, k3, v3, s_k, s_v, acc)
    gk, gv = grad_kf.to(acc), grad_vf.to(acc)
    d_rope = []
    if cos is not None:
        c, s = cos.to(acc)[:, None], sin.to(acc)[:, None]  # (B, 1, T, d)
        if rope_grad:
            m, _ = reference_route_mix(lam, ks, vs)  # (B, Hkv, T, d) the un-rotated mix
            d_rope = [(gk * m).sum(1).to(cos.dtype), (gk * rotate_half(m)).sum(1).to(sin.dtype)]
        gk = gk * c - rotate_half(gk * s)
    dlam, dks, dvs = reference_route_mix_backward(gk, gv, lam, ks, vs)
    dk_s, dv_s, dsk, dsv = reference_session_scan_backward(
        dks[1], dvs[1], grad_state_k, grad_state_v, k1a, v1a, valid, state_k, state_v, n_seen, beta
    )
    fmt = torch.contiguous_format
    dk1 = (dks[0] + dk_s).to(k1.dtype, memory_format=fmt)
    dv1 = (dvs[0] + dv_s).to(v1.dtype, memory_format=fmt)
    d_long = [] if k3 is None else [dks[2].to(k3.dtype, memory_format=fmt), dvs[2].to(v3.dtype, memory_format=fmt)]
    return dlam.contiguous(), dk1, dv1, dsk, dsv, d_long, d_rope


@torch.library.custom_op("mka::fastmka_mix_backward", mutates_args=())
def _fastmka_mix_backward_op(
    grad_kf: torch.Tensor,
    grad_vf: torch.Tensor,
    grad_state_k: torch.Tensor,
    grad_state_v: torch.Tensor,
    lam: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k3: torch.Tensor | None,
    v3: torch.Tensor | None,
    valid: torch.Tensor,
    state_k: torch.Tensor,
    state_v: torch.Tensor,
    n_seen: torch.Tensor,
    beta: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_grad: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]
]:
    return reference_fastmka_mix_backward(
        grad_kf,
        grad_vf,
        grad_state_k,
        grad_state_v,
        lam,
        k1,
        v1,
        k3,
        v3,
        valid,
        state_k,
        state_v,
        n_seen,
        beta,
        cos,
        sin,
        rope_grad,
    )


@_fastmka_mix_backward_op.register_fake
def _(
    grad_kf,
    grad_vf,
    grad_state_k,
    grad_state_v,
    lam,
    k1,
    v1,
    k3,
    v3,
    valid,
    state_k,
    state_v,
    n_seen,
    beta,
    cos,
    sin,
    rope_grad,
):
    def e(t):  # every gradient is a new contiguous tensor
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    d_long = [] if k3 is None else [e(k3), e(v3)]
    d_rope = [e(cos), e(sin)] if cos is not None and rope_grad else []
    return e(lam), e(k1), e(v1), e(state_k), e(state_v), d_long, d_rope


def _setup_context(ctx, inputs, output):
    lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos, sin = inputs
    ctx.save_for_backward(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, cos, sin)
    ctx.beta = beta


def _backward(ctx, grad_kf, grad_vf, grad_state_k, grad_state_v):
    lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, cos, sin = ctx.saved_tensors
    grads = zeros_for_none([grad_kf, grad_vf, grad_state_k, grad_state_v], [k1, v1, state_k, state_v])
    rope_grad = cos is not None and (ctx.needs_input_grad[10] or ctx.needs_input_grad[11])
    dlam, dk1, dv1, dsk, dsv, d_long, d_rope = torch.ops.mka.fastmka_mix_backward(
        *grads, lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, ctx.beta, cos, sin, rope_grad
    )
    dk3, dv3 = d_long if d_long else (None, None)
    dcos, dsin = d_rope if d_rope else (None, None)
    return dlam, dk1, dv1, dk3, dv3, None, dsk, dsv, None, None, dcos, dsin


_fastmka_mix_op.register_autograd(_backward, setup_context=_setup_context)


def fastmka_mix(
    lam: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    beta: float,
    *,
    k3: torch.Tensor | None = None,
    v3: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    state_k: torch.Tensor | None = None,
    state_v: torch.Tensor | None = None,
    n_seen: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``mka::fastmka_mix`` with defaults (all tokens valid, an empty state, no L3, no RoPE).

    ``lam: [B, G, T, L]``, ``k1, v1: [B, Hkv, T, d]`` -> ``(kf, vf, state_k, state_v)``; see the module docstring.
    """
    check.rank("k1", k1, 4, "[B, Hkv, T, d]")
    B, H, T, d = k1.shape
    sdt = torch.float64 if k1.dtype == torch.float64 else torch.float32
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=k1.device)
    if state_k is None:
        state_k = torch.zeros(B, H, d, dtype=sdt, device=k1.device)
    if state_v is None:
        state_v = torch.zeros(B, H, d, dtype=sdt, device=k1.device)
    if n_seen is None:
        n_seen = torch.zeros(B, dtype=torch.int64, device=k1.device)
    return torch.ops.mka.fastmka_mix(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, float(beta), cos, sin)
