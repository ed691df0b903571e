"""Bounded memory on a GPU, end to end: a Llama-shaped model against the same weights converted with
``MKAConfig(window=...)``, at long contexts, in one call (issue 14's GPU goals).

    python tools/gpu/bounded.py --out $OUT                 # CUDA, bf16: ~1B Llama shape, 4K / 32K / 128K tokens
    python tools/gpu/bounded.py --device cpu --tiny        # CPU, fp32, tiny sizes (what the tests run)

For each context length n, each model (full attention: SDPA with transformers' ``DynamicCache``; bounded: FastMKA,
W = 2048 window, S = 4 sinks, C = 64 tokens per chunk, R = 8 recalled chunks, random router values and gate 1 so
every memory level contributes) gets a prompt of n random tokens, prefilled through its cache in blocks of
``--block`` tokens (what ``generate`` does with a long prompt, without a ``[n, vocab]`` logits tensor), then
``--steps`` greedy cached decode steps. Measured: prefill seconds, decode ms/token (median step, device
synchronised), the cache's resident bytes (``mka_compile.memory_report``; full attention: its keys and values) and
the peak device memory. Checked first: at a length the window covers, bounded memory at init (gate 0) gives the
original's logits (identity up to S + W), and at every length the bounded model's outputs are finite.

The table comes last, with the goals: resident KV <= 10 % of full attention's at the longest length, decode >= 2x
faster than full attention there, and within 1.1x at the shortest; ``--out`` also gets ``bounded.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: the checkout's `tools` package, appended so an installed mka_compile still wins
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from tools.gpu.timings import device_arguments, device_of, llama  # noqa: E402

FULL = {"vocab": 32000, "hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8}
FULL_RUN = {"contexts": (4096, 32768, 131072), "block": 8192, "steps": 16}
FULL_MEMORY = {"window": 2048, "sink_tokens": 4, "chunk_size": 64, "recall_chunks": 8}
TINY = {"vocab": 128, "hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}
TINY_RUN = {"contexts": (48, 256, 640), "block": 128, "steps": 3}
TINY_MEMORY = {"window": 32, "sink_tokens": 4, "chunk_size": 16, "recall_chunks": 2}


def build(dev, dtype, shape: dict, memory: dict, positions: int) -> tuple:
    """``(original, bounded, bounded at init, config)`` on ``dev`` in ``dtype``, the same random weights; the
    bounded models converted on the CPU in fp32 (as a user converts a loaded checkpoint), then moved."""
    import mka_compile
    from mka_compile.bench import randomize_mka

    base = llama(shape, positions, rope_theta=500000.0)
    mcfg = mka_compile.MKAConfig(**memory, trained_length=positions)
    at_init = mka_compile.convert(copy.deepcopy(base), config=mcfg)
    bounded = randomize_mka(copy.deepcopy(at_init))
    return tuple(m.to(dev, dtype).eval() for m in (base, bounded, at_init)) + (mcfg,)


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def resident_bytes(cache) -> int:
    import mka_compile

    return int(mka_compile.memory_report(cache)["resident_bytes"])


@torch.no_grad()
def run_one(model, ids: torch.Tensor, block: int, steps: int, dev) -> dict:
    """Prefill ``ids [1, n]`` through the model's cache in blocks, then ``steps`` greedy cached decode steps."""
    from transformers import DynamicCache

    from mka_compile.hf.compat import cache_kwargs

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache()
    _sync(dev)
    t0 = time.perf_counter()
    for a in range(0, ids.shape[1], block):
        out = model(ids[:, a : a + block], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    _sync(dev)
    prefill = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    finite = bool(torch.isfinite(out.logits).all())
    times = []
    for _ in range(steps):
        _sync(dev)
        t = time.perf_counter()
        out = model(tok, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        tok = out.logits[:, -1:].argmax(-1)
        _sync(dev)
        times.append(time.perf_counter() - t)
        finite = finite and bool(torch.isfinite(out.logits).all())
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
    return {
        "prefill_s": prefill,
        "decode_ms": 1000 * statistics.median(times),
        "resident_bytes": resident_bytes(cache),
        "peak_bytes": int(peak),
        "finite": finite,
    }


@torch.no_grad()
def identity_check(base, at_init, n: int, vocab: int, dev) -> float:
    """Max |logits difference| / max |logits| between the original and bounded memory at init over ``n`` tokens
    (a length the window covers: they must agree)."""
    ids = torch.randint(0, vocab, (1, n), device=dev)
    a = base(ids, use_cache=False).logits.float()
    b = at_init(ids, use_cache=False).logits.float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-6))


