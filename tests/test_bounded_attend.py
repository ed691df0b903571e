""":func:`mka_compile.bounded.attend` against a per-query loop that lists each query's tokens and their positions
straight from the definition (``mka_compile/bounded.py``, ``mka_compile/bounded_recall.py``), with padding, several
calls, moved positions and both recall keys (``chunk_keys``)."""

from __future__ import annotations

import pytest
import torch

import mka_compile
from mka_compile import MKAConfig, bounded
from mka_compile.kernels.bounded_attention import rotate_by


# -- the attention step against its definition --------------------------------------------------------------------
def _rot(x, pos, freqs, interleaved=False):
    return rotate_by(x, torch.as_tensor(pos, dtype=torch.float64)[..., None] * freqs.double(), interleaved)


def _naive(q_raw, k_raw, v, q_r, summ_k, slot_of, real_of, cfg, freqs, trained, scale):
    """Per query (b, h, real position t): its tokens and their positions from the definition, then one softmax.
    ``q_raw: [B, H, N, d]`` etc. indexed by real position; ``slot_of[b]``: real position -> the position the model
    rotates at (real position + the row's padding)."""
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
                chosen = []
                if R and avail and cfg.chunk_keys == "mean":
                    scores = summ_k[b, g, :avail].double() @ q_r[b, g, t].double()
                elif R and avail:  # the bound: centre . q plus each RoPE pair's radius times |q's pair|
                    kb = k_raw[b, g, : avail * C].double().view(avail, C, d)
                    qh = q_raw[b, g * (H // G) : (g + 1) * (H // G), t].double()  # (rep, d)
                    mid = kb.mean(1)
                    dev = kb - mid[:, None]
                    rad = torch.sqrt(dev[..., : d // 2] ** 2 + dev[..., d // 2 :] ** 2).amax(1)  # (avail, d/2)
                    qn = torch.sqrt(qh[:, : d // 2] ** 2 + qh[:, d // 2 :] ** 2)  # (rep, d/2)
                    scores = mid @ qh.sum(0) + rad @ qn.sum(0)
                if R and avail:
                    chosen = sorted(scores.topk(min(R, avail)).indices.tolist())
                move = trained and t >= trained
                for r, c in enumerate(chosen):
                    for o in range(C):
                        i = c * C + o
                        if i >= S:
                            entries.append((i, ws - (len(chosen) - r) * C + o if move else i))
                for s in range(min(S, ws)):
                    entries.append((s, ws - len(chosen) * C - S + s if move else s))
                qv = _rot(q_raw[b, h, t].double(), slot_of[b](t), freqs)
                ks = torch.stack([_rot(k_raw[b, g, i].double(), slot_of[b](p), freqs) for i, p in entries])
                p = torch.softmax(ks @ qv * scale, 0)
                out[b, h, t] = p @ torch.stack([v[b, g, i].double() for i, _ in entries])
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
    rep = mka_compile.memory_report(type("C", (), {"layers": [type("L", (), {"store": store})()]})())
    assert rep["tokens"] == N
    if recall:  # chunks left the window for the host store
        assert store.chunk_k.shape[2] >= 8 and rep["offloaded_bytes"] > 0
    else:  # nothing can recall them: they are dropped
        assert rep["offloaded_bytes"] == 0
