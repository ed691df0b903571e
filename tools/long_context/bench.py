"""The long-context benchmark (issue 14, "Measure it"): a small byte-level Llama trained with full attention at a
short length L, then run far beyond it with full attention, window + sinks (StreamingLLM) and bounded MKA.

    python tools/long_context --quick                       # a smoke run (~2 min), writes under out/long_context
    python tools/long_context                               # the full run (<= 30 min on 2 cores from a fresh clone)
    mka-compile longctx [--quick]                           # the same through the CLI

Writes ``docs/long_context.md`` (every sentence computed from the numbers), ``docs/long_context.json`` and PNG
plots under ``docs/long_context/`` (the full run; ``--quick`` writes under ``out/long_context/`` unless ``--doc``
says otherwise). Trained weights are cached under ``.cache/long_context/`` keyed by the training settings.

Variants whose conversion needs the bounded-memory API (``MKAConfig(window=...)``, ``memory_report``) are left
out when the checkout does not have it, and the page says so; nothing is stubbed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from tools.long_context import measure, report, tasks
from tools.long_context.goals import GOALS, goals
from tools.long_context.model import (
    CACHE_DIR,
    TrainSettings,
    Variant,
    bounded_api_available,
    finetune_memory,
    instantiate,
    trained_model,
)

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    train: TrainSettings = TrainSettings()
    window: int = 64  # W <= L / 4
    sinks: int = 4  # S
    chunk: int = 32  # C
    recall: int = 4  # R; S + W + C * (R + 1) <= L
    multiples: tuple[int, ...] = (8, 32, 64)  # retrieval lengths in windows (the training length is added first)
    samples: int = 50  # per task and length
    eval_batch: int = 10
    finetune_steps: int = 30
    finetune_seq: int = 1024
    finetune_batch: int = 4
    finetune_lr: float = 1e-2
    finetune_max_s: float = 150.0  # stop the fine-tune there
    stream_tokens: int = 65536
    stream_block: int = 512
    stream_full_cap: int = 16384  # full attention streamed this far (quadratic cost)
    timing_multiples: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # decode / prefill lengths in windows
    # longer lengths timed for full attention and bounded MKA at init only: where bounded decode starts to win
    timing_far_multiples: tuple[int, ...] = (128, 256, 512)
    decode_steps: int = 8
    bank_multiples: tuple[int, ...] = (32, 64)  # lengths (in windows) of the documents put in a memory bank
    bank_samples: int = 20  # per task and length (passkey, multikey)
    budget_s: float = 1800.0  # optional parts (the fine-tune) are skipped when the run would exceed it
    seed: int = 0
    answer_digits: int = field(default=tasks.ANSWER_DIGITS)

    @property
    def budget(self) -> int:
        return self.sinks + self.window + self.recall * self.chunk


QUICK = Settings(  # tiny sizes for the smoke run; L stays 256 so that every task fits at the training length
    train=TrainSettings(hidden=32, layers=2, heads=2, kv_heads=1, steps=30, batch=8, stages=((1.0, 256, 0.5, 0.2),)),
    window=32,
    sinks=2,
    chunk=16,
    recall=2,
    multiples=(16,),
    samples=6,
    eval_batch=6,
    bank_multiples=(16,),
    bank_samples=3,
    finetune_steps=2,
    finetune_seq=512,
    finetune_batch=2,
    finetune_max_s=20.0,
    stream_tokens=2048,
    stream_block=256,
    stream_full_cap=1024,
    timing_multiples=(1, 4, 16),
    timing_far_multiples=(),
    decode_steps=3,
    budget_s=600.0,
)


def variants(s: Settings, bounded: bool) -> list[Variant]:
    full = Variant("full", "full attention", None, what="the trained model as is (SDPA, `DynamicCache`)")
    if not bounded:
        return [full]
    L = s.train.length
    common = {"sink_tokens": s.sinks, "chunk_size": s.chunk, "trained_length": L}
    mka = {"window": s.window, "recall_chunks": s.recall, **common, "chunk_keys": "bounds"}
    mean = {**mka, "chunk_keys": "mean"}
    return [
        full,
        Variant(
            "sinks",
            "window + sinks",
            {"window": s.budget - s.sinks, "recall_chunks": 0, **common},
            what=f"`MKAConfig(window={s.budget - s.sinks}, sink_tokens={s.sinks}, recall_chunks=0)` (StreamingLLM)",
        ),
        Variant("mka", "bounded MKA at init", mka, what=f"`MKAConfig({_kw(mka)})`, converted, no training"),
        Variant(
            "mka_mean",
            "bounded MKA at init, mean keys",
            mean,
            what="the same with chunks recalled by their mean key (`chunk_keys='mean'`) instead of the bound",
        ),
        Variant(
            "mka_ft",
            "bounded MKA fine-tuned",
            mka,
            finetune=True,
            what=f"the same after fine-tuning `memory_parameters` for {s.finetune_steps} steps on "
            f"{s.finetune_seq}-token retrieval samples",
        ),
    ]


def _kw(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def run(s: Settings, log, cache_dir: Path = CACHE_DIR, command: str = "") -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(s.seed)
    L, W = s.train.length, s.window
    if W > L // 4 or s.sinks + W + s.chunk * (s.recall + 1) > L:
        raise ValueError(
            f"need W <= L/4 and S + W + C*(R+1) <= L (W={W}, S={s.sinks}, C={s.chunk}, R={s.recall}, L={L})"
        )
    notes, secs = [], {}
    bounded = bounded_api_available()
    if not bounded:
        notes.append(
            "The bounded-memory API (`MKAConfig(window=..., sink_tokens=...)`, `mka_compile.memory_report`) is not in "
            "this checkout: only full attention was measured; the window + sinks and bounded MKA rows are not produced."
        )
    base, train_rec = trained_model(s.train, log, cache_dir)
    secs["train"] = 0.0 if train_rec["cached"] else train_rec["seconds"]
    vs = variants(s, bounded)
    text = tasks.text_ids("test")
    lengths = [L] + [m * W for m in s.multiples]
    samples = {(t, n): tasks.make_samples(t, n, s.samples, text, s.seed + 1) for t in tasks.TASKS for n in lengths}

    models = {}
    for v in vs:
        t0 = time.perf_counter()
        if v.finetune:
            remaining = s.budget_s - (time.perf_counter() - t_start)
            if remaining < 0.5 * s.budget_s:
                notes.append(
                    f"{v.label}: skipped, {remaining:.0f} s of the {s.budget_s:.0f} s budget were left before the "
                    "fine-tune (the retrieval, streaming and timing parts still had to run)."
                )
                continue
            model = instantiate(base, v)
            rec = finetune_memory(
                model, s.finetune_seq, s.finetune_steps, s.finetune_batch, s.finetune_lr, s.finetune_max_s, log, s.seed
            )
            if rec["steps"] < s.finetune_steps:
                notes.append(
                    f"{v.label}: the fine-tune stopped after {rec['steps']} of {s.finetune_steps} steps "
                    f"({s.finetune_max_s:.0f} s limit)."
                )
            secs["finetune"] = rec["seconds"]
            models[v.name] = (v, model, rec)
        else:
            models[v.name] = (v, instantiate(base, v), None)
        log(f"variant ready: {v.label} ({time.perf_counter() - t0:.1f} s)")

    # Retrieval: every variant, task and length (the training length first: in-length accuracy).
    t0 = time.perf_counter()
    retrieval = {}
    for name, (v, model, _) in models.items():
        retrieval[name] = {t: {} for t in tasks.TASKS}
        for n in lengths:
            for t in tasks.TASKS:
                t1 = time.perf_counter()
                res = measure.retrieval(model, samples[(t, n)], s.eval_batch)
                retrieval[name][t][str(n)] = res
                log(
                    f"  retrieval {v.label:>24} {t:>8} @ {n:>5}: {100 * res['accuracy']:5.1f} % "
                    f"({time.perf_counter() - t1:.1f} s)"
                )
    secs["retrieval"] = time.perf_counter() - t0

    # Retrieval with the document in a memory bank and the question asked alone (bounded MKA at init).
    t0 = time.perf_counter()
    bank = {}
    left = s.budget_s - (time.perf_counter() - t_start)
    if "mka" in models and s.bank_samples and left < 0.1 * s.budget_s:
        notes.append(f"Retrieval from a memory bank: skipped, {left:.0f} s of the {s.budget_s:.0f} s budget were left.")
    elif "mka" in models and s.bank_samples:
        model = models["mka"][1]
        for t in ("passkey", "multikey"):
            bank[t] = {}
            for m in (m for m in s.bank_multiples if m in s.multiples):  # lengths with samples
                n = m * W
                res = measure.bank_retrieval(model, samples[(t, n)][: s.bank_samples], s.chunk)
                bank[t][str(n)] = res
                log(f"  bank {t:>8} @ {n:>5}: {100 * res['bank']:5.1f} % (alone {100 * res['alone']:.1f} %)")
    secs["bank"] = time.perf_counter() - t0

    # Streaming perplexity and resident bytes.
    t0 = time.perf_counter()
    ids = torch.cat([torch.tensor([tasks.BOS]), text[: s.stream_tokens - 1]])
    checkpoints = [n for n in _doublings(1024 if s.stream_tokens >= 1024 else s.stream_block, s.stream_tokens)]
    stream = {}
    for name, (v, model, _) in models.items():
        cap = s.stream_full_cap if v.bounded is None else s.stream_tokens
        res = measure.stream(model, ids[:cap], s.stream_block, checkpoints, log, v.label)
        rows = [{**c, "ppl": measure.segment_ppl(res["nll"], c["tokens"])} for c in res["checkpoints"]]
        if name in ("mka", "mka_ft", "sinks"):  # the same segments with a 1K-token context (text difficulty)
            for c in rows:
                if c["tokens"] >= 2048:
                    c["ppl_1k"] = measure.fresh_segment_ppl(model, ids, c["tokens"], s.stream_block)
        d = {"checkpoints": rows}
        if cap < s.stream_tokens:
            d["capped_at"] = cap
            d["bytes_per_token"] = rows[-1]["resident_bytes"] // rows[-1]["tokens"]
        stream[name] = d
    secs["stream"] = time.perf_counter() - t0

    # Decode ms/token and prefill time, variants interleaved per length.
    t0 = time.perf_counter()
    timing = {name: [] for name in models}
    far = ("full", "mka")  # the variants timed at the longer lengths too
    for m in (*s.timing_multiples, *s.timing_far_multiples):
        n = m * W
        if n > len(ids):
            continue
        for name, (v, model, _) in models.items():
            if m not in s.timing_multiples and name not in far:
                continue
            res = measure.prefill_decode(model, ids[:n], s.decode_steps)
            timing[name].append({"tokens": n, **res})
            log(
                f"  timing {v.label:>24} @ {n:>5}: prefill {res['prefill_s']:.3f} s, "
                f"decode {res['decode_ms']:.2f} ms/token"
            )
    secs["timing"] = time.perf_counter() - t0
    exps = {
        k: measure.fit_exponent([t["tokens"] for t in rows], [t["prefill_s"] for t in rows])
        for k, rows in timing.items()
    }
    crossover = {k: _crossover(rows, timing["full"]) for k, rows in timing.items() if k != "full"}

    secs["total"] = time.perf_counter() - t_start
    r = {
        "command": command,
        "machine": {
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "settings": {**asdict(s), "budget": s.budget},
        "tasks": list(tasks.TASKS),
        "task_text": _task_text(),
        "model": {
            "params": sum(p.numel() for p in base.parameters()),
            "train": {k: v for k, v in train_rec.items() if k != "curve"},
            "train_curve": train_rec.get("curve", [])[-5:],
            "in_length_accuracy": {t: retrieval["full"][t][str(L)]["accuracy"] for t in tasks.TASKS},
        },
        "variants": {v.name: {"label": v.label, "what": v.what, "config": v.bounded} for v, _, _ in models.values()},
        "finetune": {k: {kk: vv for kk, vv in rec.items()} for k, (_, _, rec) in models.items() if rec},
        "retrieval_lengths": lengths,
        "retrieval": retrieval,
        "bank": bank,
        "stream": stream,
        "timing": timing,
        "prefill_exponent": exps,
        "crossover": crossover,
        "notes": notes,
        "seconds": {k: round(v, 1) for k, v in secs.items()},
    }
    r["goals"] = goals(r)
    return r


def _doublings(lo: int, hi: int) -> list[int]:
    out = [lo]
    while out[-1] * 2 <= hi:
        out.append(out[-1] * 2)
    return out


def _crossover(rows: list[dict], full: list[dict]) -> int | None:
    """The shortest measured length from which ``rows`` decodes faster than ``full`` at every longer length."""
    by = {t["tokens"]: t["decode_ms"] for t in full}
    ns = [t["tokens"] for t in rows]
    faster = [t["decode_ms"] < by[t["tokens"]] for t in rows]
    for i in range(len(ns)):
        if all(faster[i:]):
            return ns[i]
    return None


def _task_text() -> str:
    return (
        "**passkey**: `<filler> The pass key is 71432. Remember it. 71432 is the pass key. <filler> What is the pass "
        "key? The pass key is 71432`; **multikey**: four needles `The pass key of <name> is <number>.` with distinct "
        "names, one asked for; **kv**: no filler, the whole context is lines `<4 letters>: <5 digits>`, then "
        "`Look up <key>: <value>` (every line a distractor)."
    )


def main(argv: list[str] | None = None, prog: str = "python tools/long_context") -> dict:
    p = argparse.ArgumentParser(prog="long_context", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run on tiny sizes (~1-2 min, trains its own model)")
    p.add_argument(
        "--doc", help="markdown page to write (default docs/long_context.md; --quick: out/long_context/long_context.md)"
    )
    p.add_argument("--cache-dir", default=str(CACHE_DIR), help="where trained weights are cached")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    s = QUICK if args.quick else Settings()
    s = replace(s, seed=args.seed, train=replace(s.train, seed=args.seed))
    doc = (
        Path(args.doc)
        if args.doc
        else (ROOT / "out/long_context/long_context.md" if args.quick else ROOT / "docs/long_context.md")
    )
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])
    r = run(s, log, Path(args.cache_dir), command)
    doc.parent.mkdir(parents=True, exist_ok=True)
    pngs = report.plots(r, doc.parent / doc.stem)
    doc.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    doc.write_text(report.markdown(r, doc, pngs))
    log(f"wrote {doc}, {doc.with_suffix('.json')} and {len(pngs)} plots under {doc.parent / doc.stem}/")
    for g in r["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        log(f"  goal: {GOALS[g['id']]}: {g['measured']} -> {verdict}")
    return r


if __name__ == "__main__":
    main()
