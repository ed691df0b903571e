from __future__ import annotations

import torch
from torch import fx

from mka_compile.graph import ops
from mka_compile.graph.pattern import Match, any_, match, op, opt


class _M(torch.nn.Module):
    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.5
        s = s + mask
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def _graph():
    gm = fx.symbolic_trace(_M())
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return gm, out


def test_kinds_across_spellings() -> None:
    gm, out = _graph()
    kinds = [ops.kind(n, gm) for n in gm.graph.nodes]
    assert kinds.count("matmul") == 2 and "softmax" in kinds and "cast" in kinds and "transpose" in kinds


def test_optional_layers_commutative_and_captures() -> None:
    gm, out = _graph()
    scores = opt("mul", op("matmul", any_("q"), any_("kt")), name="scale")
    pat = op("matmul", op("softmax", opt("add", scores, any_("mask"), commutative=True)), any_("v"))
    m = Match(gm)
    assert match(pat, out, m), m.reason
    assert {"q", "kt", "v", "mask", "scale"} <= set(m.captures)
    assert m.captures["q"].name == "q" and m.captures["mask"].name == "mask"


def test_failure_says_why_and_how_far() -> None:
    gm, out = _graph()
    pat = op("matmul", op("softmax", op("einsum", any_("q"), any_("k"))), any_("v"))
    m = Match(gm)
    assert not match(pat, out, m)
    assert "expected einsum" in m.reason and m.progress >= 0


def test_check_callback_refuses_with_reason() -> None:
    gm, out = _graph()
    pat = op("matmul", any_("p"), any_("v"), check=lambda n, m: "refused for the test")
    m = Match(gm)
    assert not match(pat, out, m) and m.reason == "refused for the test"
