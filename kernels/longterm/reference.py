"""L3 long-term memory: chunk summaries and causal memory-keyed top-R recall.

The past is cut into chunks of C real tokens (padding does not count). A completed chunk c (real
positions ``[c*C, (c+1)*C)``) has a summary key and value: the mean of its ``k1`` / ``v1`` per kv head.
A query at real position p may recall chunk c iff ``(c + 1) * C <= p`` (the chunk was completed before
it), so ``p // C`` chunks are available to it, plus every valid entry of an optional external memory
bank. It recalls the top-R entries by ``q_r . key`` where ``q_r`` is the recall query (the mean over
the query heads of a kv group of the un-rotated query; for MHA simply the query).

State carried between calls (float32): ``part_k, part_v: [B, Hkv, d]``, the sums of the current
incomplete chunk (it holds ``n_seen % C`` tokens), and ``summ_k, summ_v: [B, Hkv, N, d]``, the
summaries of completed chunks in a buffer of N slots (slot c = chunk c; a row uses
``n_seen // C`` of them). The caller sizes N; ``mka::chunk_update`` raises when it is too small.

Ops:
- ``mka::chunk_update(k, v, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk_size)
  -> (part_k, part_v, summ_k, summ_v)`` (differentiable in k, v and the state);
- ``mka::recall_select(q_r, summ_k, pos, chunk_size, top_r, bank_k, bank_valid) -> (idx, found)``:
  ``idx, found: [B, Hkv, T, R]`` index into ``cat(summ, bank)`` along the slot axis (a discrete
  selection: not differentiable; gradients reach keys and values through :func:`gather_recalled`).
"""

from __future__ import annotations

import torch

from .. import _validate as check
from .._grads import new_like
from ..declare import Backward, declare


def real_positions(valid: torch.Tensor, n_seen: torch.Tensor) -> torch.Tensor:
    """``pos: [B, T]`` int64, the real (padding-free) position of each token; 0 on leading padding."""
    return (n_seen[:, None] + valid.long().cumsum(-1) - 1).clamp_min(0)


