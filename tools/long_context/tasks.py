"""Byte tokens, filler text and the retrieval samples of the long-context benchmark.

Tokens are UTF-8 bytes (ids 0..255) plus ``BOS`` (256), which starts every sequence (the first sink).

Three retrieval tasks, each a sequence of exactly ``n`` tokens whose last ``ANSWER_DIGITS`` tokens are the answer:

- ``passkey`` (the Landmark / Quest generator with real text as filler)::

      <filler> The pass key is 71432. Remember it. 71432 is the pass key. <filler>
      What is the pass key? The pass key is 71432

- ``multikey`` (RULER's multi-key needle): four needles ``The pass key of <name> is <number>.`` with distinct
  names at random depths, one of them asked for at the end: ``What is the pass key of <name>? The pass key of
  <name> is <number>``.
- ``kv`` (key-value retrieval, as in infinity-Bench's R.KV): no filler; the whole context is lines
  ``<4 random letters>: <5 digits>`` and the question is ``Look up <key>: <value>``, so every line is a distractor.

The asked needle's depth (its start over the context length) is given by the caller; the benchmark spreads it
uniformly over ``[0, 1]``. Training filler comes from the WikiText-2 validation split and the first 90 % of Tiny
Shakespeare; evaluation filler from the WikiText-2 test split (held out).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mka_compile import training

BOS = 256
VOCAB = 257
ANSWER_DIGITS = 5
TASKS = ("passkey", "multikey", "kv")
NAMES = (
    "amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "ivory", "jasper",
    "koala", "lotus", "maple", "north", "olive", "pearl", "quill", "raven", "sable", "tulip",
)  # fmt: skip


def text_ids(split: str) -> torch.Tensor:
    """Filler / streaming text as byte ids: ``train`` (WikiText-2 valid + Tiny Shakespeare first 90 %) or ``test``."""
    wiki_valid, wiki_test = training.corpus_bytes("wikitext2")
    if split == "test":
        raw = wiki_test
    elif split == "train":
        raw = wiki_valid + b"\n" + training.corpus_bytes("shakespeare")[0]
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


@dataclass
class Sample:
    ids: torch.Tensor  # (n,) int64, BOS first, the answer last
    answer: str  # the digits the model must produce
    depth: float  # where the asked needle starts, as a fraction of the context
    question: int = 0  # the last tokens that ask (and answer): the rest is the document


def _enc(s: str) -> list[int]:
    return list(s.encode())


def _number(rng: random.Random) -> str:
    return str(rng.randint(10 ** (ANSWER_DIGITS - 1), 10**ANSWER_DIGITS - 1))


def _filler(text: torch.Tensor, n: int, rng: random.Random) -> list[int]:
    if n <= 0:
        return []
    start = rng.randrange(0, len(text) - n)
    return text[start : start + n].tolist()


def _place(body: int, needles: list[tuple[list[int], float]]) -> list[tuple[int, list[int]]]:
    """Offsets into a filler of ``body`` tokens at which to insert needles ``(tokens, depth)``, sorted by depth."""
    if body < 0:
        raise ValueError(f"sequence too short for the needles and the question ({-body} tokens missing)")
    return sorted((min(int(depth * body), body), toks) for toks, depth in needles)


def _assemble(prefix: list[int], filler: list[int], placed: list[tuple[int, list[int]]], tail: list[int]) -> list[int]:
    out, prev = list(prefix), 0
    for at, toks in placed:
        out += filler[prev:at] + toks
        prev = at
    return out + filler[prev:] + tail


def passkey(n: int, depth: float, text: torch.Tensor, rng: random.Random) -> Sample:
    key = _number(rng)
    needle = _enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    tail = _enc(" What is the pass key? The pass key is " + key)
    body = n - 1 - len(needle) - len(tail)
    ids = _assemble([BOS], _filler(text, body, rng), _place(body, [(needle, depth)]), tail)
    return Sample(torch.tensor(ids), key, depth, len(tail))


def multikey(n: int, depth: float, text: torch.Tensor, rng: random.Random, needles: int = 4) -> Sample:
    names = rng.sample(NAMES, needles)
    keys = [_number(rng) for _ in names]
    toks = [_enc(f" The pass key of {nm} is {k}. ") for nm, k in zip(names, keys)]
    tail = _enc(f" What is the pass key of {names[0]}? The pass key of {names[0]} is {keys[0]}")
    body = n - 1 - sum(len(t) for t in toks) - len(tail)
    depths = [depth] + [rng.random() for _ in names[1:]]
    ids = _assemble([BOS], _filler(text, body, rng), _place(body, list(zip(toks, depths))), tail)
    return Sample(torch.tensor(ids), keys[0], depth, len(tail))


def kv(n: int, depth: float, text: torch.Tensor, rng: random.Random) -> Sample:
    del text  # no filler: every line is a distractor

    def key() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))

    line = 4 + 2 + ANSWER_DIGITS + 1  # "abcd: 12345\n"
    probe = "Look up {}: {}"
    room = n - 1 - len(probe.format("abcd", "12345"))
    count = room // line
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < count:
        k = key()
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = [_number(rng) for _ in keys]
    asked = min(int(depth * count), count - 1)
    lines = "".join(f"{k}: {v}\n" for k, v in zip(keys, values))
    pad = "\n" * (room - count * line)  # blank lines make the length exact
    ids = [BOS] + _enc(pad + lines + probe.format(keys[asked], values[asked]))
    return Sample(torch.tensor(ids), values[asked], (len(pad) + asked * line) / n)


GENERATORS = {"passkey": passkey, "multikey": multikey, "kv": kv}


def make_samples(task: str, n: int, count: int, text: torch.Tensor, seed: int) -> list[Sample]:
    """``count`` samples of ``n`` tokens; the asked needle's depth is spread uniformly: ``(i + 0.5) / count``."""
    rng = random.Random(f"{task}:{n}:{seed}")
    out = [GENERATORS[task](n, (i + 0.5) / count, text, rng) for i in range(count)]
    for s in out:
        assert len(s.ids) == n, (task, n, len(s.ids))
        assert bytes(s.ids[-ANSWER_DIGITS:].tolist()).decode() == s.answer
    return out


