"""The ONNX function bodies of the memory ops equal the ``reference_*`` implementations (fp32, 1e-5 relative),
with left padding, carried state, rows that start mid-chunk and more tokens than one scan chunk."""

from __future__ import annotations

import pytest
import torch
from onnx_node import rel, run_node

from mka_compile.kernels import real_positions, reference_chunk_update, reference_recall_select, reference_route_mix
from mka_compile.kernels import reference_session_scan as ref_scan

F32 = torch.float32


def _tokens(B=3, H=2, T=41, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, d, generator=g)
    v = torch.randn(B, H, T, d, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.25
    valid[0, :7] = False  # left padding, then a fresh state: the first real token sets the EMA
    valid[1] = True
    return k, v, valid, g


@pytest.mark.parametrize("T", [1, 41])
def test_session_scan(T: int) -> None:
    k, v, valid, g = _tokens(T=T)
    B, H, _, d = k.shape
    sk, sv = torch.randn(B, H, d, generator=g), torch.randn(B, H, d, generator=g)
    n_seen = torch.tensor([0, 9, 0])  # row 1 carries a state from earlier calls
    sk[0] = sv[0] = sk[2] = sv[2] = 0.0
    want = ref_scan(k, v, valid, sk, sv, n_seen, 0.9)
    got = run_node("SessionScan", [k, v, valid, sk, sv, n_seen], list(want), beta=0.9)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) <= 1e-5


def test_session_scan_padding_leaves_state_untouched() -> None:
    k, v, valid, g = _tokens(T=6)
    valid[:] = False
    sk, sv = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    got = run_node("SessionScan", [k, v, valid, sk, sv, torch.tensor([3, 0, 1])], [k, v, sk, sv], beta=0.8)
    assert torch.equal(got[2], sk) and torch.equal(got[3], sv)


@pytest.mark.parametrize("n_seen", [[0, 0, 0], [6, 3, 13]])
def test_chunk_update(n_seen: list[int]) -> None:
    C, N = 4, 16
    k, v, valid, g = _tokens()
    B, H, _, d = k.shape
    n = torch.tensor(n_seen)
    part_k, part_v = torch.randn(B, H, d, generator=g), torch.randn(B, H, d, generator=g)
    summ_k, summ_v = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)
    args = [k, v, valid, n, part_k, part_v, summ_k, summ_v]
    want = reference_chunk_update(*args, C)
    got = run_node("ChunkUpdate", args, list(want), chunk_size=C)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel(a, b) <= 1e-5


@pytest.mark.parametrize(("N", "top_r"), [(9, 3), (2, 4)])  # fewer slots than R: idx/found padded to R
def test_recall_select(N: int, top_r: int) -> None:
    C = 4
    k, _, valid, g = _tokens(T=29)
    B, H, T, d = k.shape
    q_r = torch.randn(B, H, T, d, generator=g)
    summ_k = torch.randn(B, H, N, d, generator=g)
    pos = real_positions(valid, torch.tensor([0, 5, 2]))  # early positions recall nothing
    idx, found = reference_recall_select(q_r, summ_k, pos, C, top_r)
    got_idx, got_found = run_node("RecallSelect", [q_r, summ_k, pos], [idx, found], chunk_size=C, top_r=top_r)
    assert torch.equal(got_found, found)
    assert torch.equal(got_idx, idx)
    assert found.any() and not found.all()


@pytest.mark.parametrize(("G", "L"), [(1, 3), (2, 2)])
def test_route_mix(G: int, L: int) -> None:
    g = torch.Generator().manual_seed(3)
    B, H, T, d = 2, 2, 7, 4
    lam = torch.softmax(torch.randn(B, G, T, L, generator=g), -1)
    ks = [torch.randn(B, H, T, d, generator=g) for _ in range(L)]
    vs = [torch.randn(B, H, T, d, generator=g) for _ in range(L)]
    want = reference_route_mix(lam, ks, vs)
    got = run_node("RouteMix", [lam, torch.stack(ks), torch.stack(vs)], list(want))
    for a, b in zip(got, want):
        assert a.dtype == F32 and rel(a, b) <= 1e-5
