"""Each Triton kernel's sweep for ``tools/gpu/check.py --sweep``: its goal-size run, its check against the reference
at an odd-length GQA size, its default tile and candidates (``make_tunables``); ``tools/gpu/sweep.py`` times them."""

from __future__ import annotations

import torch

from tools.gpu.sweep import PLUMBING, Tunable, fa, ma, max_rel_err, mt, pinned_table, rel_err
from tools.gpu.sweep_candidates import GPU_CANDIDATES, SMOKE_CANDIDATES


def _tiles(cfg) -> dict:
    return dict(zip(("block_m", "block_n", "num_warps", "num_stages"), cfg))


def make_tunables(dev, dtype, s, keys) -> list[Tunable]:
    """The sweep of each kernel in ``keys`` at the goal size ``s`` (B, H, T, d; causal)."""
    cpu = dev.type == "cpu"
    cands = SMOKE_CANDIDATES if cpu else GPU_CANDIDATES
    B, H, T, d = s["B"], s["H"], s["T"], s["d"]
    scale = d**-0.5
    g = torch.Generator(device="cpu").manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)  # noqa: E731
    torch.manual_seed(1)  # goal-size inputs are drawn on the device (fast); check-size ones from g
    rd = lambda *shape, dt=dtype: torch.randn(*shape, device=dev, dtype=dt)  # noqa: E731
    q, k, v, go = rd(B, H, T, d), rd(B, H, T, d), rd(B, H, T, d), rd(B, H, T, d)
    # check size: odd length, GQA (4 query heads per kv head)
    Bc, Hkv, Tc = 2, max(1, s["H"] // 4), s["T_check"]
    qc, kc, vc, goc = r(Bc, H, Tc, d), r(Bc, Hkv, Tc, d), r(Bc, Hkv, Tc, d), r(Bc, H, Tc, d)
    es, bd = (2 if q.element_size() == 2 else 4), fa.block_d(d)
    flash_default = lambda table: PLUMBING.INTERPRETER_CONFIG if cpu else table[(es, max(64, bd))][0]  # noqa: E731
    cache: dict[str, object] = {}

    def once(name, fn):
        if name not in cache:
            cache[name] = fn()
        return cache[name]

    out: list[Tunable] = []
    # flash attention forward / backward
    ref_fwd = lambda: fa.reference_flash_attention(qc, kc, vc, None, scale, True)[0]  # noqa: E731
    ref_bwd = lambda: fa.reference_flash_attention_backward(goc, None, qc, kc, vc, None, scale, True)  # noqa: E731
    out.append(
        Tunable(
            "flash_fwd",
            "flash fwd",
            ("BLOCK_M", "BLOCK_N", "warps", "stages"),
            flash_default(fa.FWD_CONFIGS),
            cands["flash_fwd"],
            lambda c: fa.flash_attention_fwd(q, k, v, None, None, True, **_tiles(c))[0],
            lambda c: rel_err(
                fa.flash_attention_fwd(qc, kc, vc, None, None, True, **_tiles(c))[0], once("fwd", ref_fwd)
            ),
        )
    )

    fwd_goal = lambda: fa.flash_attention_fwd(q, k, v, None, None, True)  # noqa: E731

    def flash_bwd(table, c, args):
        with pinned_table(table, args[1], c):
            return fa.flash_attention_bwd(*args, None, None, True)

    def flash_bwd_check(table, c):
        oc, lsec = once("fwd_lse", lambda: fa.flash_attention_fwd(qc, kc, vc, None, None, True))
        return max_rel_err(flash_bwd(table, c, (goc, qc, kc, vc, oc, lsec)), once("bwd", ref_bwd))

    for key, label, table in (
        ("flash_dkdv", "flash bwd dK/dV", fa.DKDV_CONFIGS),
        ("flash_dq", "flash bwd dQ", fa.DQ_CONFIGS),
    ):
        out.append(
            Tunable(
                key,
                label,
                ("BLOCK_M", "BLOCK_N", "warps", "stages"),
                flash_default(table),
                cands[key],
                lambda c, table=table: flash_bwd(table, c, (go, q, k, v, *once("fwd_goal", fwd_goal))),
                lambda c, table=table: flash_bwd_check(table, c),
            )
        )
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    # MKA attention: L1 + L2 + L3 (R=8 over T/64 summaries), as in the timings
    N = max(1, T // 64)
    lam3 = torch.softmax(rd(B, 1, T, 3, dt=torch.float32), -1)
    idx3 = torch.randint(0, N, (B, H, T, 8), device=dev)
    found3 = torch.ones(B, H, T, 8, dtype=torch.bool, device=dev)
    mem = (rd(B, H, N, d, dt=torch.float32), rd(B, H, N, d, dt=torch.float32))
    margs = (q, [k, v], [v, k], lam3, q, *mem, idx3, found3, valid, scale, True)
    Nc = Tc // 16 + 1
    validc = torch.ones(Bc, Tc, dtype=torch.bool, device=dev)
    validc[1, :5] = False
    cargs = (
        qc,
        [kc, kc * 0.5],
        [vc, vc * 0.5],
        torch.softmax(torch.randn(Bc, 1, Tc, 3, generator=g), -1).to(dev),
        r(Bc, H, Tc, d),
        torch.randn(Bc, Hkv, Nc, d, generator=g).to(dev),
        torch.randn(Bc, Hkv, Nc, d, generator=g).to(dev),
        torch.randint(0, Nc, (Bc, Hkv, Tc, 4), generator=g).to(dev),
        (torch.rand(Bc, Hkv, Tc, 4, generator=g) > 0.3).to(dev),
        validc,
        scale,
        True,
    )
    mka_default = mt._config(bd, T, None, None, None, None)
    out.append(
        Tunable(
            "mka_fwd",
            "MKA attention fwd",
            ("BLOCK_M", "BLOCK_N", "warps", "stages"),
            mka_default,
            cands["mka_fwd"],
            lambda c: mt.mka_attention_fwd(*margs, **_tiles(c))[0],
            lambda c: rel_err(
                mt.mka_attention_fwd(*cargs, **_tiles(c))[0], once("mka", lambda: ma.reference_mka_attention(*cargs))
            ),
        )
    )
    out.append(
        Tunable(
            "mka_bwd",
            "MKA attention bwd",
            ("BLOCK_M", "BLOCK_N", "warps", "stages"),
            mka_default,
            cands["mka_bwd"],
            lambda c: mt.mka_attention_bwd(go, *margs, **_tiles(c))[:3],
            lambda c: max_rel_err(
                mt.mka_attention_bwd(goc, *cargs, **_tiles(c))[:3],
                once("mka_bwd", lambda: ma.reference_mka_attention_backward(goc, *cargs)[:3]),
            ),
        )
    )
    for t in out:
        t.table_key = (es, max(64, bd))
    return [t for t in out if t.key in keys]
