"""L2 session memory: a causal exponential moving average of keys and values, carried across calls.

Math (per batch row b, kv head h, feature i; ``a_t`` depends only on b and t)::

    s_t = a_t * s_{t-1} + (1 - a_t) * k_t
    a_t = 1     if token t is padding      (the state is left untouched)
    a_t = 0     if t is the first real token the state ever sees (n_seen == 0): s_t = k_t
    a_t = beta  otherwise

Starting from the first token (rather than from zeros) makes the weights of every state sum to one,
so the EMA of ``x W + b`` equals the EMA of ``x`` projected by ``W`` plus ``b``: mixing in K/V space
equals projecting the mixed hidden state, biases included.

Shapes: ``k, v: [B, Hkv, T, d]``; ``valid: [B, T]`` bool; ``state_k, state_v: [B, Hkv, d]`` float32
(float64 with float64 inputs); ``n_seen: [B]`` int64, real tokens seen before this call.
Returns ``s_k, s_v: [B, Hkv, T, d]`` in the activation dtype and the new states (state dtype).

The reference is a two-level chunked scan (intra-chunk decay matrices, then a scan over chunk
carries), computed in the state dtype with float64 log-decays; no Python loop over T. Keys and values
of all heads run as one ``[B, T, Hkv * 2d]`` scan (the decays depend only on b and t).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import _validate as check
from .._grads import new_like
from ..declare import Backward, declare

SCAN_CHUNK = 16
_LOG_ZERO = -1.0e4  # log of a zero decay: exp() of anything that includes it is exactly 0


def decay_factors(valid: torch.Tensor, n_seen: torch.Tensor, beta: float) -> torch.Tensor:
    """``a: [B, T]`` float64 per the definition above."""
    first = valid & (n_seen[:, None] == 0) & (valid.cumsum(-1) == 1)
    a = torch.full(valid.shape, float(beta), dtype=torch.float64, device=valid.device)
    a = torch.where(valid, a, torch.ones_like(a))
    return torch.where(first, torch.zeros_like(a), a)


def _scan_plan(a: torch.Tensor, u: torch.Tensor, chunk: int, cdt: torch.dtype):
    """The decay matrices of :func:`scan_tokens` for ``a, u: [B, T]`` (they depend only on the decays):
    ``intra: [B, n, C, C]`` (weight of x_j in h_t inside a chunk, ``u`` folded in), ``carry_w: [B, n, n]``
    (weight of chunk j's end state in the state entering chunk m), ``h0_w: [B, n]`` (weight of the initial
    state entering chunk m) and ``into: [B, n, C]`` (decay from chunk start to t), all in ``cdt``."""
    B, T = a.shape
    cs_len = max(1, min(chunk, T))
    n = math.ceil(T / cs_len)
    pad = n * cs_len - T
    la = torch.where(a > 0, torch.log(a.clamp_min(1e-300)), _LOG_ZERO)
    if pad:
        la = F.pad(la, (0, pad))
        u = F.pad(u, (0, pad))
    cs = la.cumsum(-1).view(B, n, cs_len)  # (B, n, C) cumulative log-decay
    tri = torch.ones(cs_len, cs_len, dtype=torch.bool, device=a.device).tril()
    diff = (cs[..., :, None] - cs[..., None, :]).masked_fill(~tri, -math.inf)
    intra = (torch.exp(diff) * u.view(B, n, 1, cs_len)).to(cdt)  # (B, n, C, C)
    ends = cs[..., -1]  # (B, n)
    starts = F.pad(ends[:, :-1], (1, 0))  # cumulative log-decay before chunk m
    m_idx = torch.arange(n, device=a.device)
    lower = m_idx[None, :] < m_idx[:, None]  # (m, j): j < m
    carry_w = torch.exp((starts[:, :, None] - ends[:, None, :]).masked_fill(~lower, -math.inf)).to(cdt)
    return intra, carry_w, torch.exp(starts).to(cdt), torch.exp(cs - starts[..., None]).to(cdt)


@functools.lru_cache(maxsize=32)
def _fresh_plan(T: int, beta: float, chunk: int, cdt: torch.dtype, device: torch.device, reverse: bool = False):
    """:func:`_scan_plan` (batch 1, broadcast over rows) of a first call without padding: ``a = (0, beta, ...)``,
    ``u = 1 - a``, the case of every full-sequence forward (``reverse``: the backward's reversed scan,
    ``a = (1, beta, ...)``, ``u = 1``); cached, as it depends only on these arguments."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable by later autograd calls
        a = torch.full((1, T), float(beta), dtype=torch.float64, device=device)
        a[:, 0] = 1.0 if reverse else 0.0
        return _scan_plan(a, torch.ones_like(a) if reverse else 1.0 - a, chunk, cdt)


