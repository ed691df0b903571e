"""Corpora, training steps and held-out perplexity for the paper-table experiments (``tools/paper/tables.py``,
``tools/paper/convert_recovery.py``).

Tokenisation: Tiny Shakespeare by characters (the 65 distinct characters of the file), WikiText-2 by
UTF-8 bytes (256 ids; ``mka_compile.training.load_corpus``). Splits: Tiny Shakespeare first 90 % train / last 10 %
held out; WikiText-2 trains on its *validation* split and reports on its *test* split (the training split
is not bundled).

Perplexity is ``exp(mean NLL)`` over every token of the held-out text but the first: the text is cut into
non-overlapping windows of ``seq`` inputs whose targets are the next ``seq`` tokens, so each token is
predicted exactly once, from the tokens before it in its window; the last window is shorter (no padding).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mka_compile import training
from mka_compile.training import CORPORA


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # (N,) int64 ids
    heldout: torch.Tensor  # (M,) int64 ids
    vocab_size: int
    tokens: str  # what one token is
    split: str  # which text trains, which is reported


def load_corpus(name: str) -> Corpus:
    """``shakespeare`` (characters) or ``wikitext2`` (bytes) from the bundled ``data/``."""
    if name == "shakespeare":
        train, heldout = (b.decode("utf-8") for b in training.corpus_bytes("shakespeare"))  # 90 % / 10 %
        chars = sorted(set(train + heldout))
        lut = {c: i for i, c in enumerate(chars)}
        as_ids = lambda text: torch.tensor([lut[c] for c in text], dtype=torch.int64)  # noqa: E731
        return Corpus(
            name,
            as_ids(train),
            as_ids(heldout),
            len(chars),
            f"characters ({len(chars)} distinct)",
            "train on the first 90 % of tinyshakespeare.txt, report on the last 10 %",
        )
    if name == "wikitext2":
        train, heldout = training.load_corpus("wikitext2")
        return Corpus(
            name,
            train,
            heldout,
            256,
            "UTF-8 bytes (256 ids)",
            "train on the WikiText-2 *validation* split, report on the *test* split (train split not bundled)",
        )
    raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")


def batches(ids: torch.Tensor, batch: int, seq: int, seed: int) -> Iterator[torch.Tensor]:
    """Random training windows ``[batch, seq + 1]`` (inputs and shifted targets), reproducible from ``seed``."""
    return training.batches(ids, batch, seq + 1, torch.Generator().manual_seed(seed))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95); weight decay on matrices only (not on norms, gates, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor * peak`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def lm_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``window: [B, T + 1]`` (``window[:, :-1]`` predicts ``window[:, 1:]``)."""
    logits = model(window[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, window: torch.Tensor, lr: float) -> tuple[float, float]:
    """One AdamW step (gradient norm clipped at 1); returns ``(loss, seconds)``."""
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    t0 = time.perf_counter()
    loss = lm_loss(model, window)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item(), time.perf_counter() - t0


@torch.inference_mode()
def heldout_nll(model: nn.Module, ids: torch.Tensor, seq: int, max_tokens: int = 0, batch: int = 32):
    """``(sum of NLL, tokens predicted)`` over ``ids`` (the first ``max_tokens + 1`` ids if ``max_tokens``).

    Windows of ``seq`` inputs, non-overlapping, every token but the first predicted once; the last
    window is shorter and runs alone (nothing is padded)."""
    if seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    if max_tokens:
        ids = ids[: max_tokens + 1]
    n = len(ids) - 1
    if n < 1:
        raise ValueError("the held-out text needs at least 2 tokens")
    full = n // seq
    was_training = model.training
    model.eval()
    total = 0.0
    inputs = ids[: full * seq].view(full, seq)
    targets = ids[1 : full * seq + 1].view(full, seq)
    for i in range(0, full, batch):
        logits = model(inputs[i : i + batch])  # (b, seq, V)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets[i : i + batch].flatten(), reduction="sum"))
    if n > full * seq:
        logits = model(ids[full * seq : n][None])
        total += float(F.cross_entropy(logits[0].float(), ids[full * seq + 1 :], reduction="sum"))
    model.train(was_training)
    return total, n


def perplexity(model: nn.Module, ids: torch.Tensor, seq: int, max_tokens: int = 0) -> float:
    total, n = heldout_nll(model, ids, seq, max_tokens)
    return math.exp(total / n)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])
