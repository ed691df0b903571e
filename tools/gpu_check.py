"""One-call GPU check: every Triton kernel against its reference, then timed against PyTorch SDPA (flash).

    python tools/gpu_check.py                      # on a CUDA machine: checks, timings, table last
    python tools/gpu_check.py --out $OUT           # also writes details (JSON) there
    python tools/gpu_check.py --smoke              # tiny sizes; on CPU runs the Triton interpreter

Timings: CUDA events, median of ``--reps`` after warm-up, all candidates of a comparison measured in the
same run. FLOPs and bytes are counted per call (causal attention counts half the score matrix).
Targets (issue 5, H200, bf16, causal, d=128): FastMKA attention (scan + route-mix + RoPE + our flash) at
>= 0.90x the speed of SDPA-flash at T=8192; our flash forward >= 450 TFLOP/s; MKA <= 1.6x one SDPA pass;
decode per token <= 1.05x the base model's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

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


def timer(dev: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""

    def run(fn: Callable[[], object]) -> float:
        for _ in range(max(2, reps // 10)):
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
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    return run


def sdpa_flash(q, k, v, causal=True):
    """PyTorch SDPA restricted to its flash backend on CUDA (any backend on CPU)."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def attn_flops(B, H, Tq, Tk, d, causal) -> float:
    frac = 0.5 if causal and Tq == Tk else 1.0
    return 4.0 * B * H * Tq * Tk * d * frac


