"""The MKA paper's tables re-measured at small scale: six attention variants in one decoder LM, on CPU.

    python tools/paper/tables.py                 # default budget: both corpora, six variants, conversion (~15-20 min)
    python tools/paper/tables.py --quick --out /tmp/pt --doc /tmp/pt/results.md     # micro budget (~30 s)

One small decoder LM (``tools/paper/lm_variants.py``) with MHA, MQA, GQA, MLA, MKA and FastMKA attention, the
same width, depth, steps, batch, learning-rate schedule, data order and seed, trained on Tiny Shakespeare
(characters) and WikiText-2 (bytes; trained on the validation split, reported on the test split). All
variants train in lock-step (one step of each, in rotating order, on the same batch), and every timing
is taken interleaved across variants, so machine load hits them alike. Measured per variant: held-out
perplexity (``tools/paper/lm_training.py``: every token predicted once, no padding), training tokens/s (median
step), eval latency (a forward over one validation batch), decode ms/token (greedy cached decoding after
a prompt, batch 1), and the KV-cache bytes held after decoding next to the analytic formula. Then the
conversion experiment (``tools/paper/convert_recovery.py``) on the table's trained MHA model.

Writes ``<out>/<corpus>.json``, ``<out>/conversion.json``, PNG plots under ``<out>/``, and ``--doc``
(default ``docs/results.md``) with the tables, the command, seeds, budgets and the conclusions computed
from the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import mka_compile

if not __package__:  # run as a file: the checkout's `tools` package, appended so an installed mka_compile still wins
    sys.path.append(str(Path(__file__).resolve().parents[2]))
from tools.paper import convert_recovery  # noqa: E402
from tools.paper import lm_training as T  # noqa: E402
from tools.paper.lm_variants import (  # noqa: E402
    VARIANTS,
    DecoderLM,
    LMConfig,
    analytic_cache_bytes,
    cache_bytes,
    param_count,
)
from tools.paper.plots import plot_losses, plot_tradeoff  # noqa: E402
from tools.paper.report import COMPARABLE, NAMES, claims, rich_table, write_doc  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]

DEFAULT = dict(
    threads=1,
    steps=300,
    batch=16,
    seq=128,
    d_model=128,
    layers=2,
    heads=4,
    gqa_kv_heads=2,
    lr=3e-3,
    warmup=20,
    weight_decay=0.1,
    eval_every=30,
    eval_tokens=0,
    curve_tokens=8192,
    decode_prompt=64,
    decode_tokens=64,
    repeats=7,
    chunk_size=16,
    top_r=4,
    convert_steps=100,
    convert_lr=1e-3,
    convert_eval_every=10,
    noise_seeds=1,
)
QUICK = dict(
    DEFAULT,
    steps=6,
    batch=4,
    seq=32,
    d_model=32,
    layers=1,
    warmup=2,
    eval_every=3,
    eval_tokens=600,
    curve_tokens=300,
    decode_prompt=8,
    decode_tokens=8,
    repeats=2,
    chunk_size=8,
    top_r=2,
    convert_steps=4,
    convert_eval_every=2,
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="micro budget (for the test): every default below shrinks")
    p.add_argument("--corpora", nargs="+", choices=T.CORPORA, default=list(T.CORPORA))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0, help="model init (same for every variant) and data order")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"), help="JSON and PNG folder")
    p.add_argument("--doc", default=str(ROOT / "docs" / "results.md"), help="the Markdown report to write")
    p.add_argument("--no-convert", action="store_true", help="skip the conversion experiment")
    p.add_argument("--convert-corpus", choices=T.CORPORA, default="shakespeare")
    for key, val in DEFAULT.items():
        p.add_argument(
            "--" + key.replace("_", "-"), type=type(val), default=None, help=f"default {val} (--quick: {QUICK[key]})"
        )
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    for key, val in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    for key in (
        "threads",
        "steps",
        "batch",
        "seq",
        "repeats",
        "decode_prompt",
        "decode_tokens",
        "eval_every",
        "convert_eval_every",
    ):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not args.no_convert and "mha" not in args.variants:
        raise SystemExit(
            "the conversion experiment starts from the trained MHA model: add mha to --variants or pass --no-convert"
        )
    if not args.no_convert and args.convert_corpus not in args.corpora:
        raise SystemExit(f"--convert-corpus {args.convert_corpus} is not among --corpora {args.corpora}")
    return args


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


# -- one corpus: train the six variants in lock-step, then time them interleaved ------------------------
def run_corpus(corpus: T.Corpus, args, progress: Progress) -> tuple[dict, dict[str, DecoderLM]]:
    cfg = LMConfig(
        vocab_size=corpus.vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        gqa_kv_heads=args.gqa_kv_heads,
        mka=mka_compile.MKAConfig(chunk_size=args.chunk_size, top_r=args.top_r),
    )
    models, opts = {}, {}
    # MHA again from other init seeds, same batches: the seed-to-seed spread of perplexity (not timed)
    noise = {f"mha@seed{args.seed + k}": args.seed + k for k in range(1, args.noise_seeds + 1)}
    noise = noise if "mha" in args.variants else {}
    for v, seed in [*((v, args.seed) for v in args.variants), *noise.items()]:
        torch.manual_seed(seed)
        models[v] = DecoderLM(cfg, v.split("@")[0])
        opts[v] = T.make_optimizer(models[v], args.lr, args.weight_decay)
    data = T.batches(corpus.train, args.batch, args.seq, args.seed)
    V = list(models)
    step_s = {v: [] for v in V}
    losses = {v: [] for v in V}
    curve = {v: [] for v in V}
    task = progress.add_task(f"{corpus.name}: train", total=args.steps)
    t_start = time.perf_counter()
    for step in range(args.steps):
        window = next(data)  # (B, seq + 1): the same batch for every variant
        lr = T.lr_at(step, args.steps, args.lr, args.warmup)
        for i in range(len(V)):
            v = V[(i + step) % len(V)]  # rotating order: no variant always runs first
            loss, dt = T.train_step(models[v], opts[v], window, lr)
            losses[v].append(loss)
            step_s[v].append(dt)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            for v in V:
                curve[v].append((step + 1, T.perplexity(models[v], corpus.heldout, args.seq, args.curve_tokens)))
        progress.update(
            task,
            advance=1,
            description=f"{corpus.name}: train " + " ".join(f"{v} {losses[v][-1]:.2f}" for v in args.variants),
        )
    train_wall = time.perf_counter() - t_start
    progress.remove_task(task)

    t_eval = time.perf_counter()
    task = progress.add_task(f"{corpus.name}: held-out perplexity", total=len(V))
    ppl = {}
    for v in V:
        nll, n = T.heldout_nll(models[v], corpus.heldout, args.seq, args.eval_tokens)
        ppl[v] = {"nll": nll / n, "ppl": math.exp(nll / n), "tokens": n}
        progress.update(task, advance=1)
    progress.remove_task(task)

    t_timing = time.perf_counter()
    lat, dec, pre, held = time_inference({v: models[v] for v in args.variants}, corpus, args, progress)
    routing = {v: level_routing(models[v], corpus.heldout, args.seq) for v in args.variants if v in ("mka", "fastmka")}
    t_end = time.perf_counter()
    skip = min(5, max(0, args.steps - 1))  # the first steps warm up allocators and kernels
    tokens_per_step = args.batch * args.seq
    ctx = args.decode_prompt + args.decode_tokens
    out = {}
    for v in args.variants:
        f = analytic_cache_bytes(cfg, v)
        med = T.median(step_s[v][skip:])
        out[v] = {
            "params": param_count(models[v]),
            "kv_heads": cfg.kv_heads(v),
            **ppl[v],
            "train_step_ms_median": 1e3 * med,
            "train_tokens_per_s": tokens_per_step / med,
            "train_time_s": sum(step_s[v]),
            "eval_latency_ms": lat[v],
            "prefill_ms": pre[v],
            "decode_ms_per_token": dec[v],
            "cache_context": ctx,
            "cache_bytes_held": held[v],
            "cache_bytes_analytic": f.at(ctx),
            "cache_bytes_analytic_32k": f.at(32768),
            "cache_formula": f.text,
            "losses": losses[v],
            "curve": curve[v],
        }
        if v in routing:
            out[v]["routing"] = routing[v]
    cfg_d = {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "gqa_kv_heads", "mlp")}
    cfg_d.update(head_dim=cfg.head_dim, mla_kv_rank=cfg.kv_rank, mla_rope_dim=cfg.rope_dim)
    cfg_d["mka"] = {
        "levels": list(cfg.mka.levels),
        "ema_beta": cfg.mka.ema_beta,
        "chunk_size": cfg.mka.chunk_size,
        "top_r": cfg.mka.top_r,
        "gate_init": 1.0,
    }
    result = {
        "corpus": corpus.name,
        "tokens": corpus.tokens,
        "split": corpus.split,
        "train_tokens_available": len(corpus.train),
        "heldout_tokens": len(corpus.heldout) - 1,
        "model": cfg_d,
        "train_wall_s_all_variants": train_wall,
        "eval_wall_s_all_variants": t_timing - t_eval,
        "timing_wall_s_all_variants": t_end - t_timing,
        "tokens_seen_per_variant": args.steps * tokens_per_step,
        "curve_tokens": args.curve_tokens,
        "variants": out,
        "seed_noise": seed_noise({f"mha@seed{args.seed}": "mha", **{n: n for n in noise}}, ppl, losses, curve),
    }
    for n in noise:
        del models[n]
    return result, models


def seed_noise(names: dict[str, str], ppl: dict, losses: dict, curve: dict) -> dict | None:
    """MHA's perplexity from several init seeds (same data): how much of a difference is seed noise."""
    if len(names) < 2:
        return None
    runs = {label: {**ppl[key], "losses": losses[key], "curve": curve[key]} for label, key in names.items()}
    vals = [r["ppl"] for r in runs.values()]
    return {"variant": "mha", "runs": runs, "spread": max(vals) / min(vals) - 1}


