"""Triton kernels for ``mka::fastmka_mix`` and ``mka::fastmka_mix_backward`` (the CUDA implementations).

Forward, one pass over the keys and values (see :mod:`.fastmka_mix` for the definition)::

    s_t  = a_t s_{t-1} + (1 - a_t) k1_t                      (session scan, in registers)
    m_t  = lam_0 k1_t + lam_1 s_t (+ lam_2 k3_t)             (route-mix)
    kf_t = m_t cos_t + rotate_half(m_t) sin_t                 (RoPE, optional)

Backward (``gm = gkf cos - rotate_half(gkf sin)`` is RoPE transposed)::

    dlam_l = sum_d gm k_l + gvf v_l       (k_1 = s, summed over heads too when G = 1)
    dk3 = lam_2 gm,  dk1 = lam_0 gm + (1 - a_t) mu_t,  mu_t = lam_1 gm_t + a_{t+1} mu_{t+1}  (reverse scan,
    mu_{T-1} gets + g_state),  dstate = a_0 mu_0,  dcos = sum_h gkf m,  dsin = sum_h gkf rotate_half(m)

Layout: one program per (batch, kv head, block of BLOCK_H feature *pairs*). A program holds the feature
columns ``j`` and ``j + HALF`` of each pair as a ``[BLOCK_T, 2, BLOCK_H]`` tile, so rotate-half is a
swap along the middle axis, done in registers (HALF = d / 2 with RoPE, ceil(d / 2) without). T is
walked in tiles of BLOCK_T tokens (the backward from the end); inside a tile the recurrence is solved by
``tl.associative_scan`` and the state is carried between tiles in registers (as in
:mod:`.session_scan_triton`). The backward first recomputes ``s_k, s_v`` in the state dtype with
:func:`.session_scan_triton.session_scan_fwd`, then runs one reverse kernel; the reductions over d
(``dlam``) and over heads (``dlam`` for G = 1, ``dcos``, ``dsin``) finish with a small torch sum over
per-program partials.

Arithmetic is in the state dtype (float32; float64 for float64 states); ``kf, vf, dk*, dv*`` are
rounded once to the activation dtype. ``beta`` reaches the kernels as a float32 scalar.
"""

from __future__ import annotations

import torch
import triton

from ._triton import as_bytes, for_device, pow2
from .fastmka_mix import check_fastmka_mix
from .fastmka_mix_triton_kernels import _fastmka_mix_bwd_kernel, _fastmka_mix_fwd_kernel
from .session_scan_triton import session_scan_fwd


def _pairs(D: int, rope: bool) -> int:
    return D // 2 if rope else (D + 1) // 2


def _lam_strides(lam: torch.Tensor) -> tuple[int, int, int, int]:
    sb, sg, st, sl = lam.stride()
    return sb, (sg if lam.shape[1] > 1 else 0), st, sl