def _slots(valid, n_seen, chunk_size: int, N: int):
    """Each token's row in a flat ``[B * (N + 2), ...]`` slot table (slot c = chunk c; padding goes to the
    dump slot N + 1), the chunk holding the carried partial sum (``first``) and the chunks completed after
    this call (``done``), both ``[B]``."""
    B = valid.shape[0]
    pos = real_positions(valid, n_seen)
    slot = torch.where(valid, pos // chunk_size, N + 1)  # (B, T)
    rows = (slot + torch.arange(B, device=valid.device)[:, None] * (N + 2)).reshape(-1)  # (B*T,)
    return rows, n_seen // chunk_size, (n_seen + valid.long().sum(-1)) // chunk_size


def _sum_into_slots(x: torch.Tensor, rows: torch.Tensor, n_slots: int) -> torch.Tensor:
    """``x: [B, H, T, d]`` -> ``[B, H, n_slots, d]``, the sum of the tokens of each slot (``rows`` from
    :func:`_slots`). One ``index_add_`` over token rows of ``H * d`` features (a view when ``x`` is a head
    view of a ``[B, T, H * d]`` projection, as the hooks give it)."""
    B, H, T, d = x.shape
    flat = x.transpose(1, 2).reshape(B * T, H * d)  # (B*T, H*d)
    sums = flat.new_zeros(B * n_slots, H * d).index_add_(0, rows, flat)
    return sums.view(B, n_slots, H, d).transpose(1, 2)  # (B, H, n_slots, d)


def _take_slots(g: torch.Tensor, rows: torch.Tensor, T: int) -> torch.Tensor:
    """Adjoint of :func:`_sum_into_slots`: ``g: [B, H, n_slots, d]`` -> ``[B, H, T, d]``, each token's slot row."""
    B, H, n_slots, d = g.shape
    flat = g.transpose(1, 2).reshape(B * n_slots, H * d)
    return flat.index_select(0, rows).view(B, T, H, d).transpose(1, 2)


def reference_chunk_update(
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    n_seen: torch.Tensor,
    part_k: torch.Tensor,
    part_v: torch.Tensor,
    summ_k: torch.Tensor,
    summ_v: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch definition of ``mka::chunk_update`` (its signature is the op's; see the module docstring)."""
    B, H, T, d = k.shape
    N = summ_k.shape[2]
    cdt = part_k.dtype
    if T // chunk_size <= N and bool(valid.all()) and not bool(n_seen.any()):  # first call, no padding
        return _first_chunk_update(k, v, part_k, part_v, summ_k, summ_v, chunk_size)
    rows, first, done = _slots(valid, n_seen, chunk_size, N)
    slots = torch.arange(N + 2, device=k.device)
    at_first = (slots[None, :] == first[:, None])[:, None, :, None]  # (B, 1, N+2, 1): holds the partial sum
    fresh = ((slots[None, :N] >= first[:, None]) & (slots[None, :N] < done[:, None]))[:, None, :, None]
    out = []
    for x, part, summ in ((k, part_k, summ_k), (v, part_v, summ_v)):
        sums = _sum_into_slots(x.to(cdt), rows, N + 2)  # (B, H, N+2, d)
        sums = torch.where(at_first, sums + part[:, :, None, :], sums)
        new_summ = torch.where(fresh, sums[:, :, :N] / chunk_size, summ)
        new_part = sums.gather(2, done[:, None, None, None].expand(B, H, 1, d)).squeeze(2)  # (B, H, d)
        out.append((new_part, new_summ))
    (pk, sk), (pv, sv) = out
    return pk, pv, sk, sv


def _first_chunk_update(k, v, part_k, part_v, summ_k, summ_v, chunk_size: int):
    """:func:`reference_chunk_update` when every token is real and nothing was seen before: chunk c is rows
    ``[c C, (c + 1) C)``, the carried partial sum joins chunk 0 and the rows after the last complete chunk form
    the new partial sum."""
    T, C = k.shape[2], chunk_size
    nc = T // C  # complete chunks (the caller checked that the buffer holds them)
    out = []
    for x, part, summ in ((k, part_k, summ_k), (v, part_v, summ_v)):
        x = x.to(part.dtype)
        sums = x[:, :, : nc * C].unflatten(2, (nc, C)).sum(3)  # (B, H, nc, d)
        tail = x[:, :, nc * C :].sum(2)  # (B, H, d)
        if nc:
            sums[:, :, 0] += part
        else:
            tail = tail + part
        out.append((tail, torch.cat([sums / C, summ[:, :, nc:]], 2)))
    (pk, sk), (pv, sv) = out
    return pk, pv, sk, sv


def check_chunk_update(k, v, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk_size) -> None:
    check.rank("k", k, 4, "[B, Hkv, T, d]")
    check.floating("k", k)
    check.shape("v", v, k.shape, "[B, Hkv, T, d] like k")
    check.same_dtype("k", k, v=v)
    B, H, T, d = k.shape
    check.shape("valid", valid, (B, T), "[B, T]")
    check.dtype("valid", valid, torch.bool, " (True = real token)")
    check.shape("n_seen", n_seen, (B,), "[B]")
    check.dtype("n_seen", n_seen, torch.int64)
    state_dt = (torch.float32, torch.float64) if k.dtype == torch.float64 else torch.float32
    for name, s in (("part_k", part_k), ("part_v", part_v)):
        check.shape(name, s, (B, H, d), "[B, Hkv, d]")
        check.dtype(name, s, state_dt, " (MKA state is float32 whatever the activation dtype)")
    check.rank("summ_k", summ_k, 4, "[B, Hkv, N, d]")
    for name, s in (("summ_k", summ_k), ("summ_v", summ_v)):
        check.shape(name, s, (B, H, summ_k.shape[2], d), "[B, Hkv, N, d]")
        check.dtype(name, s, state_dt, " (MKA state is float32 whatever the activation dtype)")
    check.same_dtype("part_k", part_k, part_v=part_v, summ_k=summ_k, summ_v=summ_v)
    check.same_device(
        "k", k, v=v, valid=valid, n_seen=n_seen, part_k=part_k, part_v=part_v, summ_k=summ_k, summ_v=summ_v
    )
    check.positive_int("chunk_size", chunk_size)


def check_chunk_capacity(k, v, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk_size) -> None:
    """The check of ``mka::chunk_update`` that reads data: the summary buffer holds every completed chunk."""
    need = int(((n_seen + valid.long().sum(-1)) // chunk_size).max().item()) if n_seen.numel() else 0
    if need > summ_k.shape[2]:
        raise ValueError(
            f"summ_k has {summ_k.shape[2]} chunk slots but {need} chunks are complete after this call; "
            "grow the summary buffer (MKACache does this) or preallocate max_len // chunk_size slots"
        )


def reference_chunk_update_backward(
    grad_part_k,
    grad_part_v,
    grad_summ_k,
    grad_summ_v,
    k,
    v,
    valid,
    n_seen,
    part_k,
    part_v,
    summ_k,
    summ_v,
    chunk_size: int,
):
    """Adjoint of :func:`reference_chunk_update`: route each slot's gradient back to its tokens."""
    B, H, T, d = k.shape
    N = summ_k.shape[2]
    cdt = part_k.dtype
    rows, first, done = _slots(valid, n_seen, chunk_size, N)
    slots = torch.arange(N, device=k.device)
    fresh = ((slots[None, :] >= first[:, None]) & (slots[None, :] < done[:, None]))[:, None, :, None]  # (B,1,N,1)
    out = []
    for g_summ, g_part, x in ((grad_summ_k, grad_part_k, k), (grad_summ_v, grad_part_v, v)):
        g_summ = g_summ.to(cdt)  # (B, H, N, d)
        g_slots = torch.nn.functional.pad(torch.where(fresh, g_summ / chunk_size, 0.0), (0, 0, 0, 2))  # (B,H,N+2,d)
        g_slots = g_slots.scatter_add(2, done[:, None, None, None].expand(B, H, 1, d), g_part.to(cdt)[:, :, None])
        g_x = _take_slots(g_slots, rows, T).to(x.dtype)  # pads read the empty dump slot
        g_part_in = g_slots.gather(2, first[:, None, None, None].expand(B, H, 1, d)).squeeze(2)
        out.append((g_x, g_part_in, torch.where(fresh, 0.0, g_summ)))
    (gk, gpk, gsk), (gv, gpv, gsv) = out
    return gk, gv, gpk, gpv, gsk, gsv


CHUNK_UPDATE = declare(
    "mka::chunk_update",
    reference_chunk_update,
    check=check_chunk_update,
    check_values=check_chunk_capacity,
    fake=lambda k, v, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk_size: tuple(
        map(new_like, (part_k, part_v, summ_k, summ_v))
    ),
    backward=Backward(
        reference_chunk_update_backward,
        outputs=("part_k", "part_v", "summ_k", "summ_v"),  # the new states (the backward takes grad_part_k, ...)
        wrt=("k", "v", "part_k", "part_v", "summ_k", "summ_v"),
    ),
)


def reference_recall_select(
    q_r: torch.Tensor,
    summ_k: torch.Tensor,
    pos: torch.Tensor,
    chunk_size: int,
    top_r: int,
    bank_k: torch.Tensor | None = None,
    bank_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch definition of ``mka::recall_select`` (its signature is the op's; see the module docstring)."""
    B, H, T, d = q_r.shape
    N = summ_k.shape[2]
    cdt = summ_k.dtype
    scores = torch.einsum("bhtd,bhnd->bhtn", q_r.to(cdt), summ_k)  # (B, H, T, N)
    avail = torch.arange(N, device=q_r.device)[None, None, :] < (pos // chunk_size)[:, :, None]  # (B, T, N)
    avail = avail[:, None].expand(B, H, T, N)
    if bank_k is not None:
        scores = torch.cat([scores, torch.einsum("bhtd,bhmd->bhtm", q_r.to(cdt), bank_k.to(cdt))], -1)
        M = bank_k.shape[2]
        bv = bank_valid if bank_valid is not None else torch.ones(B, M, dtype=torch.bool, device=q_r.device)
        avail = torch.cat([avail, bv[:, None, None, :].expand(B, H, T, M)], -1)
    width = scores.shape[-1]
    take = min(top_r, width)
    if take == top_r:  # every output column comes from topk (descending scores; unavailable entries last)
        vals, top = scores.masked_fill(~avail, -torch.inf).topk(take, dim=-1)
        found = torch.isfinite(vals)
        return top.masked_fill(~found, 0), found
    idx = torch.zeros(B, H, T, top_r, dtype=torch.int64, device=q_r.device)
    found = torch.zeros(B, H, T, top_r, dtype=torch.bool, device=q_r.device)
    if take > 0:
        vals, top = scores.masked_fill(~avail, -torch.inf).topk(take, dim=-1)
        ok = torch.isfinite(vals)
        idx[..., :take] = torch.where(ok, top, torch.zeros_like(top))
        found[..., :take] = ok
    return idx, found


def check_recall_select(q_r, summ_k, pos, chunk_size, top_r, bank_k, bank_valid) -> None:
    check.rank("q_r", q_r, 4, "[B, Hkv, T, d]")
    check.floating("q_r", q_r)
    B, H, T, d = q_r.shape
    check.rank("summ_k", summ_k, 4, "[B, Hkv, N, d]")
    check.shape("summ_k", summ_k, (B, H, summ_k.shape[2], d), "[B, Hkv, N, d]")
    check.floating("summ_k", summ_k)
    check.shape("pos", pos, (B, T), "[B, T]")
    check.dtype("pos", pos, torch.int64)
    check.positive_int("chunk_size", chunk_size)
    check.positive_int("top_r", top_r)
    if bank_k is not None:
        check.rank("bank_k", bank_k, 4, "[B, Hkv, M, d]")
        check.shape("bank_k", bank_k, (B, H, bank_k.shape[2], d), "[B, Hkv, M, d]")
        check.floating("bank_k", bank_k)
        if bank_valid is not None:
            check.shape("bank_valid", bank_valid, (B, bank_k.shape[2]), "[B, M]")
            check.dtype("bank_valid", bank_valid, torch.bool)
    elif bank_valid is not None:
        raise ValueError("bank_valid was given without bank_k; pass the bank keys too")
    check.same_device("q_r", q_r, summ_k=summ_k, pos=pos, bank_k=bank_k, bank_valid=bank_valid)


def _recall_select_fake(q_r, summ_k, pos, chunk_size, top_r, bank_k, bank_valid):
    B, H, T, _ = q_r.shape
    return (
        q_r.new_empty(B, H, T, top_r, dtype=torch.int64),
        q_r.new_empty(B, H, T, top_r, dtype=torch.bool),
    )


RECALL_SELECT = declare(  # a discrete selection: no backward
    "mka::recall_select", reference_recall_select, check=check_recall_select, fake=_recall_select_fake
)


def recall_mask(idx: torch.Tensor, found: torch.Tensor, slots: int) -> torch.Tensor:
    """``[B, Hkv, T, S]`` bool: which of the S memory slots each query recalled (from ``recall_select``)."""
    hits = torch.zeros(*idx.shape[:-1], slots, dtype=torch.int32, device=idx.device)
    if slots == 0:
        return hits.bool()
    return hits.scatter_add(-1, idx, found.to(torch.int32)) > 0


def recall_probs(qg: torch.Tensor, mem_k: torch.Tensor, sel: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax of ``scale * q . key`` over each query's recalled slots; zeros where it recalled nothing.

    ``qg: [B, Hkv, rep, T, d]`` (queries grouped by kv head), ``mem_k: [B, Hkv, S, d]``,
    ``sel: [B, Hkv, T, S]`` -> ``[B, Hkv, rep, T, S]`` in the dtype of ``mem_k``. Dense over the S slots
    (S = chunks + bank entries, small next to T), so no ``[T, R, d]`` gather is materialised.
    """
    s = torch.matmul(qg.to(mem_k.dtype), mem_k[:, :, None].transpose(-1, -2)) * scale  # (B, Hkv, rep, T, S)
    off = ~sel[:, :, None]
    # unselected slots get the dtype's lowest finite value (exp() of it underflows to exactly 0 next to any
    # selected slot); a row that selected nothing is uniform here and zeroed afterwards, without NaN
    p = torch.softmax(s.masked_fill(off, torch.finfo(s.dtype).min), -1)
    return p.masked_fill(off, 0.0)


def recall_mix(
    q_r: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, sel: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastMKA's L3 level: the recall-score-weighted mean of the recalled keys and values.

    ``q_r: [B, Hkv, T, d]``, ``mem_k, mem_v: [B, Hkv, S, d]``, ``sel: [B, Hkv, T, S]`` ->
    ``k3, v3: [B, Hkv, T, d]`` (zeros where nothing was recalled).
    """
    d = mem_k.shape[-1]
    p = recall_probs(q_r[:, :, None], mem_k, sel, scale)[:, :, 0]  # (B, Hkv, T, S)
    kv = p @ torch.cat([mem_k, mem_v], -1)  # (B, Hkv, T, 2d): keys and values in one product
    return kv[..., :d], kv[..., d:]
