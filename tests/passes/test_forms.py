"""Canonicalised attention forms (issue 13, section 3): each hand-written form of ``tests/zoo_forms.py`` is one site
with the right facts, FastMKA conversion is the original at init, MKA mode refuses what it does not support with a
reason, and a model whose attention is only partly found is not converted partly without being asked."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from zoo_forms import FORMS, HD, D, H, WhereKeep, _Base, _causal, example

import mka_compile
from mka_compile.conversion import ConversionError


@pytest.mark.parametrize("name", sorted(FORMS))
def test_form_is_one_site_with_its_facts(name):
    model, ex = example(name)
    report = mka_compile.inspect(model, ex)
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert site.kind == "self" and site.causal
    assert (site.num_heads, site.head_dim) == (H, HD if name != "latent" else 12)  # MLA: q/k head = nope + rope
    want = FORMS[name][1]
    for key, value in want.items():
        if key == "transforms":
            assert set(value) <= set(site.transforms), site.transforms
        elif key == "scale":
            assert site.scale == pytest.approx(value)
        else:
            assert getattr(site, key) == value, (key, getattr(site, key))
    attention_like = [r for r in report.not_attention if r.attention_like]
    assert not attention_like


@pytest.mark.parametrize("name", sorted(n for n in FORMS if n != "latent"))
def test_form_fastmka_identity_at_init(name):
    model, ex = example(name)
    conv = mka_compile.convert(copy.deepcopy(model), example_inputs=ex)
    with torch.no_grad():
        torch.testing.assert_close(conv(*ex), model(*ex), rtol=1e-5, atol=1e-6)


def test_latent_attention_refused_with_reason():
    model, ex = example("latent")
    with pytest.raises(ConversionError, match="multi-head latent attention"):
        mka_compile.convert(model, example_inputs=ex)
    assert not hasattr(model, "mka")


@pytest.mark.parametrize(
    "name, words",
    [
        ("softcap", "logit soft-capping"),
        ("sinks", "attention sinks"),
        ("alibi_add", "position bias"),
        ("baddbmm_alibi_where", "position bias"),
        ("sliding_window", "sliding-window"),
        ("chunked", "chunked"),
        ("differential", "differential attention"),
    ],
)
def test_mka_mode_refuses_unsupported_score_transforms(name, words):
    model, ex = example(name)
    with pytest.raises(ConversionError, match=words) as err:
        mka_compile.convert(model, mode="mka", example_inputs=ex)
    assert "use FastMKA" in str(err.value)
    assert "gating" not in str(err.value)
    assert not hasattr(model, "mka")


class _GatedQuery(_Base):
    """Attention the rules cannot take: the query is multiplied by a gate computed from the hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, H * HD)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q * torch.sigmoid(self.gate(x)).view(B, T, H, HD).transpose(1, 2)
        s = (q @ k.transpose(-1, -2) * HD**-0.5).masked_fill(~_causal(T), float("-inf"))
        return self.out(s.softmax(-1), v)


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = WhereKeep(), _GatedQuery()

    def forward(self, x):
        return self.b(x + self.a(x))


def test_partial_conversion_refused_unless_allowed():
    torch.manual_seed(0)
    model, x = _TwoLayers().eval(), torch.randn(2, 8, D)
    report = mka_compile.inspect(model, (x,))
    assert [s.name for s in report.sites] == ["a"]
    left = [r for r in report.not_attention if r.attention_like]
    assert [r.module for r in left] == ["b"]
    assert "gating" not in left[0].reason
    with pytest.raises(ConversionError, match="attention-like softmax .* left original.*allow_partial=True"):
        mka_compile.convert(model, example_inputs=(x,))
    assert not hasattr(model.a, "mka")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mka_compile.convert(model, example_inputs=(x,), allow_partial=True)
    assert any("partial conversion" in str(w.message) and "b:" in str(w.message) for w in seen)
    assert hasattr(model.a, "mka") and not hasattr(model.b, "mka")


def test_router_softmax_is_not_attention_like():
    from zoo_handwritten import MoERouter

    torch.manual_seed(0)
    model = MoERouter()
    x = torch.randn(2, 8, next(model.parameters()).shape[-1])
    report = mka_compile.inspect(model, (x,))
    assert report.not_attention and not any(r.attention_like for r in report.not_attention)