def _repeat_row(n: int, text: torch.Tensor, rng: random.Random) -> list[int]:
    """``n`` tokens: filler, a segment, filler, the same segment again, filler. The segment (8 to n/3 tokens of
    text, or of random digits and letters, so copying must tell digits apart) and the gaps have random lengths, so
    the copy is found by content, not at a fixed distance."""
    k = rng.randint(8, max(8, n // 3))
    if rng.random() < 0.5:
        seg = _filler(text, k, rng)
    else:
        seg = _enc("".join(rng.choice("0123456789 0123456789 abcdefghijklmnopqrstuvwxyz") for _ in range(k)))
    free = n - 2 * k
    a = rng.randint(0, free)
    b = rng.randint(0, free - a)
    return _filler(text, a, rng) + seg + _filler(text, b, rng) + seg + _filler(text, free - a - b, rng)


def training_batches(
    text: torch.Tensor, batch: int, seq: int, seed: int, retrieval_share: float = 0.6, repeat_share: float = 0.1
):
    """Endless ``[batch, seq]`` training batches, with a ``[batch, seq]`` bool mask of the answer positions.

    Rows: a ``retrieval_share`` of samples of the three tasks (depths uniform at random; only ``passkey`` and
    ``kv`` below 240 tokens, where four needles do not fit), a ``repeat_share`` of "repeat" rows (a segment twice,
    at a random distance: :func:`_repeat_row`; they teach copying early), the others plain text windows. Every row
    starts with BOS."""
    rng = random.Random(seed)
    fitting = TASKS if seq >= 240 else ("passkey", "kv")
    while True:
        rows, masks = [], []
        for _ in range(batch):
            mask = torch.zeros(seq, dtype=torch.bool)
            u = rng.random()
            if u < retrieval_share:
                s = GENERATORS[rng.choice(fitting)](seq, rng.random(), text, rng)
                rows.append(s.ids)
                mask[-ANSWER_DIGITS:] = True
            elif u < retrieval_share + repeat_share:
                rows.append(torch.tensor([BOS] + _repeat_row(seq - 1, text, rng)))
            else:
                rows.append(torch.tensor([BOS] + _filler(text, seq - 1, rng)))
            masks.append(mask)
        yield torch.stack(rows), torch.stack(masks)