@torch.inference_mode()
def level_routing(model: DecoderLM, heldout: torch.Tensor, seq: int, windows: int = 8) -> dict[str, dict[str, float]]:
    """Mean routing weight per memory level of each MKA / FastMKA layer over held-out windows (``[windows, seq]``)."""
    n = max(1, min(windows, (len(heldout) - 1) // seq))
    x = heldout[: n * seq].view(n, seq)
    inputs = {}
    keep = lambda i: lambda module, args: inputs.__setitem__(i, args[0])  # noqa: E731 (the layer's input)
    hooks = [b.attn.register_forward_pre_hook(keep(i)) for i, b in enumerate(model.blocks)]
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, b in enumerate(model.blocks):
        lam = b.attn.layer.level_weights(inputs[i])  # (B, G, T, L)
        out[f"blocks.{i}"] = {lv: float(lam[..., j].mean()) for j, lv in enumerate(b.attn.layer.config.levels)}
    return out


@torch.inference_mode()
def time_inference(models: dict[str, DecoderLM], corpus: T.Corpus, args, progress: Progress):
    """Eval latency, prefill and decode per variant, repeats interleaved; and the cache bytes after decoding."""
    V = list(models)
    for m in models.values():
        m.eval()
    nwin = max(1, min(args.batch, (len(corpus.heldout) - 1) // args.seq))
    val_batch = corpus.heldout[: nwin * args.seq].view(nwin, args.seq)  # (B, seq)
    prompt = corpus.heldout[: args.decode_prompt][None]  # (1, P)
    lat = {v: [] for v in V}
    dec = {v: [] for v in V}
    pre = {v: [] for v in V}
    held = {}
    task = progress.add_task("timing eval + decode (interleaved)", total=args.repeats + 1)
    for r in range(args.repeats + 1):  # repeat 0 warms up and is not counted
        for i in range(len(V)):
            v = V[(i + r) % len(V)]
            m = models[v]
            t0 = time.perf_counter()
            m(val_batch)
            t1 = time.perf_counter()
            cache = m.new_cache()
            logits = m(prompt, cache=cache)
            t2 = time.perf_counter()
            for _ in range(args.decode_tokens):
                logits = m(logits[:, -1:].argmax(-1), cache=cache)  # greedy, one token per call
            t3 = time.perf_counter()
            if r:
                lat[v].append(1e3 * (t1 - t0))
                pre[v].append(1e3 * (t2 - t1))
                dec[v].append(1e3 * (t3 - t2) / args.decode_tokens)
            held[v] = cache_bytes(cache)
        progress.update(task, advance=1)
    progress.remove_task(task)
    med = lambda d: {v: T.median(xs) for v, xs in d.items()}  # noqa: E731
    return med(lat), med(dec), med(pre), held


# -- plots ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # one thread by default: on a shared 2-core machine two threads stall
    try:
        return run(args, sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    command = " ".join(["python tools/paper/tables.py", *argv])
    out, doc = Path(args.out), Path(args.doc)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    meta["load_before"] = meta["machine"]["load_average"]
    t_start = time.perf_counter()
    results, rec = {}, None
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console) as progress:
        for name in args.corpora:
            corpus = T.load_corpus(name)
            res, models = run_corpus(corpus, args, progress)
            results[name] = res
            (out / f"{name}.json").write_text(json.dumps(res, indent=1))
            if not args.no_convert and name == args.convert_corpus:
                t0 = time.perf_counter()
                refs = {"FastMKA trained from scratch": models["fastmka"]} if "fastmka" in models else {}
                rec = convert_recovery.run_recovery(
                    models["mha"],
                    corpus,
                    steps=args.convert_steps,
                    lr=args.convert_lr,
                    batch=args.batch,
                    seq=args.seq,
                    eval_every=args.convert_eval_every,
                    curve_tokens=args.curve_tokens,
                    final_tokens=args.eval_tokens,
                    seed=args.seed,
                    progress=progress,
                    references=refs,
                )
                rec["wall_s"] = time.perf_counter() - t0
                (out / "conversion.json").write_text(json.dumps(rec, indent=1))
            del models
    meta["load_after"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    for name, res in results.items():
        plot_losses(res, out / f"loss_{name}.png")
        console.print(rich_table(res))
    plot_tradeoff(results, out / "ppl_vs_speed.png")
    if rec is not None:
        convert_recovery.plot_recovery(rec, out / "conversion.png")
        console.print(convert_recovery.table(rec))
    (out / "meta.json").write_text(json.dumps({**meta, "command": command, "args": vars(args)}, indent=1))
    write_doc(results, rec, args, meta, doc, out, command)
    for line in claims(results):
        console.print(line)
    console.print(f"wrote {doc} and {out}/ in {meta['wall_s'] / 60:.1f} min")
    return {"results": results, "conversion": rec, "meta": meta, "doc": str(doc)}


if __name__ == "__main__":
    main()
