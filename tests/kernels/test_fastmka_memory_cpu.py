"""The fused CPU memory path (kernels/fastmka_memory_cpu) against the mka:: reference ops it stands for,
composed as SiteMemory.mix_levels composes them: outputs, new state and every gradient."""

from __future__ import annotations

import pytest
import torch

from mka_compile import kernels as K
from mka_compile.kernels import fastmka_memory_cpu as fused
from mka_compile.layers.attention import routing_weights

pytestmark = pytest.mark.skipif(fused.extension() is None, reason="the fused CPU extension did not build here")


def reference(k1, v1, q, logits, gate, valid, state, *, session, longterm, beta, chunk, top_r, scale):
    """The composition of the reference ops (what mix_levels runs without the fused path)."""
    n_seen, ema_k, ema_v, part_k, part_v, summ_k, summ_v = state
    B, Hkv, T, d = k1.shape
    H = q.shape[-1] // d
    L = 1 + session + longterm
    G = logits.shape[-1] // L
    ks, vs = [k1], [v1]
    if session:
        sk, sv, ema_k, ema_v = K.session_scan(k1, v1, beta, valid, ema_k, ema_v, n_seen)
        ks.append(sk)
        vs.append(sv)
    has_recall = None
    if longterm:
        part_k, part_v, summ_k, summ_v = torch.ops.mka.chunk_update(
            k1, v1, valid, n_seen, part_k, part_v, summ_k, summ_v, chunk
        )
        q_r = q.view(B, T, Hkv, H // Hkv, d).mean(3).transpose(1, 2)
        pos = K.real_positions(valid, n_seen)
        idx, found = torch.ops.mka.recall_select(q_r, summ_k, pos, chunk, top_r, None, None)
        has_recall = found[:, 0, :, 0]
        sel = K.recall_mask(idx, found, summ_k.shape[2])
        k3, v3 = K.recall_mix(q_r, summ_k, summ_v, sel, scale)
        ks.append(k3)
        vs.append(v3)
    lam = routing_weights(lambda _: logits, gate, q, has_recall, L, G)
    kf, vf = K.route_mix(lam, ks, vs)
    return kf, vf, lam, (ema_k, ema_v, part_k, part_v, summ_k, summ_v)


def _case(seed, *, B=2, Hkv=2, rep=2, T=37, d=8, G=1, levels=(True, True), chunk=4, top_r=3, slots=12,
          carry=0, pad=True):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    session, longterm = levels
    L = 1 + session + longterm
    base = r(B, T, Hkv * d)  # keys as a projection gives them: head views of [B, T, Hkv*d]
    k1 = base.view(B, T, Hkv, d).transpose(1, 2)
    v1 = r(B, Hkv, T, d)
    q = r(B, T, Hkv * rep * d)
    logits = r(B, T, G * L)
    gate = torch.tensor([0.7])
    valid = torch.ones(B, T, dtype=torch.bool)
    if pad:
        valid[0, :3] = False  # left padding
        valid[1, -2:] = False  # right padding
        valid[1, 10] = False  # a hole
    n_seen = torch.tensor([carry, carry + 3] if B == 2 else [carry] * B, dtype=torch.int64)
    state = (
        n_seen,
        r(B, Hkv, d) if carry else torch.zeros(B, Hkv, d),
        r(B, Hkv, d) if carry else torch.zeros(B, Hkv, d),
        r(B, Hkv, d) if carry else torch.zeros(B, Hkv, d),
        r(B, Hkv, d) if carry else torch.zeros(B, Hkv, d),
        r(B, Hkv, slots, d),
        r(B, Hkv, slots, d),
    )
    if carry:  # the partial chunk holds n_seen % chunk tokens; slots past the completed chunks are unused (zero)
        for b in range(B):
            done = int(n_seen[b]) // chunk
            state[5][b, :, done:] = 0
            state[6][b, :, done:] = 0
            if int(n_seen[b]) % chunk == 0:
                state[3][b] = 0
                state[4][b] = 0
    else:
        state[5].zero_()
        state[6].zero_()
    opts = dict(session=session, longterm=longterm, beta=0.8, chunk=chunk, top_r=top_r, scale=0.35)
    return (k1, v1, q, logits, gate, valid, state), opts


CASES = {
    "default": {},
    "per-head routing": dict(G=2),
    "session only": dict(levels=(True, False)),
    "long-term only": dict(levels=(False, True)),
    "no padding": dict(pad=False),
    "state carried": dict(carry=9),
    "mha": dict(rep=1),
    "recall all": dict(top_r=20),
    "one token": dict(T=1, carry=9, pad=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference_ops(name):
    args, opts = _case(0, **CASES[name])
    kf, vf, lam, st = fused.memory(*args, **opts)
    rkf, rvf, rlam, rst = reference(*args, **opts)
    torch.testing.assert_close(kf, rkf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vf, rvf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lam, rlam, rtol=1e-6, atol=1e-6)
    for a, b in zip(st, rst):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_reference_ops(name):
    args, opts = _case(1, **CASES[name])
    leaves = [t.detach().clone().requires_grad_() for t in args[:5]]
    w = torch.randn(2, *args[0].shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (fused.memory, reference):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        kf, vf, *_ = fn(*xs, *args[5:], **opts)
        ((kf * w[0]).sum() + (vf * w[1]).sum()).backward()
        grads.append([x.grad for x in xs])
    for name_, a, b in zip(("k1", "v1", "q", "logits", "gate"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name_: f"grad of {n}: {m}")


def test_identity_at_zero_gate():
    args, opts = _case(2)
    args = (*args[:4], torch.zeros(1), *args[5:])
    kf, vf, lam, _ = fused.memory(*args, **opts)
    assert torch.equal(kf, args[0]) and torch.equal(vf, args[1])
    assert torch.equal(lam[..., 0], torch.ones_like(lam[..., 0]))


def test_not_used_when_traced_or_off_cpu():
    x = torch.zeros(1, 1, 2, 2)
    assert fused.usable(x)
    assert not fused.usable(x.double())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not fused.usable(mode.from_tensor(x))


@pytest.mark.parametrize("name", list(CASES))
def test_mka_levels_match_reference_ops(name):
    """MKA mode's inference path: the session levels, the recalled slot sets, the routing and the new state."""
    args, opts = _case(3, **CASES[name])
    k1, v1, q, logits, gate, valid, state = args
    with torch.no_grad():
        sk, sv, idx, found, lam, st = fused.levels(*args, **opts)
        _, _, rlam, rst = reference(*args, **opts)
    torch.testing.assert_close(lam, rlam, rtol=1e-6, atol=1e-6)
    for a, b in zip(st, rst):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if opts["session"]:
        rsk, rsv, _, _ = K.session_scan(k1, v1, opts["beta"], valid, state[1], state[2], state[0])
        torch.testing.assert_close(sk, rsk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sv, rsv, rtol=1e-5, atol=1e-5)
    else:
        assert sk is None and sv is None
    if opts["longterm"]:
        B, Hkv, T, d = k1.shape
        q_r = q.view(B, T, Hkv, -1, d).mean(3).transpose(1, 2)
        ridx, rfound = torch.ops.mka.recall_select(
            q_r, rst[4], K.real_positions(valid, state[0]), opts["chunk"], opts["top_r"], None, None
        )
        slots = rst[4].shape[2]
        assert torch.equal(K.recall_mask(idx, found, slots), K.recall_mask(ridx, rfound, slots))
        assert torch.equal(found.sum(-1), rfound.sum(-1))
    else:
        assert idx is None and found is None


def test_mka_levels_refuse_autograd():
    args, opts = _case(4)
    leaf = args[0].detach().requires_grad_()
    with pytest.raises(RuntimeError, match="no backward"):
        fused.levels(leaf, *args[1:], **opts)


def test_overwrite_reuses_the_projection_buffers():
    """Without autograd, ``overwrite`` writes kf, vf over head views of [B, T, Hkv*d] projections: same values."""
    args, opts = _case(5)
    with torch.no_grad():
        kf, vf, lam, st = fused.memory(*args, **opts)
        k1 = args[0].transpose(1, 2).contiguous().transpose(1, 2)  # a head view of its own [B, T, Hkv, d] buffer
        v1 = args[1].transpose(1, 2).contiguous().transpose(1, 2)
        okf, ovf, olam, ost = fused.memory(k1, v1, *args[2:], **opts, overwrite=True)
    assert okf.data_ptr() == k1.data_ptr() and ovf.data_ptr() == v1.data_ptr()
    torch.testing.assert_close(okf, kf, rtol=0, atol=0)
    torch.testing.assert_close(ovf, vf, rtol=0, atol=0)
    for a, b in zip(ost, st):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    leaf = args[0].detach().requires_grad_()  # under autograd the inputs are kept
    kf2, *_ = fused.memory(leaf, *args[1:], **opts, overwrite=True)
    assert kf2.data_ptr() != leaf.data_ptr()


def test_ninja_from_this_environment_is_found(monkeypatch):
    """An unactivated virtual environment's ninja (the dependency) is put on PATH for the build."""
    import shutil
    import sysconfig
    from pathlib import Path

    if not (Path(sysconfig.get_path("scripts")) / "ninja").exists():
        pytest.skip("ninja is not installed next to this interpreter")
    monkeypatch.setenv("PATH", "/nonexistent")
    fused._ninja_on_path()
    assert shutil.which("ninja") == str(Path(sysconfig.get_path("scripts")) / "ninja")
