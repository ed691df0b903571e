"""``mka::memory_mix`` (+ ``_backward``) and ``mka::memory_levels``: one call's whole memory step as one op.

Math (the definition is the composition of the family ops, :func:`reference_memory_mix`)::

    lam    = onehot(local) + min(|gate|, 1) * (softmax(logits) - onehot)   routing (L3 off where nothing is recalled)
    s_t    = session EMA of k1, v1                                         L2: mka::session_scan
    summ   = chunk summaries; k3, v3 = score-weighted top-R recall of      L3: mka::chunk_update, mka::recall_select,
             the summaries completed before each token                         recall_mix
    kf, vf = sum_l lam_l k_l, sum_l lam_l v_l                              FastMKA: mka::route_mix

``memory_mix`` returns ``kf, vf`` (FastMKA); ``memory_levels`` returns, for MKA mode's attention, the session
levels and the recalled summary slots instead (same routing, same new state).

Shapes (token-major, as a projection lays them out): ``k1, v1: [B, T, Hkv, d]``; ``q: [B, T, H*d]`` (the query
projection, un-rotated; the recall query of a kv head is the mean over its query heads); ``logits: [B, T, G*L]``
(the router's output, G = 1 or Hkv, L = 1 + session + longterm); ``gate: [1]`` (the raw gate); ``valid: [B, T]``
bool; ``n_seen: [B]`` int64; ``ema_k, ema_v, part_k, part_v: [B, Hkv, d]`` and ``summ_k, summ_v: [B, Hkv, N, d]``
(state dtype, with room for the chunks this call completes). ``memory_mix`` returns ``kf, vf: [B, T, Hkv, d]``,
``lam: [B, G, T, L]`` and the new ``ema_k, ema_v, part_k, part_v, summ_k, summ_v``; ``memory_levels`` returns
``s_k, s_v: [B, T, Hkv, d]`` (zeros without the session level), ``slots: [B, Hkv, T, R]`` int32 (the recalled
summary slots, -1 = none; their order is not part of the result), ``lam`` and the new state.

Implementations: on the CPU the fused C++ pass (:mod:`.cpu`; float32 with the extension built, otherwise the
reference); elsewhere the reference (the composed ops: Triton on CUDA). ``memory_mix`` is differentiable in
``k1, v1, q, logits, gate`` (from the gradients of ``kf, vf`` and ``lam``) through the fused backward (CPU float32;
it recomputes the forward, as the attention ops do); the incoming state gets no gradient and the new state passes
none back, so the engine differentiates through the op only for a fresh state that nothing keeps.
``memory_levels`` has no backward (MKA mode's inference path).
"""

from __future__ import annotations

import inspect

import torch

from .. import _validate as check
from .._grads import new_like
from ..declare import Backward, declare
from ..longterm import real_positions, recall_mask, recall_mix
from ..route_mix import route_mix
from . import cpu
from .build import built

Tensor = torch.Tensor
STATE = ("ema_k", "ema_v", "part_k", "part_v", "summ_k", "summ_v")


def effective_gate(gate: Tensor) -> Tensor:
    """``min(|gate|, 1)`` with gradient ``sign(gate)`` (``+1`` at 0), straight through the clip at 1."""
    sign = torch.where(gate < 0, -1.0, 1.0).to(gate.dtype).detach()
    g = gate * sign
    return g + (g.clamp(max=1.0) - g).detach()


def gated_routing(logits: Tensor, gate: Tensor, has_recall: Tensor | None, num_levels: int) -> Tensor:
    """``lam: [B, G, T, L]`` in the dtype of ``logits: [B, T, G*L]``: ``onehot(local) + g * (softmax - onehot)``
    with ``g = effective_gate(gate)``; the last level (L3) is off where nothing is recalled (``has_recall: [B, T]``
    False), so those positions route over the other levels."""
    B, T, _ = logits.shape
    L = num_levels
    logits = logits.view(B, T, -1, L).transpose(1, 2)  # (B, G, T, L)
    if has_recall is not None:
        off = torch.zeros_like(logits, dtype=torch.bool)
        off[..., L - 1] = ~has_recall[:, None, :]
        logits = logits.masked_fill(off, -torch.inf)
    p = torch.softmax(logits, -1)
    onehot = torch.zeros(L, dtype=p.dtype, device=p.device)
    onehot[0] = 1.0
    return onehot + effective_gate(gate.to(p.dtype)) * (p - onehot)


