"""One-call GPU check: every Triton kernel against its reference, then what a converted model runs, timed.

    python tools/gpu/check.py                      # on a CUDA machine: checks, timings, table last
    python tools/gpu/check.py --out $OUT           # also writes details (JSON) there
    python tools/gpu/check.py --smoke              # tiny sizes; on CPU runs the Triton interpreter
    python tools/gpu/check.py --sweep --out $OUT   # + tile sweep per kernel (sweep.txt); the table still last
    python tools/gpu/check.py --sweep-only flash_fwd,mka_fwd   # just these kernels' sweeps
    bash tools/gpu/run.sh                          # on a GPU machine without the package installed

The timings come from :mod:`tools.gpu.timings`: a converted Llama-shaped model's prefill and decode tokens/s against
the same model unconverted (SDPA), and the ``mka::`` ops it calls against SDPA-flash.
The sweep times a small grid of tile configs per Triton kernel (flash forward, flash backward dK/dV and
dQ, MKA forward and backward) at the goal size within --sweep-budget seconds,
skips configs that do not compile or fit (recording why), checks the fastest against the reference and
against the default's output, and reports the best next to the default. With --sweep the checks, timings
and goals are printed before the sweep and again after it, so they close the output even if the sweep is
cut short; results are written to gpu_check.json after every step.

Timings: ops by CUDA events, models by wall time with the device synchronised; medians, all candidates of a
comparison measured in the same run. FLOPs and bytes are counted per call (causal attention counts half the
score matrix). Targets (issue 5, bf16): a converted FastMKA model prefills at >= 0.90x the original's tokens/s
(prompt 8192) and decodes at <= 1.05x its time per token; our flash forward >= 450 TFLOP/s (H200, d=128); MKA
attention <= 1.6x one SDPA pass.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import mka_compile.kernels  # noqa: F401  (registers the ops and their CUDA kernels)

if not __package__:  # run as a file: the checkout's `tools` package, appended so an installed mka_compile still wins
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from tools.gpu.sweep import (  # noqa: E402  (the kernel modules under the short names both tools use)
    SWEEP_KEYS,
    fa,
    lt,
    ltt,
    ma,
    mt,
    rel_err,
    run_sweep,
    ss,
    st,
    sweep_table,
)
from tools.gpu.timings import (  # noqa: E402
    FULL,
    FULL_RUN,
    TINY,
    TINY_RUN,
    _guarded,
    model_timings,
    op_timings,
    print_model_table,
    print_op_table,
)
from tools.gpu.tunables import make_tunables  # noqa: E402


def checks(dev, dtype, s) -> list[dict]:
    """Each kernel against its reference at moderate sizes (odd lengths, GQA). A kernel that raises is
    recorded as failed (with the error) and the others still run."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)  # noqa: E731
    B, H, Hkv, T, d = 2, s["H"], max(1, s["H"] // 4), s["T_check"], s["d"]
    out = []
    tol = 2e-2 if dtype != torch.float32 else 1e-4

    def add(name, fn):
        try:
            err = float(fn())
            out.append({"kernel": name, "rel_err": err, "ok": err <= tol})
        except Exception as e:  # noqa: BLE001  (reported; the other kernels are still checked)
            out.append({"kernel": name, "rel_err": math.nan, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"check {name} FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)

    q, k, v = r(B, H, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    valid[1, :5] = False
    sk = torch.zeros(B, Hkv, d, device=dev)
    n0 = torch.zeros(B, dtype=torch.int64, device=dev)
    C, N = 16, T // 16 + 1
    st_args = (
        torch.zeros(B, Hkv, d, device=dev),
        torch.zeros(B, Hkv, d, device=dev),
        torch.zeros(B, Hkv, N, d, device=dev),
        torch.zeros(B, Hkv, N, d, device=dev),
    )
    pos = lt.real_positions(valid, n0)
    summ = r(B, Hkv, N, d).float()
    q_r = q.view(B, Hkv, H // Hkv, T, d).mean(2)
    lam3 = torch.softmax(r(B, 1, T, 3).float(), -1)
    q3 = r(B, H, T, d)
    idx3 = torch.randint(0, N, (B, Hkv, T, 4), generator=g).to(dev)
    found3 = torch.rand(B, Hkv, T, 4, generator=g).to(dev) > 0.3
    mem = (r(B, Hkv, N, d).float(), r(B, Hkv, N, d).float())
    args = (q, [k, k * 0.5], [v, v * 0.5], lam3, q3, *mem, idx3, found3, valid, d**-0.5, True)
    go = r(B, H, T, d)

    def recall():
        idx, found = ltt.recall_select_fwd(q_r, summ, pos, C, 4)
        ridx, rfound = lt.reference_recall_select(q_r, summ, pos, C, 4)
        return 1.0 - float((lt.recall_mask(idx, found, N) == lt.recall_mask(ridx, rfound, N)).float().mean())

    def flash_bwd():
        o, lse = fa.flash_attention_fwd(q, k, v, None, None, True)
        dq = fa.flash_attention_bwd(go, q, k, v, o, lse, None, None, True)[0]
        qr = q.detach().float().requires_grad_()
        ref = fa.reference_flash_attention(qr, k.float(), v.float(), None, d**-0.5, True)[0]
        (ref * go.float()).sum().backward()
        return rel_err(dq, qr.grad)

    add(
        "flash fwd (GQA, causal)",
        lambda: rel_err(
            fa.flash_attention_fwd(q, k, v, None, None, True)[0],
            fa.reference_flash_attention(q, k, v, None, d**-0.5, True)[0],
        ),
    )
    add(
        "session scan fwd",
        lambda: rel_err(
            st.session_scan_fwd(k, v, valid, sk, sk.clone(), n0, 0.9)[0],
            ss.reference_session_scan(k, v, valid, sk, sk.clone(), n0, 0.9)[0],
        ),
    )
    add(
        "chunk update fwd",
        lambda: rel_err(
            ltt.chunk_update_fwd(k, v, valid, n0, *st_args, C)[2],
            lt.reference_chunk_update(k, v, valid, n0, *st_args, C)[2],
        ),
    )
    add("recall select fwd (top-4)", recall)
    add("mka attention fwd", lambda: rel_err(mt.mka_attention_fwd(*args)[0], ma.reference_mka_attention(*args)))
    add(
        "mka attention bwd (dq)",
        lambda: rel_err(mt.mka_attention_bwd(go, *args)[0], ma.reference_mka_attention_backward(go, *args)[0]),
    )
    add("flash bwd (dq)", flash_bwd)
    return out


def print_tables(device_name, dtype, sizes, chk, timed) -> list[tuple[str, float, bool]]:
    """The checks, the op and model timings (``timed``: ``{"ops": rows, "models": rows}``) and the goals."""
    print(f"\n{device_name}, {dtype}, B={sizes['B']} H={sizes['H']} T={sizes['T']} d={sizes['d']}, causal")
    print(f"{'check':40s} {'rel err':>10s}  ok")
    for c in chk:
        print(f"{c['kernel']:40s} {c['rel_err']:10.2e}  {'yes' if c['ok'] else 'NO'}")
    print_op_table(timed["ops"])
    print_model_table(timed["models"])
    ops = {r["what"]: r for r in timed["ops"]}
    models = {r["what"]: r for r in timed["models"]}
    tflops = ops.get("mka::flash_attention fwd", {}).get("tflops", math.nan)
    mka = ops.get("mka::mka_attention fwd (3 levels)", {}).get("vs_sdpa", math.nan)
    prefill, decode = (models.get(f"converted fastmka {p}", {}).get("vs_original", math.nan) for p in PHASES)
    goals = [
        ("our flash fwd >= 450 TFLOP/s", tflops, tflops >= 450),
        ("converted FastMKA prefill: tokens/s vs original >= 0.90", prefill, prefill >= 0.90),
        ("MKA attention: ours/SDPA <= 1.6", 1 / mka, 1 / mka <= 1.6),
        ("converted FastMKA decode: time/token vs original <= 1.05", 1 / decode, 1 / decode <= 1.05),
    ]
    print(f"\n{'goal (issue 5; meaningful at full size on a GPU)':58s} {'value':>9s}  met")
    for g, v, m in goals:
        print(f"{g:58s} {v:9.2f}  {'yes' if m else 'no'}")
    sys.stdout.flush()
    return goals


PHASES = ("prefill", "decode")


def _keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in SWEEP_KEYS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown kernel {bad or text!r}; choose from {', '.join(SWEEP_KEYS)}")
    return keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: Triton interpreter)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--sweep", action="store_true", help="also sweep tile configs per kernel at the goal size")
    p.add_argument(
        "--sweep-only",
        type=_keys,
        default=None,
        metavar="KERNELS",
        help=f"only sweep these kernels (comma-separated: {', '.join(SWEEP_KEYS)}); no checks or timings",
    )
    p.add_argument("--sweep-budget", type=float, default=200.0, help="seconds for the whole sweep (default 200)")
    p.add_argument("--sweep-reps", type=int, default=5, help="timed calls per config (median)")
    p.add_argument("--sweep-warmup", type=int, default=2, help="calls before timing, the first compiles")
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
    model_reps = 2 if args.smoke else max(3, reps // 6)
    sweep_reps, sweep_warmup = (1, 1) if args.smoke else (args.sweep_reps, args.sweep_warmup)
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": device_name,
        "dtype": str(dtype),
        "sizes": sizes,
        "torch": torch.__version__,
        "triton": getattr(importlib.import_module("triton"), "__version__", "?"),
    }

    def save() -> None:
        if out_dir:
            (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))

    t0 = time.time()
    chk = rows = None
    if args.sweep_only is None:
        chk = _guarded(
            "checks", lambda: checks(dev, dtype, sizes), [{"kernel": "checks", "rel_err": math.nan, "ok": False}]
        )
        report["checks"] = chk
        save()
        failed = [
            {"what": "timings", "ms": math.nan, "vs_sdpa": math.nan, "tokens_s": math.nan, "vs_original": math.nan}
        ]
        rows = {
            "ops": _guarded("op timings", lambda: op_timings(dev, dtype, sizes, reps), failed),
            "models": _guarded(
                "model timings",
                lambda: model_timings(dev, dtype, *((TINY, TINY_RUN) if args.smoke else (FULL, FULL_RUN)), model_reps),
                failed,
            ),
        }
        report["timings"] = rows
        report["seconds"] = time.time() - t0
        goals = print_tables(device_name, dtype, sizes, chk, rows)  # printed again last when sweeping
        report["goals"] = [{"goal": g, "value": v, "met": bool(m)} for g, v, m in goals]
        save()
    sweep_ok = True
    if args.sweep or args.sweep_only:
        keys = args.sweep_only or list(SWEEP_KEYS)
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        header = (
            f"tile sweep: {device_name}, {dtype}, B={sizes['B']} H={sizes['H']} T={sizes['T']} d={sizes['d']}, "
            f"causal; median of {sweep_reps} after {sweep_warmup} calls"
        )
        print(f"\n{header}", flush=True)

        def on_update(sw):  # after each kernel: what a timeout would otherwise lose
            report["sweep"] = sw
            save()
            if out_dir:
                (out_dir / "sweep.txt").write_text(sweep_table(sw, header + " (partial)") + "\n")

        sw = run_sweep(
            dev,
            dtype,
            make_tunables(dev, dtype, sizes, keys),
            args.sweep_budget,
            sweep_warmup,
            sweep_reps,
            tol,
            on_update,
        )
        report["sweep"] = sw
        report["seconds"] = time.time() - t0
        save()
        text = sweep_table(sw, header)
        if out_dir:
            (out_dir / "sweep.txt").write_text(text + "\n")
        print("\n" + text, flush=True)
        sweep_ok = sw["stopped"] is None and all(e["best"] is not None or not e["results"] for e in sw["kernels"])
        sweep_ok = sweep_ok and not any(e.get("wrong") for e in sw["kernels"])
        if rows is not None:
            print_tables(device_name, dtype, sizes, chk, rows)
    timed = [] if rows is None else rows["ops"] + rows["models"]
    checks_ok = chk is None or (all(c["ok"] for c in chk) and all(math.isfinite(r["ms"]) for r in timed))
    return 0 if checks_ok and sweep_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