def fastmka_mix_fwd(
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
    *,
    BLOCK_T: int | None = None,
    BLOCK_H: int | None = None,
    num_warps: int = 2,  # H200 sweep (bf16, T=8192, d=128): 2 warps 1.06 ms vs 4 warps 2.27 ms
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused scan + route-mix (+ RoPE): ``lam: [B, G, T, L]``, ``k1, v1, k3?, v3?: [B, H, T, d]`` (any
    strides), ``valid: [B, T]``, ``state_k, state_v: [B, H, d]``, ``n_seen: [B]``, ``cos?, sin?: [B, T, d]``
    -> ``(kf, vf, state_k, state_v)`` (``kf, vf`` new contiguous tensors in ``k1.dtype``). No argument checks.
    """
    B, H, T, D = k1.shape
    rope = cos is not None
    half = _pairs(D, rope)
    kf = torch.empty(B, H, T, D, dtype=k1.dtype, device=k1.device)  # (B, H, T, d)
    vf = torch.empty_like(kf)
    st_k = torch.empty(B, H, D, dtype=state_k.dtype, device=k1.device)  # (B, H, d)
    st_v = torch.empty_like(st_k)
    k3_, v3_ = (k1, v1) if k3 is None else (k3, v3)
    cos_, sin_ = (state_k, state_k) if cos is None else (cos, sin)
    bt = BLOCK_T or pow2(T, 16, 32)
    bh = BLOCK_H or pow2(half, 1, 16)
    grid = (B * H, triton.cdiv(half, bh))
    for_device(_fastmka_mix_fwd_kernel, k1.device)[grid](
        lam,
        k1,
        v1,
        k3_,
        v3_,
        as_bytes(valid).contiguous(),
        n_seen.contiguous(),
        state_k.contiguous(),
        state_v.contiguous(),
        cos_,
        sin_,
        kf,
        vf,
        st_k,
        st_v,
        float(beta),
        T,
        D,
        H,
        half,
        *_lam_strides(lam),
        *k1.stride(),
        *v1.stride(),
        *k3_.stride(),
        *v3_.stride(),
        *(cos.stride() if rope else (0, 0, 0)),
        *(sin.stride() if rope else (0, 0, 0)),
        *kf.stride(),
        HAS_K3=k3 is not None,
        ROPE=rope,
        BLOCK_T=bt,
        BLOCK_H=bh,
        num_warps=num_warps,
    )
    return kf, vf, st_k, st_v


def fastmka_mix_bwd(
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
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rope_grad: bool = False,
    *,
    BLOCK_T: int | None = None,
    BLOCK_H: int | None = None,
    num_warps: int = 4,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]
]:
    """Backward of :func:`fastmka_mix_fwd`: gradients ``[B, H, T, d]`` / ``[B, H, d]`` (any strides) ->
    ``(dlam, dk1, dv1, dstate_k, dstate_v, [dk3, dv3] or [], [dcos, dsin] or [])`` as
    :func:`.fastmka_mix.reference_fastmka_mix_backward` returns them."""
    B, H, T, D = k1.shape
    G, L = lam.shape[1], lam.shape[3]
    rope = cos is not None
    rope_grad = rope and rope_grad
    half = _pairs(D, rope)
    sdt = state_k.dtype
    dev = k1.device
    bt = BLOCK_T or pow2(T, 16, 16)
    bh = BLOCK_H or pow2(half, 1, 16)
    ndb = triton.cdiv(half, bh)
    # the session level, recomputed in the state dtype (not rounded to the activation dtype)
    sk, sv, _, _ = session_scan_fwd(k1, v1, valid, state_k, state_v, n_seen, beta, out_dtype=sdt)
    dk1 = torch.empty(B, H, T, D, dtype=k1.dtype, device=dev)  # (B, H, T, d)
    dv1 = torch.empty_like(dk1)
    dk3 = torch.empty_like(dk1) if k3 is not None else dk1
    dv3 = torch.empty_like(dk1) if k3 is not None else dv1
    dsk = torch.empty(B, H, D, dtype=sdt, device=dev)  # (B, H, d)
    dsv = torch.empty_like(dsk)
    dlam = torch.empty(B, H, ndb, T, L, dtype=sdt, device=dev)  # (B, H, NDB, T, L) partial sums
    dcos = torch.empty(B, H, T, D, dtype=sdt, device=dev) if rope_grad else dsk  # (B, H, T, d) per head
    dsin = torch.empty_like(dcos) if rope_grad else dsv
    k3_, v3_ = (k1, v1) if k3 is None else (k3, v3)
    cos_, sin_ = (state_k, state_k) if cos is None else (cos, sin)
    for_device(_fastmka_mix_bwd_kernel, dev)[(B * H, ndb)](
        grad_kf,
        grad_vf,
        grad_state_k.contiguous(),
        grad_state_v.contiguous(),
        lam,
        k1,
        v1,
        k3_,
        v3_,
        sk,
        sv,
        as_bytes(valid).contiguous(),
        n_seen.contiguous(),
        cos_,
        sin_,
        dk1,
        dv1,
        dk3,
        dv3,
        dsk,
        dsv,
        dlam,
        dcos,
        dsin,
        float(beta),
        T,
        D,
        H,
        half,
        ndb,
        *grad_kf.stride(),
        *grad_vf.stride(),
        *_lam_strides(lam),
        *k1.stride(),
        *v1.stride(),
        *k3_.stride(),
        *v3_.stride(),
        *(cos.stride() if rope else (0, 0, 0)),
        *(sin.stride() if rope else (0, 0, 0)),
        HAS_K3=k3 is not None,
        ROPE=rope,
        ROPE_GRAD=rope_grad,
        L=L,
        BLOCK_T=bt,
        BLOCK_H=bh,
        num_warps=num_warps,
    )
    dlam = dlam.sum(2)  # (B, H, T, L)
    dlam = (dlam.sum(1, keepdim=True) if G == 1 else dlam).to(lam.dtype)  # (B, G, T, L)
    d_long = [dk3, dv3] if k3 is not None else []
    d_rope = [dcos.sum(1).to(cos.dtype), dsin.sum(1).to(sin.dtype)] if rope_grad else []
    return dlam, dk1, dv1, dsk, dsv, d_long, d_rope


# -- CUDA implementations of the ops --------------------------------------------------------------------


def _fastmka_mix_cuda(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos=None, sin=None):
    check_fastmka_mix(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos, sin)
    return fastmka_mix_fwd(lam, k1, v1, k3, v3, valid, state_k, state_v, n_seen, beta, cos, sin)


torch.library.register_kernel("mka::fastmka_mix", "cuda", _fastmka_mix_cuda)
# the launcher takes the op's arguments in the op's order
torch.library.register_kernel("mka::fastmka_mix_backward", "cuda", fastmka_mix_bwd)
