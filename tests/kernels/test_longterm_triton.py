"""Triton L3 kernels (``kernels/longterm/triton_kernels.py``): chunk_update and recall_select against the references.

The launchers run on CPU tensors through the Triton interpreter (tiny shapes, small blocks); the tests
marked ``gpu`` go through the ``mka::`` dispatcher on CUDA tensors.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported; CPU tensors run interpreted in any case
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
ref = importlib.import_module("mka_compile.kernels.longterm.reference")
tri = importlib.import_module("mka_compile.kernels.longterm.triton_kernels")

C = 4


def _chunk_inputs(B=2, H=2, T=17, d=5, N=16, n_seen=(0, 6), dtype=torch.float32, seed=0, bthd=False):
    """chunk_update arguments without chunk_size: random holes, row 0 starts with 3 pads. The carried state is
    consistent with n_seen (the open chunk holds ``n_seen % C`` tokens, earlier slots hold summaries)."""
    g = torch.Generator().manual_seed(seed)

    def r():
        x = torch.randn(B, T, H, d, generator=g).transpose(1, 2) if bthd else torch.randn(B, H, T, d, generator=g)
        return x.to(dtype)

    k, v = r(), r()
    valid = torch.rand(B, T, generator=g) > 0.3
    valid[0, : min(3, T)] = False
    n = torch.tensor(n_seen[:B])
    open_ = (n % C > 0).float()[:, None, None]
    part_k, part_v = torch.randn(B, H, d, generator=g) * open_, torch.randn(B, H, d, generator=g) * open_
    summ_k, summ_v = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)
    return k, v, valid, n, part_k, part_v, summ_k, summ_v


@pytest.mark.parametrize(
    ("T", "dtype", "n_seen"),
    [
        (1, torch.float32, (0, 3)),
        (17, torch.bfloat16, (0, 6)),
        (45, torch.float32, (5, 8)),
        (45, torch.bfloat16, (0, 0)),
    ],
)
def test_chunk_update_matches_reference(T: int, dtype: torch.dtype, n_seen) -> None:
    args = _chunk_inputs(T=T, dtype=dtype, n_seen=n_seen, bthd=T == 45)
    got = tri.chunk_update_fwd(*args, C, BLOCK_T=16, BLOCK_D=4, BLOCK_N=4)
    want = ref.reference_chunk_update(*args, C)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunk_update_closing_and_empty_calls() -> None:
    """The call's last real token closes a chunk (nothing stays open); an all-padding call changes nothing;
    a carried partial sum is kept when no chunk closes (whatever its value)."""
    k, v, valid, n, pk, pv, sk, sv = _chunk_inputs(B=2, T=6, n_seen=(2, 1))
    valid[:] = True  # row 0: positions 2..7 -> closes chunks 0 and 1
    valid[1, 2:] = False  # row 1: positions 1..2 -> nothing closes
    pk[1] += 5.0
    for args in [(k, v, valid, n, pk, pv, sk, sv), (k, v, torch.zeros_like(valid), n, pk, pv, sk, sv)]:
        got = tri.chunk_update_fwd(*args, C)
        for a, b in zip(got, ref.reference_chunk_update(*args, C)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got = tri.chunk_update_fwd(k, v, valid, n, pk, pv, sk, sv, C)
    assert got[0][0].abs().max() == 0


def _recall_inputs(B=2, H=2, T=17, d=5, N=12, M=0, bank_valid=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_r = torch.randn(B, T, H, d, generator=g).transpose(1, 2)  # strided, like the layer's mean over heads
    summ_k = torch.randn(B, H, N, d, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.2
    valid[0, :3] = False
    pos = ref.real_positions(valid, torch.tensor([0] + [9] * (B - 1)))
    bank_k = torch.randn(B, H, M, d, generator=g).to(torch.bfloat16) if M else None
    bv = (torch.rand(B, M, generator=g) > 0.4) if M and bank_valid else None
    return q_r, summ_k, pos, bank_k, bv


def _same_selection(got, want, q_r, summ_k, pos, chunk_size, bank_k, bv) -> None:
    """Same ``found``; the selected entries have the reference's scores in the same (descending) order.
    Compared by score (float64), so that float32 near-ties may resolve either way."""
    (idx, found), (want_idx, want_found) = got, want
    assert idx.dtype == torch.int64 and found.dtype == torch.bool and idx.shape == want_idx.shape
    assert torch.equal(found, want_found)
    hits = torch.zeros(*idx.shape[:-1], idx.max() + 1, dtype=torch.int64).scatter_add(-1, idx, found.long())
    assert hits.max() <= 1  # no entry selected twice
    mem = summ_k if bank_k is None else torch.cat([summ_k, bank_k.to(summ_k.dtype)], 2)
    scores = torch.einsum("bhtd,bhsd->bhts", q_r.double(), mem.double())  # (B, H, T, S)
    N, S = summ_k.shape[2], mem.shape[2]
    avail = torch.arange(S)[None, None, :] < (pos // chunk_size)[:, :, None]  # (B, T, S)
    if bank_k is not None:
        bank_ok = torch.ones(S - N, dtype=torch.bool) if bv is None else bv[:, None, :]
        avail[..., N:] = bank_ok
    scores = scores.masked_fill(~avail[:, None], -torch.inf)
    pick = scores.gather(-1, idx).masked_fill(~found, 0.0)
    want_pick = scores.gather(-1, want_idx).masked_fill(~want_found, 0.0)
    assert torch.isfinite(pick).all()  # only available entries were selected
    torch.testing.assert_close(pick, want_pick, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("T", "R", "N", "M", "bank_valid"),
    [(1, 1, 3, 0, False), (17, 5, 12, 0, False), (45, 8, 20, 7, True), (17, 16, 3, 5, False)],
)
def test_recall_select_matches_reference(T: int, R: int, N: int, M: int, bank_valid: bool) -> None:
    q_r, summ_k, pos, bank_k, bv = _recall_inputs(T=T, N=N, M=M, bank_valid=bank_valid)
    got = tri.recall_select_fwd(q_r, summ_k, pos, C, R, bank_k, bv, BLOCK_Q=16, BLOCK_N=16)
    want = ref.reference_recall_select(q_r, summ_k, pos, C, R, bank_k, bv)
    _same_selection(got, want, q_r, summ_k, pos, C, bank_k, bv)
    assert 0 < int(got[1].sum()) < got[1].numel()  # some queries recall fewer than R entries


def test_recall_select_default_blocks_bf16_query() -> None:
    q_r, summ_k, pos, bank_k, bv = _recall_inputs(T=40, d=16, N=40, M=3)
    q_r = q_r.bfloat16()
    got = tri.recall_select_fwd(q_r, summ_k, pos, 8, 4, bank_k, bv)
    want = ref.reference_recall_select(q_r, summ_k, pos, 8, 4, bank_k, bv)
    _same_selection(got, want, q_r, summ_k, pos, 8, bank_k, bv)


def test_recall_select_limits_explain() -> None:
    q_r, summ_k, pos, _, _ = _recall_inputs(T=2)
    with pytest.raises(ValueError, match="top_r <= 32"):
        tri.recall_select_fwd(q_r, summ_k, pos, C, 33)


def test_cuda_kernels_registered_and_take_op_arguments() -> None:
    for op in ("mka::chunk_update", "mka::recall_select"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    args = _chunk_inputs(T=9, N=3)  # the CUDA implementations, called as the dispatcher would (CPU here)
    for a, b in zip(tri._chunk_update_cuda(*args, C), ref.reference_chunk_update(*args, C)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="chunk slots"):
        tri._chunk_update_cuda(*args[:6], args[6][:, :, :1], args[7][:, :, :1], C)
    q_r, summ_k, pos, bank_k, bv = _recall_inputs(T=5, M=3, bank_valid=True)
    for R in (3, 40):  # 40 > MAX_TOP_R: the reference answers
        got = tri._recall_select_cuda(q_r, summ_k, pos, C, R, bank_k, bv)
        want = ref.reference_recall_select(q_r, summ_k, pos, C, R, bank_k, bv)
        _same_selection(got, want, q_r, summ_k, pos, C, bank_k, bv)


# ------------------------------------------------------------------------------------------ GPU, dispatcher


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_dispatch(dtype: torch.dtype) -> None:
    args = _chunk_inputs(B=3, H=4, T=500, d=64, N=40, n_seen=(0, 13, 64), dtype=dtype, bthd=True)
    got = torch.ops.mka.chunk_update(*[a.cuda() for a in args], 16)
    for a, b in zip(got, ref.reference_chunk_update(*args, 16)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    q_r, summ_k, pos, bank_k, bv = _recall_inputs(B=2, H=4, T=700, d=64, N=50, M=30, bank_valid=True)
    for R in (8, 40):  # 40: beyond MAX_TOP_R, the CUDA op falls back to the reference
        dev = [x.cuda() if x is not None else None for x in (q_r, summ_k, pos)]
        idx, found = torch.ops.mka.recall_select(dev[0], dev[1], dev[2], 16, R, bank_k.cuda(), bv.cuda())
        want = ref.reference_recall_select(q_r, summ_k, pos, 16, R, bank_k, bv)
        _same_selection((idx.cpu(), found.cpu()), want, q_r, summ_k, pos, 16, bank_k, bv)
