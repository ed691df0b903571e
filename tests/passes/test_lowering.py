"""Rule family ``lower.attention`` (passes/attention/lowering.py) run by PassManager on a dynamo graph: scale and
masks read from the site facts (``SiteFacts.scores``), the replacement verified, the reasons for sites kept."""

from __future__ import annotations

import pytest
import torch

from mka_compile.graph import ops
from mka_compile.graph.capture import capture
from mka_compile.graph.rules import PassError, PassManager
from mka_compile.passes.attention import RULES, find_sites
from mka_compile.passes.attention import lowering as L


class _Attention(torch.nn.Module):
    """Eager attention: scale, a masked_fill with ``fill``, softmax, ``@ v``."""

    def __init__(self, fill: float = float("-inf")) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.fill = fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = lambda t: t.view(2, 7, 2, 8).transpose(1, 2)  # noqa: E731
        s = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) * 8**-0.5
        p = torch.softmax(s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), self.fill), dim=-1)
        return p @ heads(self.v(x))


def _site(model: torch.nn.Module):
    torch._dynamo.reset()
    x = torch.randn(2, 7, 16)
    captured = capture(model.eval(), (x,), method="dynamo")
    (site,), _ = find_sites(captured, RULES)
    return captured, site, x


def test_scores_are_read_once_into_the_site_facts() -> None:
    _, site, _ = _site(_Attention())
    sc = site.scores
    assert sc.refused is None and sc.scale == pytest.approx(8**-0.5) and sc.factor is None
    assert sc.hide is site.match.captures["mask_fill"] and sc.additive is None and sc.keep is None
    _, site, _ = _site(_Attention(fill=0.0))
    assert "writes 0.0, not a mask value" in site.scores.refused


def test_lowering_runs_through_the_pass_manager() -> None:
    model = _Attention()
    captured, site, x = _site(model)
    plan = L.plan(site, captured, "mka")
    assert isinstance(plan, dict) and plan["scale"] == pytest.approx(8**-0.5) and plan["hide"] is site.scores.hide
    result = PassManager(L.rules({site.match.captures["out"]: plan}), keep_meta=True).run(captured.gm, captured.inputs)
    assert result.changes == {"lower.attention.eager": 1, "lower.attention.sdpa": 0}
    kinds = [ops.kind(n, captured.gm) for n in captured.gm.graph.nodes]
    assert "softmax" not in kinds and "masked_fill" not in kinds  # the matched ops are gone
    assert not any("val" in n.meta for n in captured.gm.graph.nodes)  # keep_meta: dynamo's metadata as it was
    out = captured.gm(*captured.inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_a_wrong_replacement_is_refused_by_the_verification() -> None:
    """A plan that hands the replacement the wrong operand (k^T as the values) fails the pass, which is named."""
    captured, site, _ = _site(_Attention())
    plan = {**L.plan(site, captured, "mka"), "v": site.match.captures["kt"]}  # (B, H, d, T) instead of (B, H, T, d)
    with pytest.raises(PassError, match=r"pass 'lower.attention.eager'"):
        PassManager(L.rules({site.match.captures["out"]: plan}), keep_meta=True).run(captured.gm, captured.inputs)
