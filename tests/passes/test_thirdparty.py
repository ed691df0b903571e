"""Third-party-style model code with its own KV caches (``tests/thirdparty``): detection, FastMKA identity at init,
and cached decoding equal to one full call with a non-zero gate."""

from __future__ import annotations

import copy

import pytest
import torch
from thirdparty import models
from zoo import randomize_mka

import mka_compile

CACHE = {"litgpt": "index_copy", "litgpt_softcap": "index_copy", "torchtune": "index_put"}
ROPE = {"litgpt": "partial_rotate_half", "litgpt_softcap": "partial_rotate_half", "torchtune": "interleaved"}


@pytest.mark.parametrize("name", models.NAMES)
def test_thirdparty_sites(name):
    model, _, spec = models.build(name)
    report = mka_compile.inspect(model, spec["example"])
    assert len(report.sites) == 2, str(report)
    for s in report.sites:
        assert (s.kind, s.causal, s.cache, s.rope) == ("self", True, CACHE[name], ROPE[name])
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 2, 16)
        assert ("softcap=30" in s.transforms) == (name == "litgpt_softcap")
    assert not [r for r in report.not_attention if r.attention_like]


@pytest.mark.parametrize("name", models.NAMES)
def test_thirdparty_fastmka_identity_and_decode(name):
    model, ids, spec = models.build(name)
    full_kw = spec["forward_kwargs"]
    with torch.no_grad():
        ref = model(ids, **full_kw)
    conv = mka_compile.convert(copy.deepcopy(model), example_inputs=spec["example"])
    with torch.no_grad():
        torch.testing.assert_close(conv(ids, **full_kw), ref, rtol=1e-5, atol=1e-6)
    randomize_mka(conv)
    with torch.no_grad():
        full = conv(ids, **full_kw)
    assert (full - ref).abs().max() > 1e-3  # the gate is live
    steps = spec["decode"](conv, ids)
    torch.testing.assert_close(steps, full[:, -steps.shape[1] :], rtol=1e-4, atol=1e-5)


def test_static_cache_refused_in_mka_mode_with_the_reason():
    model, _, spec = models.build("torchtune")  # a preallocated cache: the mask hides the future slots
    with pytest.raises(mka_compile.ConversionError, match=r"preallocated \(static\) KV cache"):
        mka_compile.convert(model, mode="mka", example_inputs=spec["example"])
    assert not mka_compile.memory_parameters(model)  # left as it was
