"""Small training utilities shared by the CLI demo and the tools: bundled corpora, batches, perplexity, a loop.

Corpora (installed as ``mka_compile.data``, attribution in its README): Tiny Shakespeare (first 90 % train,
last 10 % validation) and WikiText-2 (train on the validation split, report on the test split: the training
split is not bundled). Tokens are bytes (ids 0..255).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import resources

import torch
from rich.progress import Progress

CORPORA = ("shakespeare", "wikitext2")


def corpus_bytes(name: str) -> tuple[bytes, bytes]:
    """``(train, validation)`` raw bytes of a bundled corpus."""
    data = resources.files("mka_compile.data")
    if name == "shakespeare":
        raw = data.joinpath("tinyshakespeare.txt").read_bytes()
        cut = int(0.9 * len(raw))
        return raw[:cut], raw[cut:]
    if name == "wikitext2":
        return data.joinpath("wikitext2_valid.txt").read_bytes(), data.joinpath("wikitext2_test.txt").read_bytes()
    raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")


def load_corpus(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level token ids ``(train, validation)``."""
    as_ids = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    train, val = corpus_bytes(name)
    return as_ids(train), as_ids(val)


def batches(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random windows ``[batch, seq]`` of ``ids`` drawn with ``gen``."""
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s : s + seq] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int, max_windows: int) -> float:
    """exp(mean NLL) over non-overlapping windows of ``ids`` (every token predicted once, no padding)."""
    was_training = model.training
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq)
    windows = ids[: n * seq].view(n, seq)
    nll = 0.0
    for i in range(0, n, 8):
        chunk = windows[i : i + 8]
        nll += float(model(chunk, labels=chunk, use_cache=False).loss) * chunk.numel()
    model.train(was_training)
    return math.exp(nll / windows.numel())


def train(model, data: Iterator[torch.Tensor], steps: int, lr: float, label: str, progress: Progress) -> list[float]:
    """AdamW (no weight decay, grad-norm clip 1) on a Hugging Face causal LM's own loss; the loss per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    task = progress.add_task(label, total=steps)
    losses = []
    model.train()
    for _ in range(steps):
        x = next(data)
        loss = model(x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        progress.update(task, advance=1, description=f"{label} loss {loss.item():.3f}")
    return losses
