"""What a converted model runs, timed: a converted Llama-shaped model end to end, and the ``mka::`` ops it calls.

    python tools/gpu/timings.py                         # CUDA, bf16: a ~1B Llama shape, prompt 8192, 128 new tokens
    python tools/gpu/timings.py --device cpu --tiny     # CPU, fp32, tiny sizes (what the tests run)
    python tools/gpu/timings.py --out $OUT              # also writes timings.json there

1. **Models** (:func:`model_timings`): a Hugging Face ``LlamaForCausalLM`` with random weights (SDPA attention),
   and the same weights converted with ``mka_compile.convert`` to FastMKA and to MKA (random router values, gate 1,
   so every memory level contributes), in ``--dtype`` on ``--device``. Each is timed on a prefill of
   ``--prompt`` tokens, then ``--new-tokens`` greedy cached decode steps; wall time with the device synchronised,
   median of ``--reps`` rounds after a warm-up round, the models interleaved (order rotated every round).
   Reported: tokens/s of prefill and of decode, and their ratio to the unconverted model's.
2. **Ops** (:func:`op_timings`): each ``mka::`` op a converted model (or the ``mka`` backend) calls, through
   ``torch.ops.mka`` (CUDA: the Triton kernels; CPU: the references), at one attention's size (B, H, T, d; causal),
   against ``scaled_dot_product_attention`` restricted to its flash backend, CUDA-event medians.

``tools/gpu/check.py`` prints both tables (and the goals) after its kernel checks.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as a file: the checkout's `tools` package, appended so an installed mka_compile still wins
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from tools.gpu.sweep import bench  # noqa: E402

# Model shapes: FULL is Llama-3.2-1B-like (d=64 heads, GQA 4:1); TINY runs on a CPU in seconds.
FULL = {"vocab": 32000, "hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8}
FULL_RUN = {"batch": 1, "prompt": 8192, "new_tokens": 128}
TINY = {"vocab": 128, "hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}
TINY_RUN = {"batch": 1, "prompt": 64, "new_tokens": 8}


def _guarded(what: str, fn: Callable[[], object], failed: object) -> object:
    """``fn()``, or ``failed`` after printing the error (so the other timings and the tables still run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        print(f"{what} FAILED: {type(e).__name__}: {str(e)[:1000]}", flush=True)
        return failed


def timer(dev: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU); nan if it raises."""

    def run(fn: Callable[[], object]) -> float:
        return _guarded("timing", lambda: bench(dev, fn, max(2, reps // 10) + 1, reps)[0], math.nan)

    return run


def sdpa_flash(q, k, v, causal=True):
    """PyTorch SDPA restricted to its flash backend on CUDA (any backend on CPU)."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attn_flops(B, H, Tq, Tk, d, causal) -> float:
    frac = 0.5 if causal and Tq == Tk else 1.0
    return 4.0 * B * H * Tq * Tk * d * frac


# ------------------------------------------------------------------------------------------------------ models


def llama(shape: dict, positions: int = 2048, **config):
    """A random-weight ``LlamaForCausalLM`` of ``shape`` (SDPA attention, fp32 on the CPU, seed 0)."""
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=positions,
        **config,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def build_models(dev, dtype, shape: dict, modes=("fastmka", "mka"), mka_config=None) -> dict:
    """``{"original": model, mode: converted model, ...}`` on ``dev`` in ``dtype`` (same random weights); a mode
    that fails to convert maps to its error message instead."""
    import mka_compile
    from mka_compile.bench import randomize_mka

    base = llama(shape, max(2048, shape.get("positions", 0)))
    models: dict = {}
    for mode in modes:  # converted on the CPU in fp32 (as a user converts a loaded checkpoint), then moved
        conv = _guarded(
            f"convert ({mode})",
            lambda mode=mode: randomize_mka(mka_compile.convert(copy.deepcopy(base), mode=mode, config=mka_config)),
            None,
        )
        models[mode] = conv.to(dev, dtype).eval() if conv is not None else "conversion failed"
    return {"original": base.to(dev, dtype), **models}


@torch.no_grad()
def prefill_decode(model, ids: torch.Tensor, new_tokens: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Seconds of one prefill of ``ids`` ``[B, T]`` and of ``new_tokens`` greedy cached decode steps after it."""
    from mka_compile.hf.compat import cache_kwargs, returned_cache

    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    sync()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, **last)
    past, tok = returned_cache(out), out.logits[:, -1:].argmax(-1)
    sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(tok, use_cache=True, **last, **cache_kwargs(model, past))
        past, tok = returned_cache(out), out.logits[:, -1:].argmax(-1)
    sync()
    return t1 - t0, time.perf_counter() - t1


def model_timings(dev, dtype, shape: dict, run: dict, reps: int, modes=("fastmka", "mka"), mka_config=None):
    """Rows ``{"what", "phase", "ms", "tokens_s", "vs_original"}``: prefill and decode of the original model and of
    each converted one, interleaved, median of ``reps`` rounds after a warm-up round."""
    B, T, N = run["batch"], run["prompt"], run["new_tokens"]
    models = build_models(dev, dtype, {**shape, "positions": T + N + 1}, modes, mka_config)
    ids = torch.randint(0, shape["vocab"], (B, T), generator=torch.Generator().manual_seed(1)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    live = {name: m for name, m in models.items() if not isinstance(m, str)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in live}
    names = list(live)
    for r in range(reps + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name not in times:
                continue
            got = _guarded(f"{name} prefill + decode", lambda m=live[name]: prefill_decode(m, ids, N, sync), None)
            if got is None:  # a failed model gets nan rows; the others still run
                del times[name]
                continue
            if r > 0:  # round 0 warms up (allocator, kernels compiled on first use)
                times[name].append(got)
    rows = []
    for phase, idx, tokens in (("prefill", 0, B * T), ("decode", 1, B * N)):
        base = statistics.median(t[idx] for t in times["original"]) if times.get("original") else math.nan
        for name in models:
            label = "original (SDPA)" if name == "original" else f"converted {name}"
            s = statistics.median(t[idx] for t in times[name]) if times.get(name) else math.nan
            row = {
                "what": f"{label} {phase}",
                "phase": phase,
                "ms": 1e3 * s,
                "tokens_s": tokens / s,
                "vs_original": base / s,
            }
            if isinstance(models[name], str) or name not in times:
                row["error"] = models[name] if isinstance(models[name], str) else "failed (see the log)"
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------- ops


def op_timings(dev, dtype, s: dict, reps: int) -> list[dict]:
    """Rows ``{"what", "ms", ("tflops" | "gbps"), "vs_sdpa"}`` for the ``mka::`` ops at ``s`` (B, H, T, d)."""
    ops, t = torch.ops.mka, timer(dev, reps)
    B, H, T, d = s["B"], s["H"], s["T"], s["d"]
    scale = d**-0.5
    r = lambda *shape, dt=dtype: torch.randn(*shape, device=dev, dtype=dt)  # noqa: E731
    q, k, v = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    fl = attn_flops(B, H, T, T, d, True)
    gb = 4 * B * H * T * d * q.element_size() / 1e9  # read k and v, write two outputs of their size
    rows = []

    def add(what, ms, base, flops=None, gbytes=None):
        row = {"what": what, "ms": ms, "vs_sdpa": base / ms}
        if flops is not None:
            row["tflops"] = flops / ms / 1e9
        if gbytes is not None:
            row["gbps"] = gbytes / (ms / 1e3)
        rows.append(row)

    t_sdpa = t(lambda: sdpa_flash(q, k, v))
    add("SDPA flash fwd", t_sdpa, t_sdpa, fl)
    add("mka::flash_attention fwd", t(lambda: ops.flash_attention(q, k, v, None, scale, True)), t_sdpa, fl)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    go = torch.randn_like(q)
    t_sdpa_fb = t(lambda: torch.autograd.grad(sdpa_flash(qg, kg, vg), (qg, kg, vg), go))
    add("SDPA flash fwd+bwd", t_sdpa_fb, t_sdpa_fb, 3.5 * fl)
    flash_fb = lambda: torch.autograd.grad(ops.flash_attention(qg, kg, vg, None, scale, True)[0], (qg, kg, vg), go)  # noqa: E731
    add("mka::flash_attention fwd+bwd", t(flash_fb), t_sdpa_fb, 3.5 * fl)
    # the memory step of a converted site: session scan, chunk summaries, recall, routed mix
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    n0 = torch.zeros(B, dtype=torch.int64, device=dev)
    zf = lambda *shape: torch.zeros(*shape, device=dev)  # noqa: E731  (float32 state)
    add(
        "mka::session_scan",
        t(lambda: ops.session_scan(k, v, valid, zf(B, H, d), zf(B, H, d), n0, 0.9)),
        t_sdpa,
        None,
        gb,
    )
    C, R = 64 if T >= 256 else 16, 8 if T >= 256 else 4
    N = T // C + 1
    chunk = lambda: ops.chunk_update(k, v, valid, n0, zf(B, H, d), zf(B, H, d), zf(B, H, N, d), zf(B, H, N, d), C)  # noqa: E731
    add("mka::chunk_update", t(chunk), t_sdpa, None, gb / 2)
    summ, pos = r(B, H, N, d, dt=torch.float32), torch.arange(T, device=dev).expand(B, T)
    add(f"mka::recall_select (top-{R})", t(lambda: ops.recall_select(q, summ, pos, C, R, None, None)), t_sdpa)
    lam3 = torch.softmax(r(B, 1, T, 3, dt=torch.float32), -1)
    add("mka::route_mix (3 levels)", t(lambda: ops.route_mix(lam3, [k, v, q], [v, q, k])), t_sdpa, None, 2 * gb)
    # MKA mode: L1 + L2 full length and L3 (R recalled summaries) in one pass, against one SDPA pass
    idx3 = torch.randint(0, N, (B, H, T, R), device=dev)
    found3 = torch.ones(B, H, T, R, dtype=torch.bool, device=dev)
    margs = (q, [k, v], [v, k], lam3, q, summ, summ, idx3, found3, valid, scale, True)
    add("mka::mka_attention fwd (3 levels)", t(lambda: ops.mka_attention(*margs)), t_sdpa, 2 * fl)
    return rows


# -------------------------------------------------------------------------------------------------------- main


def print_model_table(rows: list[dict]) -> None:
    print(f"\n{'model (prefill, then cached decode)':40s} {'ms':>10s} {'tokens/s':>11s} {'vs original':>12s}")
    for row in rows:
        note = f"  {row['error']}" if "error" in row else ""
        print(f"{row['what']:40s} {row['ms']:10.2f} {row['tokens_s']:11.1f} {row['vs_original']:12.2f}{note}")


def print_op_table(rows: list[dict]) -> None:
    print(f"\n{'op':40s} {'ms':>10s} {'TFLOP/s':>9s} {'GB/s':>9s} {'SDPA/ours':>10s}")
    for row in rows:
        tf_ = f"{row['tflops']:.1f}" if "tflops" in row else "-"
        gb_ = f"{row['gbps']:.0f}" if "gbps" in row else "-"
        print(f"{row['what']:40s} {row['ms']:10.3f} {tf_:>9s} {gb_:>9s} {row['vs_sdpa']:10.2f}")
    sys.stdout.flush()


def device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--tiny`` and ``--dtype``, as every tools/gpu script takes them."""
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds on a CPU)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 (CUDA), float32")


def device_of(args: argparse.Namespace) -> tuple[torch.device, torch.dtype] | None:
    """The device and dtype the arguments ask for; None (after saying why) when CUDA is asked for but absent."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny to exercise the script on the CPU", file=sys.stderr)
        return None
    dev = torch.device(args.device)
    return dev, getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    device_arguments(p)
    p.add_argument("--reps", type=int, default=None, help="rounds per model, calls per op (default 5 / 30; tiny 2)")
    for key in ("batch", "prompt", "new_tokens"):
        p.add_argument(
            f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {FULL_RUN[key]} (tiny {TINY_RUN[key]})"
        )
    p.add_argument("--modes", default="fastmka,mka", help="conversion modes timed against the original")
    p.add_argument("--skip-ops", action="store_true", help="only the model timings")
    p.add_argument("--out", default=None, help="folder for timings.json")
    args = p.parse_args(argv)
    if (got := device_of(args)) is None:
        return 2
    dev, dtype = got
    shape, run = (TINY, dict(TINY_RUN)) if args.tiny else (FULL, dict(FULL_RUN))
    run.update({k: getattr(args, k) for k in run if getattr(args, k) is not None})
    op_size = {"B": 1, "H": 2, "T": 48, "d": 32} if args.tiny else {"B": 4, "H": 32, "T": 8192, "d": 128}
    reps = args.reps or (2 if args.tiny else None)
    mka_config = None
    if args.tiny:
        import mka_compile

        mka_config = mka_compile.MKAConfig(chunk_size=16, top_r=4)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name}, {dtype}, torch {torch.__version__}; model {shape} {run}", flush=True)
    report: dict = {"device": name, "dtype": str(dtype), "model": {**shape, **run}, "ops_size": op_size}
    modes = tuple(m for m in args.modes.split(",") if m)
    report["models"] = model_timings(dev, dtype, shape, run, reps or 5, modes, mka_config)
    if not args.skip_ops:
        report["ops"] = _guarded("op timings", lambda: op_timings(dev, dtype, op_size, reps or 30), [])
        print_op_table(report["ops"])
    print_model_table(report["models"])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "timings.json").write_text(json.dumps(report, indent=2))
    ok = all(math.isfinite(r["ms"]) for r in report["models"] + report.get("ops", [{"ms": 0.0}]))
    return 0 if ok and (args.skip_ops or report["ops"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
