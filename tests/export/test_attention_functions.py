"""The ONNX function bodies of MKA attention equal :func:`reference_mka_attention` (fp32, 1e-5 relative): GQA,
padded keys, rows that see no key, cached decode (Tq < Tk), non-causal, and the L3 recalled entries."""

from __future__ import annotations

import pytest
import torch
from onnx_node import rel, run_node

from mka_compile.kernels import reference_flash_attention, reference_mka_attention


def _case(Tq: int, Tk: int, recall: bool, G: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, d, S, R = 2, 4, 2, 8, 5, 3
    q = torch.randn(B, H, Tq, d, generator=g)
    ks = [torch.randn(B, Hkv, Tk, d, generator=g) for _ in range(2)]
    vs = [torch.randn(B, Hkv, Tk, d, generator=g) for _ in range(2)]
    L = 3 if recall else 2
    lam = torch.softmax(torch.randn(B, G, Tq, L, generator=g), -1)
    kv_valid = torch.ones(B, Tk, dtype=torch.bool)
    kv_valid[1, :4] = False  # left padding: the first queries of row 1 see no key
    q3 = torch.randn(B, H, Tq, d, generator=g)
    mem_k, mem_v = torch.randn(B, Hkv, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g)
    idx = torch.randint(0, S, (B, Hkv, Tq, R if recall else 0), generator=g)
    found = torch.rand(idx.shape, generator=g) > 0.3
    if recall:
        found[0, :, 0] = False  # a query that recalled nothing
    return q, ks, vs, lam, q3, mem_k, mem_v, idx, found, kv_valid


@pytest.mark.parametrize(
    ("Tq", "Tk", "recall", "G", "causal"),
    [(9, 9, True, 1, True), (3, 11, True, 2, True), (1, 7, False, 1, True), (6, 6, False, 2, False)],
)
def test_mka_attention(Tq: int, Tk: int, recall: bool, G: int, causal: bool) -> None:
    q, ks, vs, lam, q3, mem_k, mem_v, idx, found, kv_valid = _case(Tq, Tk, recall, G)
    scale = 0.3
    want = reference_mka_attention(q, ks, vs, lam, q3, mem_k, mem_v, idx, found, kv_valid, scale, causal)
    inputs = [q, torch.stack(ks), torch.stack(vs), lam, kv_valid]
    if recall:
        inputs += [q3, mem_k, mem_v, idx, found]
    got = run_node("MKAAttentionRecall" if recall else "MKAAttention", inputs, [want], scale=scale, causal=int(causal))
    assert not torch.isnan(got[0]).any()
    assert rel(got[0], want) <= 1e-5


@pytest.mark.parametrize(
    ("mask_kind", "Tq", "Tk", "causal"), [(None, 7, 7, True), ("bool", 3, 9, True), ("additive", 6, 6, False)]
)
def test_flash_attention(mask_kind: str | None, Tq: int, Tk: int, causal: bool) -> None:
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, d = 2, 4, 2, 8
    q = torch.randn(B, H, Tq, d, generator=g)
    k, v = torch.randn(B, Hkv, Tk, d, generator=g), torch.randn(B, Hkv, Tk, d, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Tq, Tk, generator=g) > 0.3
        mask[1, :, 0] = False  # a row that sees no key: out 0, lse -inf
    elif mask_kind == "additive":
        mask = torch.randn(1, H, Tq, Tk, generator=g)  # a finite bias (ALiBi-like) ...
        mask[0, 0, 2, :3] = -1.0e9  # ... and hidden keys
    want = reference_flash_attention(q, k, v, mask, 0.25, causal)
    op = "FlashAttention" if mask is None else "FlashAttentionMasked"
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape).masked_fill(~mask, -torch.inf)  # the translation's bool -> additive
    inputs = [q, k, v] if mask is None else [q, k, v, mask]
    out, lse = run_node(op, inputs, list(want), scale=0.25, causal=int(causal))
    assert rel(out, want[0]) <= 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(want[1]))
    fin = torch.isfinite(want[1])
    assert rel(lse[fin], want[1][fin]) <= 1e-5
