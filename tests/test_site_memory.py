"""SiteMemory's two CPU paths: the fused C++ memory path and the mka:: reference ops give the same model."""

from __future__ import annotations

import pytest
import torch
import zoo

import mka_compile
from mka_compile import MKAConfig
from mka_compile import kernels as K
from mka_compile.hf.compat import cache_kwargs, returned_cache
from mka_compile.sites.memory import SiteMemory

pytestmark = pytest.mark.skipif(not K.fastmka_memory_cpu.built(), reason="the fused extension did not build")

CFG = MKAConfig(chunk_size=4, top_r=2)


def _model(mode: str):
    model, _ = zoo.causal_lm("llama", "sdpa")
    mka_compile.convert(model, mode=mode, config=CFG)
    zoo.randomize_mka(model)
    return model


def _run(model, fused: bool, monkeypatch, fn):
    with monkeypatch.context() as mp:
        if not fused:
            mp.setattr(K.fastmka_memory_cpu, "supports", lambda *a: False)
        return fn(model)


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_fused_path_equals_reference_ops(mode, monkeypatch):
    """Padded batch, no grad and with grad (losses and every gradient: FastMKA's fused backward; MKA mode runs the
    reference ops under autograd), and cached decode after a prefill."""
    model = _model(mode)
    ids = torch.randint(1, 90, (2, 21))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding

    def forward(m):
        with torch.no_grad():
            return m(ids, attention_mask=mask).logits

    def train(m):
        m.zero_grad()
        loss = m(ids, attention_mask=mask, labels=ids, use_cache=False).loss  # no cache: the fused backward
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    def decode(m):
        with torch.no_grad():
            out = m(ids[:, :13], attention_mask=mask[:, :13], use_cache=True)
            cache = returned_cache(out)
            steps = [out.logits]
            for t in range(13, 21):
                out = m(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **cache_kwargs(m, cache))
                steps.append(out.logits)
            return torch.cat(steps, 1)

    for fn in (forward, decode):
        torch.testing.assert_close(_run(model, True, monkeypatch, fn), _run(model, False, monkeypatch, fn))
    loss_f, grads_f = _run(model, True, monkeypatch, train)
    loss_r, grads_r = _run(model, False, monkeypatch, train)
    torch.testing.assert_close(loss_f, loss_r)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_zero_states_stay_zero():
    """Fresh states share their zero tensors between calls; no path may write into them."""
    for mode in ("fastmka", "mka"):
        model = _model(mode)
        ids = torch.randint(1, 90, (2, 17))
        with torch.no_grad():
            model(ids, use_cache=False)
        model(ids, labels=ids, use_cache=False).loss.backward()
        mems = [m for m in model.modules() if isinstance(m, SiteMemory)]
        assert mems and all(m._zeros for m in mems)
        for m in mems:
            for st in m._zeros.values():
                for t in (st.n_seen, st.ema_k, st.ema_v, st.part_k, st.part_v, st.summ_k, st.summ_v):
                    assert not t.any()


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_eager_and_compiled_run_the_same_op(mode, monkeypatch):
    """A converted model's memory step is one op in eager runs and under torch.compile (no run-time switch on
    tracing): the op is called, and aot_eager gives the eager logits (and, FastMKA without a cache, gradients)."""
    model = _model(mode)
    ids = torch.randint(1, 90, (2, 13))
    name = "memory_levels" if mode == "mka" else "memory_mix"
    calls = []
    real = getattr(K.fastmka_memory_cpu, name)
    monkeypatch.setattr(K.fastmka_memory_cpu, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    assert len(calls) == model.config.num_hidden_layers
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        assert any(f"mka.{name}" in s for s in seen), seen
        torch.testing.assert_close(
            torch.compile(model, backend="aot_eager")(ids, use_cache=False).logits, eager, rtol=1e-5, atol=1e-5
        )
        if mode == "fastmka":
            grads = []
            for m in (model, torch.compile(model, backend="aot_eager")):
                model.zero_grad()
                m(ids, labels=ids, use_cache=False).loss.backward()
                grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            for a, b in zip(*grads):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()
