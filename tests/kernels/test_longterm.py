from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from mka_compile.kernels import real_positions, recall_mask, recall_mix

F64 = torch.float64


def _tokens(B=2, H=2, T=23, d=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, d, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, d, generator=g, dtype=dtype)
    valid = torch.rand(B, T, generator=g) > 0.3
    return k, v, valid


def _empty_state(B, H, d, N, dtype=torch.float32):
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    return z(B, H, d), z(B, H, d), z(B, H, N, d), z(B, H, N, d)


def _naive_chunks(k, valid, C):
    """Per row: list of completed chunk means and the partial sum, by walking the tokens."""
    out = []
    for b in range(k.shape[0]):
        done, cur = [], []
        for t in range(k.shape[2]):
            if valid[b, t]:
                cur.append(k[b, :, t])
                if len(cur) == C:
                    done.append(torch.stack(cur).mean(0))
                    cur = []
        part = torch.stack(cur).sum(0) if cur else torch.zeros_like(k[b, :, 0])
        out.append((done, part))
    return out


def test_chunk_update_matches_definition_and_splits() -> None:
    C = 4
    k, v, valid = _tokens()
    B, H, T, d = k.shape
    N = 6
    state = _empty_state(B, H, d, N, F64)
    n0 = torch.zeros(B, dtype=torch.int64)
    pk, pv, sk, sv = torch.ops.mka.chunk_update(k, v, valid, n0, *state, C)
    for b, (done, part) in enumerate(_naive_chunks(k, valid, C)):
        for c, mean in enumerate(done):
            torch.testing.assert_close(sk[b, :, c], mean)
        assert sk[b, :, len(done) :].abs().sum() == 0
        torch.testing.assert_close(pk[b], part)
    # the same result when fed in uneven pieces that cross chunk boundaries
    st, n = state, n0
    for a, e in [(0, 1), (1, 6), (6, 7), (7, 18), (18, 23)]:
        st = torch.ops.mka.chunk_update(k[:, :, a:e], v[:, :, a:e], valid[:, a:e], n, *st, C)
        n = n + valid[:, a:e].sum(-1)
    for got, want in zip(st, (pk, pv, sk, sv)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("T", [3, 4, 23])
def test_chunk_update_first_call_without_padding(T: int) -> None:
    """All tokens real, nothing seen: chunks are row blocks (a shortcut); equal to the definition, carried
    partial sum included, and to feeding the tokens one by one."""
    C, N = 4, 6
    k, v, _ = _tokens(T=T)
    B, H, _, d = k.shape
    valid = torch.ones(B, T, dtype=torch.bool)
    n0 = torch.zeros(B, dtype=torch.int64)
    pk0, pv0, sk0, sv0 = _empty_state(B, H, d, N, F64)
    pk0 = torch.randn_like(pk0)  # a carried partial sum (not reachable from a real cache, but part of the op)
    pk, pv, sk, sv = torch.ops.mka.chunk_update(k, v, valid, n0, pk0, pv0, sk0 + 1.0, sv0, C)
    for b, (done, part) in enumerate(_naive_chunks(k, valid, C)):
        if done:
            torch.testing.assert_close(sk[b, :, 0], done[0] + pk0[b] / C)
        for c, mean in enumerate(done[1:], 1):
            torch.testing.assert_close(sk[b, :, c], mean)
        assert (sk[b, :, len(done) :] == 1.0).all()  # slots not completed keep their values
        torch.testing.assert_close(pk[b], part + (0 if done else pk0[b]))
    st, n = (pk0, pv0, sk0 + 1.0, sv0), n0
    for t in range(T):
        st = torch.ops.mka.chunk_update(k[:, :, t : t + 1], v[:, :, t : t + 1], valid[:, t : t + 1], n, *st, C)
        n = n + 1
    for got, want in zip(st, (pk, pv, sk, sv)):
        torch.testing.assert_close(got, want)


def test_chunk_update_capacity_error() -> None:
    k, v, _ = _tokens(T=12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="summ_k has 2 chunk slots"):
        torch.ops.mka.chunk_update(k, v, valid, torch.zeros(2, dtype=torch.int64), *_empty_state(2, 2, 3, 2, F64), 4)


def test_chunk_update_gradcheck_and_opcheck() -> None:
    k, v, valid = _tokens(T=11)
    n_seen = torch.tensor([0, 3])
    g = torch.Generator().manual_seed(1)
    st = [torch.randn(2, 2, 3, generator=g, dtype=F64) for _ in range(2)]
    st += [torch.randn(2, 2, 5, 3, generator=g, dtype=F64) for _ in range(2)]
    ins = [t.clone().requires_grad_() for t in (k, v, *st)]
    assert torch.autograd.gradcheck(
        lambda a, b_, c, e, f, h: torch.ops.mka.chunk_update(a, b_, valid, n_seen, c, e, f, h, 3), ins
    )
    args = (k.float().requires_grad_(), v.float(), valid, n_seen, *[s.float() for s in st], 3)
    opcheck(torch.ops.mka.chunk_update.default, args)


def _naive_recall(q_r, summ, pos, C, R, bank=None, bank_valid=None):
    B, H, T, _ = q_r.shape
    found_sets = {}
    for b in range(B):
        for h in range(H):
            for t in range(T):
                cands = {c: float(q_r[b, h, t] @ summ[b, h, c]) for c in range(int(pos[b, t]) // C)}
                if bank is not None:
                    N = summ.shape[2]
                    for m in range(bank.shape[2]):
                        if bank_valid is None or bank_valid[b, m]:
                            cands[N + m] = float(q_r[b, h, t] @ bank[b, h, m])
                found_sets[b, h, t] = set(sorted(cands, key=lambda c: -cands[c])[:R])
    return found_sets


@pytest.mark.parametrize("with_bank", [False, True])
def test_recall_is_causal_and_top_r(with_bank: bool) -> None:
    C, R = 3, 2
    B, H, T, d, N, M = 2, 2, 14, 4, 5, 3
    g = torch.Generator().manual_seed(2)
    q_r = torch.randn(B, H, T, d, generator=g)
    summ = torch.randn(B, H, N, d, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.2
    pos = real_positions(valid, torch.tensor([0, 4]))
    bank = torch.randn(B, H, M, d, generator=g) if with_bank else None
    bank_valid = torch.tensor([[True, False, True], [True, True, True]]) if with_bank else None
    idx, found = torch.ops.mka.recall_select(q_r, summ, pos, C, R, bank, bank_valid)
    want = _naive_recall(q_r, summ, pos, C, R, bank, bank_valid)
    for (b, h, t), chosen in want.items():
        got = {int(i) for i, f in zip(idx[b, h, t], found[b, h, t]) if f}
        assert got == chosen, (b, h, t)
        assert all(c >= N or (c + 1) * C <= int(pos[b, t]) for c in got)  # causal: only completed chunks
    opcheck(torch.ops.mka.recall_select.default, (q_r, summ, pos, C, R, bank, bank_valid))


def test_recall_mask_and_mix() -> None:
    B, H, T, S, d = 1, 1, 2, 3, 2
    mem_k = torch.arange(B * H * S * d, dtype=torch.float32).view(B, H, S, d)
    mem_v = -mem_k
    idx = torch.tensor([[[[2, 0], [1, 0]]]])
    found = torch.tensor([[[[True, True], [False, False]]]])
    sel = recall_mask(idx, found, S)
    assert sel.tolist() == [[[[True, False, True], [False, False, False]]]]
    q_r = torch.ones(B, H, T, d)
    k3, v3 = recall_mix(q_r, mem_k, mem_v, sel, 0.5)
    w = torch.softmax(torch.stack([q_r[0, 0, 0] @ mem_k[0, 0, 2], q_r[0, 0, 0] @ mem_k[0, 0, 0]]) * 0.5, 0)
    torch.testing.assert_close(k3[0, 0, 0], w[0] * mem_k[0, 0, 2] + w[1] * mem_k[0, 0, 0])
    torch.testing.assert_close(v3[0, 0, 0], -k3[0, 0, 0])
    assert torch.isfinite(k3).all() and k3[0, 0, 1].abs().sum() == 0  # nothing recalled -> zeros


@pytest.mark.parametrize(
    ("over", "name"),
    [
        (dict(top_r=0), "top_r"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-2), "chunk_size"),
        (dict(pos=torch.zeros(2, 5, dtype=torch.int32)), "pos"),
        (dict(summ_k=torch.zeros(2, 3, 4, 4)), "summ_k"),
        (dict(bank_k=torch.zeros(2, 2, 3, 5)), "bank_k"),
        (dict(bank_valid=torch.ones(2, 3, dtype=torch.bool)), "bank_valid"),
    ],
)
def test_recall_bad_input_names_the_argument(over, name: str) -> None:
    args = dict(
        q_r=torch.zeros(2, 2, 5, 4),
        summ_k=torch.zeros(2, 2, 4, 4),
        pos=torch.zeros(2, 5, dtype=torch.int64),
        chunk_size=4,
        top_r=2,
        bank_k=None,
        bank_valid=None,
    )
    args.update(over)
    with pytest.raises(ValueError, match=name):
        torch.ops.mka.recall_select(**args)


def test_chunk_update_bad_input_names_the_argument() -> None:
    k, v, valid = _tokens(T=5, dtype=torch.float32)
    st = _empty_state(2, 2, 3, 2)
    n0 = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="chunk_size"):
        torch.ops.mka.chunk_update(k, v, valid, n0, *st, 0)
    with pytest.raises(ValueError, match="part_k"):
        torch.ops.mka.chunk_update(k, v, valid, n0, st[0].bfloat16(), *st[1:], 4)
    with pytest.raises(ValueError, match="summ_v"):
        torch.ops.mka.chunk_update(k, v, valid, n0, *st[:3], torch.zeros(2, 2, 3, 3), 4)


def test_chunk_update_backward_opcheck() -> None:
    k, v, valid = _tokens(T=11, dtype=torch.float32)
    n_seen = torch.tensor([0, 3])
    st = [torch.randn(2, 2, 3), torch.randn(2, 2, 3), torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 3)]
    grads = [torch.randn_like(t) for t in st]
    opcheck(torch.ops.mka.chunk_update_backward.default, (*grads, k, v, valid, n_seen, *st, 3))