def goals(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """``(goal, measured, met)`` from the rows (one per context and model)."""
    by = {(r["model"], r["tokens"]): r for r in rows}
    ns = sorted({r["tokens"] for r in rows})
    lo, hi = ns[0], ns[-1]
    out = []
    f, b = by.get(("full", hi)), by.get(("bounded", hi))
    if f and b:
        frac = b["resident_bytes"] / f["resident_bytes"]
        out.append((f"resident KV <= 10 % of full attention's at {hi:,}", f"{100 * frac:.1f} %", frac <= 0.10))
        speed = f["decode_ms"] / b["decode_ms"]
        out.append((f"decode >= 2x faster than full attention at {hi:,}", f"{speed:.2f}x", speed >= 2.0))
    f, b = by.get(("full", lo)), by.get(("bounded", lo))
    if f and b:
        ratio = b["decode_ms"] / f["decode_ms"]
        out.append((f"decode within 1.1x of full attention at {lo:,}", f"{ratio:.2f}x", ratio <= 1.1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    device_arguments(p)
    p.add_argument("--contexts", type=int, nargs="+", help="prompt lengths (default 4096 32768 131072)")
    p.add_argument("--block", type=int, help="prefill block (default 8192)")
    p.add_argument("--steps", type=int, help="decode steps per length (default 16)")
    p.add_argument("--out", default=None, help="folder for bounded.json")
    args = p.parse_args(argv)
    if (got := device_of(args)) is None:
        return 2
    dev, dtype = got
    shape, run, memory = (TINY, dict(TINY_RUN), TINY_MEMORY) if args.tiny else (FULL, dict(FULL_RUN), FULL_MEMORY)
    run.update({k: getattr(args, k) for k in run if getattr(args, k) is not None})
    contexts = sorted(run["contexts"])
    positions = max(contexts) + run["steps"] + 1
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name}, {dtype}, torch {torch.__version__}; model {shape}; bounded {memory}; {run}", flush=True)
    t_build = time.perf_counter()
    base, bounded, at_init, mcfg = build(dev, dtype, shape, memory, positions)
    print(f"built in {time.perf_counter() - t_build:.1f} s", flush=True)
    covered = min(memory["window"], contexts[0])
    rel = identity_check(base, at_init, covered, shape["vocab"], dev)
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    print(f"check: bounded at init == original over {covered} tokens: max rel diff {rel:.2e} (tol {tol:g})", flush=True)
    del at_init
    report = {"device": name, "dtype": str(dtype), "model": shape, "memory": memory, "run": run, "rows": []}
    report["identity"] = {"tokens": covered, "max_rel_diff": rel, "ok": rel <= tol}
    torch.manual_seed(1)
    for n in contexts:
        ids = torch.randint(0, shape["vocab"], (1, n), device=dev)
        for label, model in (("full", base), ("bounded", bounded)):
            try:
                row = run_one(model, ids, run["block"], run["steps"], dev)
            except Exception as e:  # noqa: BLE001  (out of memory at the longest length: the table says so)
                print(f"{label} @ {n}: FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
                row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            report["rows"].append({"model": label, "tokens": n, **row})
            if "error" not in row:
                print(
                    f"{label:8s} n={n:7d}: prefill {row['prefill_s']:8.2f} s, decode {row['decode_ms']:8.2f} ms/token, "
                    f"resident {row['resident_bytes'] / 2**20:9.1f} MiB, peak {row['peak_bytes'] / 2**30:6.2f} GiB",
                    flush=True,
                )
    ok_rows = [r for r in report["rows"] if "error" not in r]
    report["goals"] = [{"goal": g, "measured": m, "met": met} for g, m, met in goals(ok_rows)]
    print()
    print("| tokens | model | prefill s | decode ms/token | resident MiB | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        if "error" in r:
            print(f"| {r['tokens']:,} | {r['model']} | failed: {r['error'][:60]} | | | |")
        else:
            print(
                f"| {r['tokens']:,} | {r['model']} | {r['prefill_s']:.2f} | {r['decode_ms']:.2f} | "
                f"{r['resident_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**30:.2f} |"
            )
    print()
    print(f"identity at init over {covered} tokens: {'ok' if report['identity']['ok'] else 'FAILED'} ({rel:.2e})")
    for g in report["goals"]:
        print(f"goal: {g['goal']}: {g['measured']} -> {'met' if g['met'] else 'NOT met'}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bounded.json").write_text(json.dumps(report, indent=2))
    finite = all(r.get("finite", False) for r in report["rows"] if r["model"] == "bounded")
    return 0 if report["identity"]["ok"] and finite and len(ok_rows) == len(report["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
