"""The tile sweep of ``tools/gpu_check.py --sweep``: time a small grid of tile configurations per Triton kernel at
the goal size, check each winner against the reference, and say where a winner belongs in the kernel's config table.
Imported by ``tools/gpu_check.py`` (see its docstring for the command line)."""

from __future__ import annotations

import functools
import importlib
import statistics
import time
from collections.abc import Callable

import torch
from gpu_sweep_candidates import GPU_CANDIDATES, SMOKE_CANDIDATES, WHERE  # tools/ (on the path when run)

import mka_compile.kernels  # noqa: F401  (registers the ops and their CUDA kernels)

fa = importlib.import_module("mka_compile.kernels.flash_attention")
da = importlib.import_module("mka_compile.kernels.decode_attention")
ma = importlib.import_module("mka_compile.kernels.mka_attention")
mt = importlib.import_module("mka_compile.kernels.mka_attention_triton")
ss = importlib.import_module("mka_compile.kernels.session_scan")
st = importlib.import_module("mka_compile.kernels.session_scan_triton")
fm = importlib.import_module("mka_compile.kernels.fastmka_mix")
fmt = importlib.import_module("mka_compile.kernels.fastmka_mix_triton")
lt = importlib.import_module("mka_compile.kernels.longterm")
ltt = importlib.import_module("mka_compile.kernels.longterm_triton")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


SWEEP_KEYS = ("flash_fwd", "flash_dkdv", "flash_dq", "decode", "fastmka_mix", "mka_fwd", "mka_bwd")
PLUMBING = importlib.import_module("mka_compile.kernels.flash_attention.plumbing")
TR = importlib.import_module("mka_compile.kernels._triton")


class Tunable:
    """One kernel's sweep: ``run(cfg)`` at the goal size (timed; returns its outputs), ``check(cfg)`` its
    relative error against the reference at the check size (odd length, GQA where the kernel has it)."""

    def __init__(self, key, label, params, default, candidates, run, check, reps_scale=1):
        self.key, self.label, self.params, self.default = key, label, params, tuple(default)
        self.candidates = [self.default] + [tuple(c) for c in candidates if tuple(c) != self.default]
        self.run, self.check, self.reps_scale = run, check, reps_scale
        self.table_key: tuple[int, int] | None = None


def bench(dev: torch.device, fn: Callable[[], object], warmup: int, reps: int) -> tuple[float, float]:
    """``(median ms over reps, wall seconds of the first call)``; the first call compiles."""
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times), first


def max_rel_err(a, b) -> float:
    """Largest relative error over matching tensors of two (nested) outputs."""
    if isinstance(a, torch.Tensor):
        return rel_err(a, b)
    return max(max_rel_err(x, y) for x, y in zip(a, b) if x is not None)


class pinned_table:
    """``with pinned_table(DKDV_CONFIGS, q, cfg):`` the flash launcher tries only ``cfg`` for q's dtype and head
    size (CPU: the interpreter's config, shared by all flash kernels); the launch cache is set aside."""

    def __init__(self, table: dict, x: torch.Tensor, cfg: tuple) -> None:
        self.table, self.cfg, self.cpu = table, tuple(cfg), x.device.type == "cpu"
        self.key = (2 if x.element_size() == 2 else 4, max(64, fa.block_d(x.shape[-1])))

    def __enter__(self):
        self.chosen = dict(PLUMBING._CHOSEN)
        PLUMBING._CHOSEN.clear()
        if self.cpu:
            self.saved, PLUMBING.INTERPRETER_CONFIG = PLUMBING.INTERPRETER_CONFIG, self.cfg
        else:
            self.saved, self.table[self.key] = self.table[self.key], [self.cfg]
        return self

    def __exit__(self, *exc):
        if self.cpu:
            PLUMBING.INTERPRETER_CONFIG = self.saved
        else:
            self.table[self.key] = self.saved
        PLUMBING._CHOSEN.clear()
        PLUMBING._CHOSEN.update(self.chosen)
        return False


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


def _cuda_broken(e: Exception) -> bool:
    """An error after which the CUDA context is unusable (illegal address, launch failure...)."""
    text = str(e)
    return any(m in text for m in ("CUDA error", "Triton Error [CUDA]", "illegal memory access", "launch failure"))