def _step(k1, v1, q, logits, gate, valid, n_seen, state, session, longterm, beta, chunk, top_r, scale, mix):
    """The composed ops: the levels ``[B, Hkv, T, d]`` (L3's only when ``mix``), ``lam``, the new state (fresh
    tensors) and the recall ``(idx, found)`` (None without the long-term level)."""
    k1, v1 = k1.transpose(1, 2), v1.transpose(1, 2)  # (B, Hkv, T, d)
    B, Hkv, T, d = k1.shape
    ema_k, ema_v, part_k, part_v, summ_k, summ_v = state
    ks, vs = [k1], [v1]
    if session:
        sk, sv, ema_k, ema_v = torch.ops.mka.session_scan(k1, v1, valid, ema_k, ema_v, n_seen, beta)
        ks.append(sk)
        vs.append(sv)
    else:
        ema_k, ema_v = ema_k.clone(), ema_v.clone()  # op outputs never alias its inputs
    recall = has_recall = None
    if longterm:
        part_k, part_v, summ_k, summ_v = torch.ops.mka.chunk_update(
            k1, v1, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk
        )
        q_r = q.reshape(B, T, Hkv, -1, d).mean(3).transpose(1, 2)  # (B, Hkv, T, d)
        idx, found = torch.ops.mka.recall_select(q_r, summ_k, real_positions(valid, n_seen), chunk, top_r, None, None)
        recall, has_recall = (idx, found), found[:, 0, :, 0]  # a found entry is listed first
        if mix:
            k3, v3 = recall_mix(q_r, summ_k, summ_v, recall_mask(idx, found, summ_k.shape[2]), scale)
            ks.append(k3.to(k1.dtype))
            vs.append(v3.to(v1.dtype))
    else:
        part_k, part_v, summ_k, summ_v = part_k.clone(), part_v.clone(), summ_k.clone(), summ_v.clone()
    rdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = gated_routing(logits.to(rdt), gate, has_recall, 1 + session + longterm)
    return ks, vs, lam, (ema_k, ema_v, part_k, part_v, summ_k, summ_v), recall