def scan_tokens(
    a: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor,
    u: torch.Tensor,
    chunk: int = SCAN_CHUNK,
    plan: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + u_t * x_t`` over the token axis of ``x: [B, T, F]`` (all heads and features side
    by side, so each matrix below is applied once to every feature); ``a, u: [B, T]`` (``a`` in [0, 1]),
    ``h0: [B, F]``. Returns ``h: [B, T, F]`` in the dtype of ``h0``.

    Two levels: inside chunks of ``chunk`` steps a ``[C, C]`` decay matrix (with ``u`` folded in) is applied
    by one batched matmul over ``[C, F]`` blocks; chunk carries follow from an ``[n, n]`` matrix over chunk
    ends. Log-decays are float64; a zero decay is ``exp(-1e4) == 0`` exactly. Few full-size temporaries.
    ``plan``: the matrices of :func:`_scan_plan` for these decays, when the caller has them.
    """
    B, T, D = x.shape
    cdt = h0.dtype
    intra, carry_w, h0_w, into = plan if plan is not None else _scan_plan(a, u, chunk, cdt)
    n, cs_len = into.shape[1], into.shape[2]
    if n * cs_len > T:
        x = F.pad(x, (0, 0, 0, n * cs_len - T))
    y = torch.matmul(intra, x.view(B, n, cs_len, D).to(cdt))  # (B, n, C, D) zero-carry states
    carry = torch.matmul(carry_w, y[:, :, -1])  # (B, n, D): state entering each chunk
    carry = carry + h0_w[:, :, None] * h0[:, None, :]
    into = into.expand(B, n, cs_len).reshape(B * n, cs_len, 1)
    y.view(B * n, cs_len, D).baddbmm_(into, carry.view(B * n, 1, D))  # y += into (x) carry
    y = y.view(B, n * cs_len, D)
    return y[:, :T] if n * cs_len > T else y


def linear_scan(
    a: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor,
    u: torch.Tensor | None = None,
    chunk: int = SCAN_CHUNK,
) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + u_t * x_t`` for all t; returns ``h: [B, H, T, D]`` in the dtype of ``h0``.

    ``a, u: [B, T]`` (``u`` defaults to ones), ``x: [B, H, T, D]``, ``h0: [B, H, D]``; :func:`scan_tokens`
    with the heads folded into the features.
    """
    B, H, T, D = x.shape
    u = torch.ones_like(a) if u is None else u
    h = scan_tokens(a, x.transpose(1, 2).reshape(B, T, H * D), h0.reshape(B, H * D), u, chunk)  # (B, T, H*D)
    return h.view(B, T, H, D).transpose(1, 2)


def _scan_kv(a, u, k, v, state_k, state_v, plan=None) -> torch.Tensor:
    """Keys and values in one :func:`scan_tokens` (the decays are shared): ``[B, Hkv, T, 2d]``, keys first."""
    B, H, T, d = k.shape
    x = torch.cat([k.transpose(1, 2), v.transpose(1, 2)], -1).reshape(B, T, H * 2 * d)  # (B, T, Hkv*2d)
    h0 = torch.cat([state_k, state_v], -1).reshape(B, H * 2 * d)
    return scan_tokens(a, x, h0, u, plan=plan).view(B, T, H, 2 * d).transpose(1, 2)  # (B, Hkv, T, 2d)


def reference_session_scan(
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    state_k: torch.Tensor,
    state_v: torch.Tensor,
    n_seen: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch definition of ``mka::session_scan`` (differentiable; its signature is the op's); see the module
    docstring for shapes."""
    d = k.shape[-1]
    if bool(valid.all()) and not bool(n_seen.any()):  # a first call without padding: the cached matrices
        plan = _fresh_plan(k.shape[2], float(beta), SCAN_CHUNK, state_k.dtype, k.device)
        s = _scan_kv(None, None, k, v, state_k, state_v, plan)  # (B, Hkv, T, 2d) in the state dtype
    else:
        a = decay_factors(valid, n_seen, beta)  # (B, T)
        s = _scan_kv(a, 1.0 - a, k, v, state_k, state_v)
    # the outputs are fresh buffers (the op makes them contiguous), so no two of them alias
    return s[..., :d].to(k.dtype), s[..., d:].to(v.dtype), s[:, :, -1, :d].clone(), s[:, :, -1, d:].clone()


def check_session_scan(k, v, valid, state_k, state_v, n_seen, beta) -> None:
    check.rank("k", k, 4, "[B, Hkv, T, d]")
    check.floating("k", k)
    check.shape("v", v, k.shape, "[B, Hkv, T, d] like k")
    check.same_dtype("k", k, v=v)
    B, H, T, d = k.shape
    if T < 1:
        raise ValueError("k must hold at least one token (T >= 1)")
    check.shape("valid", valid, (B, T), "[B, T]")
    check.dtype("valid", valid, torch.bool, " (True = real token)")
    state_dt = (torch.float32, torch.float64) if k.dtype == torch.float64 else torch.float32
    for name, s in (("state_k", state_k), ("state_v", state_v)):
        check.shape(name, s, (B, H, d), "[B, Hkv, d]")
        check.dtype(name, s, state_dt, " (MKA state is float32 whatever the activation dtype)")
    check.same_dtype("state_k", state_k, state_v=state_v)
    check.shape("n_seen", n_seen, (B,), "[B]")
    check.dtype("n_seen", n_seen, torch.int64)
    check.same_device("k", k, v=v, valid=valid, state_k=state_k, state_v=state_v, n_seen=n_seen)
    check.beta(beta)


def reference_session_scan_backward(
    grad_sk, grad_sv, grad_state_k, grad_state_v, k, v, valid, state_k, state_v, n_seen, beta
):
    """Adjoint of the scan: ``lam_t = g_t + a_{t+1} lam_{t+1}`` (a reverse scan with the same decays);
    ``dk_t = (1 - a_t) lam_t`` and ``dstate = a_0 lam_0``."""
    cdt = state_k.dtype
    d = k.shape[-1]
    a = decay_factors(valid, n_seen, beta)  # (B, T)
    a_rev = torch.cat([torch.ones_like(a[:, :1]), a.flip(-1)[:, :-1]], -1)  # a'_u = a_{T-u}
    B, H, T, _ = k.shape
    g = torch.cat([grad_sk.transpose(1, 2), grad_sv.transpose(1, 2)], -1).to(cdt).flip(1)  # (B, T, Hkv, 2d) reversed
    g[:, 0] += torch.cat([grad_state_k, grad_state_v], -1).to(cdt)  # the final states' gradient enters at t = T-1
    ones = torch.ones_like(a_rev)
    plan = None
    if bool(valid.all()) and not bool(n_seen.any()):  # a first call without padding: the cached matrices
        plan = _fresh_plan(T, float(beta), SCAN_CHUNK, cdt, k.device, reverse=True)
    adj = scan_tokens(a_rev, g.view(B, T, H * 2 * d), g.new_zeros(B, H * 2 * d), ones, plan=plan)
    adj = adj.flip(1).view(B, T, H, 2 * d)
    dx = (adj * (1.0 - a).to(cdt)[:, :, None, None]).transpose(1, 2)  # (B, Hkv, T, 2d)
    d0 = adj[:, 0] * a[:, :1, None].to(cdt)  # (B, Hkv, 2d)
    return dx[..., :d].to(k.dtype), dx[..., d:].to(v.dtype), d0[..., :d].clone(), d0[..., d:].clone()


SESSION_SCAN = declare(
    "mka::session_scan",
    reference_session_scan,
    check=check_session_scan,
    fake=lambda k, v, valid, state_k, state_v, n_seen, beta: tuple(map(new_like, (k, v, state_k, state_v))),
    backward=Backward(
        reference_session_scan_backward,
        outputs=("sk", "sv", "state_k", "state_v"),  # the backward takes grad_sk, grad_sv, grad_state_k, ...
        wrt=("k", "v", "state_k", "state_v"),
    ),
)


def session_scan(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None = None,
    state_k: torch.Tensor | None = None,
    state_v: torch.Tensor | None = None,
    n_seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``mka::session_scan`` with defaults: all tokens valid, an empty float32 state.

    ``k, v: [B, Hkv, T, d]`` -> ``(s_k, s_v, state_k, state_v)``; see the module docstring.
    """
    check.rank("k", k, 4, "[B, Hkv, T, d]")
    B, H, T, d = k.shape
    sdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=k.device)
    if state_k is None:
        state_k = torch.zeros(B, H, d, dtype=sdt, device=k.device)
    if state_v is None:
        state_v = torch.zeros(B, H, d, dtype=sdt, device=k.device)
    if n_seen is None:
        n_seen = torch.zeros(B, dtype=torch.int64, device=k.device)
    return torch.ops.mka.session_scan(k, v, valid, state_k, state_v, n_seen, float(beta))
