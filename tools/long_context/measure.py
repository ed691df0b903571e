"""The measurements of the long-context benchmark, each on one model (a variant of the trained one).

- :func:`retrieval`: accuracy under teacher forcing: one forward over the whole sample (question and answer), a
  sample is right when the argmax at every answer position is the answer's digit;
- :func:`stream`: WikiText-2 test bytes fed through the model's cache block by block (``cache``), the
  NLL of every token, and at checkpoints the cache's ``memory_report`` and the elapsed time;
- :func:`prefill_decode`: one prefill call of ``n`` tokens (timed), then cached decode steps (median ms/token);
- :func:`fit_exponent`: ``t ~ a * n^k`` by least squares in log-log.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mka_compile.hf.compat import cache_kwargs, returned_cache
from tools.long_context import tasks


def _call(model, ids: torch.Tensor, cache):
    """One cached call; returns ``(logits, cache)``."""
    out = model(ids, use_cache=True, **(cache_kwargs(model, cache) if cache is not None else {}))
    return out.logits, returned_cache(out)


def memory_report(cache) -> dict:
    """``mka_compile.memory_report(cache)`` when the checkout has it; else the bytes of a plain ``DynamicCache``'s
    tensors (full attention: all resident, nothing offloaded)."""
    try:
        from mka_compile import memory_report as report
    except ImportError:
        report = None
    if report is not None:
        return {k: int(v) for k, v in report(cache).items()}
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"no memory_report in this checkout and the cache is a {type(cache).__name__}")
    resident = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"resident_bytes": resident, "offloaded_bytes": 0, "tokens": int(cache.get_seq_length())}


@torch.no_grad()
def retrieval(model, samples: list[tasks.Sample], batch: int) -> dict:
    """Teacher-forced retrieval accuracy of ``samples`` (all of one length), ``batch`` samples per forward."""
    k = tasks.ANSWER_DIGITS
    predicted, correct = [], []
    for i in range(0, len(samples), batch):
        x = torch.stack([s.ids for s in samples[i : i + batch]])  # (b, n)
        logits = model(x, use_cache=False, logits_to_keep=k + 1).logits[:, :-1]  # (b, k, V): predicts the answer
        pred = logits.argmax(-1)
        for row, target in zip(pred, x[:, -k:]):
            predicted.append(bytes(min(t, 255) for t in row.tolist()).decode("latin-1"))
            correct.append(bool((row == target).all()))
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "correct": correct,
        "predicted": predicted,
        "depths": [round(s.depth, 4) for s in samples],
    }


@torch.no_grad()
def bank_retrieval(model, samples: list[tasks.Sample], chunk: int) -> dict:
    """Retrieval with the context in a memory bank: each sample's document (its tokens before the question, cut at
    a chunk boundary) goes into ``mka_compile.memory_bank``; the question (BOS, the cut's remainder, the question)
    is asked alone, with ``bounded_cache(bank)`` and without. Teacher-forced accuracy of both."""
    from mka_compile import bounded_cache, memory_bank

    k = tasks.ANSWER_DIGITS
    hits = {"bank": [], "alone": []}
    for smp in samples:
        cut = (len(smp.ids) - smp.question) // chunk * chunk
        q = torch.cat([torch.tensor([tasks.BOS]), smp.ids[cut:]])[None]
        bank = memory_bank(model, smp.ids[None, :cut], block_size=1024)
        for name, kw in (("bank", cache_kwargs(model, bounded_cache(bank))), ("alone", {})):
            pred = model(q, logits_to_keep=k + 1, **kw).logits[:, :-1].argmax(-1)
            hits[name].append(bool((pred[0] == q[0, -k:]).all()))
    return {name: sum(h) / len(h) for name, h in hits.items()} | {"n": len(samples)}


@torch.no_grad()
def fresh_segment_ppl(model, ids: torch.Tensor, n: int, block: int, warm: int = 1024) -> float:
    """Perplexity of the tokens in ``(n / 2, n]`` of ``ids`` (the segment :func:`segment_ppl` scores) predicted by
    ``model`` from a fresh cache that starts ``warm`` tokens before the segment: the same text with a short context,
    the reference that tells what a long stream adds or costs from how hard the text is."""
    lo = max(0, n // 2 - warm)
    res = stream(model, ids[lo:n], block, [], lambda _: None, "")
    seg = res["nll"][n // 2 - lo : n - lo - 1]
    return math.exp(sum(seg) / len(seg))


@torch.no_grad()
def stream(
    model, ids: torch.Tensor, block: int, checkpoints: list[int], log: Callable[[str], None], label: str
) -> dict:
    """Feed ``ids: [N]`` through the model's cache in blocks of ``block`` tokens.

    Returns ``nll`` (``N - 1`` floats: token ``t + 1`` predicted from tokens ``<= t``) and, at every checkpoint
    ``n`` (a multiple of ``block``), ``memory_report`` of the cache holding ``n`` tokens and the seconds spent."""
    cache, nll, rows, prev, t0 = None, [], [], None, time.perf_counter()
    for start in range(0, len(ids), block):
        x = ids[start : start + block][None]  # (1, b)
        logits, cache = _call(model, x, cache)
        logits = logits[0].float()  # (b, V)
        if prev is not None:
            logits = torch.cat([prev, logits])
        targets = ids[max(start, 1) : start + x.shape[1]]
        nll.append(F.cross_entropy(logits[: len(targets)], targets, reduction="none"))
        prev = logits[-1:]
        end = start + x.shape[1]
        if end in checkpoints:
            rows.append({"tokens": end, "seconds": round(time.perf_counter() - t0, 3), **memory_report(cache)})
            log(f"  {label}: {end:,} tokens streamed, {rows[-1]['seconds']:.1f} s")
    return {"nll": torch.cat(nll).tolist(), "checkpoints": rows}


def segment_ppl(nll: list[float], n: int) -> float:
    """Perplexity of the tokens in ``(n / 2, n]`` (of the first ``n``; all of them for the first checkpoint)."""
    lo = n // 2 if n > 1024 else 0
    seg = nll[lo : n - 1]
    return math.exp(sum(seg) / len(seg))


@torch.no_grad()
def prefill_decode(model, ids: torch.Tensor, steps: int) -> dict:
    """Prefill ``ids: [n]`` in one call (timed), then ``steps`` greedy cached decode steps (median ms/token)."""
    t0 = time.perf_counter()
    logits, cache = _call(model, ids[None], None)
    prefill = time.perf_counter() - t0
    nxt, times = logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, cache = _call(model, nxt, cache)
        times.append(time.perf_counter() - t0)
        nxt = logits[:, -1:].argmax(-1)
    return {"prefill_s": prefill, "decode_ms": 1000 * statistics.median(times), **memory_report(cache)}


def fit_exponent(ns: list[int], ts: list[float]) -> float | None:
    """Least-squares slope of ``log t`` against ``log n`` (None with fewer than two points)."""
    pts = [(math.log(n), math.log(t)) for n, t in zip(ns, ts) if t > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
