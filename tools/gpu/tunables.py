"""Each Triton kernel's sweep for ``tools/gpu_check.py --sweep``: its goal-size run, its check against the reference
at an odd-length GQA size, its default tile and candidates (``make_tunables``); ``tools/gpu_sweep.py`` times them."""

from __future__ import annotations

import torch
from gpu_sweep import PLUMBING, TR, Tunable, da, fa, fm, fmt, ma, max_rel_err, mt, pinned_table, rel_err  # tools/
from gpu_sweep_candidates import GPU_CANDIDATES, SMOKE_CANDIDATES  # tools/ (on the path when run)


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
    # split-K decode: one token over the T-long cache
    q1 = rd(B, H, 1, d)
    qd = qc[:, :, -3:]
    if cpu:
        dec_default = (da.INTERPRETER_BLOCK_N, 1, 1, None)
    else:
        _, bn0, w0, st0 = da.DECODE_CONFIGS[(es, max(64, bd))][0]
        dec_default = (bn0, w0, st0, None)
    dec = lambda c: dict(block_n=c[0], num_warps=c[1], num_stages=c[2], num_splits=c[3])  # noqa: E731
    out.append(
        Tunable(
            "decode",
            "split-K decode",
            ("BLOCK_N", "warps", "stages", "splits"),
            dec_default,
            cands["decode"],
            lambda c: da.decode_attention_fwd(q1, k, v, None, None, True, **dec(c))[0],
            lambda c: rel_err(
                da.decode_attention_fwd(qd, kc, vc, None, None, True, **dec(c))[0],
                once("dec", lambda: da.reference_decode_attention(qd, kc, vc, None, scale, True)[0]),
            ),
            reps_scale=4,
        )
    )
    # fused FastMKA mix (scan + route-mix + RoPE)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    sk = torch.zeros(B, H, d, device=dev)
    n0 = torch.zeros(B, dtype=torch.int64, device=dev)
    lam = torch.softmax(rd(B, 1, T, 2, dt=torch.float32), -1)
    cos, sin = fm.rope_tables(torch.arange(T, device=dev).expand(B, T), d, dtype=dtype)

    def mix_inputs(n):  # check size: Bc batches, odd length, padding, a carried state, RoPE
        validc = torch.ones(Bc, n, dtype=torch.bool, device=dev)
        validc[1, :5] = False
        skc = torch.randn(Bc, Hkv, d, generator=g).to(dev)
        lamc = torch.softmax(torch.randn(Bc, 1, n, 2, generator=g), -1).to(dev)
        cc, sc = fm.rope_tables(torch.arange(n, device=dev).expand(Bc, n) + 3, d, dtype=dtype)
        return (lamc, kc, vc, None, None, validc, skc, skc * 0.5, torch.tensor([0, 7], device=dev), 0.9, cc, sc)

    mix = lambda c: dict(BLOCK_T=c[0], BLOCK_H=c[1], num_warps=c[2])  # noqa: E731
    half = d // 2
    out.append(
        Tunable(
            "fastmka_mix",
            "fastmka mix",
            ("BLOCK_T", "BLOCK_H", "warps"),
            (TR.pow2(T, 16, 32), TR.pow2(half, 1, 16), 4),
            cands["fastmka_mix"],
            lambda c: fmt.fastmka_mix_fwd(lam, k, v, None, None, valid, sk, sk, n0, 0.9, cos, sin, **mix(c))[:2],
            lambda c: max_rel_err(
                fmt.fastmka_mix_fwd(*once("mix_in", lambda: mix_inputs(Tc)), **mix(c)),
                once("mix_ref", lambda: fm.reference_fastmka_mix(*cache["mix_in"])),
            ),
        )
    )
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