def reference_memory_mix(
    k1: Tensor,
    v1: Tensor,
    q: Tensor,
    logits: Tensor,
    gate: Tensor,
    valid: Tensor,
    n_seen: Tensor,
    ema_k: Tensor,
    ema_v: Tensor,
    part_k: Tensor,
    part_v: Tensor,
    summ_k: Tensor,
    summ_v: Tensor,
    session: bool,
    longterm: bool,
    beta: float,
    chunk: int,
    top_r: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Definition of ``mka::memory_mix`` (the composed ops; see the module docstring)."""
    state = (ema_k, ema_v, part_k, part_v, summ_k, summ_v)
    ks, vs, lam, new, _ = _step(k1, v1, q, logits, gate, valid, n_seen, state, session, longterm, beta, chunk,
                                top_r, scale, mix=True)  # fmt: skip
    kf, vf = route_mix(lam, ks, vs)  # (B, Hkv, T, d)
    return kf.transpose(1, 2), vf.transpose(1, 2), lam, *new


def reference_memory_levels(
    k1: Tensor,
    v1: Tensor,
    q: Tensor,
    logits: Tensor,
    gate: Tensor,
    valid: Tensor,
    n_seen: Tensor,
    ema_k: Tensor,
    ema_v: Tensor,
    part_k: Tensor,
    part_v: Tensor,
    summ_k: Tensor,
    summ_v: Tensor,
    session: bool,
    longterm: bool,
    beta: float,
    chunk: int,
    top_r: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Definition of ``mka::memory_levels`` (the composed ops; see the module docstring)."""
    state = (ema_k, ema_v, part_k, part_v, summ_k, summ_v)
    ks, vs, lam, new, recall = _step(k1, v1, q, logits, gate, valid, n_seen, state, session, longterm, beta, chunk,
                                     top_r, scale, mix=False)  # fmt: skip
    B, T, Hkv, _ = k1.shape
    s_k, s_v = (ks[1].transpose(1, 2), vs[1].transpose(1, 2)) if session else (torch.zeros_like(k1),) * 2
    if recall is None:
        slots = torch.full((B, Hkv, T, top_r), -1, dtype=torch.int32, device=k1.device)
    else:
        slots = torch.where(recall[1], recall[0], -1).to(torch.int32)
    return s_k, s_v, slots, lam, *new


def check_memory_step(k1, v1, q, logits, gate, valid, n_seen, *rest) -> None:
    """Shapes, dtypes and devices of the arguments of both ops (metadata only; the op runs it on every call, so the
    common case is a few comparisons and the messages are built only for an argument that fails)."""
    *state, session, longterm, beta, chunk, top_r, scale = rest
    check.rank("k1", k1, 4, "[B, T, Hkv, d] (token-major)")
    check.floating("k1", k1)
    B, T, Hkv, d = k1.shape
    L = 1 + bool(session) + bool(longterm)
    if v1.shape != k1.shape or v1.dtype != k1.dtype or q.dtype != k1.dtype:
        check.shape("v1", v1, k1.shape, "[B, T, Hkv, d] like k1")
        check.same_dtype("k1", k1, v1=v1, q=q)
    if q.dim() != 3 or q.shape[:2] != (B, T) or q.shape[2] % (Hkv * d):
        raise ValueError(f"q must be [B, T, H*d] with H a multiple of Hkv = {Hkv} and d = {d}; got {tuple(q.shape)}")
    if logits.dim() != 3 or logits.shape[:2] != (B, T) or logits.shape[2] not in (L, Hkv * L):
        raise ValueError(f"logits must be [B, T, G*L] with G = 1 or Hkv = {Hkv} and L = {L}; got {tuple(logits.shape)}")
    check.floating("logits", logits)
    if gate.shape != (1,) or valid.shape != (B, T) or valid.dtype != torch.bool:
        check.shape("gate", gate, (1,), "[1]")
        check.shape("valid", valid, (B, T), "[B, T]")
        check.dtype("valid", valid, torch.bool, " (True = real token)")
    if n_seen.shape != (B,) or n_seen.dtype != torch.int64:
        check.shape("n_seen", n_seen, (B,), "[B]")
        check.dtype("n_seen", n_seen, torch.int64)
    check.rank("summ_k", state[4], 4, "[B, Hkv, N, d]")
    per_row, per_slot = (B, Hkv, d), (B, Hkv, state[4].shape[2], d)
    for name, x in zip(STATE, state):
        layout, want = ("[B, Hkv, N, d]", per_slot) if name.startswith("summ") else ("[B, Hkv, d]", per_row)
        if x.shape != want or x.dtype not in (torch.float32, torch.float64):
            check.shape(name, x, want, layout)
            check.dtype(name, x, (torch.float32, torch.float64), " (MKA state is float32, float64 with float64 inputs)")
    tensors = (v1, q, logits, gate, valid, n_seen, *state)
    if any(t.device != k1.device for t in tensors):
        names = ("v1", "q", "logits", "gate", "valid", "n_seen", *STATE)
        check.same_device("k1", k1, **dict(zip(names, tensors)))
    check.beta(beta)
    check.positive_int("chunk", chunk)
    check.positive_int("top_r", top_r)


def _fake_common(k1, q, logits, state, session, longterm):
    B, T, Hkv, _ = k1.shape
    L = 1 + bool(session) + bool(longterm)
    rdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = logits.new_empty(B, logits.shape[2] // L, T, L, dtype=rdt)
    return lam, tuple(new_like(s) for s in state)


def _fake_mix(k1, v1, q, logits, gate, valid, n_seen, *rest):
    lam, state = _fake_common(k1, q, logits, rest[:6], rest[6], rest[7])
    return new_like(k1), new_like(v1), lam, *state


def _fake_levels(k1, v1, q, logits, gate, valid, n_seen, *rest):
    lam, state = _fake_common(k1, q, logits, rest[:6], rest[6], rest[7])
    B, T, Hkv, _ = k1.shape
    slots = k1.new_empty(B, Hkv, T, rest[10], dtype=torch.int32)
    return new_like(k1), new_like(v1), slots, lam, *state


def supports(*tensors: Tensor) -> bool:
    """Whether the fused C++ pass runs on these tensors: float32 on the CPU, the extension built. A fact of the
    tensors' device and dtype (the same in eager and compiled runs)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and built()


def _fused(args) -> bool:
    k1, v1, q, logits = args[:4]
    return supports(k1, v1, q, logits, *args[7:13])


def reference_memory_mix_backward(
    grad_kf: Tensor, grad_vf: Tensor, grad_lam: Tensor | None, *args
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``k1, v1, q, logits, gate`` from those of ``kf, vf`` and ``lam`` (None: none): the fused
    backward (CPU float32). ``args``: the arguments of ``mka::memory_mix`` (the backward op's schema is derived from
    the forward's, see ``MEMORY_MIX``). The new state's gradients are not taken (see the module docstring)."""
    if not _fused(args):
        raise NotImplementedError(
            "mka::memory_mix is differentiable through the fused CPU pass only (float32 CPU tensors, the C++ "
            "extension built); elsewhere differentiate the composed ops (reference_memory_mix), as mka_compile's "
            "layers and converted sites do"
        )
    return cpu.backward(grad_kf, grad_vf, grad_lam, *args)


MEMORY_MIX = declare(
    "mka::memory_mix",
    reference_memory_mix,
    check=check_memory_step,
    fake=_fake_mix,
    backward=Backward(
        reference_memory_mix_backward,
        outputs=("kf", "vf", "lam", *STATE),
        wrt=("k1", "v1", "q", "logits", "gate"),
        params=("grad_kf", "grad_vf", "grad_lam", *inspect.signature(reference_memory_mix).parameters),
        optional_grads=("lam",),
    ),
)
MEMORY_LEVELS = declare("mka::memory_levels", reference_memory_levels, check=check_memory_step, fake=_fake_levels)


def _register_cpu(op, mix: bool) -> None:
    """``op``'s CPU kernel: the fused C++ pass where it runs (:func:`supports`), otherwise the composed ops."""

    def impl(*args):
        if not _fused(args):
            return op(*args)
        op.check_all(*args)
        return cpu.forward(*args, mix=mix)

    impl.__name__ = impl.__qualname__ = f"_{op.name.split('::')[-1]}_cpu"
    torch.library.register_kernel(op.name, "cpu", impl)


_register_cpu(MEMORY_MIX, mix=True)
_register_cpu(MEMORY_LEVELS, mix=False)


def memory_mix(k1, v1, q, logits, gate, valid, state, *, session, longterm, beta, chunk, top_r, scale):
    """``mka::memory_mix`` for head views: ``k1, v1: [B, Hkv, T, d]``, ``state = (n_seen, ema_k, ema_v, part_k,
    part_v, summ_k, summ_v)``. Returns ``kf, vf: [B, Hkv, T, d]`` (head views of the op's token-major outputs,
    so ``kf.transpose(1, 2).reshape(B, T, -1)`` copies nothing), ``lam`` and the new state (6 tensors)."""
    kf, vf, lam, *new = torch.ops.mka.memory_mix(
        k1.transpose(1, 2), v1.transpose(1, 2), q, logits, gate, valid, *state, bool(session), bool(longterm),
        float(beta), int(chunk), int(top_r), float(scale),
    )  # fmt: skip
    return kf.transpose(1, 2), vf.transpose(1, 2), lam, tuple(new)


def memory_levels(k1, v1, q, logits, gate, valid, state, *, session, longterm, beta, chunk, top_r, scale):
    """``mka::memory_levels`` for head views (no autograd), arguments as :func:`memory_mix`. Returns the session
    levels ``s_k, s_v: [B, Hkv, T, d]`` (None without them), the recalled slots ``idx, found: [B, Hkv, T, R]`` as
    ``mka::recall_select`` gives them (None without the long-term level), ``lam`` and the new state."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (k1, v1, q, logits, gate)):
        raise RuntimeError("mka::memory_levels has no backward; call it under torch.no_grad()")
    s_k, s_v, slots, lam, *new = torch.ops.mka.memory_levels(
        k1.transpose(1, 2), v1.transpose(1, 2), q, logits, gate, valid, *state, bool(session), bool(longterm),
        float(beta), int(chunk), int(top_r), float(scale),
    )  # fmt: skip
    sess = (s_k.transpose(1, 2), s_v.transpose(1, 2)) if session else (None, None)
    recall = (slots.clamp_min(0).long(), slots >= 0) if longterm else (None, None)
    return *sess, *recall, lam, tuple(new)
