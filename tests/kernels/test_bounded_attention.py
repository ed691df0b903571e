"""``mka::bounded_attention`` against attention computed another way: dense masked attention over the same keys, and
keys rotated at their new positions directly."""

from __future__ import annotations

import pytest
import torch

from mka_compile import kernels as K
from mka_compile.kernels.bounded_attention.reference import BLOCK_T, rotate_by


def _rope(x, pos, freqs, interleaved):
    """``x: [B, G, P, d]`` rotated at positions ``pos: [P]``."""
    return rotate_by(x, pos.double()[:, None] * freqs.double(), interleaved)


def _case(B=2, H=4, G=2, T=5, P=11, M=7, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=dtype)
    k = torch.randn(B, G, P, d, generator=g, dtype=dtype)
    v = torch.randn(B, G, P, d, generator=g, dtype=dtype)
    idx = torch.randint(-2, P, (B, G, T, M), generator=g)
    idx[..., 0] = torch.randint(0, P, (B, G, T), generator=g)  # at least one key per query
    return q, k, v, idx


def test_equals_dense_attention_over_the_selected_keys():
    q, k, v, idx = _case()
    out, lse = K.bounded_attention(q, k, v, idx, scale=0.3)
    B, H, T, d = q.shape
    G = k.shape[1]
    rep = H // G
    for b in range(B):
        for h in range(H):
            for t in range(T):
                sel = idx[b, h // rep, t]
                sel = sel[sel >= 0]
                # a key listed twice counts twice: build the dense attention from the list itself
                s = (k[b, h // rep, sel] @ q[b, h, t]) * 0.3
                p = torch.softmax(s, 0)
                want = p @ v[b, h // rep, sel]
                torch.testing.assert_close(out[b, h, t], want)
                torch.testing.assert_close(lse[b, h, t].double(), torch.logsumexp(s, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [8, 4])  # full and partial rotary width
def test_delta_moves_keys_to_new_positions(interleaved, rot):
    """Keys rotated at their true positions, moved by ``delta``, score like keys rotated at the new positions."""
    B, H, G, T, P, M, d = 1, 2, 1, 3, 6, 6, 8
    g = torch.Generator().manual_seed(1)
    freqs = 1.0 / (100.0 ** (torch.arange(rot // 2, dtype=torch.float32) * 2 / rot))
    raw_k = torch.randn(B, G, P, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, G, P, d, generator=g, dtype=torch.float64)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    true_pos = torch.arange(P) * 7 + 1000
    new_pos = torch.tensor([3, 5, 8, 9, 10, 12])
    k_true = _rope(raw_k, true_pos, freqs, interleaved)
    k_new = _rope(raw_k, new_pos, freqs, interleaved)
    idx = torch.arange(P).expand(B, G, T, M).contiguous()
    delta = (new_pos - true_pos).expand(B, G, T, M).contiguous()
    out, lse = K.bounded_attention(q, k_true, v, idx, delta, freqs, 0.5, interleaved)
    want, want_lse = K.bounded_attention(q, k_new, v, idx, None, None, 0.5, interleaved)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    plain, _ = K.bounded_attention(q, k_true, v, idx, None, None, 0.5, interleaved)
    assert not torch.allclose(plain, want)  # the move matters


def test_query_without_keys_gives_zero_and_long_sequences_block():
    q, k, v, idx = _case(T=BLOCK_T + 3, P=9)
    idx[:, :, 4] = -1
    out, lse = K.bounded_attention(q, k, v, idx)
    assert torch.all(out[:, :, 4] == 0) and torch.all(torch.isneginf(lse[:, :, 4]))
    want, _ = K.bounded_attention(q[:, :, -3:], k, v, idx[:, :, -3:])
    torch.testing.assert_close(out[:, :, -3:], want)  # the second block equals the same queries alone


def test_gradients_match_finite_differences():
    q, k, v, idx = _case(B=1, H=2, G=1, T=3, P=5, M=4, d=4)
    freqs = torch.tensor([0.3, 0.01])
    delta = torch.randint(-5, 5, idx.shape, generator=torch.Generator().manual_seed(2))
    ins = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    fn = lambda a, b, c: K.bounded_attention(a, b, c, idx, delta, freqs, 0.7, False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ins)  # out and lse


def test_opcheck():
    q, k, v, idx = _case(dtype=torch.float32)
    delta = torch.zeros_like(idx)
    freqs = torch.tensor([0.5, 0.1], dtype=torch.float32)
    args = (q.requires_grad_(True), k, v, idx, delta, freqs, 0.5, True)
    torch.library.opcheck(torch.ops.mka.bounded_attention.default, args)


def test_bad_inputs_name_the_argument():
    q, k, v, idx = _case(dtype=torch.float32)
    with pytest.raises(ValueError, match="idx"):
        K.bounded_attention(q, k, v, idx.int())
    with pytest.raises(ValueError, match="kv heads"):
        K.bounded_attention(q[:, :3], k, v, idx)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [8, 4])
def test_runs_sharing_one_move_equal_entry_by_entry(interleaved, rot):
    """``run``: the query is turned once per run of entries; outputs and gradients equal turning every key."""
    B, H, G, T, P, d, run = 2, 4, 2, 5, 40, 8, 4
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, H, T, d), (B, G, P, d), (B, G, P, d)))
    idx = torch.randint(-1, P, (B, G, T, 3 * run), generator=g)
    delta = torch.randint(-(10**5), 10**5, (B, G, T, 3), generator=g).repeat_interleave(run, -1)
    freqs = 1.0 / (100.0 ** (torch.arange(rot // 2, dtype=torch.float32) * 2 / rot))
    outs = []
    for r in (1, run):
        ins = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
        out, lse = K.bounded_attention(*ins, idx, delta, freqs, 0.5, interleaved, run=r)
        grads = torch.autograd.grad((out * out).sum() + lse.sum(), ins)
        outs.append((out, lse, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="run"):
        K.bounded_attention(q, k, v, idx, delta, freqs, 0.5, interleaved, run=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [8, 4])
def test_cpu_kernel_equals_the_reference(dtype, interleaved, rot):
    """The C++ CPU kernel (``kernels/bounded_attention/extension.cpp``, the op's CPU implementation where it builds)
    against the reference: skipped entries, a query with none, moves in runs and entry by entry; an entry past the
    pool is refused."""
    from mka_compile.kernels.bounded_attention import cpu

    if cpu.extension() is None:
        pytest.skip("the C++ CPU kernel did not build here (or MKA_CPU_FUSED=0)")
    B, H, G, T, P, d = 2, 6, 3, 5, 37, 12
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=g, dtype=dtype) for s in ((B, H, T, d), (B, G, P, d), (B, G, P, d)))
    idx = torch.randint(-1, P, (B, G, T, 24), generator=g)
    idx[0, 1, 2] = -1  # no entry
    delta = torch.randint(-3000, 3000, (B, G, T, 6), generator=g).repeat_interleave(4, -1)
    delta[..., :5] = torch.randint(-9, 9, (B, G, T, 5), generator=g)  # a few entries moved one by one
    delta[..., 20:] = 0
    freqs = 1.0 / (100.0 ** (torch.arange(rot // 2, dtype=torch.float32) * 2 / rot))
    args = (q, k, v, idx, delta, freqs, 0.4, interleaved)
    out, lse = torch.ops.mka.bounded_attention(*args, 1)
    want, want_lse = K.reference_bounded_attention(*args)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)
    assert torch.all(out[0, 2:4, 2] == 0) and torch.all(torch.isneginf(lse[0, 2:4, 2]))
    got = cpu.extension().forward(*args)  # the kernel itself ran (not a fallback)
    torch.testing.assert_close(got[0], out, rtol=0, atol=0)
    idx[1, 0, 0, 3] = P
    with pytest.raises(RuntimeError, match="past the pool"):
        torch.ops.mka.bounded_attention(q, k, v, idx, delta, freqs, 0.4, interleaved, 1)
