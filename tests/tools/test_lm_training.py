"""tools/paper/lm_training.py: corpora and tokenisation, the LR schedule, held-out perplexity over every token once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tools.paper import lm_training as T


class Bigram(nn.Module):
    """Logits depend on the current token only, so a token's NLL does not depend on its window."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


@pytest.mark.parametrize(("n", "seq", "cap"), [(101, 10, 0), (100, 10, 0), (57, 8, 30), (5, 16, 0)])
def test_heldout_nll_predicts_every_token_once(n: int, seq: int, cap: int) -> None:
    torch.manual_seed(0)
    m = Bigram(11)
    ids = torch.randint(0, 11, (n,))
    total, count = T.heldout_nll(m, ids, seq, cap, batch=3)
    used = ids[: cap + 1] if cap else ids
    with torch.no_grad():
        direct = F.cross_entropy(m(used[:-1]), used[1:], reduction="sum").item()
    assert count == len(used) - 1
    assert math.isclose(total, direct, rel_tol=1e-5)
    assert math.isclose(T.perplexity(m, ids, seq, cap), math.exp(direct / count), rel_tol=1e-5)
    assert m.training  # the mode is restored


def test_heldout_nll_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="seq must be >= 1"):
        T.heldout_nll(Bigram(3), torch.zeros(5, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        T.heldout_nll(Bigram(3), torch.zeros(1, dtype=torch.long), 4)


def test_corpora() -> None:
    sh = T.load_corpus("shakespeare")
    assert sh.vocab_size == 65 and int(sh.train.max()) < 65 and int(sh.heldout.min()) >= 0
    assert len(sh.train) + len(sh.heldout) == 1115394 and abs(len(sh.train) / 1115394 - 0.9) < 1e-5
    wt = T.load_corpus("wikitext2")
    assert wt.vocab_size == 256 and "validation" in wt.split and "test" in wt.split
    with pytest.raises(ValueError, match="corpus must be one of"):
        T.load_corpus("ptb")
    b = next(T.batches(sh.train, 3, 16, seed=0))
    assert b.shape == (3, 17) and torch.equal(b, next(T.batches(sh.train, 3, 16, seed=0)))


def test_lr_schedule() -> None:
    assert T.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert T.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert T.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert T.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert all(T.lr_at(s, 100, 1.0, 10) >= T.lr_at(s + 1, 100, 1.0, 10) for s in range(10, 100))
    assert T.median([3.0, 1.0, 2.0]) == 2.0 and T.median([4.0, 1.0, 2.0, 3.0]) == 2.5
