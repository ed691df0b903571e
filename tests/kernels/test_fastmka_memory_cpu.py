"""``mka::memory_mix`` / ``mka::memory_levels`` (kernels/fastmka_memory_cpu): the fused C++ CPU kernel against the
op's definition, the composed ``mka::`` reference ops (outputs, new state, every gradient, with trained gates and
routers), ``torch.library.opcheck``, and eager against ``torch.compile(backend="aot_eager")``."""

from __future__ import annotations

import pytest
import torch

from mka_compile import kernels as K
from mka_compile.kernels import fastmka_memory_cpu as ops
from mka_compile.kernels.fastmka_memory_cpu import build
from mka_compile.layers.attention import routing_weights

pytestmark = pytest.mark.skipif(not ops.built(), reason="the fused CPU extension did not build here")


def composed(k1, v1, q, logits, gate, valid, state, *, session, longterm, beta, chunk, top_r, scale):
    """The composed reference ops as ``SiteMemory.mix_levels`` runs them without the op (written out here, apart
    from the op's own definition): ``kf, vf: [B, Hkv, T, d]``, ``lam`` and the new state."""
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
          carry=0, pad=True, gate=0.7):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    session, longterm = levels
    L = 1 + session + longterm
    base = r(B, T, Hkv * d)  # keys as a projection gives them: head views of [B, T, Hkv*d]
    k1 = base.view(B, T, Hkv, d).transpose(1, 2)
    v1 = r(B, Hkv, T, d)
    q = r(B, T, Hkv * rep * d)
    # a trained router: logits of a two-layer MLP with random weights, not zero
    w1, w2 = r(q.shape[-1], 16) / q.shape[-1] ** 0.5, r(16, G * L)
    logits = torch.nn.functional.silu(q @ w1) @ w2
    gate = torch.tensor([gate])
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
    "negative gate": dict(gate=-0.4),
    "gate past 1": dict(gate=1.8),
}


def _op_args(args, opts) -> tuple:
    """The op's positional arguments (token-major k1, v1) from a case."""
    k1, v1, q, logits, gate, valid, state = args
    o = opts
    return (k1.transpose(1, 2), v1.transpose(1, 2), q, logits, gate, valid, *state, o["session"], o["longterm"],
            o["beta"], o["chunk"], o["top_r"], o["scale"])  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_composed_ops(name):
    args, opts = _case(0, **CASES[name])
    kf, vf, lam, st = ops.memory_mix(*args, **opts)
    rkf, rvf, rlam, rst = composed(*args, **opts)
    torch.testing.assert_close(kf, rkf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vf, rvf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lam, rlam, rtol=1e-6, atol=1e-6)
    for a, b in zip(st, rst):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the op's own definition (what other devices and dtypes run) is that composition too
    ref = ops.reference_memory_mix(*_op_args(args, opts))
    torch.testing.assert_close(ref[0], rkf.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref[2], rlam, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_composed_ops(name):
    args, opts = _case(1, **CASES[name])
    leaves = [t.detach().clone().requires_grad_() for t in args[:5]]
    w = torch.randn(2, *args[0].shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (ops.memory_mix, composed):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        kf, vf, lam, _ = fn(*xs, *args[5:], **opts)
        wl = torch.randn(lam.shape, generator=torch.Generator().manual_seed(6))  # the routing weights too
        ((kf * w[0]).sum() + (vf * w[1]).sum() + (lam * wl).sum()).backward()
        grads.append([x.grad for x in xs])
    for name_, a, b in zip(("k1", "v1", "q", "logits", "gate"), *grads):
        assert a is not None and b is not None or name_ == "q" and not opts["longterm"], name_
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name_: f"grad of {n}: {m}")


def test_identity_at_zero_gate():
    args, opts = _case(2)
    args = (*args[:4], torch.zeros(1), *args[5:])
    kf, vf, lam, _ = ops.memory_mix(*args, **opts)
    assert torch.equal(kf, args[0]) and torch.equal(vf, args[1])
    assert torch.equal(lam[..., 0], torch.ones_like(lam[..., 0]))


@pytest.mark.parametrize("name", ["default", "per-head routing", "session only", "long-term only", "state carried"])
def test_opcheck_memory_mix(name):
    """Schema, fake implementation, autograd registration and AOT dispatch (static and dynamic shapes)."""
    args, opts = _case(6, **CASES[name])
    op_args = list(_op_args(args, opts))
    for i in range(5):  # k1, v1, q, logits, gate
        op_args[i] = op_args[i].detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.mka.memory_mix.default, tuple(op_args))