def checks(dev, dtype, s) -> list[dict]:
    """Each kernel against its reference at moderate sizes (odd lengths, GQA)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)  # noqa: E731
    B, H, Hkv, T, d = 2, s["H"], max(1, s["H"] // 4), s["T_check"], s["d"]
    out = []
    tol = 2e-2 if dtype != torch.float32 else 1e-4

    def add(name, err):
        out.append({"kernel": name, "rel_err": err, "ok": err <= tol})

    q, k, v = r(B, H, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d)
    o, _ = fa.flash_attention_fwd(q, k, v, None, None, True)
    add("flash fwd (GQA, causal)", rel_err(o, fa.reference_flash_attention(q, k, v, None, d**-0.5, True)[0]))
    qq = q[:, :, -3:]
    o, _ = da.decode_attention_fwd(qq, k, v, None, None, True)
    add("decode split-K (3 queries)", rel_err(o, da.reference_decode_attention(qq, k, v, None, d**-0.5, True)[0]))
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    valid[1, :5] = False
    sk = torch.zeros(B, Hkv, d, device=dev)
    n0 = torch.zeros(B, dtype=torch.int64, device=dev)
    got = st.session_scan_fwd(k, v, valid, sk, sk.clone(), n0, 0.9)
    want = ss.reference_session_scan(k, v, valid, sk, sk.clone(), n0, 0.9)
    add("session scan fwd", rel_err(got[0], want[0]))
    lam = torch.softmax(r(B, 1, T, 2).float(), -1)
    got = fmt.fastmka_mix_fwd(lam, k, v, None, None, valid, sk, sk.clone(), n0, 0.9)
    want = fm.reference_fastmka_mix(lam, k, v, None, None, valid, sk, sk.clone(), n0, 0.9)
    add("fastmka mix fwd", rel_err(got[0], want[0]))
    C, N = 16, T // 16 + 1
    st_args = (
        torch.zeros(B, Hkv, d, device=dev),
        torch.zeros(B, Hkv, d, device=dev),
        torch.zeros(B, Hkv, N, d, device=dev),
        torch.zeros(B, Hkv, N, d, device=dev),
    )
    got = ltt.chunk_update_fwd(k, v, valid, n0, *st_args, C)
    want = lt.reference_chunk_update(k, v, valid, n0, *st_args, C)
    add("chunk update fwd", rel_err(got[2], want[2]))
    pos = lt.real_positions(valid, n0)
    summ = r(B, Hkv, N, d).float()
    q_r = q.view(B, Hkv, H // Hkv, T, d).mean(2)
    idx, found = ltt.recall_select_fwd(q_r, summ, pos, C, 4)
    ridx, rfound = lt.reference_recall_select(q_r, summ, pos, C, 4)
    same = lt.recall_mask(idx, found, N) == lt.recall_mask(ridx, rfound, N)
    add("recall select fwd (top-4)", 1.0 - float(same.float().mean()))
    lam3 = torch.softmax(r(B, 1, T, 3).float(), -1)
    q3 = r(B, H, T, d)
    idx3 = torch.randint(0, N, (B, Hkv, T, 4), generator=g).to(dev)
    found3 = torch.rand(B, Hkv, T, 4, generator=g).to(dev) > 0.3
    mem = (r(B, Hkv, N, d).float(), r(B, Hkv, N, d).float())
    args = (q, [k, k * 0.5], [v, v * 0.5], lam3, q3, *mem, idx3, found3, valid, d**-0.5, True)
    got, _, _ = mt.mka_attention_fwd(*args)
    add("mka attention fwd", rel_err(got, ma.reference_mka_attention(*args)))
    go = r(B, H, T, d)
    got = mt.mka_attention_bwd(go, *args)
    want = ma.reference_mka_attention_backward(go, *args)
    add("mka attention bwd (dq)", rel_err(got[0], want[0]))
    qg = q.detach().requires_grad_()
    o, lse = fa.flash_attention_fwd(qg, k, v, None, None, True)
    dq = fa.flash_attention_bwd(go, qg, k, v, o, lse, None, None, True)[0]
    qr = q.detach().float().requires_grad_()
    ref = fa.reference_flash_attention(qr, k.float(), v.float(), None, d**-0.5, True)[0]
    (ref * go.float()).sum().backward()
    add("flash bwd (dq)", rel_err(dq, qr.grad))
    return out


def timings(dev, dtype, s, reps) -> list[dict]:
    t = timer(dev, reps)
    B, H, T, d = s["B"], s["H"], s["T"], s["d"]
    r = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype)  # noqa: E731
    q, k, v = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    rows = []
    fl = attn_flops(B, H, T, T, d, True)
    t_sdpa = t(lambda: sdpa_flash(q, k, v))
    rows.append({"what": "SDPA flash fwd", "ms": t_sdpa, "tflops": fl / t_sdpa / 1e9, "vs_sdpa": 1.0})
    t_ours = t(lambda: fa.flash_attention_fwd(q, k, v, None, None, True))
    rows.append({"what": "our flash fwd", "ms": t_ours, "tflops": fl / t_ours / 1e9, "vs_sdpa": t_sdpa / t_ours})
    # FastMKA attention = fused scan + route-mix + RoPE, then our flash
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    sk = torch.zeros(B, H, d, device=dev)
    n0 = torch.zeros(B, dtype=torch.int64, device=dev)
    lam = torch.softmax(torch.randn(B, 1, T, 2, device=dev), -1)
    ang = torch.arange(T, device=dev)[:, None] * 10000 ** (-torch.arange(0, d, 2, device=dev) / d)
    cos = torch.cat([ang.cos(), ang.cos()], -1).expand(B, T, d).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).expand(B, T, d).to(dtype)

    def fastmka():
        kf, vf, _, _ = fmt.fastmka_mix_fwd(lam, k, v, None, None, valid, sk, sk, n0, 0.9, cos, sin)
        return fa.flash_attention_fwd(q, kf, vf, None, None, True)

    t_fast = t(fastmka)
    rows.append(
        {
            "what": "FastMKA attention (mix+RoPE+flash)",
            "ms": t_fast,
            "tflops": fl / t_fast / 1e9,
            "vs_sdpa": t_sdpa / t_fast,
        }
    )
    t_mix = t(lambda: fmt.fastmka_mix_fwd(lam, k, v, None, None, valid, sk, sk, n0, 0.9, cos, sin))
    gb = (4 * B * H * T * d * q.element_size()) / 1e9
    rows.append({"what": "fastmka mix alone", "ms": t_mix, "gbps": gb / (t_mix / 1e3), "vs_sdpa": t_sdpa / t_mix})
    t_scan = t(lambda: st.session_scan_fwd(k, v, valid, sk, sk, n0, 0.9))
    rows.append({"what": "session scan fwd", "ms": t_scan, "gbps": gb / (t_scan / 1e3), "vs_sdpa": t_sdpa / t_scan})
    # MKA: L1 + L2 + L3 (R=8 over T/64 summaries) in one pass vs one SDPA pass
    N = max(1, T // 64)
    lam3 = torch.softmax(torch.randn(B, 1, T, 3, device=dev), -1)
    idx3 = torch.randint(0, N, (B, H, T, 8), device=dev)
    found3 = torch.ones(B, H, T, 8, dtype=torch.bool, device=dev)
    mem = (torch.randn(B, H, N, d, device=dev), torch.randn(B, H, N, d, device=dev))
    margs = (q, [k, v], [v, k], lam3, q, *mem, idx3, found3, valid, d**-0.5, True)
    t_mka = t(lambda: mt.mka_attention_fwd(*margs))
    rows.append(
        {"what": "MKA attention fwd (3 levels)", "ms": t_mka, "tflops": 2 * fl / t_mka / 1e9, "vs_sdpa": t_sdpa / t_mka}
    )
    # backward: SDPA flash fwd+bwd vs ours
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    go = torch.randn_like(q)

    def sdpa_fb():
        o = sdpa_flash(qg, kg, vg)
        torch.autograd.grad(o, (qg, kg, vg), go)

    o_ours, lse = fa.flash_attention_fwd(q, k, v, None, None, True)
    t_sdpa_fb = t(sdpa_fb)
    t_ours_b = t(lambda: fa.flash_attention_bwd(go, q, k, v, o_ours, lse, None, None, True))
    rows.append({"what": "SDPA flash fwd+bwd", "ms": t_sdpa_fb, "tflops": 3.5 * fl / t_sdpa_fb / 1e9, "vs_sdpa": 1.0})
    rows.append(
        {
            "what": "our flash fwd+bwd",
            "ms": t_ours + t_ours_b,
            "tflops": 3.5 * fl / (t_ours + t_ours_b) / 1e9,
            "vs_sdpa": t_sdpa_fb / (t_ours + t_ours_b),
        }
    )
    # decode: one token over a T-long cache
    q1 = r(B, H, 1, d)
    t_sdpa_dec = t(lambda: sdpa_flash(q1, k, v, causal=False))
    t_dec = t(lambda: da.decode_attention_fwd(q1, k, v, None, None, True))
    k1, v1 = r(B, H, 1, d), r(B, H, 1, d)
    one = torch.ones(B, 1, dtype=torch.bool, device=dev)
    lam1 = lam[:, :, :1]

    def fast_decode():
        fmt.fastmka_mix_fwd(lam1, k1, v1, None, None, one, sk, sk, n0 + 5, 0.9, cos[:, :1], sin[:, :1])
        return da.decode_attention_fwd(q1, k, v, None, None, True)

    t_fast_dec = t(fast_decode)
    dec_bytes = 2 * B * H * T * d * q.element_size() / 1e9
    rows.append(
        {"what": "SDPA decode (1 token)", "ms": t_sdpa_dec, "gbps": dec_bytes / (t_sdpa_dec / 1e3), "vs_sdpa": 1.0}
    )
    rows.append(
        {"what": "our split-K decode", "ms": t_dec, "gbps": dec_bytes / (t_dec / 1e3), "vs_sdpa": t_sdpa_dec / t_dec}
    )
    rows.append(
        {
            "what": "FastMKA decode (mix+split-K)",
            "ms": t_fast_dec,
            "gbps": dec_bytes / (t_fast_dec / 1e3),
            "vs_sdpa": t_sdpa_dec / t_fast_dec,
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: Triton interpreter)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke to exercise the script on the CPU interpreter", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if dev.type == "cuda" else torch.float32
    sizes = (
        {"B": 1, "H": 2, "T": 48, "d": 32, "T_check": 33}
        if args.smoke
        else {"B": 4, "H": 32, "T": 8192, "d": 128, "T_check": 1000}
    )
    reps = args.reps or (2 if args.smoke else 30)
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    t0 = time.time()
    chk = checks(dev, dtype, sizes)
    rows = timings(dev, dtype, sizes, reps)
    report = {
        "device": device_name,
        "dtype": str(dtype),
        "sizes": sizes,
        "torch": torch.__version__,
        "checks": chk,
        "timings": rows,
        "seconds": time.time() - t0,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"\n{device_name}, {dtype}, B={sizes['B']} H={sizes['H']} T={sizes['T']} d={sizes['d']}, causal")
    print(f"{'check':40s} {'rel err':>10s}  ok")
    for c in chk:
        print(f"{c['kernel']:40s} {c['rel_err']:10.2e}  {'yes' if c['ok'] else 'NO'}")
    print(f"\n{'timing':40s} {'ms':>10s} {'TFLOP/s':>9s} {'GB/s':>9s} {'SDPA/ours':>10s}")
    for row in rows:
        tf_ = f"{row['tflops']:.1f}" if "tflops" in row else "-"
        gb_ = f"{row['gbps']:.0f}" if "gbps" in row else "-"
        print(f"{row['what']:40s} {row['ms']:10.3f} {tf_:>9s} {gb_:>9s} {row['vs_sdpa']:10.2f}")
    by = {r["what"]: r for r in rows}
    goals = [
        ("our flash fwd >= 450 TFLOP/s", by["our flash fwd"]["tflops"], by["our flash fwd"]["tflops"] >= 450),
        (
            "FastMKA attention: SDPA/ours >= 0.90",
            by["FastMKA attention (mix+RoPE+flash)"]["vs_sdpa"],
            by["FastMKA attention (mix+RoPE+flash)"]["vs_sdpa"] >= 0.90,
        ),
        (
            "MKA: ours/SDPA <= 1.6",
            1 / by["MKA attention fwd (3 levels)"]["vs_sdpa"],
            1 / by["MKA attention fwd (3 levels)"]["vs_sdpa"] <= 1.6,
        ),
        (
            "FastMKA decode: ours/SDPA <= 1.05",
            1 / by["FastMKA decode (mix+split-K)"]["vs_sdpa"],
            1 / by["FastMKA decode (mix+split-K)"]["vs_sdpa"] <= 1.05,
        ),
    ]
    report["goals"] = [{"goal": g, "value": v, "met": bool(m)} for g, v, m in goals]
    if args.out:
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'goal (issue 5; meaningful at full size on a GPU)':52s} {'value':>9s}  met")
    for g, v, m in goals:
        print(f"{g:52s} {v:9.2f}  {'yes' if m else 'no'}")
    return 0 if all(c["ok"] for c in chk) and all(math.isfinite(r["ms"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