def run_sweep(dev, dtype, tunables, budget_s, warmup, reps, tol, on_update=None) -> dict:
    """Time every candidate of each tunable within ``budget_s`` seconds (each kernel gets an equal share of
    what is left when it starts, at least its default and one alternative); check the fastest against the
    reference (check size) and against the default's output (goal size); the first that passes wins."""
    t_start = time.time()
    kernels: list[dict] = []
    report = {"budget_s": budget_s, "warmup": warmup, "reps": reps, "kernels": kernels, "stopped": None}
    report["device_type"] = dev.type
    broken = False
    for i, tu in enumerate(tunables):
        entry = {
            "key": tu.key,
            "kernel": tu.label,
            "params": list(tu.params),
            "default": list(tu.default),
            "where": WHERE[tu.key].format(key=tu.table_key),
            "results": [],
            "best": None,
            "stopped": None,
        }
        kernels.append(entry)
        left = budget_s - (time.time() - t_start)
        if broken or left <= 0:
            entry["stopped"] = "not run: " + ("the CUDA context broke earlier" if broken else "sweep budget spent")
            continue
        share = left / (len(tunables) - i)
        k_start = time.time()
        n = len(tu.candidates)
        for j, cfg in enumerate(tu.candidates):
            if time.time() - t_start > budget_s:
                entry["stopped"] = f"sweep budget ({budget_s:.0f} s) spent after {j} of {n} configs"
                break
            if j >= 2 and time.time() - k_start > share:
                entry["stopped"] = f"this kernel's share ({share:.0f} s) spent after {j} of {n} configs"
                break
            rec: dict = {"config": list(cfg), "ms": None}
            try:
                rec["ms"], rec["first_call_s"] = bench(
                    dev, functools.partial(tu.run, cfg), warmup, reps * tu.reps_scale
                )
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (recorded: out of shared memory, compile failure, ...)
                rec["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                broken = dev.type == "cuda" and _cuda_broken(e)
            entry["results"].append(rec)
            ms = f"{rec['ms']:9.3f} ms  (first call {rec['first_call_s']:.1f} s)" if rec["ms"] is not None else ""
            print(f"sweep {tu.label:18s} {_cfg_str(cfg):18s} {ms or rec['status'][:100]}", flush=True)
            if broken:
                entry["stopped"] = report["stopped"] = "CUDA error: the context is unusable, sweep stopped"
                break
        if not broken:
            _pick_winner(tu, entry, tol)
        entry["seconds"] = time.time() - k_start
        if on_update:
            on_update(report)
    report["seconds"] = time.time() - t_start
    return report


def _pick_winner(tu: Tunable, entry: dict, tol: float) -> None:
    timed = sorted((r for r in entry["results"] if r["ms"] is not None), key=lambda r: r["ms"])
    default = next((r for r in entry["results"] if tuple(r["config"]) == tu.default), None)
    default_out = None
    for rec in timed[:3]:
        cfg = tuple(rec["config"])
        try:
            rec["check_rel_err"] = tu.check(cfg)
            if cfg != tu.default and default is not None and default["ms"] is not None:
                if default_out is None:
                    default_out = tu.run(tu.default)
                rec["rel_err_vs_default"] = max_rel_err(tu.run(cfg), default_out)
        except Exception as e:  # noqa: BLE001
            rec["status"] = f"check failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        ok = rec["check_rel_err"] <= tol and rec.get("rel_err_vs_default", 0.0) <= tol
        if ok:
            entry["best"] = rec
            break
        rec["status"] = "WRONG RESULT (rel err above tolerance)"
    if default is not None and default["ms"] is not None and entry["best"] is not None:
        entry["default_ms"] = default["ms"]
        entry["speedup"] = default["ms"] / entry["best"]["ms"]
    entry["wrong"] = [r["config"] for r in entry["results"] if r.get("status", "").startswith("WRONG")]


def _cfg_str(cfg) -> str:
    return ",".join("auto" if c is None else str(c) for c in cfg)


def sweep_table(sw: dict, header: str) -> str:
    lines = [
        header,
        f"{'kernel':18s} {'params':32s} {'default':>16s} {'ms':>9s}  {'best':>16s} {'ms':>9s}  speedup  check",
    ]
    notes = []
    for e in sw["kernels"]:
        default = next((r for r in e["results"] if r["config"] == e["default"]), None)
        d_ms = f"{default['ms']:.3f}" if default and default["ms"] is not None else "-"
        b = e["best"]
        b_cfg, b_ms = (_cfg_str(b["config"]), f"{b['ms']:.3f}") if b else ("-", "-")
        sp = f"{e['speedup']:.2f}x" if "speedup" in e else "-"
        chk = f"ok {b['check_rel_err']:.1e}" if b else ("NO WINNER" if e["results"] else "-")
        lines.append(
            f"{e['kernel']:18s} {','.join(e['params']):32s} {_cfg_str(e['default']):>16s} {d_ms:>9s}  "
            f"{b_cfg:>16s} {b_ms:>9s}  {sp:>7s}  {chk}"
        )
        failed = [r for r in e["results"] if r["ms"] is None]
        if failed:
            reasons = sorted({r["status"].split(":")[1].strip() if ":" in r["status"] else r["status"] for r in failed})
            notes.append(f"{e['kernel']}: {len(failed)} of {len(e['results'])} configs failed ({', '.join(reasons)})")
        if e.get("wrong"):
            notes.append(f"{e['kernel']}: WRONG results at {e['wrong']}")
        if e["stopped"]:
            notes.append(f"{e['kernel']}: {e['stopped']}")
        if e.get("speedup", 1.0) >= 1.03 and sw.get("device_type") == "cuda":  # CPU: interpreter tiles
            notes.append(f"{e['kernel']}: to adopt {_cfg_str(b['config'])}, put it first in {e['where']}")
    used = sw.get("seconds")
    lines.append(f"sweep time {used:.0f} s of a {sw['budget_s']:.0f} s budget" if used is not None else "")
    return "\n".join(lines + notes)


# ----------------------------------------------------------------------------------------------------- main
