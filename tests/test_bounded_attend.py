""":func:`mka_compile.bounded.attend` against a per-query loop that lists each query's tokens and their positions
straight from the definition (``mka_compile/bounded.py``, ``mka_compile/bounded_recall.py``), with padding, several
calls, moved positions and both recall keys (``chunk_keys``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mka_compile
from mka_compile import MKAConfig, bounded
from mka_compile.kernels.bounded_attention import rotate_by


# -- the attention step against its definition --------------------------------------------------------------------
def _rot(x, pos, freqs, interleaved=False):
    return rotate_by(x, torch.as_tensor(pos, dtype=torch.float64)[..., None] * freqs.double(), interleaved)


def _naive(q_raw, k_raw, v, q_r, summ_k, slot_of, real_of, cfg, freqs, trained, scale, bank=None):
    """Per query (b, h, real position t): its tokens and their positions from the definition, then one softmax.
    ``q_raw: [B, H, N, d]`` etc. indexed by real position; ``slot_of[b]``: real position -> the position the model
    rotates at (real position + the row's padding). ``bank``: ``(keys [G, M, C, d] un-rotated, values)``, chunks
    every query may recall too, laid out right before its window (before its own recalled chunks)."""
    B, H, N, d = q_raw.shape
    G = k_raw.shape[1]
    S, W, C, R = cfg.sink_tokens, cfg.window, cfg.chunk_size, cfg.exact_recall
    out = torch.zeros(B, H, N, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(real_of[b]):
                ws = C * (max(0, t - W + 1) // C)
                entries = [(i, i) for i in range(ws, t + 1)]
                avail = ws // C
                M = 0 if bank is None else bank[0].shape[1]
                chosen = []
                if R and avail and cfg.chunk_keys == "mean":
                    scores = summ_k[b, g, :avail].double() @ q_r[b, g, t].double()
                elif R and avail + M:  # the bound: centre . q plus each RoPE pair's radius times |q's pair|
                    kb = k_raw[b, g, : avail * C].double().view(avail, C, d)
                    if M:  # candidates: own chunks 0 .. avail - 1, then the bank's
                        kb = torch.cat([kb, bank[0][g].double()])
                    qh = q_raw[b, g * (H // G) : (g + 1) * (H // G), t].double()  # (rep, d)
                    mid = kb.mean(1)
                    dev = kb - mid[:, None]
                    rad = torch.sqrt(dev[..., : d // 2] ** 2 + dev[..., d // 2 :] ** 2).amax(1)  # (avail, d/2)
                    qn = torch.sqrt(qh[:, : d // 2] ** 2 + qh[:, d // 2 :] ** 2)  # (rep, d/2)
                    scores = mid @ qh.sum(0) + rad @ qn.sum(0)
                if R and avail + M:
                    top = scores.topk(min(R, len(scores))).indices.tolist()
                    chosen = sorted(top, key=lambda c: (c < avail, c))  # the bank's first, then own in order
                move = trained and t >= trained
                n_bank = sum(c >= avail for c in chosen)
                for r, c in enumerate(chosen):
                    for o in range(C):
                        if c >= avail:  # a bank chunk: before the window, with the other bank chunks
                            at = ws - (len(chosen) - r) * C + o if move else ws - (n_bank - r) * C + o
                            entries.append((("bank", c - avail, o), at))
                            continue
                        i = c * C + o
                        if i >= S:
                            entries.append((i, ws - (len(chosen) - r) * C + o if move else i))
                for s in range(min(S, ws)):
                    entries.append((s, ws - len(chosen) * C - S + s if move else s))
                qv = _rot(q_raw[b, h, t].double(), slot_of[b](t), freqs)
                kk = [bank[0][g, i[1], i[2]] if isinstance(i, tuple) else k_raw[b, g, i] for i, _ in entries]
                vv = [bank[1][g, i[1], i[2]] if isinstance(i, tuple) else v[b, g, i] for i, _ in entries]
                ks = torch.stack([_rot(k.double(), slot_of[b](p), freqs) for k, (_, p) in zip(kk, entries)])
                p = torch.softmax(ks @ qv * scale, 0)
                out[b, h, t] = p @ torch.stack(vv).double()
    return out


@pytest.mark.parametrize("trained", [0, 40])  # 40: queries from position 40 on see moved keys
@pytest.mark.parametrize("recall,keys", [(0, "bounds"), (2, "bounds"), (2, "mean")])
def test_attend_equals_its_definition(trained, recall, keys):
    torch.manual_seed(0)
    cfg = MKAConfig(window=10, sink_tokens=3, chunk_size=4, top_r=2, recall_chunks=recall, chunk_keys=keys)
    B, H, G, d, N = 2, 4, 2, 8, 57
    pads = [0, 5]  # row 1 is left-padded by 5 slots and has 5 real tokens fewer
    real_of = [N, N - 5]
    freqs = 1.0 / (50.0 ** (torch.arange(d // 2, dtype=torch.float32) * 2 / d))
    q_raw, q_r = torch.randn(B, H, N, d), torch.randn(B, G, N, d)
    k_raw, v = torch.randn(B, G, N, d), torch.randn(B, G, N, d)
    summ_k = torch.randn(B, G, N // 4 + 1, d)
    slot_of = [lambda t, p=p: t + p for p in pads]
    want = _naive(q_raw, k_raw, v, q_r, summ_k, slot_of, real_of, cfg, freqs, trained, 0.4)

    # the model's view: slot-major tensors, row 1 padded on the left; fed in calls of 20, 1, 1, 15, 20 slots
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, : pads[1]] = False
    real_idx = (valid.long().cumsum(-1) - 1).clamp_min(0)  # (B, N) real position of each slot

    def at_slots(x):  # [B, h, N_real, d] -> [B, h, N_slots, d], rotated at slot positions when asked
        return torch.stack([x[b][:, real_idx[b]] for b in range(B)])

    slots = torch.arange(N)
    qs = _rot(at_slots(q_raw), slots, freqs).float()
    ks = _rot(at_slots(k_raw), slots, freqs).float()
    vs, qrs = at_slots(v), at_slots(q_r)
    store = bounded.BoundedStore.empty(B, G, d, ks, cfg)
    got = torch.zeros(B, H, N, d)
    for lo, hi in ((0, 20), (20, 21), (21, 22), (22, 37), (37, N)):
        out = bounded.attend(
            store, qs[:, :, lo:hi], ks[:, :, lo:hi], vs[:, :, lo:hi], valid[:, lo:hi], qrs[:, :, lo:hi], summ_k,
            cfg, freqs, False, trained, 0.4,
        )  # fmt: skip
        got[:, :, lo:hi] = out
    for b in range(B):
        torch.testing.assert_close(got[b][:, valid[b]].double(), want[b][:, : real_of[b]], rtol=2e-5, atol=2e-5)
        assert torch.all(got[b][:, ~valid[b]] == 0)  # padded queries attend to nothing
    rep = mka_compile.memory_report(type("C", (), {"layers": [type("L", (), {"stores": [store]})()]})())
    assert rep["tokens"] == N
    if recall:  # chunks left the window for the host store
        assert store.chunk_k.shape[2] >= 8 and rep["offloaded_bytes"] > 0
    else:  # nothing can recall them: they are dropped
        assert rep["offloaded_bytes"] == 0


@pytest.mark.parametrize("trained", [0, 40])
def test_attend_with_a_memory_bank_equals_its_definition(trained):
    """A bank's chunks compete with the query's own by the same bound and are laid out right before the window, in
    the row's frame (row 1 is padded and rotated at slot positions)."""
    from mka_compile.bounded_bank import BankLayer

    torch.manual_seed(1)
    cfg = MKAConfig(window=10, sink_tokens=3, chunk_size=4, top_r=2, recall_chunks=2)
    B, H, G, d, N, M, C = 2, 4, 2, 8, 45, 5, 4
    pads = [0, 5]
    real_of = [N, N - 5]
    freqs = 1.0 / (50.0 ** (torch.arange(d // 2, dtype=torch.float32) * 2 / d))
    q_raw, k_raw, v = torch.randn(B, H, N, d), torch.randn(B, G, N, d), torch.randn(B, G, N, d)
    bk, bv = torch.randn(G, M, C, d) * 1.5, torch.randn(G, M, C, d)  # larger keys: some bank chunks win
    want = _naive(
        q_raw, k_raw, v, None, None, [lambda t, p=p: t + p for p in pads], real_of, cfg, freqs, trained, 0.4, (bk, bv)
    )

    starts = torch.arange(M) * C + 7  # the source's positions (any)
    src_pos = starts[:, None] + torch.arange(C)  # (M, C)
    mid = bk.mean(2)
    dev = bk - mid[:, :, None]
    rad = torch.sqrt(dev[..., : d // 2] ** 2 + dev[..., d // 2 :] ** 2).amax(2)
    bank = BankLayer(_rot(bk, src_pos, freqs).float(), bv, starts, torch.cat([mid, rad], -1).float())

    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, : pads[1]] = False
    real_idx = (valid.long().cumsum(-1) - 1).clamp_min(0)
    slots = torch.arange(N)

    def at_slots(x):
        return torch.stack([x[b][:, real_idx[b]] for b in range(B)])

    qs, ks, vs = _rot(at_slots(q_raw), slots, freqs).float(), _rot(at_slots(k_raw), slots, freqs).float(), at_slots(v)
    store = bounded.BoundedStore.empty(B, G, d, ks, cfg)
    got = torch.zeros(B, H, N, d)
    for lo, hi in ((0, 20), (20, 21), (21, 30), (30, N)):
        got[:, :, lo:hi] = bounded.attend(
            store, qs[:, :, lo:hi], ks[:, :, lo:hi], vs[:, :, lo:hi], valid[:, lo:hi], None, None, cfg, freqs, False,
            trained, 0.4, bank=bank, rot_pos=slots[lo:hi].expand(B, -1),
        )  # fmt: skip
    for b in range(B):
        torch.testing.assert_close(got[b][:, valid[b]].double(), want[b][:, : real_of[b]], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("trained,recall", [(0, 0), (0, 2), (40, 2)])
def test_the_fixed_size_step_equals_attend(trained, recall):
    """:func:`mka_compile.bounded_fixed.attend_one` (the exported decode step: one token per row, fixed shapes) gives
    what :func:`bounded.attend` gives for the whole sequence, token by token from an empty store and from a PyTorch
    prefill's store (``FixedStore.from_store``); a padded row (rotated at its real positions) writes nothing."""
    from mka_compile.bounded_fixed import FixedStore, attend_one

    torch.manual_seed(2)
    cfg = MKAConfig(window=10, sink_tokens=3, chunk_size=4, top_r=2, recall_chunks=recall)
    B, H, G, d, N = 2, 4, 2, 8, 70
    freqs = 1.0 / (50.0 ** (torch.arange(d // 2, dtype=torch.float32) * 2 / d))
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :6] = False
    real = (valid.long().cumsum(-1) - 1).clamp_min(0)
    q, k = (
        _rot(torch.randn(B, H, N, d), real[:, None], freqs).float(),
        _rot(torch.randn(B, G, N, d), real[:, None], freqs).float(),
    )
    v = torch.randn(B, G, N, d)
    want = bounded.attend(
        bounded.BoundedStore.empty(B, G, d, k, cfg), q, k, v, valid, None, None, cfg, freqs, False, trained, 0.4
    )
    prefilled = bounded.BoundedStore.empty(B, G, d, k, cfg)
    bounded.attend(
        prefilled, q[:, :, :40], k[:, :, :40], v[:, :, :40], valid[:, :40], None, None, cfg, freqs, False, trained, 0.4
    )
    for start, fs in (
        (0, FixedStore.empty(B, G, d, d + d // 2, 32, cfg, k)),
        (40, FixedStore.from_store(prefilled, 32, cfg, freqs, False)),
    ):
        outs, store = [], fs
        # kept: a driver's chunk store and recall keys (inputs only), written from what each step completes
        kept = [fs.chunk_k.clone(), fs.chunk_v.clone(), fs.bounds.clone()]
        for t in range(start, N):
            one = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], valid[:, t])
            driven = dataclasses.replace(fs, chunk_k=kept[0].clone(), chunk_v=kept[1].clone(), bounds=kept[2].clone())
            o, fs, (*done, done_at) = attend_one(driven, *one, cfg, freqs, False, trained, 0.4)
            o2, store, _ = attend_one(store, *one, cfg, freqs, False, trained, 0.4)  # the store it returns, whole
            torch.testing.assert_close(o2, o, rtol=0, atol=0)
            outs.append(o)
            for b in (done_at >= 0).nonzero().flatten().tolist():
                for x, part in zip(kept, done):
                    x[b, :, done_at[b]] = part[b]
        got = torch.cat(outs, 2)
        m = valid[:, None, start:, None]
        torch.testing.assert_close(got * m, want[:, :, start:] * m, rtol=1e-5, atol=1e-5)
        assert torch.equal(fs.count, valid.sum(-1))
        assert all(torch.equal(x, y) for x, y in zip(kept, (store.chunk_k, store.chunk_v, store.bounds)))


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("sinks", [0, 2])
def test_a_call_of_padding_only_attends_to_nothing(fused, sinks, monkeypatch):
    """A first short call whose tokens are all padding (nothing stored yet) gives zeros, with the C++ kernel and
    with the reference (``MKA_CPU_FUSED=0``)."""
    monkeypatch.setenv("MKA_CPU_FUSED", fused)
    cfg = MKAConfig(window=8, sink_tokens=sinks, chunk_size=4, recall_chunks=0)
    store = bounded.BoundedStore.empty(2, 1, 4, torch.zeros(1), cfg)
    q, k = torch.randn(2, 2, 3, 4), torch.randn(2, 1, 3, 4)
    none = torch.zeros(2, 3, dtype=torch.bool)
    out = bounded.attend(store, q, k, k, none, None, None, cfg, None, False, 0, 0.5)
    assert torch.equal(out, torch.zeros_like(q)) and int(store.n.sum()) == 0