@pytest.mark.parametrize("name", ["default", "per-head routing", "session only", "long-term only", "state carried"])
def test_opcheck_memory_levels(name):
    args, opts = _case(7, **CASES[name])
    torch.library.opcheck(torch.ops.mka.memory_levels.default, _op_args(args, opts))


def test_eager_equals_aot_eager_compile():
    """The same op runs in eager mode and under torch.compile: outputs and gradients agree."""
    args, opts = _case(8)
    w = torch.randn(2, *args[0].shape, generator=torch.Generator().manual_seed(8))

    def step(k1, v1, q, logits, gate):
        kf, vf, lam, st = ops.memory_mix(k1, v1, q, logits, gate, *args[5:], **opts)
        return (kf * w[0]).sum() + (vf * w[1]).sum() + lam[..., -1].pow(2).sum(), lam, st

    runs = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        xs = [t.detach().clone().requires_grad_() for t in args[:5]]
        loss, lam, st = fn(*xs)
        loss.backward()
        runs.append((loss.detach(), lam.detach(), [s.detach() for s in st], [x.grad for x in xs]))
    (l0, lam0, st0, g0), (l1, lam1, st1, g1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lam1, lam0, rtol=0, atol=0)
    for a, b in zip(st1 + g1, st0 + g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_graph_holds_the_op():
    """torch.compile sees mka::memory_mix itself (not the composed ops) and its backward."""
    args, opts = _case(9)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    fn = torch.compile(lambda *xs: ops.memory_mix(*xs, *args[5:], **opts)[0].sum(), backend=aot_autograd(
        fw_compiler=backend, bw_compiler=backend), fullgraph=True)  # fmt: skip
    fn(*[t.detach().clone().requires_grad_() for t in args[:5]]).backward()
    assert "mka.memory_mix.default" in seen and "mka.memory_mix_backward.default" in seen
    assert not any(s.startswith(("mka.session_scan", "mka.chunk_update", "mka.route_mix")) for s in seen)


@pytest.mark.parametrize("name", list(CASES))
def test_mka_levels_match_composed_ops(name):
    """MKA mode's inference op: the session levels, the recalled slot sets, the routing and the new state."""
    args, opts = _case(3, **CASES[name])
    k1, v1, q, logits, gate, valid, state = args
    with torch.no_grad():
        sk, sv, idx, found, lam, st = ops.memory_levels(*args, **opts)
        _, _, rlam, rst = composed(*args, **opts)
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
        ops.memory_levels(leaf, *args[1:], **opts)


def test_other_dtypes_run_the_definition_and_refuse_a_backward():
    """float64 on the CPU: the op runs its definition (the composed ops); its backward is the fused pass only."""
    args, opts = _case(10)
    args64 = [a.double() if a.is_floating_point() else a for a in args[:6]]
    state64 = tuple(s.double() if s.is_floating_point() else s for s in args[6])
    kf, vf, lam, st = ops.memory_mix(*args64, state64, **opts)
    rkf, rvf, rlam, rst = composed(*args64, state64, **opts)
    assert kf.dtype == torch.float64 and lam.dtype == torch.float64
    torch.testing.assert_close(kf, rkf, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lam, rlam, rtol=1e-12, atol=1e-12)
    leaf = args64[0].detach().requires_grad_()
    kf, *_ = ops.memory_mix(leaf, *args64[1:], state64, **opts)
    with pytest.raises(NotImplementedError, match="fused CPU pass only"):
        kf.sum().backward()


def test_supports_is_a_fact_of_device_and_dtype():
    """The engine's choice reads device and dtype only, so fake tensors (torch.compile) get the eager answer."""
    x = torch.zeros(1, 1, 2, 2)
    assert ops.supports(x)
    assert not ops.supports(x.double())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert ops.supports(mode.from_tensor(x))


def test_ninja_from_this_environment_is_found(monkeypatch):
    """An unactivated virtual environment's ninja (the dependency) is put on PATH for the build."""
    import shutil
    import sysconfig
    from pathlib import Path

    if not (Path(sysconfig.get_path("scripts")) / "ninja").exists():
        pytest.skip("ninja is not installed next to this interpreter")
    monkeypatch.setenv("PATH", "/nonexistent")
    build._ninja_on_path()
    assert shutil.which("ninja") == str(Path(sysconfig.get_path("scripts")) / "ninja")
